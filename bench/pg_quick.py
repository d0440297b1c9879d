#!/usr/bin/env python3
"""Quick PostgreSQL check: `psql \\copy` of the contacts CSV into an empty
table with a primary key (the ceiling) against `idemload load` of the same
file: first load, identical re-run, 10%-changed + 5%-new run. Prints wall
time, rows/s, ratio to the ceiling, peak RSS and WAL bytes of each.

Usage: bench/pg_quick.py DATA_DIR [ROWS]   (files from gen_contacts)
Env: PGURL (default the local socket, database test), IDEMLOAD (binary).
"""
import json, os, subprocess, sys, time

data, rows = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
url = os.environ.get("PGURL", "postgres://root@%2Fvar%2Frun%2Fpostgresql/test")
binary = os.environ.get("IDEMLOAD", "target/release/idemload")
# idemload reads the CSV, or the JSONL with EXT=jsonl; the ceiling always the CSV.
ext = os.environ.get("EXT", "csv")
csv = f"{data}/contacts_{rows}.csv"
source = f"{data}/contacts_{rows}.{ext}"
changed = f"{data}/contacts_{rows}_changed.{ext}"

def psql(sql):
    return subprocess.run(["psql", url, "-qtAc", sql], check=True, capture_output=True, text=True).stdout.strip()

def measure(name, cmd, n):
    psql("CHECKPOINT")
    lsn = psql("SELECT pg_current_wal_lsn()")
    start = time.time()
    out = subprocess.run(["/usr/bin/time", "-f", "%M %U %S"] + cmd, capture_output=True, text=True)
    wall = time.time() - start
    wal = int(float(psql(f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{lsn}')")))
    if out.returncode not in (0, 4):
        sys.exit(f"{name} failed: {out.stderr}")
    rss, user, system = out.stderr.strip().splitlines()[-1].split()
    rss, cpu = int(rss) // 1024, float(user) + float(system)
    stats = ""
    if out.stdout.strip().startswith("{"):
        r = json.loads(out.stdout)
        stats = f"ins {r['inserted']} upd {r['updated']} unch {r['unchanged']}"
    return name, wall, n / wall, rss, wal, stats, cpu

psql("DROP SCHEMA IF EXISTS bench_copy CASCADE; DROP SCHEMA IF EXISTS bench_idem CASCADE; CREATE SCHEMA bench_copy")
psql("""CREATE TABLE bench_copy.contacts (id bigint PRIMARY KEY, email text, first_name text,
        last_name text, company text, city text, country text, score double precision,
        active boolean, created_at timestamptz, updated_at timestamptz)""")
results = [measure("psql \\copy (ceiling)",
                   ["psql", url, "-qc", f"\\copy bench_copy.contacts FROM '{csv}' CSV HEADER"], rows)]
dest = f"{url}?schema=bench_idem"
load = [binary, "load", "--into", dest, "--table", "contacts", "--key", "id", "--json"]
results.append(measure("idemload first load", load[:2] + [source] + load[2:], rows))
results.append(measure("idemload identical re-run", load[:2] + [source] + load[2:], rows))
results.append(measure("idemload 10% changed, 5% new", load[:2] + [changed] + load[2:], rows * 21 // 20))
count = psql("SELECT count(*) || ' rows, ' || count(DISTINCT id) || ' distinct ids' FROM bench_idem.contacts")
ceiling = results[0][2]
print(f"| run | wall s | rows/s | x ceiling | peak RSS MB | WAL MB | stats | CPU s |")
print(f"| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
for name, wall, rate, rss, wal, stats, cpu in results:
    print(f"| {name} | {wall:.2f} | {rate:,.0f} | {rate / ceiling:.2f} | {rss} | {wal / 1e6:.1f} | {stats} | {cpu:.2f} |")
print(f"final table: {count}")
