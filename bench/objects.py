#!/usr/bin/env python3
"""Object storage benchmark: 1M contacts into PostgreSQL from a local S3
server (moto_server) as JSONL.gz and as Parquet, against the same data as a
local plain JSONL file, measured in one run; then the peak RSS of one large
gzip'd object streamed into SQLite (memory must stay flat).

With PEERS=1, dlt's filesystem source (merge, primary_key id) and Sling
(incremental, primary key id, update key updated_at) read the same two S3
objects into PostgreSQL in the same run, each into a fresh schema; they come
from PyPI into bench/.venv as bench_postgres.py installs them (plus
dlt[filesystem,parquet]). PEER_ROWS=N measures them on N-row objects instead
(for a peer too slow at ROWS), with idemload's local plain JSONL at N too so
that their ratio has a reference of the same size.

Usage: bench/objects.py DATA_DIR [ROWS] [BIG_MB]   (contacts from gen_contacts)
Env: PGURL (default the local socket, database test), IDEMLOAD (binary),
     S3 (endpoint, default http://127.0.0.1:9310, a running moto_server),
     PEERS, PEER_ROWS (above).
Prints Markdown tables for bench/RESULTS.md.
"""
import gzip, json, os, shutil, subprocess, sys, time

import boto3
import pyarrow.json as pajson
import pyarrow.parquet as pq

data = sys.argv[1]
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
big_mb = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
url = os.environ.get("PGURL", "postgres://root@%2Fvar%2Frun%2Fpostgresql/test")
binary = os.environ.get("IDEMLOAD", "target/release/idemload")
endpoint = os.environ.get("S3", "http://127.0.0.1:9310")
env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")

peers = os.environ.get("PEERS", "") not in ("", "0")
peer_rows = int(os.environ.get("PEER_ROWS", rows))

def prepare(n):
    """The plain JSONL (from gen_contacts, cut to n lines if need be), its gzip and its Parquet."""
    plain = f"{data}/contacts_{n}.jsonl"
    if not os.path.exists(plain):
        with open(f"{data}/contacts_{rows}.jsonl") as src, open(plain, "w") as dst:
            for i, line in zip(range(n), src):
                dst.write(line)
    gz, parquet = f"{plain}.gz", f"{data}/contacts_{n}.parquet"
    if not os.path.exists(gz):
        with open(plain, "rb") as src, gzip.open(gz, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
    if not os.path.exists(parquet):
        pq.write_table(pajson.read_json(plain), parquet, row_group_size=100_000)
    return plain, gz, parquet

plain, gz, parquet = prepare(rows)

s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench",
                  aws_secret_access_key="bench", region_name="us-east-1")
bucket = f"bench-{int(time.time())}"
s3.create_bucket(Bucket=bucket)
s3.upload_file(gz, bucket, "contacts.jsonl.gz")
s3.upload_file(parquet, bucket, "contacts.parquet")
if peers and peer_rows != rows:
    peer_plain, peer_gz, peer_parquet = prepare(peer_rows)
    s3.upload_file(peer_gz, bucket, f"peer/contacts_{peer_rows}.jsonl.gz")
    s3.upload_file(peer_parquet, bucket, f"peer/contacts_{peer_rows}.parquet")
    peer_objects = (f"peer/contacts_{peer_rows}.jsonl.gz", f"peer/contacts_{peer_rows}.parquet")
else:
    peer_objects = ("contacts.jsonl.gz", "contacts.parquet")

DLT_SCRIPT = r'''
import sys, dlt
from dlt.common.configuration.specs import AwsCredentials
from dlt.sources.filesystem import filesystem, read_jsonl, read_parquet
endpoint, bucket, key, reader, url, dataset, pipes = sys.argv[1:8]
creds = AwsCredentials(aws_access_key_id="bench", aws_secret_access_key="bench",
                       region_name="us-east-1", endpoint_url=endpoint)
files = filesystem(bucket_url=f"s3://{bucket}", credentials=creds, file_glob=key)
res = (files | (read_jsonl() if reader == "jsonl" else read_parquet())).with_name("contacts")
res.apply_hints(write_disposition="merge", primary_key="id")
p = dlt.pipeline(pipeline_name="bench_objects", destination=dlt.destinations.postgres(credentials=url),
                 dataset_name=dataset, pipelines_dir=pipes)
print(p.run(res))
'''

