#!/usr/bin/env python3
"""Two or more `idemload` builds' `serve`, alternated in one session:

    python3 bench/serve_ab.py BIN_A,BIN_B [ROUNDS]

Each round starts each build's `serve` in turn on a fresh `bench_serve`
schema (as bench/serve.py does: 8 connections, 16 client connections), sends
32 warm-up requests, 3,000 one-record and 600 hundred-record requests, and
prints requests/s, records/s and latencies. Needs the release
`examples/serve_load` (`cargo build --release --example serve_load`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as R  # noqa: E402
import serve as S  # noqa: E402

ONES, HUNDREDS = 3000, 600


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    bins = sys.argv[1].split(",")
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    workdir = os.path.join(R.OUT, "serve_ab")
    os.makedirs(workdir, exist_ok=True)
    base = 0
    for _ in range(rounds):
        for binary in bins:
            R.IDEMLOAD = binary
            S.psql(f"DROP SCHEMA IF EXISTS {S.SCHEMA} CASCADE; CREATE SCHEMA {S.SCHEMA}")
            proc, url, _ = S.start_server(workdir)
            try:
                S.generate(url, 32, 1, 900_000_000 + base)
                groups = S.group_sizes(url)
                ones = S.generate(url, ONES, 1, base)
                groups = S.with_groups(url, ones, groups)
                hundreds = S.generate(url, HUNDREDS, 100, 10_000_000 + base * 100)
                S.with_groups(url, hundreds, groups)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            base += 1_000_000
            print(
                f"{binary}: one-record {ones['requests_per_s']:.0f} req/s "
                f"(p50 {ones['p50_ms']:.1f} ms, p99 {ones['p99_ms']:.1f} ms); "
                f"hundred-record {hundreds['records_per_s']:.0f} records/s "
                f"(p50 {hundreds['p50_ms']:.1f} ms); requests per transaction "
                f"{ones['group']} / {hundreds['group']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
