#!/usr/bin/env python3
"""Where `idemload serve`'s CPU goes: python3 bench/serve_cpu.py BIN RECORDS_PER_REQUEST N

Starts BIN's `serve` as bench/serve.py does (fresh `bench_serve` schema,
SERVE_CONNECTIONS database connections, CLIENTS client connections), sends 64
warm-up requests, then N requests of RECORDS_PER_REQUEST records, and prints
requests/s, p50/p99, the CPU per request of serve, of every postgres process
and of the load generator (from /proc), how busy the cores were, and the
requests per group transaction. Needs the release `examples/serve_load`
(SERVE_LOAD names another).
"""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as R  # noqa: E402
import serve as S  # noqa: E402


def ticks(pids):
    """User + system clock ticks of `pids` so far (0 for a process gone)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def postgres_pids():
    out = subprocess.run(["pgrep", "-f", "postgres"], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    binary, per, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    R.IDEMLOAD = binary
    S.psql(f"DROP SCHEMA IF EXISTS {S.SCHEMA} CASCADE; CREATE SCHEMA {S.SCHEMA}")
    workdir = os.path.join(R.OUT, "serve_cpu")
    os.makedirs(workdir, exist_ok=True)
    proc, url, _ = S.start_server(workdir)
    try:
        S.generate(url, 64, 1, 900_000_000)
        groups = S.group_sizes(url)
        hz = os.sysconf("SC_CLK_TCK")
        serve0, pg0, load0 = ticks([proc.pid]), ticks(postgres_pids()), os.times()
        started = time.time()
        result = S.generate(url, n, per, 0)
        wall = time.time() - started
        serve1, pg1, load1 = ticks([proc.pid]), ticks(postgres_pids()), os.times()
        after = S.group_sizes(url)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    serve_s, pg_s = (serve1 - serve0) / hz, (pg1 - pg0) / hz
    load_s = load1.children_user + load1.children_system - load0.children_user - load0.children_system
    per_request = lambda seconds: seconds / n * 1e6
    busy = (serve_s + pg_s + load_s) / wall / os.cpu_count() * 100
    group = (after[0] - groups[0]) / max(1.0, after[1] - groups[1])
    print(
        f"{binary}: {result['requests_per_s']:.0f} req/s (p50 {result['p50_ms']:.1f} ms, "
        f"p99 {result['p99_ms']:.1f} ms); CPU per request: serve {per_request(serve_s):.0f} µs, "
        f"postgres {per_request(pg_s):.0f} µs, load generator {per_request(load_s):.0f} µs; "
        f"cores {busy:.0f}% busy; {group:.1f} requests per transaction"
    )


if __name__ == "__main__":
    main()
