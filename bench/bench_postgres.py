"""PostgreSQL benchmark (issue 3): `python3 bench/run.py postgres [--rows N]`.

Against the PostgreSQL of IDEMLOAD_BENCH_POSTGRES (default
postgres://root@127.0.0.1:5432/test), each tool in a fresh schema of its own:
the ceiling (`psql \\copy` of the CSV into an empty table with a primary key
on id), idemload (only when this build accepts postgres:// URLs), dlt
(merge, primary_key id) and Sling (incremental, primary key id, update key
updated_at), each on a first load, an identical re-run and the 10%-changed /
5%-new file. Reports wall time, rows/s, ratio to the ceiling, peak RSS, WAL
bytes (pg_wal_lsn_diff around the run) and rows = distinct ids at the end.
dlt and Sling come from PyPI into the virtualenv bench/.venv.
"""

import glob
import json
import os
import subprocess
import sys

import run as R

URL = os.environ.get("IDEMLOAD_BENCH_POSTGRES", "postgres://root@127.0.0.1:5432/test")
VENV = os.path.join(R.BENCH, ".venv")
VPY = os.path.join(VENV, "bin", "python")

DDL = """id bigint PRIMARY KEY, email text, first_name text, last_name text, company text,
city text, country text, score double precision, active boolean,
created_at timestamptz, updated_at timestamptz"""


def dlt_url(url=URL):
    """dlt insists on a password; a trust-auth server ignores it."""
    from urllib.parse import urlsplit, urlunsplit
    u = urlsplit(url)
    if u.password is None and u.username:
        u = u._replace(netloc=f"{u.username}:unused@{u.hostname}" + (f":{u.port}" if u.port else ""))
    return urlunsplit(u)


def psql(sql):
    out = subprocess.run(["psql", URL, "-v", "ON_ERROR_STOP=1", "-Atqc", sql],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"psql: {out.stderr.strip()}")
    return out.stdout.strip()


def fresh_schema(name):
    psql(f"DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}")


def wal_lsn():
    return psql("SELECT pg_current_wal_lsn()")


