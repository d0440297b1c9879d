#!/bin/sh
# SQLite benchmark: ceiling (sqlite3 .import) vs idemload first load, re-run
# and 10%-changed run, at 1M and 5M rows; results into bench/RESULTS.md.
# Usage: bench/sqlite.sh [--rows 1000000] [--no-build]
cd "$(dirname "$0")/.." && exec python3 bench/run.py sqlite "$@"