def psql(sql):
    return subprocess.run(["psql", url, "-qtAc", sql], check=True, capture_output=True, text=True).stdout.strip()

def server_pid():
    """The local S3 server's process (moto_server on the endpoint's port), if found."""
    port = endpoint.rsplit(":", 1)[-1].strip("/")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if any(b"moto_server" in a for a in args) and port.encode() in args:
            return pid
    return None

SERVER = server_pid()

def server_cpu():
    """CPU seconds (user + system) the S3 server has used so far, or None."""
    if not SERVER:
        return None
    fields = open(f"/proc/{SERVER}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def timed(name, cmd, schema, n, run_env=env, table="contacts"):
    cpu0 = server_cpu()
    start = time.time()
    out = subprocess.run(["/usr/bin/time", "-f", "%M %U %S"] + cmd, capture_output=True, text=True, env=run_env)
    wall = time.time() - start
    s3cpu = server_cpu() - cpu0 if cpu0 is not None else None
    if out.returncode != 0:
        print(f"{name} failed ({out.returncode}): {out.stdout[-2000:]}\n{out.stderr[-3000:]}", file=sys.stderr)
        return dict(name=name, rows=n, failed=(out.stdout + out.stderr)[-3000:])
    rss, user, system = out.stderr.strip().splitlines()[-1].split()
    count, distinct = psql(f"SELECT count(*), count(DISTINCT id) FROM {schema}.{table}").split("|")
    print(f"{name}: {wall:.2f} s, {count} rows", file=sys.stderr, flush=True)
    return dict(name=name, rows=n, wall=wall, rate=n / wall, rss=int(rss) // 1024, s3cpu=s3cpu,
                cpu=float(user) + float(system), out=out.stdout, count=int(count), distinct=int(distinct))

def measure(name, source, schema, extra=(), n=rows):
    psql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    cmd = [binary, "load", source, "--into", f"{url}?schema={schema}", "--table", "contacts",
           "--key", "id", "--json", "--endpoint", endpoint, *extra]
    r = timed(name, cmd, schema, n)
    if "failed" in r:
        sys.exit(f"{name} failed: {r['failed']}")
    r["inserted"] = json.loads(r["out"])["inserted"]
    return r

results = [
    measure("local plain JSONL", plain, "bench_obj_local"),
    measure("local Parquet", parquet, "bench_obj_lparquet"),
    measure("S3 JSONL.gz (moto_server)", f"s3://{bucket}/contacts.jsonl.gz", "bench_obj_s3gz"),
    measure("S3 Parquet (moto_server)", f"s3://{bucket}/contacts.parquet", "bench_obj_s3pq"),
]
schemas = ["bench_obj_local", "bench_obj_lparquet", "bench_obj_s3gz", "bench_obj_s3pq"]
if peers:
    import bench_postgres as BP
    BP.venv_ready("dlt[filesystem,postgres,parquet]", "dlt, s3fs, pyarrow")
    vpy, sling = BP.VPY, BP.sling_binary()
    if peer_rows != rows:
        results.append(measure(f"local plain JSONL, {peer_rows:,} rows (reference for the peers)",
                               peer_plain, "bench_obj_peerref", n=peer_rows))
        schemas.append("bench_obj_peerref")
    dlt_pg = BP.dlt_url(url)
    dlt_script = os.path.join(data, "dlt_objects.py")
    with open(dlt_script, "w") as f:
        f.write(DLT_SCRIPT)
    pipes = os.path.join(data, "dlt_objects_pipelines")
    for label, key, reader, schema in [("JSONL.gz", peer_objects[0], "jsonl", "bench_obj_dlt_gz"),
                                       ("Parquet", peer_objects[1], "parquet", "bench_obj_dlt_pq")]:
        psql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        shutil.rmtree(pipes, ignore_errors=True)
        results.append(timed(f"dlt filesystem, S3 {label}, merge", [vpy, dlt_script, endpoint, bucket, key, reader,
                             dlt_pg, schema, pipes], schema, peer_rows))
        schemas.append(schema)
    if sling:
        s_env = dict(env, BENCH_PG=url + ("&" if "?" in url else "?") + "sslmode=disable",
                     MOTO_S3=json.dumps(dict(type="s3", bucket=bucket, access_key_id="bench", secret_access_key="bench",
                                             region="us-east-1", endpoint=endpoint, url_style="path")))
        # Sling reads JSON lines as one JSON column unless flattened. Parquet is
        # left out: Sling reads it from S3 through the DuckDB CLI with a secret
        # of its own (`PROVIDER credential_chain`) that drops the connection's
        # endpoint, so DuckDB asks AWS itself; with SLING_DUCKDB_COMPUTE=false
        # it fetches the object from the endpoint but then spins without
        # writing a row (a 1,000-row local Parquet file too).
        for label, key, fmt, schema in [("JSONL.gz", peer_objects[0], "{format: jsonlines, compression: gzip, flatten: true}", "bench_obj_sling_gz")]:
            psql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            results.append(timed(f"Sling, S3 {label}, incremental", [
                sling, "run", "--src-conn", "MOTO_S3", "--src-stream", f"s3://{bucket}/{key}", "--src-options", fmt,
                "--tgt-conn", "BENCH_PG", "--tgt-object", f"{schema}.contacts",
                "--mode", "incremental", "--primary-key", "id", "--update-key", "updated_at"], schema, peer_rows, s_env))
            schemas.append(schema)
    else:
        print("no sling binary in bench/.venv: Sling left out", file=sys.stderr)

base = results[0]["rate"]
peer_base = next(r["rate"] for r in results if r["name"].startswith("local plain JSONL") and r["rows"] == peer_rows)
print(f"| contacts into PostgreSQL | rows | wall s | rows/s | vs idemload local plain JSONL | CPU s | S3 server CPU s | peak RSS MB | rows / distinct ids |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
for r in results:
    name = r["name"] if r["name"].startswith(("dlt", "Sling")) else f"idemload {r['name']}"
    if "failed" in r:
        print(f"| {name} | {r['rows']:,} | failed | | | | | | |")
        continue
    ref = base if r["rows"] == rows else peer_base
    s3cpu = "-" if r["s3cpu"] is None else f"{r['s3cpu']:.2f}"
    print(f"| {name} | {r['rows']:,} | {r['wall']:.2f} | {r['rate']:,.0f} | {r['rate'] / ref:.2f}x | {r['cpu']:.2f} | {s3cpu} | {r['rss']} | {r['count']:,} / {r['distinct']:,} |")
for r in results:
    if "failed" in r:
        print(f"\n{r['name']} failed:\n```\n{r['failed'].strip()[-1500:]}\n```")
for schema in schemas:
    psql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")

# One large object: the contacts repeated (new ids each copy) up to BIG_MB
# of JSONL, gzip'd, streamed into SQLite with `--mode insert_new`.
if big_mb > 0:
    big = f"{data}/big_{big_mb}mb.jsonl.gz"
    if not os.path.exists(big):
        written, copy = 0, 0
        with gzip.open(big, "wt", compresslevel=1) as dst:
            while written < big_mb << 20:
                with open(plain) as src:
                    for line in src:
                        if copy:  # a new id for every copy: id + copy * 10^8
                            head, rest = line[len('{"id":'):].split(",", 1)
                            line = '{"id":%d,%s' % (int(head) + copy * 100_000_000, rest)
                        dst.write(line)
                        written += len(line)
                copy += 1
    s3.upload_file(big, bucket, "big.jsonl.gz")
    db = f"{data}/big.db"
    for suffix in ["", "-wal", "-shm"]:
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    start = time.time()
    out = subprocess.run(["/usr/bin/time", "-f", "%M", binary, "load", f"s3://{bucket}/big.jsonl.gz",
                          "--endpoint", endpoint, "--into", f"sqlite://{db}", "--table", "big",
                          "--key", "id", "--json"], capture_output=True, text=True, env=env)
    wall = time.time() - start
    if out.returncode != 0:
        sys.exit(f"big object failed: {out.stderr}")
    r = json.loads(out.stdout)
    print()
    print(f"| one object | compressed MB | JSONL MB | records | wall s | peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    with open(big, "rb") as f:  # the gzip trailer: uncompressed size mod 2^32 (one member)
        f.seek(-4, 2)
        plain_mb = int.from_bytes(f.read(4), "little") / 2**20
    print(f"| s3://…/big.jsonl.gz into SQLite | {os.path.getsize(big) / 2**20:.0f} | {plain_mb:.0f} | {r['read']:,} | {wall:.1f} | {int(out.stderr.strip().splitlines()[-1]) // 1024} |")
