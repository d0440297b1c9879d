//! Integration tests: the real `idemload` binary in a fresh temp dir, one
//! module per section of the spec, each body run on every backend
//! (`idemtest!`). Server backends read `IDEMLOAD_TEST_POSTGRES` /
//! `IDEMLOAD_TEST_MYSQL`.

#[macro_use]
mod common;

mod audit;
mod backfill;
mod bad_input;
mod books;
mod check;
mod cli;
mod concurrency;
mod config_file;
mod crash;
mod csv;
mod duplicates;
mod edges;
mod examples;
mod failures;
mod files;
mod files_once;
mod foreign;
mod harness;
mod http_source;
mod huge_values;
mod incremental;
mod keys;
mod load_twice;
mod modes;
mod monitors;
mod numbers;
mod objects;
mod origins;
mod overlap;
mod pg_restart;
mod property;
mod read_only;
mod readers;
mod serve;
mod shapes;
mod signals;
mod sql_source;
mod tls;
mod tolerance;
mod verify;
mod watch;
mod watch_maintenance;
mod writeback;
