#!/usr/bin/env python3
"""idemload benchmarks: one command per destination, results into bench/RESULTS.md.

    python3 bench/run.py sqlite   [--rows 1000000,5000000]
    python3 bench/run.py postgres [--rows 1000000]

Builds the release binary and the data generator, generates the contacts
data under bench/out/ (deterministic; kept between runs), then measures in
one run the ceiling (the database's own bulk import of the CSV into a table
with a primary key on id) and idemload's first load, an identical re-run
and a run where 10% of the rows changed and 5% are new. Every measurement
is a child process: wall time, and peak RSS from /usr/bin/time -v when it
exists, else getrusage(RUSAGE_CHILDREN).
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
OUT = os.path.join(BENCH, "out")
RESULTS = os.path.join(BENCH, "RESULTS.md")
IDEMLOAD = os.path.join(ROOT, "target", "release", "idemload")
GEN = os.path.join(ROOT, "target", "release", "examples", "gen_contacts")
TIME = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None

# Columns of the generated contacts, in file order, with the SQLite types
# idemload infers for them (so the ceiling's table has the same shape).
SQLITE_COLUMNS = [
    ("id", "INTEGER NOT NULL"),
    ("email", "TEXT"),
    ("first_name", "TEXT"),
    ("last_name", "TEXT"),
    ("company", "TEXT"),
    ("city", "TEXT"),
    ("country", "TEXT"),
    ("score", "REAL"),
    ("active", "BOOLEAN"),
    ("created_at", "TIMESTAMP"),
    ("updated_at", "TIMESTAMP"),
]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Measured:
    def __init__(self, wall, rss_kb, stdout, stderr, code, cpu=0.0):
        self.wall = wall
        self.cpu = cpu
        self.rss_kb = rss_kb
        self.stdout = stdout
        self.stderr = stderr
        self.code = code


# Without /usr/bin/time: a small Python parent runs the command and writes
# getrusage(RUSAGE_CHILDREN).ru_maxrss (its only child) to a file.
RUSAGE_WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[2:])\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "open(sys.argv[1], 'w').write(f'{u.ru_maxrss} {u.ru_utime + u.ru_stime}')\n"
    "sys.exit(code)\n"
)


def measure(cmd, env=None, input_path=None, ok_codes=(0,), cwd=None):
    """Runs cmd as a child; returns wall seconds, peak RSS (KiB) and output."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as tf:
        if TIME:
            full = [TIME, "-v", "-o", tf.name] + list(cmd)
        else:
            full = [sys.executable, "-c", RUSAGE_WRAPPER, tf.name] + list(cmd)
        stdin = open(input_path, "rb") if input_path else subprocess.DEVNULL
        try:
            start = time.perf_counter()
            p = subprocess.run(full, stdin=stdin, capture_output=True, env=env, cwd=cwd)
            wall = time.perf_counter() - start
        finally:
            if input_path:
                stdin.close()
        text = tf.read()
    if TIME:
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        rss = int(m.group(1)) if m else 0
        cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text))
    else:
        rss, cpu = (text.split() + ["0", "0"])[:2]
        rss, cpu = int(rss), float(cpu)
    res = Measured(wall, rss, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"), p.returncode, cpu)
    if p.returncode not in ok_codes:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return res


def build():
    log("building target/release/idemload and examples/gen_contacts (cargo build --release)")
    subprocess.run(
        ["cargo", "build", "--release", "--bin", "idemload", "--example", "gen_contacts"],
        cwd=ROOT,
        check=True,
    )


def data_files(rows):
    """Generates (once) and returns the paths of the contacts data for `rows`."""
    stem = os.path.join(OUT, f"contacts_{rows}")
    files = {
        "jsonl": stem + ".jsonl",
        "csv": stem + ".csv",
        "changed_jsonl": stem + "_changed.jsonl",
        "changed_csv": stem + "_changed.csv",
    }
    stamp = stem + ".done"
    if not (os.path.exists(stamp) and all(os.path.exists(f) for f in files.values())
            and os.path.getmtime(stamp) >= os.path.getmtime(GEN)):
        log(f"generating {rows:,} contacts into {OUT}")
        t = time.perf_counter()
        subprocess.run([GEN, "--rows", str(rows), "--out", OUT], check=True)
        open(stamp, "w").close()
        log(f"generated in {time.perf_counter() - t:.1f}s")
    return files


def machine():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} CPUs ({cpu}){mem}, {platform.system()} {platform.release()}"


