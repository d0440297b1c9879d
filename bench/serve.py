#!/usr/bin/env python3
"""`idemload serve` benchmark: python3 bench/serve.py [--no-build] [--ones N] [--hundreds N]

Against the PostgreSQL of IDEMLOAD_BENCH_POSTGRES (default
postgres://root@127.0.0.1:5432/test), in a fresh schema: starts the release
`idemload serve` (one process, 8 connections, request logs at info into a
file), then the load generator `examples/serve_load` (bench/serve_load.rs)
sends, over 16 concurrent connections, N one-record requests, then N
hundred-record requests, each with its own Idempotency-Key, and reports
requests/s, records/s and p50/p99 latency. The hundred-record records are
also written to a JSONL file and loaded with `idemload load` into another
table of the same schema, for the records/s of a file load of the same
records. Results go into bench/RESULTS.md (section `serve`). SERVE_LOAD names
another serve_load binary (default target/release/examples/serve_load);
CLIENTS sets the client connections (default 16), SERVE_CONNECTIONS the
serve process's database connections (default 8).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as R  # noqa: E402

URL = os.environ.get("IDEMLOAD_BENCH_POSTGRES", "postgres://root@127.0.0.1:5432/test")
SCHEMA = "bench_serve"
CONNECTIONS = int(os.environ.get("SERVE_CONNECTIONS", "8"))
CLIENTS = os.environ.get("CLIENTS", "16")
LOAD = os.environ.get("SERVE_LOAD", os.path.join(R.ROOT, "target", "release", "examples", "serve_load"))


def psql(sql):
    out = subprocess.run(["psql", URL, "-v", "ON_ERROR_STOP=1", "-Atqc", sql], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"psql: {out.stderr.strip()}")
    return out.stdout.strip()


def dest_url():
    sep = "&" if "?" in URL else "?"
    return f"{URL}{sep}schema={SCHEMA}"


def start_server(workdir):
    pipeline = os.path.join(workdir, "ingest.toml")
    with open(pipeline, "w") as f:
        f.write(
            f'name = "bench_ingest"\n\n[destination]\nurl = "{dest_url()}"\ntable = "events"\n\n'
            f'[load]\nkey = "id"\n\n[serve]\nconnections = {CONNECTIONS}\n'
        )
    log_path = os.path.join(workdir, "serve.log")
    log = open(log_path, "w")
    proc = subprocess.Popen([R.IDEMLOAD, "serve", pipeline, "--listen", "127.0.0.1:0"], stderr=log, stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        with open(log_path) as f:
            m = re.search(r"on (http://\S+/v1/records)", f.read())
        if m:
            return proc, m.group(1), log_path
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"idemload serve did not start:\n{open(log_path).read()[-2000:]}")


def group_sizes(url):
    """(requests, transactions) of serve's group commit so far, from /metrics."""
    import urllib.request

    text = urllib.request.urlopen(url.replace("/v1/records", "/metrics")).read().decode()
    value = lambda name: float(next(l.rsplit(" ", 1)[1] for l in text.splitlines() if l.startswith(name)))
    try:
        return value("idemload_commit_group_requests_sum"), value("idemload_commit_group_requests_count")
    except StopIteration:  # a build without group commit
        return 0.0, 0.0


def with_groups(url, result, before):
    """Adds the mean requests per transaction since `before` to `result`."""
    after = group_sizes(url)
    requests, groups = after[0] - before[0], after[1] - before[1]
    result["group"] = f"{requests / groups:.1f}" if groups else "n/a"
    return after


