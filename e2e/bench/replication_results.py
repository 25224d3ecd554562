#!/usr/bin/env python3
"""Helpers of replication.sh: polls of `marsadm view --json`, the lag
sampler, fio's and iperf3's JSON, and the final table and results JSON.

    replication_results.py status MARSADM ROOT RES NODE
        one line: the resource's log.appended on ROOT's node, then NODE's
        replica entry: fetched applied lag_bytes lag_seconds
    replication_results.py catchup MARSADM ROOT RES NODE TARGET TIMEOUT [CMD...]
        reads NODE's applied (as ROOT's node sees it), starts the clock,
        runs CMD (e.g. marsadm resume-fetch), then polls every 0.05 s until
        applied reaches TARGET; prints "seconds applied_at_start
        applied_at_end"; exit 1 on timeout
    replication_results.py sample MARSADM ROOT RES NODE INTERVAL OUT.jsonl [NODE_ROOT]
        appends {t, appended, fetched, applied, lag_bytes, lag_seconds}
        every INTERVAL s until SIGTERM (NODE's entry as ROOT's node sees it,
        by gossip); with NODE_ROOT also NODE's own view of itself, right
        after: {t_own, own_fetched, own_applied} (no gossip delay)
    replication_results.py fio FIO.json         bytes seconds mib_s iops p99_us
    replication_results.py streams FIO.json     per-stream bytes / slowest job
    replication_results.py iperf IPERF.json     bits per second (received)
    replication_results.py lagstats OUT.jsonl   percentiles of the samples:
        the gossip view (lag_bytes, lag_seconds as ROOT's node reports
        them), and, when sampled with NODE_ROOT, the apply lag itself:
        bytes = appended on ROOT - applied on NODE (NODE's own view), and
        seconds = how long before NODE had applied position X the primary
        had appended X (appended interpolated between samples)
    replication_results.py report META.json OUT.json KEY=VALUE...

Nothing here judges the figures: replication.sh is a benchmark, not a test.
"""

import json
import signal
import subprocess
import sys
import time

# Shared with the NBD benchmark: key=value arguments and fio's JSON.
from nbd_results import MIB, job_figures, kv, load_fio  # noqa: E402