def wal_bytes(before):
    return int(float(psql(f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{before}')")))


def table_rows(schema, table="contacts"):
    try:
        n, d = psql(f"SELECT count(*), count(DISTINCT id) FROM {schema}.{table}").split("|")
        return int(n), int(d)
    except RuntimeError:
        return None


def timed(cmd, env=None):
    lsn = wal_lsn()
    m = R.measure(cmd, env=env, ok_codes=(0, 4))
    m.wal = wal_bytes(lsn)
    return m


def venv_ready(dlt="dlt[postgres]", imports="dlt"):
    """bench/.venv with `dlt` (the pip requirement; `imports` proves it is
    there) and Sling."""
    if not os.path.exists(VPY):
        R.log("creating bench/.venv")
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    ok = subprocess.run([VPY, "-c", f"import {imports}"], capture_output=True).returncode == 0
    if not ok or not sling_binary():
        R.log(f'installing "{dlt}" and sling-linux-amd64 into bench/.venv (pip)')
        subprocess.run([VPY, "-m", "pip", "install", "-q", dlt, "sling-linux-amd64"], check=True)


def sling_binary():
    found = glob.glob(os.path.join(VENV, "lib", "python*", "site-packages", "sling*", "**", "sling*"), recursive=True)
    found = [f for f in found if os.path.isfile(f) and os.access(f, os.X_OK) and not f.endswith(".py")]
    return found[0] if found else None


def idemload_supports_postgres():
    probe = os.path.join(R.OUT, "probe.jsonl")
    with open(probe, "w") as f:
        f.write('{"id": 1}\n')
    fresh_schema("bench_probe")
    p = subprocess.run([R.IDEMLOAD, "load", probe, "--into", f"{URL}?schema=bench_probe", "--table", "probe", "--json"],
                       capture_output=True, text=True)
    psql("DROP SCHEMA IF EXISTS bench_probe CASCADE")
    return p.returncode == 0


DLT_SCRIPT = r'''
import json, sys, dlt
path, url, dataset, pipes = sys.argv[1:5]
def rows():
    with open(path) as f:
        for line in f:
            yield json.loads(line)
res = dlt.resource(rows, name="contacts", write_disposition="merge", primary_key="id")
p = dlt.pipeline(pipeline_name="bench_contacts", destination=dlt.destinations.postgres(credentials=url),
                 dataset_name=dataset, pipelines_dir=pipes)
print(p.run(res))
'''


def run(rows_list):
    venv_ready()
    results = []
    with_idemload = idemload_supports_postgres()
    if not with_idemload:
        R.log("this idemload build does not accept postgres:// URLs: its rows are left out")
    dlt_script = os.path.join(R.OUT, "dlt_load.py")
    with open(dlt_script, "w") as f:
        f.write(DLT_SCRIPT)
    sling = sling_binary()
    for rows in rows_list:
        files = R.data_files(rows)
        runs = [("first load", files["jsonl"], rows), ("identical re-run", files["jsonl"], rows),
                ("10% changed, 5% new", files["changed_jsonl"], rows + rows // 20)]

        R.log(f"{rows:,} rows: ceiling, psql \\copy of the CSV")
        fresh_schema("bench_ceiling")
        psql(f"CREATE TABLE bench_ceiling.contacts ({DDL})")
        m = timed(["psql", URL, "-v", "ON_ERROR_STOP=1", "-qc",
                   f"\\copy bench_ceiling.contacts FROM '{files['csv']}' WITH (FORMAT csv, HEADER true)"])
        ceiling = rows / m.wall
        results.append((rows, "ceiling: psql \\copy (CSV)", "", m, rows, table_rows("bench_ceiling")))
        R.log(f"  {m.wall:.2f}s, WAL {m.wal / 1e6:.0f} MB")
        psql("DROP SCHEMA bench_ceiling CASCADE")

        tools = []
        if with_idemload:
            fresh_schema("bench_idemload")
            tools.append(("idemload", "bench_idemload", lambda path: [
                R.IDEMLOAD, "load", path, "--into", f"{URL}?schema=bench_idemload", "--table", "contacts", "--json"], None))
            fresh_schema("bench_idemload_cursor")

            def cursor_pipeline(path):
                # The same load as a pipeline with a cursor and a day of
                # lookback: a re-run reads the file but writes only what is
                # at or after the checkpoint minus a day.
                toml = os.path.join(R.OUT, "pg_cursor.toml")
                with open(toml, "w") as f:
                    f.write(f"""name = "bench_contacts_cursor"
[source]
type = "file"
path = "{path}"
[destination]
url = "{URL}?schema=bench_idemload_cursor"
table = "contacts"
[load]
key = ["id"]
cursor = "updated_at"
lookback = "1d"
""")
                return [R.IDEMLOAD, "run", toml, "--json"]
            tools.append(("idemload cursor+lookback", "bench_idemload_cursor", cursor_pipeline, None))
        fresh_schema("bench_dlt")
        tools.append(("dlt merge", "bench_dlt", lambda path: [
            VPY, dlt_script, path, dlt_url(), "bench_dlt", os.path.join(R.OUT, "dlt_pipelines")], None))
        if sling:
            fresh_schema("bench_sling")
            env = dict(os.environ, BENCH_PG=URL + ("&" if "?" in URL else "?") + "sslmode=disable")
            tools.append(("sling incremental", "bench_sling", lambda path: [
                # Sling reads the CSV: its incremental mode fails on flattened JSONL
                # ("unable to cast row value to time.Time") on a re-run.
                sling, "run", "--src-stream", f"file://{path[:-len('.jsonl')]}.csv", "--src-options", "{format: csv}",
                "--tgt-conn", "BENCH_PG", "--tgt-object", "bench_sling.contacts",
                "--mode", "incremental", "--primary-key", "id", "--update-key", "updated_at"], env))
        else:
            R.log("no sling binary found in bench/.venv: Sling rows are left out")
        import shutil
        shutil.rmtree(os.path.join(R.OUT, "dlt_pipelines"), ignore_errors=True)
        for tool, schema, cmd, env in tools:
            # The changed file is a whole snapshot, not an export of what
            # changed: with a cursor, its late changes below the checkpoint
            # minus lookback are skipped by design, so that run is left out.
            for label, path, n in runs[:2] if "cursor" in tool else runs:
                R.log(f"{rows:,} rows: {tool}, {label}")
                try:
                    m = timed(cmd(path), env=env)
                except SystemExit as e:
                    R.log(f"  failed: {str(e)[:500]}")
                    continue
                results.append((rows, f"{tool}: {label}", ceiling, m, n, table_rows(schema)))
                R.log(f"  {m.wall:.2f}s, WAL {m.wal / 1e6:.0f} MB, peak RSS {R.rss_mb(m.rss_kb)} MB")
            psql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")

    lines = [
        "## PostgreSQL",
        "",
        f"Measured {R.datetime.datetime.now(R.datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {R.machine()};",
        f"{psql('SHOW server_version')} at {URL.split('@')[-1]}. Ceiling: `psql \\copy` of the CSV into an empty",
        "table with a primary key on id. dlt: `write_disposition=\"merge\"`, `primary_key=\"id\"`; Sling:",
        "incremental, primary key id, update key updated_at, reading the CSV; dlt and idemload read the",
        "JSONL; idemload: `load` (key id, no cursor: every row compared); idemload cursor+lookback: `run`",
        "of a pipeline with `cursor = \"updated_at\"`, `lookback = \"1d\"`. WAL MB: pg_wal_lsn_diff around the run.",
        f"Machine load average when the run ended: {os.getloadavg()[0]:.1f}.",
        "",
        "| rows | run | wall s | rows/s | vs ceiling | peak RSS MB | WAL MB | rows / distinct ids |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for rows, label, ceiling, m, n, count in results:
        ratio = f"{(n / m.wall) / ceiling:.2f}x" if ceiling else "1.00x"
        cnt = f"{count[0]:,} / {count[1]:,}" if count else "-"
        lines.append(f"| {rows:,} | {label} | {m.wall:.2f} | {R.fmt_rate(n, m.wall)} | {ratio} | "
                     f"{R.rss_mb(m.rss_kb)} | {m.wal / 1e6:,.0f} | {cnt} |")
    if not with_idemload:
        lines += ["", "idemload rows are missing: this build does not accept postgres:// URLs."]
    R.write_section("postgres", "\n".join(lines))
    print("\n".join(lines))