def generate(url, requests, per_request, first_id, jsonl=None):
    cmd = [LOAD, "--url", url, "--connections", CLIENTS, "--requests", str(requests),
           "--per-request", str(per_request), "--first-id", str(first_id)]
    if jsonl:
        cmd += ["--jsonl", jsonl]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"serve_load failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--ones", type=int, default=5000, help="one-record requests")
    ap.add_argument("--hundreds", type=int, default=2000, help="hundred-record requests")
    args = ap.parse_args()
    if not args.no_build:
        R.log("building target/release/idemload and examples/serve_load")
        subprocess.run(["cargo", "build", "--release", "--bin", "idemload", "--example", "serve_load"], cwd=R.ROOT, check=True)
    os.makedirs(R.OUT, exist_ok=True)
    psql(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}")
    workdir = os.path.join(R.OUT, "serve")
    os.makedirs(workdir, exist_ok=True)
    proc, url, log_path = start_server(workdir)
    try:
        # A few requests first: the table exists and connections are open.
        generate(url, 32, 1, 900_000_000)
        groups = group_sizes(url)
        R.log(f"{args.ones} one-record requests")
        ones = generate(url, args.ones, 1, 0)
        groups = with_groups(url, ones, groups)
        R.log(f"{args.hundreds} hundred-record requests")
        jsonl = os.path.join(workdir, "hundreds.jsonl")
        hundreds = generate(url, args.hundreds, 100, 10_000_000, jsonl)
        with_groups(url, hundreds, groups)
    finally:
        proc.terminate()
        code = proc.wait(timeout=60)
    stored = int(psql(f"SELECT count(*) FROM {SCHEMA}.events"))
    want = 32 + args.ones + args.hundreds * 100
    if stored != want:
        raise SystemExit(f"events holds {stored} rows, expected {want}")
    R.log("idemload load of the same hundred-record records from a file")
    m = R.idemload_load(jsonl, dest_url(), "events_file", ("--key", "id"))
    records = args.hundreds * 100
    file_rate = records / m.wall
    load_avg = os.getloadavg()
    lines = [
        "## `idemload serve` (PostgreSQL)",
        "",
        f"Written by `python3 bench/serve.py --ones {args.ones} --hundreds {args.hundreds}`; one run.",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {R.machine()};",
        f"PostgreSQL {psql('SHOW server_version')}, idemload {R.git_describe()} (release build). One `idemload serve`",
        f"process ({CONNECTIONS} database connections, request logs at info to a file); `examples/serve_load`",
        f"(bench/serve_load.rs) on the same machine sends NDJSON requests over {CLIENTS} concurrent",
        "connections, each with its own `Idempotency-Key`, into a table with `key = \"id\"`",
        "(merge). Each request's transaction takes its key (an advisory lock) and reads its row, then",
        "its rows, rejects and response commit, alone or with the other requests waiting for a",
        f"writer (group commit: {max(1, CONNECTIONS // 4)} writers, up to 32 requests per transaction; the group sizes are",
        "read from `/metrics`). The file load is `idemload load` of the hundred-record requests' records",
        f"(one JSONL file, batches of 10,000) into another table. Server exit code after SIGTERM: {code}.",
        f"Load average (1/5/15 min) when the run ended: {load_avg[0]:.1f} / {load_avg[1]:.1f} / {load_avg[2]:.1f}",
        "(a shared 2-core machine: the server, PostgreSQL and the load generator share the cores).",
        "",
        "| requests | records each | requests/s | records/s | p50 ms | p99 ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in (ones, hundreds):
        lines.append(
            f"| {r['requests']:,} | {r['per_request']} | {r['requests_per_s']:,.0f} | {r['records_per_s']:,.0f} "
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
        )
    lines += [
        "",
        f"- `idemload load` of the same {records:,} records from a file: {m.wall:.2f} s, "
        f"{file_rate:,.0f} records/s; serve's hundred-record requests reach "
        f"{hundreds['records_per_s'] / file_rate:.2f}x that, one-record requests "
        f"{ones['records_per_s'] / file_rate:.3f}x.",
        f"- Requests per transaction (group commit): {ones['group']} for the one-record requests,",
        f"  {hundreds['group']} for the hundred-record ones.",
        "- The runs are seconds long on a shared machine: expect +-30% between runs.",
    ]
    R.write_section("serve", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
