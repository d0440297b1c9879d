#!/usr/bin/env python3
"""Writeback benchmark: records/s into a fake CRM with 50 ms of latency per
request, at concurrency 1 and 8, and API calls per record on a first run and
on an unchanged re-run.

    python3 bench/writeback.py [--records 200] [--latency-ms 50]

Builds the release binary and the fake_crm example, starts the CRM on a free
port of 127.0.0.1, and prints a markdown table (also appended to
bench/RESULTS.md between writeback markers).
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pipeline(binary, workdir):
    started = time.monotonic()
    out = subprocess.run([binary, "run", "crm.toml", "--json"], cwd=workdir, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    if out.returncode != 0:
        sys.exit(f"idemload failed: {out.stderr}")
    return json.loads(out.stdout), elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--latency-ms", type=int, default=50)
    args = ap.parse_args()
    print("building release binary and fake_crm ...", flush=True)
    subprocess.run(["cargo", "build", "--release", "-q", "--bin", "idemload", "--example", "fake_crm"], cwd=ROOT, check=True)
    binary = str(ROOT / "target/release/idemload")
    rows = []
    for concurrency in (1, 8):
        port = free_port()
        crm = subprocess.Popen([str(ROOT / "target/release/examples/fake_crm"), str(port), str(args.latency_ms)], stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        try:
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, "contacts.jsonl"), "w") as f:
                    for i in range(1, args.records + 1):
                        f.write(json.dumps({"id": i, "email": f"c{i}@example.com", "name": f"Contact {i}"}) + "\n")
                Path(d, "crm.toml").write_text(
                    f'''name = "bench"
[source]
type = "file"
path = "contacts.jsonl"
[load]
key = ["email"]
[destination]
type = "http"
base_url = "http://127.0.0.1:{port}"
lookup = {{ method = "GET", path = "/contacts/search?email={{email}}", id = "results.0.id" }}
create = {{ method = "POST", path = "/contacts", body = {{ email = "{{email}}", name = "{{name}}" }} }}
update = {{ method = "PATCH", path = "/contacts/{{remote_id}}", body = {{ name = "{{name}}" }} }}
ledger = "sqlite://ledger.db"
concurrency = {concurrency}
''')
                first, t1 = run_pipeline(binary, d)
                second, t2 = run_pipeline(binary, d)
                n = args.records
                rows.append((concurrency, n, t1, n / t1, first.get("api_requests", 0) / n, t2, second.get("api_requests", 0) / n, first["inserted"], second["unchanged"]))
                print(f"concurrency {concurrency}: first run {t1:.2f}s, re-run {t2:.2f}s", flush=True)
        finally:
            crm.kill()
    lines = [
        f"Fake CRM (`examples/fake_crm.rs`) with {args.latency_ms} ms of latency per request; {args.records} new contacts, each needing a lookup and a create.",
        "",
        "| concurrency | records | first run s | records/s | API calls per record | unchanged re-run s | API calls per record on re-run |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c, n, t1, rps, calls1, t2, calls2, _, _ in rows:
        lines.append(f"| {c} | {n} | {t1:.2f} | {rps:.1f} | {calls1:.2f} | {t2:.2f} | {calls2:.2f} |")
    table = "\n".join(lines)
    print(table)
    results = ROOT / "bench/RESULTS.md"
    text = results.read_text() if results.exists() else "# idemload benchmark results\n"
    block = f"<!-- writeback:begin -->\n## HTTP destination (writeback)\n\n{table}\n<!-- writeback:end -->"
    if "<!-- writeback:begin -->" in text:
        text = re.sub(r"<!-- writeback:begin -->.*?<!-- writeback:end -->", block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    results.write_text(text)


if __name__ == "__main__":
    main()
