#!/usr/bin/env bash
# watch: a SQLite seen store holding N keys (default 10M), polls of 10,000
# items of which 1% are new. Prints each poll's wall time and peak RSS.
#   bash bench/watch.sh [SEEN_KEYS]
set -euo pipefail
cd "$(dirname "$0")/.."
keys=${1:-10000000}
bin=$PWD/target/release/idemload
cargo build --release -q --bin idemload
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"
items() { python3 -c "
import json, sys
lo, hi = int(sys.argv[1]), int(sys.argv[2])
for i in range(lo, hi):
    print(json.dumps({'id': i, 'updated_at': '2025-01-01T00:00:00Z', 'name': 'item %d' % i}))" "$1" "$2" > items.jsonl; }
cat > w.toml <<TOML
name = "bench"
[source]
type = "file"
path = "items.jsonl"
[trigger]
store = "sqlite://seen.db"
order_by = "updated_at"
TOML
items 0 10000
"$bin" watch w.toml --once 2>/dev/null
echo "filling the store with $keys seen keys ..."
sqlite3 seen.db "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < $keys - 10000)
  INSERT INTO _idemload_seen SELECT 'watch:bench', printf('%016x%016x%016x%016x', random(), random(), random(), x), 0 FROM c;"
echo "store: $(sqlite3 seen.db 'SELECT count(*) FROM _idemload_seen') keys, $(du -h seen.db | cut -f1)"
poll() {
  /usr/bin/time -f "%e s wall, %M KB peak RSS" "$bin" watch w.toml --once --json 2>&1 >/tmp/watch_bench_events.txt | tail -1
  grep '"poll"' /tmp/watch_bench_events.txt
}
items 100 10100    # 9,900 seen before, 100 new
echo "poll with 1% new:  $(poll)"
echo "poll with 0% new:  $(poll)"
