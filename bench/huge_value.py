#!/usr/bin/env python3
"""Peak memory for one huge value: a 50 MB JSON line holding one array of
25 million numbers, between good lines, loaded into SQLite with the default
max_value_bytes (1 MiB), as JSONL and as a `.json` array file.

    python3 bench/huge_value.py [--mb 50] [--no-build] [--compare OTHER_BINARY]

The line must end as one reject and the good lines as rows (exit 4). Writes
a table of wall time and peak RSS per binary into bench/RESULTS.md (between
huge-value markers); --compare adds the rows of another build (an older
commit's target/release/idemload) measured the same way.
"""

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as R  # noqa: E402  (bench/run.py)


def write_inputs(mb):
    """Writes (once) huge_MB.jsonl and huge_MB.json; returns their paths and the line's size."""
    os.makedirs(R.OUT, exist_ok=True)
    elements = mb * (1 << 20) // 2
    big = '{"id":2,"big":[' + "0," * (elements - 1) + "0]}"
    good = [json.dumps({"id": i, "name": f"n{i}"}) for i in (1, 3, 4)]
    paths = {}
    for ext, text in (
        ("jsonl", f"{good[0]}\n{big}\n{good[1]}\n{good[2]}\n"),
        ("json", f"[\n{good[0]},\n{big},\n{good[1]},\n{good[2]}\n]\n"),
    ):
        path = os.path.join(R.OUT, f"huge_{mb}.{ext}")
        if not os.path.exists(path) or os.path.getsize(path) != len(text):
            with open(path, "w") as f:
                f.write(text)
        paths[ext] = path
    return paths, len(big)


def load(binary, path, db):
    R.rm_db(db)
    m = R.measure([binary, "load", path, "--into", f"sqlite://{db}", "--table", "t", "--json"], ok_codes=(0, 4))
    report = json.loads(m.stdout)
    R.rm_db(db)
    if (m.code, report["inserted"], report["rejected"]) != (4, 3, 1):
        R.log(f"WARNING {binary} {path}: exit {m.code}, report {report}")
    return m, report


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=50, help="size of the huge line in MiB")
    ap.add_argument("--no-build", action="store_true", help="use the binary already in target/release")
    ap.add_argument("--compare", help="another idemload binary to measure the same way (e.g. the previous commit's)")
    ap.add_argument("--compare-label", default="before", help="how the table names --compare's build")
    args = ap.parse_args()
    if not args.no_build:
        R.build()
    paths, line = write_inputs(args.mb)
    db = os.path.join(R.OUT, "huge_value.db")
    builds = [(f"{R.git_describe()} (this build)", R.IDEMLOAD)]
    if args.compare:
        builds.insert(0, (args.compare_label, args.compare))
    lines = [
        "## One huge value",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {R.machine()}",
        f"by `python3 bench/huge_value.py`: a {line / 1e6:.1f} MB line `{{\"id\":2,\"big\":[0,0,…]}}` (one array",
        f"of {line // 2:,} numbers) between three good lines, loaded into SQLite with `idemload load",
        "FILE --into sqlite://… --table t --json` and the default max_value_bytes (1 MiB); the line ends as",
        "one reject (its raw text cut to 8 KiB with its length and SHA-256), the good lines as rows, exit 4.",
        "",
        "| build | file | wall s | peak RSS MB | peak RSS / line size | inserted / rejected |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for label, binary in builds:
        for ext in ("jsonl", "json"):
            R.log(f"{label}: {os.path.basename(paths[ext])}")
            m, report = load(binary, paths[ext], db)
            R.log(f"  {m.wall:.2f}s, peak RSS {R.rss_mb(m.rss_kb)} MB")
            lines.append(
                f"| {label} | .{ext} | {m.wall:.2f} | {R.rss_mb(m.rss_kb)} | {m.rss_kb * 1024 / line:.1f}x "
                f"| {report['inserted']} / {report['rejected']} |"
            )
    # What the process takes for a two-line file: the part of the peak
    # that is not the huge line's.
    tiny = os.path.join(R.OUT, "tiny.jsonl")
    with open(tiny, "w") as f:
        f.write('{"id":1}\n{"id":3}\n')
    R.rm_db(db)
    base = R.measure([R.IDEMLOAD, "load", tiny, "--into", f"sqlite://{db}", "--table", "t", "--json"])
    R.rm_db(db)
    lines += [
        "",
        f"The same build loading a two-line file peaks at {R.rss_mb(base.rss_kb)} MB. Above that, this build holds",
        "the line once while it measures it unbuilt (a JSON line past 4 MiB gets room for the longest",
        "line at once). A .json element is buffered by serde_json, whose buffer doubles as it grows:",
        "the freed smaller steps, which mimalloc keeps for a second, count towards its peak.",
    ]
    R.write_section("huge-value", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