def write_section(name, text):
    """Replaces (or appends) the section `name` of bench/RESULTS.md."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = ""
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            old = f.read()
    if not old:
        old = "# idemload benchmark results\n\nWritten by `python3 bench/run.py sqlite|postgres`; numbers from one run each.\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    with open(RESULTS, "w") as f:
        f.write(new)
    log(f"wrote {os.path.relpath(RESULTS, ROOT)} ({name})")


def fmt_rate(rows, wall):
    return f"{rows / wall / 1000:,.0f}k" if wall > 0 else "-"


def rss_mb(kb):
    return f"{kb / 1024:.0f}"


def idemload_load(path, url, table, extra=()):
    m = measure([IDEMLOAD, "load", path, "--into", url, "--table", table, "--json", *extra], ok_codes=(0, 4))
    try:
        m.report = json.loads(m.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"idemload printed no JSON report:\n{m.stdout}\n{m.stderr[-2000:]}")
    return m


def counts(report):
    return f"{report['inserted']:,} / {report['updated']:,} / {report['unchanged']:,}"


def expect(report, what, **want):
    got = {k: report[k] for k in want}
    if got != want:
        log(f"WARNING {what}: expected {want}, got {got}")
        return False
    return True


# ---------------------------------------------------------------- SQLite


def rm_db(path):
    for suffix in ("", "-wal", "-shm", "-journal"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)


def sqlite_rows(db, table):
    out = subprocess.run(["sqlite3", db, f'SELECT count(*), count(DISTINCT id) FROM "{table}"'],
                         capture_output=True, text=True, check=True).stdout.strip()
    return tuple(int(x) for x in out.split("|"))


def bench_sqlite(rows_list):
    if not shutil.which("sqlite3"):
        raise SystemExit("sqlite3 is not installed (apt-get install sqlite3)")
    results = []
    for rows in rows_list:
        files = data_files(rows)
        db_dir = os.path.join(OUT, "sqlite")
        os.makedirs(db_dir, exist_ok=True)
        new_rows = rows + rows // 20

        # The ceiling: sqlite3's own CSV import into the same table shape.
        db = os.path.join(db_dir, f"ceiling_{rows}.db")
        rm_db(db)
        ddl = ", ".join(f"{c} {t}" for c, t in SQLITE_COLUMNS)
        script = os.path.join(db_dir, "import.sql")
        with open(script, "w") as f:
            f.write(f"CREATE TABLE contacts ({ddl}, PRIMARY KEY (id));\n")
            f.write(".mode csv\n")
            f.write(f".import --skip 1 {files['csv']} contacts\n")
        log(f"{rows:,} rows: ceiling, sqlite3 .import of the CSV")
        m = measure(["sqlite3", db], input_path=script)
        if m.stderr.strip():
            log(f"sqlite3 said: {m.stderr.strip()[:500]}")
        n, distinct = sqlite_rows(db, "contacts")
        ceiling = rows / m.wall
        results.append((rows, "ceiling: sqlite3 .import (CSV)", m, None, f"{n:,} rows"))
        log(f"  {m.wall:.2f}s ({m.cpu:.2f}s CPU), {fmt_rate(rows, m.wall)} rows/s, peak RSS {rss_mb(m.rss_kb)} MB")
        rm_db(db)

        db = os.path.join(db_dir, f"idemload_{rows}.db")
        rm_db(db)
        url = f"sqlite://{db}"
        runs = [
            ("idemload first load (JSONL)", files["jsonl"], rows,
             dict(inserted=rows, updated=0, unchanged=0, duplicates=0, rejected=0)),
            ("idemload identical re-run", files["jsonl"], rows,
             dict(inserted=0, updated=0, unchanged=rows, duplicates=0, rejected=0)),
            ("idemload 10% changed, 5% new", files["changed_jsonl"], new_rows,
             dict(inserted=rows // 20, updated=rows // 10, unchanged=rows - rows // 10, duplicates=0, rejected=0)),
        ]
        for label, path, n_read, want in runs:
            log(f"{rows:,} rows: {label}")
            m = idemload_load(path, url, "contacts")
            ok = expect(m.report, label, **want)
            results.append((rows, label, m, ceiling, counts(m.report) + ("" if ok else " (!)")))
            m.rows = n_read
            log(f"  {m.wall:.2f}s ({m.cpu:.2f}s CPU), {fmt_rate(n_read, m.wall)} rows/s, peak RSS {rss_mb(m.rss_kb)} MB, "
                f"inserted/updated/unchanged {counts(m.report)}")
        n, distinct = sqlite_rows(db, "contacts")
        if n != new_rows or distinct != new_rows:
            log(f"WARNING: table holds {n} rows ({distinct} distinct ids), expected {new_rows}")
        db_size = os.path.getsize(db)
        log(f"  final table: {n:,} rows, {distinct:,} distinct ids, file {db_size / 1e6:.0f} MB")
        rm_db(db)

    lines = [
        "## SQLite",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {machine()};",
        f"{subprocess.run(['sqlite3', '--version'], capture_output=True, text=True).stdout.split()[0]} (sqlite3 CLI), "
        f"idemload {git_describe()} (release build, bundled SQLite, WAL, synchronous=NORMAL).",
        "Ceiling: `sqlite3` `.import` of the CSV into a table of the same shape with `PRIMARY KEY (id)`",
        "(its default journal, one transaction). idemload loads the JSONL with `idemload load FILE",
        "--into sqlite://… --table contacts --json` (key `id`, no cursor, batches of 10,000 rows,",
        "one transaction each); the changed file holds every row, 10% of them with a new score,",
        "city and later `updated_at`, plus 5% new ids. rows/s counts the rows read; CPU s is user +",
        "system time of the process (idemload parses, plans and writes on separate threads).",
        f"Machine load average when the run ended: {os.getloadavg()[0]:.1f} (shared machine: wall times vary with it).",
        "",
        "| rows | run | wall s | rows/s | vs ceiling | CPU s | peak RSS MB | inserted / updated / unchanged |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for rows, label, m, ceiling, note in results:
        n = getattr(m, "rows", rows)
        ratio = f"{(n / m.wall) / ceiling:.2f}x" if ceiling else "1.00x"
        lines.append(f"| {rows:,} | {label} | {m.wall:.2f} | {fmt_rate(n, m.wall)} | {ratio} | {m.cpu:.2f} | {rss_mb(m.rss_kb)} | {note} |")
    lines.append("")
    lines.append("Targets: first load >= 0.6x the ceiling; identical re-run at least 2x faster than the first load; peak RSS < 150 MB.")
    lines.append("")
    for rows in rows_list:
        r = [x for x in results if x[0] == rows]
        ceil_m, first, rerun, changed = r[0][2], r[1][2], r[2][2], r[3][2]
        ratio = (rows / first.wall) / (rows / ceil_m.wall)
        speedup = first.wall / rerun.wall
        peak = max(x[2].rss_kb for x in r[1:]) / 1024
        verdict = lambda ok: "met" if ok else "NOT met"
        lines.append(
            f"- {rows:,} rows: first load {ratio:.2f}x the ceiling ({verdict(ratio >= 0.6)}); "
            f"re-run {speedup:.1f}x faster than the first load ({verdict(speedup >= 2)}); "
            f"idemload peak RSS {peak:.0f} MB ({verdict(peak < 150)})."
        )
    write_section("sqlite", "\n".join(lines))
    print("\n".join(lines))


def git_describe():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", choices=["sqlite", "postgres"])
    ap.add_argument("--rows", default=None, help="comma-separated sizes (sqlite: 1000000,5000000; postgres: 1000000)")
    ap.add_argument("--no-build", action="store_true", help="use the binaries already in target/release")
    args = ap.parse_args()
    if not args.no_build:
        build()
    os.makedirs(OUT, exist_ok=True)
    if args.target == "sqlite":
        rows = [int(x) for x in (args.rows or "1000000,5000000").split(",")]
        bench_sqlite(rows)
    else:
        import bench_postgres  # noqa: E402  (bench/bench_postgres.py)
        rows = [int(x) for x in (args.rows or "1000000").split(",")]
        bench_postgres.run(rows)


if __name__ == "__main__":
    sys.path.insert(0, BENCH)
    main()
