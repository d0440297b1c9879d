#!/usr/bin/env python3
"""Two builds of idemload compared in one session on PostgreSQL and MariaDB:
bench/pg_quick.py (ceiling `psql \\copy`, first load, identical re-run, 10%
changed + 5% new; idemload reads the JSONL) and bench/mysql.sh (ceiling `LOAD
DATA LOCAL INFILE`, the same three runs) with each binary in turn, the order
alternating round by round (A B, B A, A B, ...) so that drift in the shared
machine's load falls on both. Each scenario's ratio is to the ceiling measured
in the same script run, just before it.

Usage: bench/before_after.py DATA_DIR BEFORE_BIN AFTER_BIN [ROUNDS] [ROWS]
       bench/before_after.py DATA_DIR LABEL=BIN LABEL=BIN ... [ROUNDS] [ROWS]
(more than two builds: the order is reversed every other round; ratios of
each build are also given against the first build's).
Env: PGURL (default postgres://root@127.0.0.1:5432/test), MySQL as bench/mysql.sh;
BACKENDS=PostgreSQL,MariaDB (the default) or one of them.
Prints Markdown: the median wall and ratio of each scenario per build, and every
round's ratios.
"""
import os, re, statistics, subprocess, sys, tempfile

BENCH = os.path.dirname(os.path.abspath(__file__))
data, args = sys.argv[1], sys.argv[2:]
bins = [a for a in args if not a.isdigit()]
nums = [int(a) for a in args if a.isdigit()]
rounds = nums[0] if nums else 3
rows = nums[1] if len(nums) > 1 else 1_000_000
if all("=" in b for b in bins):
    builds = dict(b.split("=", 1) for b in bins)
else:
    builds = {"before": bins[0], "after": bins[1]}
labels = list(builds)
backends = os.environ.get("BACKENDS", "PostgreSQL,MariaDB").split(",")
pgurl = os.environ.get("PGURL", "postgres://root@127.0.0.1:5432/test")


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
        if len(cells) == 8 and re.fullmatch(r"[\d.]+", cells[1]):
            found.append((cells[0], float(cells[1]), float(cells[3]), float(cells[7])))
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
        m = re.match(r"\| ([^|]+) \| ([\d.]+) s \| \d+ \| ([\d.]+)x \|.* ([\d.]+) s \|$", line)
        if m:
            found.append((m.group(1).strip(), float(m.group(2)), float(m.group(3)), float(m.group(4))))
    return found


results = {}  # (backend, scenario) -> build -> [(wall, ratio)]
order = []
for r in range(rounds):
    names = labels if r % 2 == 0 else labels[::-1]
    for backend, fn in [("PostgreSQL", pg), ("MariaDB", mysql)]:
        if backend not in backends:
            continue
        for name in names:
            log(f"round {r + 1}: {backend}, {name}")
            for scenario, wall, ratio, cpu in fn(builds[name]):
                key = (backend, scenario)
                if key not in results:
                    order.append(key)
                results.setdefault(key, {}).setdefault(name, []).append((wall, ratio, cpu))
                log(f"  {scenario}: {wall:.2f} s, {ratio:.2f}x, CPU {cpu:.2f} s")

med = lambda xs, i: statistics.median(x[i] for x in xs)
head = " | ".join(f"{n} wall s | {n} vs ceiling | {n} CPU s" for n in labels)
rel = " | ".join(f"{n} / {labels[0]}: ratio, CPU" for n in labels[1:])
print(f"| backend | scenario | {head} | {rel} |")
print("| --- | --- | " + " | ".join(["---:"] * (4 * len(labels) - 1)) + " |")
for key in order:
    cells = [f"{med(results[key][n], 0):.2f} | {med(results[key][n], 1):.2f}x | {med(results[key][n], 2):.2f}" for n in labels]
    b = results[key][labels[0]]
    rels = [f"{med(results[key][n], 1) / med(b, 1):.2f}, {med(results[key][n], 2) / max(med(b, 2), 0.01):.2f}"
            for n in labels[1:]]
    print(f"| {key[0]} | {key[1]} | {' | '.join(cells)} | {' | '.join(rels)} |")
print()
print("| backend | scenario | " + " | ".join(f"{n}: wall s / ratio / CPU s each round" for n in labels) + " |")
print("| --- | --- | " + " | ".join(["---"] * len(labels)) + " |")
for key in order:
    each = ["; ".join(f"{x[0]:.2f} / {x[1]:.2f} / {x[2]:.2f}" for x in results[key][n]) for n in labels]
    print(f"| {key[0]} | {key[1]} | {' | '.join(each)} |")
