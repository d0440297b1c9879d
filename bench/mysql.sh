#!/usr/bin/env bash
# MySQL/MariaDB: idemload against its ceiling, `LOAD DATA LOCAL INFILE` of the
# same CSV into a table with a primary key on id.
#
#   N=1000000 bench/mysql.sh          # writes bench/RESULTS-mysql.md
#
# Scenarios: a first load into an empty table, a re-run of the same file,
# and a file where 10% of the rows changed and 5% are new. Each reports
# wall time, rows/s, ratio to the ceiling's rows/s, peak RSS of the loading
# process, InnoDB redo log bytes written (`Innodb_os_log_written` delta, so
# other load on the server shows up too) and the final row count against
# the distinct ids.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000000}
HOST=${MYSQL_HOST:-127.0.0.1}
PORT=${MYSQL_PORT:-3306}
USER=${MYSQL_USER:-root}
DB=${BENCH_DB:-idemload_bench}
URL="mysql://$USER@$HOST:$PORT/$DB"
BIN=${BIN:-target/release/idemload}
OUT=${OUT:-bench/RESULTS-mysql.md}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# DATA=DIR keeps the generated CSVs there between runs (for runs that
# alternate two builds); without it they live in a temporary directory.
CSV_DIR=${DATA:-$WORK}

mysql=(mysql --local-infile=1 -h"$HOST" -P"$PORT" -u"$USER" -N -B)
[ -x "$BIN" ] || cargo build --release --quiet
CONTACTS=$CSV_DIR/mysql_contacts_$N.csv
CHANGED=$CSV_DIR/mysql_changed_$N.csv
[ -s "$CONTACTS" ] || python3 bench/contacts.py "$N" "$CONTACTS"
[ -s "$CHANGED" ] || python3 bench/contacts.py "$N" "$CHANGED" --changed 0.10 --new 0.05

status() { # InnoDB redo log bytes written so far (the analog of PostgreSQL's WAL)
    "${mysql[@]}" -e "SHOW GLOBAL STATUS LIKE 'Innodb_os_log_written'" | cut -f2
}

CEILING_RPS=""
rows=()
measure() { # name rows table command...
    local name=$1 n=$2 table=$3; shift 3
    local b0 b1
    b0=$(status)
    /usr/bin/time -f "%e %M %U %S" -o "$WORK/time" "$@" >"$WORK/out" 2>"$WORK/err" || {
        code=$?; [ $code -eq 4 ] || { cat "$WORK/err"; exit $code; }; }
    b1=$(status)
    read -r secs rss user sys <<<"$(cat "$WORK/time")"
    local cpu
    cpu=$(python3 -c "print(f'{$user + $sys:.2f}')")
    local rps count distinct ratio
    rps=$(python3 -c "print(round($n / max($secs, 0.001)))")
    [ -n "$CEILING_RPS" ] || CEILING_RPS=$rps
    ratio=$(python3 -c "print(f'{$rps / $CEILING_RPS:.2f}x')")
    read -r count distinct <<<"$("${mysql[@]}" -D "$DB" -e "SELECT COUNT(*), COUNT(DISTINCT id) FROM \`$table\`")"
    local summary=""
    if [ -s "$WORK/out" ]; then
        summary=$(python3 -c "import json,sys; r=json.load(open('$WORK/out')); print(f\"ins {r['inserted']} upd {r['updated']} unch {r['unchanged']}\")")
    fi
    rows+=("| $name | $secs s | $rps | $ratio | $((rss / 1024)) MB | $(((b1 - b0) / 1048576)) MB | $count / $distinct | $summary | $cpu s |")
    echo "${rows[-1]}" >&2
}

"${mysql[@]}" -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB CHARACTER SET utf8mb4"
"${mysql[@]}" -D "$DB" -e "CREATE TABLE ceiling (id BIGINT NOT NULL PRIMARY KEY, email LONGTEXT,
    first_name LONGTEXT, last_name LONGTEXT, company LONGTEXT, city LONGTEXT, score DOUBLE,
    active TINYINT(1), created_at DATETIME(6), updated_at DATETIME(6)) CHARACTER SET utf8mb4"
measure "LOAD DATA LOCAL INFILE (ceiling)" "$N" ceiling "${mysql[@]}" -D "$DB" -e \
    "LOAD DATA LOCAL INFILE '$CONTACTS' INTO TABLE ceiling CHARACTER SET utf8mb4
     FIELDS TERMINATED BY ',' LINES TERMINATED BY '\n' IGNORE 1 LINES
     (id, email, first_name, last_name, company, city, score, @active, @created, @updated)
     SET active = (@active = 'true'),
         created_at = STR_TO_DATE(@created, '%Y-%m-%dT%H:%i:%sZ'),
         updated_at = STR_TO_DATE(@updated, '%Y-%m-%dT%H:%i:%sZ')"
load=("$BIN" load --into "$URL" --table contacts --key id --json)
measure "idemload, first load (empty table)" "$N" contacts "${load[@]}" "$CONTACTS"
measure "idemload, identical re-run" "$N" contacts "${load[@]}" "$CONTACTS"
changed_n=$(( $(wc -l <"$CHANGED") - 1 ))
measure "idemload, 10% changed + 5% new" "$changed_n" contacts "${load[@]}" "$CHANGED"

{
    echo "# MySQL/MariaDB benchmark"
    echo
    echo "$N generated contacts ($(nproc) cores, $("${mysql[@]}" -e 'SELECT VERSION()'), $(date -u +%F))."
    echo "Ratio = rows/s against LOAD DATA LOCAL INFILE into a table with a primary key."
    echo "Load average when the run ended: $(cut -d' ' -f1-3 /proc/loadavg) (other work shares the machine)."
    echo
    echo "| scenario | wall | rows/s | ratio | peak RSS | redo log written | rows / distinct ids | idemload stats | CPU (user + system) |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    printf '%s\n' "${rows[@]}"
} >"$OUT"
cat "$OUT"
