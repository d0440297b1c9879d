#!/usr/bin/env python3
"""Backfill throughput with many workers against a slow API.

    python3 bench/backfill.py [--no-build] [--postgres] [--windows 48] [--pages 4]
                              [--per-page 100] [--latency-ms 50] [--write]

A local threaded HTTP API (Python's ThreadingHTTPServer, keep-alive) answers
`GET /v1/events?since=S&until=U&page=N&per_page=M` with the events whose `at`
lies in [S, U) and their `total`, after `--latency-ms` per page, so each window
is exactly `--pages` requests. The range is `--windows` windows of one hour
from 2024-01-01T00:00:00Z, `pages x per_page` events each (default 48 windows
x 4 pages x 100 = 19,200 events, 192 requests; one worker needs at least
192 x 50 ms = 9.6 s of API latency).

The same `idemload backfill --window 1h` is timed with 1, 2, 4 and 8 worker
processes started at once, and with `--workers 2|4|8` in one process, each
from a fresh destination: a new SQLite file, or with `--postgres` a fresh
schema of IDEMLOAD_BENCH_POSTGRES (default IDEMLOAD_TEST_POSTGRES). After each
configuration it checks that every process exited 0, that `backfill --status`
counts every window done, that the table holds every event once, and that the
API answered exactly windows x pages requests (no window read twice). Prints
the throughput and its ratio to one process, and the latency floor
(ceil(windows / claimers) x pages x latency); `--write` puts the section into
bench/RESULTS.md (`backfill`). One session: the ratios are the measure, the
machine is shared.
"""

import argparse
import bisect
import datetime
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as R  # noqa: E402

TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(R.ROOT, "target")
IDEMLOAD = os.environ.get("IDEMLOAD") or os.path.join(TARGET, "release", "idemload")
START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
SCHEMA = "bench_backfill"


def instant(text):
    """A window bound: RFC 3339 (`Z` or an offset) or a date, as epoch seconds."""
    t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return t.timestamp()


class Api:
    """The events API; counts requests and pages per window."""

    def __init__(self, windows, per_window, latency):
        self.latency = latency
        self.lock = threading.Lock()
        self.requests = 0
        self.per_window = {}
        step = 3600 / per_window
        self.events = []
        for w in range(windows):
            for k in range(per_window):
                at = START + datetime.timedelta(seconds=w * 3600 + k * step)
                self.events.append((at.timestamp(), {
                    "id": w * 100_000 + k,
                    "at": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "account": f"acct-{(w * 7 + k) % 97}",
                    "amount": (w * 31 + k * 17) % 10_000 / 100,
                    "note": f"event {k} of window {w}",
                }))
        self.keys = [t for t, _ in self.events]
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                q = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
                try:
                    lo, hi = instant(q["since"]), instant(q["until"])
                except (KeyError, ValueError) as e:
                    return self.answer(400, {"error": f"bad window: {e}"})
                page, size = int(q.get("page", "1")), int(q.get("per_page", "100"))
                a, b = bisect.bisect_left(api.keys, lo), bisect.bisect_left(api.keys, hi)
                items = [e for _, e in api.events[a:b][(page - 1) * size: page * size]]
                time.sleep(api.latency)
                with api.lock:
                    api.requests += 1
                    api.per_window[(lo, hi)] = api.per_window.get((lo, hi), 0) + 1
                self.answer(200, {"items": items, "total": b - a})

            def answer(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self):
        with self.lock:
            self.requests = 0
            self.per_window = {}


def psql(url, sql):
    out = subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-Atqc", sql], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"psql: {out.stderr.strip()}")
    return out.stdout.strip()


