#!/usr/bin/env python3
"""Files loaded once: an identical re-run of a pipeline over a folder of
exports, against its first load, on SQLite and PostgreSQL.

python3 bench/files_once.py [ROWS] [FILES]      (default 1,000,000 in 10)

Writes 1M generated contacts as JSON lines split into 10 files, runs the
pipeline (`idemload run`, key `id`, merge) once into an empty table, then
again over the same files (every file logged in `_idemload_files` and
unchanged: none is read), then with one file touched (its content
rewritten identically, so its modification time changes: it alone is
read). Prints wall times and ratios; the ratio is the measure (the machine
is shared). PostgreSQL needs IDEMLOAD_BENCH_POSTGRES (a URL) or is skipped.
"""
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "idemload")


def write_files(folder, rows, files):
    rnd = random.Random(42)
    per = rows // files
    for f in range(files):
        with open(os.path.join(folder, f"contacts-{f:02d}.jsonl"), "w") as out:
            for i in range(f * per + 1, (f + 1) * per + 1):
                out.write(json.dumps({
                    "id": i,
                    "email": f"user{i}@example.com",
                    "name": f"First{i % 5000} Last{i % 7919}",
                    "city": rnd.choice(["Berlin", "Lisbon", "Austin", "Osaka"]),
                    "score": rnd.randrange(100000) / 100,
                    "updated_at": f"2024-06-{1 + rnd.randrange(28):02d}T10:00:00Z",
                }) + "\n")


def run(cwd, pipeline):
    start = time.monotonic()
    out = subprocess.run([BIN, "run", pipeline, "--json"], cwd=cwd,
                         capture_output=True, text=True)
    wall = time.monotonic() - start
    if out.returncode != 0:
        sys.exit(f"idemload exited {out.returncode}: {out.stderr}")
    return wall, json.loads(out.stdout)


def bench(name, url, rows, files, folder):
    work = tempfile.mkdtemp(prefix="idemload-files-once-")
    try:
        pipeline = os.path.join(work, "contacts.toml")
        with open(pipeline, "w") as p:
            p.write(f'name = "files_once_bench"\n\n[source]\ntype = "file"\n'
                    f'path = "{folder}/*.jsonl"\n\n[destination]\nurl = "{url.format(work=work)}"\n'
                    f'table = "files_once_bench"\n\n[load]\nkey = "id"\n')
        first_wall, first = run(work, pipeline)
        again_wall, again = run(work, pipeline)
        touched = os.path.join(folder, "contacts-03.jsonl")
        with open(touched, "rb") as f:
            data = f.read()
        time.sleep(0.01)
        with open(touched, "wb") as f:
            f.write(data)
        one_wall, one = run(work, pipeline)
        print(f"| {name} | {rows:,} in {files} files | first load | {first_wall:.2f} | 1.00x | read {first['read']:,} |")
        print(f"| {name} | | identical re-run | {again_wall:.3f} | {again_wall / first_wall:.3f}x | read {again['read']:,}, files_skipped {again['files_skipped']} |")
        print(f"| {name} | | one file touched | {one_wall:.2f} | {one_wall / first_wall:.3f}x | read {one['read']:,}, files_skipped {one['files_skipped']} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    files = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    folder = tempfile.mkdtemp(prefix="idemload-files-once-data-")
    try:
        write_files(folder, rows, files)
        print("| backend | input | run | wall s | vs first load | counts |")
        print("| --- | --- | --- | ---: | ---: | --- |")
        bench("SQLite", "sqlite://{work}/bench.db", rows, files, folder)
        pg = os.environ.get("IDEMLOAD_BENCH_POSTGRES")
        if pg:
            subprocess.run(["psql", pg, "-qc",
                            "DROP TABLE IF EXISTS files_once_bench; "
                            "DELETE FROM _idemload_files WHERE pipeline = 'files_once_bench'; "
                            "DELETE FROM _idemload_state WHERE pipeline = 'files_once_bench'"],
                           capture_output=True)
            bench("PostgreSQL", pg, rows, files, folder)
        else:
            print("(PostgreSQL skipped: set IDEMLOAD_BENCH_POSTGRES)", file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
