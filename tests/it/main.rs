mod audit;
mod watch;
