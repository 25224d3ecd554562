#!/usr/bin/python3
"""Keeps QD random 4 KiB FUA writes in flight on one NBD export for a while
and prints what it saw as one JSON object (iops, bytes, latency).

fio's nbd engine sends no FUA flag, hence this driver. It needs libnbd's
Python module (Debian: python3-libnbd), which lives in the system Python:
run it with /usr/bin/python3.

    nbd_fua.py nbd://127.0.0.1:10809/bench --qd 32 --seconds 10 [--bs 4096] [--no-fua]
"""

import argparse
import json
import random
import sys
import time

try:
    import nbd
except ImportError:
    sys.exit("nbd_fua.py: Python module 'nbd' missing (apt-get install python3-libnbd; run with /usr/bin/python3)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("uri")
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--bs", type=int, default=4096)
    ap.add_argument("--no-fua", action="store_true", help="plain writes (measures the driver's own ceiling)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    h = nbd.NBD()
    h.connect_uri(args.uri)
    fua = not args.no_fua
    if fua and not h.can_fua():
        print(f"nbd_fua.py: {args.uri} does not offer FUA", file=sys.stderr)
        return 1
    flags = nbd.CMD_FLAG_FUA if fua else 0
    blocks = h.get_size() // args.bs
    rng = random.Random(args.seed)
    buf = nbd.Buffer.from_bytearray(bytearray(rng.randbytes(args.bs)))

    # Commands are retired by polling rather than by completion callbacks:
    # a Python callback per write costs more than the whole NBD round trip.
    started = {}
    lats = []
    errors = 0

    def reap():
        nonlocal errors
        while started:
            cookie = h.aio_peek_command_completed()
            if cookie <= 0:
                return
            try:
                h.aio_command_completed(cookie)
            except nbd.Error:
                errors += 1
            lats.append(time.perf_counter() - started.pop(cookie))

    t0 = time.perf_counter()
    end = t0 + args.seconds
    while time.perf_counter() < end:
        while len(started) < args.qd:
            cookie = h.aio_pwrite(buf, rng.randrange(blocks) * args.bs, flags=flags)
            started[cookie] = time.perf_counter()
        h.poll(-1)
        reap()
    # What is in flight at the deadline still counts, and so does its time.
    while started:
        h.poll(-1)
        reap()
    elapsed = time.perf_counter() - t0
    h.shutdown()

    lats.sort()
    n = len(lats)

    def pct(p):
        return lats[min(n - 1, int(p / 100 * n))] * 1e6 if n else None

    out = {
        "uri": args.uri,
        "qd": args.qd,
        "bs": args.bs,
        "fua": fua,
        "ios": n,
        "errors": errors,
        "seconds": elapsed,
        "bytes": n * args.bs,
        "iops": n / elapsed,
        "bw_mib_s": n * args.bs / elapsed / 2**20,
        "lat_us_mean": sum(lats) / n * 1e6 if n else None,
        "lat_us_p50": pct(50),
        "lat_us_p99": pct(99),
    }
    print(json.dumps(out))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
