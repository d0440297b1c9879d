//! The statements a connection has prepared, by their text.
//!
//! `query(&str)` and `execute(&str)` prepare an unnamed statement first:
//! one more round trip, and the server parses and plans the text again.
//! The statements run once per ingest request (claim, fence, finish, the
//! batch's COPY) are the same few texts on every request, so each is
//! prepared once per connection and kept. Prepared statements outlive a
//! rolled back transaction, and the server plans one again when a table it
//! names changes.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Error, GenericClient, Row, Statement};

/// More texts than this (a table whose columns keep changing gives a new
/// COPY each time) and the cache starts again.
const MAX_STATEMENTS: usize = 64;

#[derive(Default)]
pub(super) struct Statements(Mutex<HashMap<String, Statement>>);

impl Statements {
    /// The statement of `sql`, prepared on this connection the first time.
    pub(super) async fn prepare(
        &self,
        client: &impl GenericClient,
        sql: &str,
    ) -> Result<Statement, Error> {
        if let Some(statement) = self.lock().get(sql) {
            return Ok(statement.clone());
        }
        let statement = client.prepare(sql).await?;
        let mut cache = self.lock();
        if cache.len() >= MAX_STATEMENTS {
            cache.clear();
        }
        cache.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    /// `client.query(sql, params)` through the prepared statement.
    pub(super) async fn query(
        &self,
        client: &impl GenericClient,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        let statement = self.prepare(client, sql).await?;
        client.query(&statement, params).await
    }

    /// `client.query_opt(sql, params)` through the prepared statement.
    pub(super) async fn query_opt(
        &self,
        client: &impl GenericClient,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        let statement = self.prepare(client, sql).await?;
        client.query_opt(&statement, params).await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Statement>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
