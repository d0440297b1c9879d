#!/usr/bin/env python3
"""Object storage benchmark: 1M contacts into PostgreSQL from a local S3
server (moto_server) as JSONL.gz and as Parquet, against the same data as a
local plain JSONL file, measured in one run; then the peak RSS of one large
gzip'd object streamed into SQLite (memory must stay flat).

Usage: bench/objects.py DATA_DIR [ROWS] [BIG_MB]   (contacts from gen_contacts)
Env: PGURL (default the local socket, database test), IDEMLOAD (binary),
     S3 (endpoint, default http://127.0.0.1:9310, a running moto_server).
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

plain = f"{data}/contacts_{rows}.jsonl"
gz = f"{plain}.gz"
parquet = f"{data}/contacts_{rows}.parquet"
if not os.path.exists(gz):
    with open(plain, "rb") as src, gzip.open(gz, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
if not os.path.exists(parquet):
    pq.write_table(pajson.read_json(plain), parquet, row_group_size=100_000)

s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench",
                  aws_secret_access_key="bench", region_name="us-east-1")
bucket = f"bench-{int(time.time())}"
s3.create_bucket(Bucket=bucket)
s3.upload_file(gz, bucket, "contacts.jsonl.gz")
s3.upload_file(parquet, bucket, "contacts.parquet")

def psql(sql):
    return subprocess.run(["psql", url, "-qtAc", sql], check=True, capture_output=True, text=True).stdout.strip()

def measure(name, source, schema, extra=()):
    psql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    cmd = [binary, "load", source, "--into", f"{url}?schema={schema}", "--table", "contacts",
           "--key", "id", "--json", "--endpoint", endpoint, *extra]
    start = time.time()
    out = subprocess.run(["/usr/bin/time", "-f", "%M %U %S"] + cmd, capture_output=True, text=True, env=env)
    wall = time.time() - start
    if out.returncode != 0:
        sys.exit(f"{name} failed: {out.stderr}")
    rss, user, system = out.stderr.strip().splitlines()[-1].split()
    r = json.loads(out.stdout)
    count = psql(f"SELECT count(*) FROM {schema}.contacts")
    return dict(name=name, wall=wall, rate=rows / wall, rss=int(rss) // 1024,
                cpu=float(user) + float(system), inserted=r["inserted"], count=count)

results = [
    measure("local plain JSONL", plain, "bench_obj_local"),
    measure("local Parquet", parquet, "bench_obj_lparquet"),
    measure("S3 JSONL.gz (moto_server)", f"s3://{bucket}/contacts.jsonl.gz", "bench_obj_s3gz"),
    measure("S3 Parquet (moto_server)", f"s3://{bucket}/contacts.parquet", "bench_obj_s3pq"),
]
base = results[0]["rate"]
print(f"| {rows:,} contacts into PostgreSQL | wall s | rows/s | vs local plain JSONL | CPU s | peak RSS MB | inserted |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in results:
    print(f"| {r['name']} | {r['wall']:.2f} | {r['rate']:,.0f} | {r['rate'] / base:.2f}x | {r['cpu']:.2f} | {r['rss']} | {r['inserted']:,} |")
for schema in ["bench_obj_local", "bench_obj_lparquet", "bench_obj_s3gz", "bench_obj_s3pq"]:
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
