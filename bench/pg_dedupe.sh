#!/usr/bin/env bash
# audit and dedupe --apply on a PostgreSQL table of N rows (default 10M)
# with 1% duplicate keys. Prints the wall time of each step.
#   bash bench/pg_dedupe.sh [ROWS]
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-10000000}
url=${IDEMLOAD_BENCH_POSTGRES:-postgres://root@127.0.0.1:5432/test}
schema=idemload_bench_dedupe
bin=target/release/idemload
cargo build --release -q --bin idemload
psql -q "$url" <<SQL
DROP SCHEMA IF EXISTS $schema CASCADE;
CREATE SCHEMA $schema;
CREATE TABLE $schema.usage (service_line text, usage_day int, gb_used float8, created_at timestamptz);
INSERT INTO $schema.usage
  SELECT 'SL-' || (g % 100000), g / 100000, g * 0.001, timestamptz '2025-01-01' + g * interval '1 second'
  FROM generate_series(1, $rows * 99 / 100) g;
INSERT INTO $schema.usage
  SELECT service_line, usage_day, gb_used + 1, created_at + interval '1 day'
  FROM $schema.usage WHERE usage_day % 99 = 0 LIMIT $rows / 100;
ANALYZE $schema.usage;
SQL
target=(--url "$url?schema=$schema" --table usage --key service_line,usage_day)
time_it() { local s; s=$(date +%s.%N); "$@" > /tmp/pg_dedupe_out.json || true; echo "$(echo "$(date +%s.%N) - $s" | bc) s"; }
echo "rows: $(psql -Atq "$url" -c "SELECT count(*) FROM $schema.usage")"
echo "audit:            $(time_it "$bin" audit "${target[@]}" --json)"; cat /tmp/pg_dedupe_out.json; echo
echo "dedupe --apply:   $(time_it "$bin" dedupe "${target[@]}" --order-by created_at --apply --json)"; head -c 300 /tmp/pg_dedupe_out.json; echo
echo "audit after:      $(time_it "$bin" audit "${target[@]}" --json)"; head -c 300 /tmp/pg_dedupe_out.json; echo
psql -q "$url" -c "DROP SCHEMA $schema CASCADE"
