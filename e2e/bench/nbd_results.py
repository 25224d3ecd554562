#!/usr/bin/env python3
"""Bookkeeping for nbd.sh: turns fio's JSON output (and nbd_fua.py's) into
one record per run, appended to a JSON-lines file, and at the end prints the
table and the ratios and writes the results as one JSON document.

    nbd_results.py fio  RUNS.jsonl FIO.json KEY=VALUE...   [--streams]
    nbd_results.py fua  RUNS.jsonl DRIVER.json KEY=VALUE...
    nbd_results.py bytes FIO.json           # bytes the (single) job wrote
    nbd_results.py report RUNS.jsonl META.json OUT.json

KEY=VALUE pairs (workload=…, phase=…, target=…, …) are stored with the
record; numbers are converted. Nothing here judges the figures: nbd.sh is a
benchmark, not a test.
"""

import json
import sys

MIB = 2**20


def kv(pairs):
    out = {}
    for p in pairs:
        k, _, v = p.partition("=")
        try:
            v = int(v)
        except ValueError:
            try:
                v = float(v)
            except ValueError:
                pass
        out[k] = v
    return out


def load_fio(path):
    """fio's JSON; the nbd engine prints a line to stdout, so nbd.sh uses --output."""
    with open(path) as f:
        text = f.read()
    return json.loads(text[text.index("{"):])


def job_figures(job):
    """One job's write figures. job_runtime includes end_fsync. With
    fdatasync=1, a write's latency is its write(2) plus its fdatasync, which
    fio reports apart ("sync"): both are added here."""
    w = job["write"]
    secs = job["job_runtime"] / 1000.0
    p99 = w.get("clat_ns", {}).get("percentile", {}).get("99.000000")
    lat = w["lat_ns"]["mean"]
    sync = job.get("sync", {})
    if sync.get("lat_ns", {}).get("N", 0) >= w["total_ios"] > 0:
        lat += sync["lat_ns"]["mean"]
        sp99 = sync["lat_ns"].get("percentile", {}).get("99.000000")
        p99 = (p99 or 0) + sp99 if sp99 else None
    return {
        "bytes": w["io_bytes"],
        "seconds": secs,
        "ios": w["total_ios"],
        "lat_us_mean": lat / 1000.0,
        "lat_us_p99": p99 / 1000.0 if p99 else None,
        "error": job.get("error", 0),
    }


def cmd_fio(runs, path, pairs, streams=False):
    d = load_fio(path)
    jobs = {j["jobname"]: job_figures(j) for j in d["jobs"]}
    rec = kv(pairs)
    if streams:
        # Two streams at once: the workload's bytes count once; the run
        # took as long as the slower stream (both wrote the same bytes).
        log, image = jobs["log"], jobs["image"]
        secs = max(log["seconds"], image["seconds"])
        nbytes = min(log["bytes"], image["bytes"])
        rec.update(
            bytes=nbytes,
            seconds=secs,
            ios=image["ios"] * nbytes // max(image["bytes"], 1),
            lat_us_mean=image["lat_us_mean"],
            lat_us_p99=image["lat_us_p99"],
            error=log["error"] or image["error"],
            streams={"log": log, "image": image},
        )
    else:
        (only,) = jobs.values()
        rec.update(only)
    finish(runs, rec)


def cmd_fua(runs, path, pairs):
    with open(path) as f:
        d = json.load(f)
    rec = kv(pairs)
    rec.update(
        bytes=d["bytes"],
        seconds=d["seconds"],
        ios=d["ios"],
        lat_us_mean=d["lat_us_mean"],
        lat_us_p99=d["lat_us_p99"],
        error=d["errors"],
    )
    finish(runs, rec)


