mod audit;
mod http_source;
mod sql_source;
mod watch;
mod writeback;