class Destination:
    def __init__(self, pg_url, work):
        self.pg_url = pg_url
        self.work = work
        self.name = "PostgreSQL" if pg_url else "SQLite"

    def fresh(self):
        """A new empty destination; returns its URL."""
        if self.pg_url:
            psql(self.pg_url, f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}")
            sep = "&" if "?" in self.pg_url else "?"
            return f"{self.pg_url}{sep}schema={SCHEMA}"
        db = os.path.join(self.work, "bench.db")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.remove(db + suffix)
        return f"sqlite://{db}"

    def rows(self):
        if self.pg_url:
            return tuple(int(x) for x in psql(
                self.pg_url, f"SELECT count(*), count(DISTINCT id) FROM {SCHEMA}.events").split("|"))
        with sqlite3.connect(os.path.join(self.work, "bench.db")) as c:
            return c.execute("SELECT count(*), count(DISTINCT id) FROM events").fetchone()

    def drop(self):
        if self.pg_url:
            psql(self.pg_url, f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")


def write_pipeline(work, base, url):
    path = os.path.join(work, "events.toml")
    window = 'params = { since = "{window_start}", until = "{window_end}" }'
    with open(path, "w") as f:
        f.write(
            f'name = "bench_backfill"\n\n[source]\ntype = "http"\nurl = "{base}/v1/events"\n'
            f'records = "items"\n{window}\n\n'
            f'[source.pagination]\ntype = "page"\nsize = {ARGS.per_page}\ntotal_path = "total"\n\n'
            f'[destination]\nurl = "{url}"\ntable = "events"\n\n'
            '[load]\nkey = "id"\ncursor = "at"\n'
        )
    return path


def backfill_args(pipeline, windows, extra=()):
    to = (START + datetime.timedelta(hours=windows)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [IDEMLOAD, "backfill", pipeline, "--from", "2024-01-01T00:00:00Z", "--to", to,
            "--window", "1h", "--json", *extra]


def measure(dest, api, work, processes, workers):
    url = dest.fresh()
    pipeline = write_pipeline(work, api.base, url)
    api.reset()
    extra = ("--workers", str(workers)) if workers > 1 else ()
    cmd = backfill_args(pipeline, ARGS.windows, extra)
    start = time.monotonic()
    procs = [subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(processes)]
    outs = [p.communicate() for p in procs]
    wall = time.monotonic() - start
    loaded = 0
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"backfill exited {p.returncode}:\n{err[-3000:]}")
        report = json.loads(out)
        if report["windows_done"] != ARGS.windows:
            raise SystemExit(f"a process ended with {report['windows_done']} windows done: {report}")
        loaded += report["windows_loaded"]
    status = subprocess.run([IDEMLOAD, "backfill", pipeline, "--status", "--json"], cwd=work,
                            capture_output=True, text=True)
    done = json.loads(status.stdout)["done"] if status.stdout.strip() else None
    events = ARGS.windows * ARGS.pages * ARGS.per_page
    rows = dest.rows()
    problems = []
    if status.returncode != 0 or done != ARGS.windows:
        problems.append(f"--status exit {status.returncode}, done {done}")
    if loaded != ARGS.windows:
        problems.append(f"windows loaded {loaded}")
    if rows != (events, events):
        problems.append(f"rows {rows}")
    if api.requests != ARGS.windows * ARGS.pages:
        problems.append(f"requests {api.requests}")
    if problems:
        raise SystemExit(f"{processes} x --workers {workers}: expected {ARGS.windows} windows, "
                         f"{events} rows, {ARGS.windows * ARGS.pages} requests; got " + ", ".join(problems))
    return wall, api.requests


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--postgres", action="store_true", help="PostgreSQL instead of SQLite")
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--pages", type=int, default=4, help="pages per window")
    ap.add_argument("--per-page", type=int, default=100)
    ap.add_argument("--latency-ms", type=float, default=50)
    ap.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md")
    ARGS = ap.parse_args()
    if not ARGS.no_build:
        R.log("building the release idemload (cargo build --release --bin idemload)")
        subprocess.run(["cargo", "build", "--release", "--bin", "idemload"], cwd=R.ROOT, check=True)
    pg_url = None
    if ARGS.postgres:
        pg_url = os.environ.get("IDEMLOAD_BENCH_POSTGRES") or os.environ.get("IDEMLOAD_TEST_POSTGRES")
        if not pg_url:
            raise SystemExit("--postgres needs IDEMLOAD_BENCH_POSTGRES (or IDEMLOAD_TEST_POSTGRES)")
    latency = ARGS.latency_ms / 1000
    api = Api(ARGS.windows, ARGS.pages * ARGS.per_page, latency)
    work = tempfile.mkdtemp(prefix="idemload-bench-backfill-")
    dest = Destination(pg_url, work)
    configs = [(1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (1, 4), (1, 8)]
    results = []
    try:
        for processes, workers in configs:
            what = f"{processes} process{'es' if processes > 1 else ''}" if workers == 1 else f"1 process, --workers {workers}"
            R.log(f"{dest.name}: {what}")
            wall, requests = measure(dest, api, work, processes, workers)
            results.append((what, processes * workers, wall, requests))
    finally:
        dest.drop()
        shutil.rmtree(work, ignore_errors=True)
    events = ARGS.windows * ARGS.pages * ARGS.per_page
    base_wall = results[0][2]
    load = os.getloadavg()
    lines = [
        f"## Backfill with many workers ({dest.name})",
        "",
        f"Written by `python3 bench/backfill.py{' --postgres' if pg_url else ''} --windows {ARGS.windows} "
        f"--pages {ARGS.pages} --per-page {ARGS.per_page} --latency-ms {ARGS.latency_ms:g}`; one session,",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {R.machine()}, idemload {R.git_describe()} (release build).",
        f"A local threaded Python API answers each page after {ARGS.latency_ms:g} ms; {ARGS.windows} windows of one hour,",
        f"{ARGS.pages} pages of {ARGS.per_page} events each ({events:,} events, {ARGS.windows * ARGS.pages} requests);",
        "`idemload backfill --window 1h` into a fresh destination each time, its processes started at once.",
        "Checked after each: every window done, every event stored once, no window asked for twice.",
        "Floor: ceil(windows / claimers) x pages x latency, the API's latency alone.",
        f"Load average (1/5/15 min) at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (2 shared cores).",
        "",
        "| claimers | wall s | windows/s | events/s | vs 1 process | floor s | requests |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for what, claimers, wall, requests in results:
        floor = math.ceil(ARGS.windows / claimers) * ARGS.pages * latency
        lines.append(
            f"| {what} | {wall:.2f} | {ARGS.windows / wall:.1f} | {events / wall:,.0f} | "
            f"{base_wall / wall:.2f}x | {floor:.2f} | {requests} |"
        )
    text = "\n".join(lines)
    print(text)
    if ARGS.write:
        R.write_section("backfill", text)


if __name__ == "__main__":
    main()