def finish(runs, rec):
    secs = rec["seconds"] or float("nan")
    rec["mib_s"] = rec["bytes"] / MIB / secs
    rec["iops"] = rec["ios"] / secs
    with open(runs, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(
        f"  {rec.get('phase', ''):9} {rec.get('workload', ''):13} {rec.get('target', ''):14}"
        f" {rec['mib_s']:9.1f} MiB/s {rec['iops']:9.0f} IOPS"
        f"  ({rec['bytes'] / MIB:.0f} MiB in {rec['seconds']:.2f} s"
        + (f"; disk took {rec['disk_bytes'] / MIB:.0f} MiB)" if rec.get("disk_bytes", -1) >= 0 else ")")
    )
    if rec["error"]:
        print(f"  run reported error {rec['error']}", file=sys.stderr)
        sys.exit(1)


def cmd_bytes(path):
    (job,) = load_fio(path)["jobs"]
    print(job["write"]["io_bytes"])


# (column key, heading) of the throughput table, and the ratios reported.
TARGETS = [("mars", "mars"), ("qemu-nbd", "qemu-nbd"), ("fio-fs", "fio on fs"), ("two-stream", "2-stream")]
RATIOS = [("mars", "qemu-nbd"), ("mars", "fio-fs"), ("mars", "two-stream")]
WORKLOADS = ["seq-1M-QD1", "seq-1M-QD32", "rand-4K-QD1", "rand-4K-QD32"]


def cmd_report(runs_path, meta_path, out_path):
    with open(runs_path) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    with open(meta_path) as f:
        meta = json.load(f)
    # Repeated runs (bursts): the run with the median MiB/s stands for all.
    groups = {}
    for r in runs:
        groups.setdefault((r["phase"], r["workload"], r["target"]), []).append(r)
    by = {}
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["mib_s"])
        med = dict(rs[(len(rs) - 1) // 2])
        if len(rs) > 1:
            med["reps_mib_s"] = [r["mib_s"] for r in rs]
        by[key] = med

    ratios = []
    for phase in ("burst", "sustained"):
        for w in WORKLOADS:
            for a, b in RATIOS:
                ra, rb = by.get((phase, w, a)), by.get((phase, w, b))
                if ra and rb and rb["mib_s"] > 0:
                    ratios.append(
                        {"phase": phase, "workload": w, "ratio": f"{a}/{b}", "value": ra["mib_s"] / rb["mib_s"]}
                    )
    fua = {k[2]: r for k, r in by.items() if k[0] == "fua"}

    def fua_ratio(name, a, b):
        if a in fua and b in fua and fua[b]["iops"] > 0:
            ratios.append({"phase": "fua", "workload": "rand-4K", "ratio": name, "value": fua[a]["iops"] / fua[b]["iops"]})

    fua_ratio("mars-FUA-QD32/fdatasync-each", "mars-FUA-QD32", "fdatasync-each")
    fua_ratio("mars-FUA-QD32/fdatasync-each-append", "mars-FUA-QD32", "fdatasync-each-append")
    fua_ratio("mars-FUA-QD1/fdatasync-each-append", "mars-FUA-QD1", "fdatasync-each-append")
    fua_ratio("mars-FUA-QD32/mars-FUA-QD1", "mars-FUA-QD32", "mars-FUA-QD1")
    fua_ratio("mars-FUA-QD32/qemu-nbd-FUA-QD32", "mars-FUA-QD32", "qemu-nbd-FUA-QD32")
    rat = {(r["phase"], r["workload"], r["ratio"]): r["value"] for r in ratios}

    out = []
    out.append("")
    reps = meta["params"].get("burst_reps", 1)
    out.append(
        "Throughput: MiB/s (IOPS); ratios are of MiB/s. "
        + (f"Bursts: median of {reps} runs; the rest: one run each." if reps > 1 else "One run each.")
    )
    for phase in ("burst", "sustained"):
        out.append("")
        hdr = f"{phase:9} {'workload':13}" + "".join(f" {h:>17}" for k, h in TARGETS if phase == "sustained" or k != "two-stream")
        hdr += "".join(f" {a + '/' + b:>19}" for a, b in RATIOS if phase == "sustained" or b != "two-stream")
        out.append(hdr)
        for w in WORKLOADS:
            line = f"{'':9} {w:13}"
            for k, _ in TARGETS:
                if phase == "burst" and k == "two-stream":
                    continue
                r = by.get((phase, w, k))
                line += f" {r['mib_s']:8.1f} ({r['iops']:6.0f})" if r else f" {'-':>17}"
            for a, b in RATIOS:
                if phase == "burst" and b == "two-stream":
                    continue
                v = rat.get((phase, w, f"{a}/{b}"))
                line += f" {v:18.2f}x" if v is not None else f" {'-':>19}"
            out.append(line)
    if fua:
        out.append("")
        out.append("fua       4 KiB random writes, each durable before it completes")
        for name in ("mars-FUA-QD1", "mars-FUA-QD32", "qemu-nbd-FUA-QD32", "fdatasync-each",
                     "fdatasync-each-append", "driver-ceiling-QD32"):
            r = fua.get(name)
            if r:
                out.append(
                    f"          {name:22} {r['iops']:9.0f} IOPS  {r['mib_s']:7.1f} MiB/s"
                    f"  lat mean {r['lat_us_mean']:8.0f} us  p99 {r['lat_us_p99'] or 0:8.0f} us"
                )
        for r in ratios:
            if r["phase"] == "fua":
                out.append(f"          {r['ratio']:38} {r['value']:8.2f}x")
    sus = [r for r in runs if r["phase"] == "sustained" and r["target"] == "mars"]
    if sus:
        out.append("")
        out.append(
            f"sustained mars runs: bytes written, and the largest writeback backlog seen"
            f" (overlay limit {meta['params']['overlay_limit_bytes'] / MIB:.0f} MiB; sampled every 0.5 s)"
        )
        for r in sus:
            out.append(
                f"          {r['workload']:13} {r['bytes'] / MIB:8.0f} MiB written,"
                f" backlog up to {r.get('max_backlog_bytes', 0) / MIB:6.0f} MiB"
            )
    shares = sorted(r.get("others_cpu_share", 0) for r in runs)
    noisy = [s for s in shares if s > 0.25]
    out.append("")
    out.append(
        f"noise: CPU time outside the benchmark's processes (other work; also kernel threads, softirq and steal,"
        f" some of it for our I/O) per run: median {shares[len(shares) // 2]:.0%},"
        f" max {shares[-1]:.0%} of the CPUs; {len(noisy)} of {len(runs)} runs above 25%"
        + (": figures are noisy." if noisy else ".")
    )
    spread = [
        (k, max(r["reps_mib_s"]) / min(r["reps_mib_s"]))
        for k, r in by.items()
        if len(r.get("reps_mib_s", [])) > 1 and min(r["reps_mib_s"]) > 0
    ]
    if spread:
        k, worst = max(spread, key=lambda x: x[1])
        out.append(f"       repeated bursts differ by up to {worst:.1f}x (max/min MiB/s, {k[1]} on {k[2]}).")
    text = "\n".join(out)
    print(text)
    doc = {"meta": meta, "runs": runs, "ratios": ratios}
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "fio":
        streams = "--streams" in args
        args = [a for a in args if a != "--streams"]
        cmd_fio(args[0], args[1], args[2:], streams)
    elif cmd == "fua":
        cmd_fua(args[0], args[1], args[2:])
    elif cmd == "bytes":
        cmd_bytes(args[0])
    elif cmd == "report":
        cmd_report(*args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
