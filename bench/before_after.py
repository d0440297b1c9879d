#!/usr/bin/env python3
"""Two builds of idemload compared in one session on PostgreSQL and MariaDB:
bench/pg_quick.py (ceiling `psql \\copy`, first load, identical re-run, 10%
changed + 5% new; idemload reads the JSONL) and bench/mysql.sh (ceiling `LOAD
DATA LOCAL INFILE`, the same three runs) with each binary in turn, the order
alternating round by round (A B, B A, A B, ...) so that drift in the shared
machine's load falls on both. Each scenario's ratio is to the ceiling measured
in the same script run, just before it.

Usage: bench/before_after.py DATA_DIR BEFORE_BIN AFTER_BIN [ROUNDS] [ROWS]
Env: PGURL (default postgres://root@127.0.0.1:5432/test), MySQL as bench/mysql.sh.
Prints Markdown: the median wall and ratio of each scenario per build, and every
round's ratios.
"""
import os, re, statistics, subprocess, sys, tempfile

BENCH = os.path.dirname(os.path.abspath(__file__))
data, before, after = sys.argv[1:4]
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
rows = int(sys.argv[5]) if len(sys.argv) > 5 else 1_000_000
pgurl = os.environ.get("PGURL", "postgres://root@127.0.0.1:5432/test")
builds = {"before": before, "after": after}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def pg(binary):
    env = dict(os.environ, IDEMLOAD=binary, PGURL=pgurl, EXT="jsonl")
    out = subprocess.run([sys.executable, os.path.join(BENCH, "pg_quick.py"), data, str(rows)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"pg_quick failed: {out.stdout}\n{out.stderr}")
    found = []
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and re.fullmatch(r"[\d.]+", cells[1]):
            found.append((cells[0], float(cells[1]), float(cells[3])))
    return found


def mysql(binary):
    with tempfile.NamedTemporaryFile("r", suffix=".md") as tf:
        env = dict(os.environ, BIN=binary, N=str(rows), OUT=tf.name, DATA=data)
        out = subprocess.run(["bash", os.path.join(BENCH, "mysql.sh")], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"mysql.sh failed: {out.stdout}\n{out.stderr}")
        text = tf.read()
    found = []
    for line in text.splitlines():
        m = re.match(r"\| ([^|]+) \| ([\d.]+) s \| \d+ \| ([\d.]+)x \|", line)
        if m:
            found.append((m.group(1).strip(), float(m.group(2)), float(m.group(3))))
    return found


results = {}  # (backend, scenario) -> build -> [(wall, ratio)]
order = []
for r in range(rounds):
    names = ["before", "after"] if r % 2 == 0 else ["after", "before"]
    for backend, fn in [("PostgreSQL", pg), ("MariaDB", mysql)]:
        for name in names:
            log(f"round {r + 1}: {backend}, {name}")
            for scenario, wall, ratio in fn(builds[name]):
                key = (backend, scenario)
                if key not in results:
                    order.append(key)
                results.setdefault(key, {}).setdefault(name, []).append((wall, ratio))
                log(f"  {scenario}: {wall:.2f} s, {ratio:.2f}x")

print(f"| backend | scenario | before wall s | before vs ceiling | after wall s | after vs ceiling | after / before (ratio) |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
for key in order:
    b, a = results[key]["before"], results[key]["after"]
    bw, br = statistics.median(x[0] for x in b), statistics.median(x[1] for x in b)
    aw, ar = statistics.median(x[0] for x in a), statistics.median(x[1] for x in a)
    print(f"| {key[0]} | {key[1]} | {bw:.2f} | {br:.2f}x | {aw:.2f} | {ar:.2f}x | {ar / br:.2f} |")
print()
print("| backend | scenario | before: ratio each round | after: ratio each round |")
print("| --- | --- | --- | --- |")
for key in order:
    b, a = results[key]["before"], results[key]["after"]
    print(f"| {key[0]} | {key[1]} | {', '.join(f'{x[1]:.2f}' for x in b)} | {', '.join(f'{x[1]:.2f}' for x in a)} |")
