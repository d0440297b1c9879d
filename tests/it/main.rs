//! Integration tests: the real `idemload` binary in a fresh temp dir, one
//! module per section of the spec, each body run on every backend
//! (`idemtest!`). Server backends read `IDEMLOAD_TEST_POSTGRES` /
//! `IDEMLOAD_TEST_MYSQL`.

#[macro_use]
mod common;

mod audit;
mod bad_input;
mod concurrency;
mod crash;
mod csv;
mod duplicates;
mod files;
mod harness;
mod http_source;
mod incremental;
mod keys;
mod load_twice;
mod modes;
mod objects;
mod overlap;
mod pg_restart;
mod property;
mod sql_source;
mod watch;
mod writeback;