def view(marsadm, root, res):
    out = subprocess.run(
        [marsadm, "--root", root, "view", res, "--json"],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout
    r = json.loads(out)["resources"][0]
    return r


def replica(r, node):
    for x in r.get("replicas", []):
        if x.get("node") == node:
            return x
    raise SystemExit(f"replica {node} not in the view of {r.get('name')}")


def cmd_status(marsadm, root, res, node):
    r = view(marsadm, root, res)
    x = replica(r, node)
    print(r["log"]["appended"], x["fetched"], x["applied"], x.get("lag_bytes", 0),
          x.get("lag_seconds", 0.0))


def cmd_catchup(marsadm, root, res, node, target, timeout, *cmd):
    target, timeout = int(target), float(timeout)
    start = replica(view(marsadm, root, res), node)["applied"]
    t0 = time.monotonic()
    if cmd:
        subprocess.run(cmd, check=True, timeout=60, stdout=subprocess.DEVNULL)
    applied = start
    while True:
        try:
            applied = replica(view(marsadm, root, res), node)["applied"]
        except (subprocess.SubprocessError, ValueError, KeyError):
            pass
        if applied >= target:
            print(f"{time.monotonic() - t0:.3f} {start} {applied}")
            return 0
        if time.monotonic() - t0 > timeout:
            print(f"{time.monotonic() - t0:.3f} {start} {applied}")
            return 1
        time.sleep(0.05)


def cmd_sample(marsadm, root, res, node, interval, out, node_root=None):
    interval = float(interval)
    # A flag, not sys.exit: a SystemExit raised inside the loop's try would
    # be swallowed with a failed `view`, and the sampler would never stop.
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    with open(out, "a") as f:
        t0 = time.monotonic()
        n = 0
        while not stop:
            try:
                t = time.monotonic() - t0
                r = view(marsadm, root, res)
                x = replica(r, node)
                row = {
                    "t": round(t, 3),
                    "appended": r["log"]["appended"],
                    "fetched": x["fetched"], "applied": x["applied"],
                    "lag_bytes": x.get("lag_bytes", 0),
                    "lag_seconds": x.get("lag_seconds", 0.0),
                }
                if node_root:
                    t_own = time.monotonic() - t0
                    own = view(marsadm, node_root, res)["log"]
                    row.update(t_own=round(t_own, 3), own_fetched=own["fetched"],
                               own_applied=own["applied"])
                f.write(json.dumps(row) + "\n")
                f.flush()
            except (subprocess.SubprocessError, ValueError, KeyError, SystemExit):
                pass
            n += 1
            # Fixed schedule: a slow `view` does not stretch the period.
            time.sleep(max(0.0, t0 + n * interval - time.monotonic()))


def cmd_fio(path):
    figs = [job_figures(j) for j in load_fio(path)["jobs"]]
    b = sum(f["bytes"] for f in figs)
    s = max(max(f["seconds"] for f in figs), 1e-6)
    ios = sum(f["ios"] for f in figs)
    p99 = max((f["lat_us_p99"] or 0) for f in figs)
    print(b, f"{s:.3f}", f"{b / MIB / s:.1f}", f"{ios / s:.0f}", f"{p99:.0f}")


def cmd_streams(path):
    """N concurrent streams of the same bytes: the replicated bytes once,
    over the slowest stream's time (which includes its final fsync)."""
    figs = [job_figures(j) for j in load_fio(path)["jobs"]]
    b = min(f["bytes"] for f in figs)
    s = max(max(f["seconds"] for f in figs), 1e-6)
    per = " ".join(f"{f['bytes'] / MIB / max(f['seconds'], 1e-6):.1f}" for f in figs)
    print(b, f"{s:.3f}", f"{b / MIB / s:.1f}", per)


def cmd_iperf(path):
    with open(path) as f:
        d = json.load(f)
    print(int(d["end"]["sum_received"]["bits_per_second"]))


def pct(vals, p):
    if not vals:
        return None
    v = sorted(vals)
    i = min(len(v) - 1, max(0, int(round(p / 100.0 * (len(v) - 1)))))
    return v[i]


def appended_at(rows, pos):
    """When the primary's log first reached pos: linear interpolation
    between the samples around it (None if never)."""
    prev = None
    for r in rows:
        if r["appended"] >= pos:
            if prev is None or r["appended"] == prev["appended"]:
                return r["t"]
            f = (pos - prev["appended"]) / (r["appended"] - prev["appended"])
            return prev["t"] + f * (r["t"] - prev["t"])
        prev = r
    return None


def cmd_lagstats(path):
    """Prints: n, gossip-view bytes p50 p99 max, seconds p50 p99 max, zero
    samples, then the apply lag (own view): bytes p50 p99 max, seconds p50
    p99 max (all 0 when the samples have no own view)."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    lb = [r["lag_bytes"] for r in rows]
    ls = [r["lag_seconds"] for r in rows]
    own = [r for r in rows if "own_applied" in r]
    ob = [max(0, r["appended"] - r["own_applied"]) for r in own]
    os_ = []
    for r in own:
        if r["own_applied"] >= r["appended"]:
            os_.append(0.0)
            continue
        # The first byte not yet applied: since when has the primary had it?
        t = appended_at(rows, r["own_applied"] + 1)
        if t is not None:
            os_.append(max(0.0, r["t_own"] - t))
    print(len(rows), pct(lb, 50) or 0, pct(lb, 99) or 0, max(lb or [0]),
          f"{pct(ls, 50) or 0:.3f}", f"{pct(ls, 99) or 0:.3f}", f"{max(ls or [0]):.3f}",
          sum(1 for x in lb if x == 0),
          pct(ob, 50) or 0, pct(ob, 99) or 0, max(ob or [0]),
          f"{pct(os_, 50) or 0:.3f}", f"{pct(os_, 99) or 0:.3f}", f"{max(os_ or [0]):.3f}")


def cpu_runs(path):
    """iops_run's CPU lines: run -> {marsd_a, marsd_b, user, system,
    irq_softirq, idle}."""
    keys = ("marsd_a", "marsd_b", "user", "system", "irq_softirq", "idle")
    runs = {}
    try:
        for line in open(path):
            f = line.split()
            if len(f) == 7:
                runs[f[0]] = dict(zip(keys, map(float, f[1:])))
    except (OSError, TypeError, ValueError):
        pass
    return runs


def cmd_report(meta_path, out_path, pairs):
    v = kv(pairs)
    with open(meta_path) as f:
        meta = json.load(f)

    def g(k):
        return v.get(k)

    def ratio(a, b):
        return round(a / b, 3) if a is not None and b else None

    net_mib = g("net_bits_s") / 8 / MIB if g("net_bits_s") else None
    ceiling = min(x for x in (net_mib, g("disk_mib_s")) if x) if (net_mib or g("disk_mib_s")) else None
    results = {
        "ceilings": {
            "network_bits_s": g("net_bits_s"),
            "network_mib_s": round(net_mib, 1) if net_mib else None,
            "disk_four_stream_mib_s": g("disk_mib_s"),
            "disk_four_stream_per_stream_mib_s": g("disk_streams"),
            "disk_four_stream_bytes_each": g("disk_bytes"),
            "disk_four_stream_seconds": g("disk_seconds"),
            "disk_two_stream_mib_s": g("disk2_mib_s"),
            "disk_two_stream_per_stream_mib_s": g("disk2_streams"),
            "replication_ceiling_mib_s": round(ceiling, 1) if ceiling else None,
        },
        "shipping": {
            "bytes_written": g("ship_bytes"),
            "primary_write_mib_s": g("ship_write_mib_s"),
            "primary_write_seconds": g("ship_write_seconds"),
            "log_bytes_to_ship": g("ship_log_bytes"),
            "catchup_seconds": g("catchup_seconds"),
            "catchup_mib_s": g("catchup_mib_s"),
            "catchup_timed_out": bool(g("catchup_timed_out")),
        },
        "lag": {
            "target_rate_mib_s": g("lag_rate_mib_s"),
            "achieved_write_mib_s": g("lag_write_mib_s"),
            "seconds": g("lag_s"),
            "samples": g("lag_samples"),
            "samples_zero_lag": g("lag_zero"),
            "lag_bytes_p50": g("lag_b50"), "lag_bytes_p99": g("lag_b99"),
            "lag_bytes_max": g("lag_bmax"),
            "lag_seconds_p50": g("lag_s50"), "lag_seconds_p99": g("lag_s99"),
            "lag_seconds_max": g("lag_smax"),
            "drain_seconds_after": g("lag_drain_seconds"),
            "apply_lag_bytes_p50": g("apply_b50"), "apply_lag_bytes_p99": g("apply_b99"),
            "apply_lag_bytes_max": g("apply_bmax"),
            "apply_lag_seconds_p50": g("apply_s50"), "apply_lag_seconds_p99": g("apply_s99"),
            "apply_lag_seconds_max": g("apply_smax"),
        },
        "slow_link": {
            "throttle_bits_s": g("tbf_bits_s"),
            "iops_unthrottled": g("iops_fast"), "iops_throttled": g("iops_slow"),
            "iops_unthrottled_before": g("iops_fast1"), "iops_unthrottled_after": g("iops_fast2"),
            "iops_secondary_paused": g("iops_paused"), "p99_us_secondary_paused": g("iops_paused_p99"),
            # CPUs busy (CPU-seconds per second) during each run.
            "cpu": cpu_runs(g("cpu_file")),
            "mib_s_unthrottled": g("iops_fast_mib_s"), "mib_s_throttled": g("iops_slow_mib_s"),
            "p99_us_unthrottled": g("iops_fast_p99"), "p99_us_throttled": g("iops_slow_p99"),
            "log_mib_s_unthrottled": g("fast_log_mib_s"), "log_mib_s_throttled": g("slow_log_mib_s"),
            "secondary_unfetched_bytes_after_unthrottled": g("fast_unfetched_after"),
            "secondary_lag_bytes_after_unthrottled": g("fast_lag_after"),
            "secondary_unfetched_bytes_after_throttled": g("slow_unfetched_after"),
            "secondary_lag_bytes_after_throttled": g("slow_lag_after"),
        },
    }
    ratios = {
        "catchup_vs_ceiling": ratio(g("catchup_mib_s"), ceiling),
        "catchup_vs_network": ratio(g("catchup_mib_s"), net_mib),
        "catchup_vs_disk": ratio(g("catchup_mib_s"), g("disk_mib_s")),
        "catchup_vs_two_stream_ceiling": ratio(
            g("catchup_mib_s"), min(x for x in (net_mib, g("disk2_mib_s")) if x)
            if (net_mib or g("disk2_mib_s")) else None),
        "iops_throttled_vs_unthrottled": ratio(g("iops_slow"), g("iops_fast")),
        "iops_unthrottled_vs_paused": ratio(g("iops_fast"), g("iops_paused")),
        "iops_throttled_vs_paused": ratio(g("iops_slow"), g("iops_paused")),
    }
    doc = {"meta": meta, "results": results, "ratios": ratios}
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")

    def fmt(x, unit=""):
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:,.1f}{unit}" if abs(x) >= 10 else f"{x:.3f}{unit}"
        return f"{x:,}{unit}"

    rows = [
        ("ceiling", "network (iperf3 A→B)", fmt(net_mib, " MiB/s"),
         f"{g('net_bits_s') / 1e9:.2f} Gbit/s" if g("net_bits_s") else ""),
        ("ceiling", "disk: 4 streams at once", fmt(g("disk_mib_s"), " MiB/s"),
         f"streams {g('disk_streams')} MiB/s"),
        ("ceiling", "disk: B's 2 streams", fmt(g("disk2_mib_s"), " MiB/s"),
         f"streams {g('disk2_streams')} MiB/s (what the catch-up runs)"),
        ("ceiling", "min(network, disk 4 streams)", fmt(ceiling, " MiB/s"), ""),
        ("shipping", "primary write, B paused", fmt(g("ship_write_mib_s"), " MiB/s"),
         f"{fmt(g('ship_bytes') / MIB if g('ship_bytes') else None)} MiB seq 1M QD32"),
        ("shipping", "catch-up (fetch+apply)", fmt(g("catchup_mib_s"), " MiB/s"),
         f"{fmt(g('ship_log_bytes') / MIB if g('ship_log_bytes') else None)} MiB in {fmt(g('catchup_seconds'), ' s')}"
         + (" TIMED OUT" if g("catchup_timed_out") else "")),
        ("lag", f"at {fmt(g('lag_rate_mib_s'))} MiB/s for {g('lag_s')} s",
         f"p50 {fmt(g('lag_b50'))} B", f"p99 {fmt(g('lag_b99'))} B, max {fmt(g('lag_bmax'))} B"),
        ("lag", "lag_seconds", f"p50 {fmt(g('lag_s50'), ' s')}",
         f"p99 {fmt(g('lag_s99'), ' s')}, max {fmt(g('lag_smax'), ' s')}; "
         f"{g('lag_samples')} samples, {g('lag_zero')} at 0; achieved {fmt(g('lag_write_mib_s'))} MiB/s (as A reports it, by gossip)"),
        ("lag", "apply lag bytes (B's own)", f"p50 {fmt(g('apply_b50'))} B",
         f"p99 {fmt(g('apply_b99'))} B, max {fmt(g('apply_bmax'))} B (A's appended - B's applied)"),
        ("lag", "apply lag seconds", f"p50 {fmt(g('apply_s50'), ' s')}",
         f"p99 {fmt(g('apply_s99'), ' s')}, max {fmt(g('apply_smax'), ' s')} (since A had appended what B applies next)"),
        ("slow link", "rand-4K-QD32 unthrottled", fmt(g("iops_fast"), " IOPS"),
         f"mean of before {fmt(g('iops_fast1'))} and after {fmt(g('iops_fast2'))}; first run: p99 {fmt(g('iops_fast_p99'))} µs, log {fmt(g('fast_log_mib_s'))} MiB/s; at the end B has "
         f"{fmt(g('fast_unfetched_after'))} B unfetched, {fmt(g('fast_lag_after'))} B unapplied"),
        ("slow link", f"throttled to {fmt(g('tbf_bits_s') / 1e6 if g('tbf_bits_s') else None)} Mbit/s",
         fmt(g("iops_slow"), " IOPS"),
         f"p99 {fmt(g('iops_slow_p99'))} µs, log {fmt(g('slow_log_mib_s'))} MiB/s; at the end B has "
         f"{fmt(g('slow_unfetched_after'))} B unfetched, {fmt(g('slow_lag_after'))} B unapplied"),
        ("slow link", "B's fetching paused", fmt(g("iops_paused"), " IOPS"),
         f"p99 {fmt(g('iops_paused_p99'))} µs (the primary alone; B catches up afterwards)"),
    ]
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    print()
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip())
    print()
    print("ratios:")
    goals = {
        "catchup_vs_ceiling": "catch-up / min(network, disk 4 streams)",
        "catchup_vs_network": "catch-up / network",
        "catchup_vs_disk": "catch-up / disk (4 streams)",
        "catchup_vs_two_stream_ceiling": "catch-up / min(network, disk 2 streams)",
        "iops_throttled_vs_unthrottled": "writer IOPS, slow link / fast link (mean) (goal ≥ 0.9)",
        "iops_unthrottled_vs_paused": "writer IOPS, fast link / B paused",
        "iops_throttled_vs_paused": "writer IOPS, slow link / B paused",
    }
    for k, text in goals.items():
        print(f"  {text:<50} {fmt(ratios[k])}")


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "status":
        cmd_status(*args)
    elif cmd == "catchup":
        return cmd_catchup(*args)
    elif cmd == "sample":
        cmd_sample(*args)
    elif cmd == "fio":
        cmd_fio(*args)
    elif cmd == "streams":
        cmd_streams(*args)
    elif cmd == "iperf":
        cmd_iperf(*args)
    elif cmd == "lagstats":
        cmd_lagstats(*args)
    elif cmd == "report":
        cmd_report(args[0], args[1], args[2:])
    else:
        raise SystemExit(f"unknown command {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
