//! Deduplication records in PostgreSQL: the `prosody_dedup` table, its
//! queries, and [`DedupStore`] for [`PostgresStore`] (connection and migration
//! in `store/`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::{DedupStore, HandledId};
use crate::store::{PostgresStore, Schema, StoreFuture};

/// The deduplication table's migrations. `id` is `bytea` for the same reason
/// timer keys are: any string fits.
pub(crate) const SCHEMA: Schema = Schema {
    component: "dedup",
    migrations: &["
        CREATE TABLE IF NOT EXISTS prosody_dedup (
            group_id      text   NOT NULL,
            topic         text   NOT NULL,
            key           bytea  NOT NULL,
            id            bytea  NOT NULL,
            version       text   NOT NULL,
            expires_at_ms bigint NOT NULL,
            PRIMARY KEY (group_id, topic, key, id, version)
        );
        CREATE INDEX IF NOT EXISTS prosody_dedup_expiry ON prosody_dedup (expires_at_ms);
    "],
};

/// Most expired deduplication records one sweep deletes.
const PURGE_LIMIT: i64 = 10_000;

/// How often, at most, a store sweeps expired deduplication records.
const PURGE_EVERY: Duration = Duration::from_secs(600);

/// The deduplication statements, prepared once per connection.
pub(crate) struct Statements {
    contains: Statement,
    record: Statement,
    purge: Statement,
}

impl Statements {
    pub(crate) async fn prepare(client: &Client) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            contains: client
                .prepare(
                    "SELECT 1 FROM prosody_dedup
                     WHERE group_id = $1 AND topic = $2 AND key = $3 AND id = $4
                       AND version = $5 AND expires_at_ms > $6",
                )
                .await?,
            record: client
                .prepare(
                    "INSERT INTO prosody_dedup (group_id, topic, key, id, version, expires_at_ms)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (group_id, topic, key, id, version)
                     DO UPDATE SET expires_at_ms = excluded.expires_at_ms",
                )
                .await?,
            purge: client
                .prepare(
                    "DELETE FROM prosody_dedup WHERE ctid IN (
                         SELECT ctid FROM prosody_dedup WHERE expires_at_ms <= $1 LIMIT $2
                     )",
                )
                .await?,
        })
    }
}

/// A record's statement parameters: its key ($1 to $5), then a time ($6).
struct Params<'a> {
    group: &'a str,
    topic: &'a str,
    key: &'a [u8],
    id: &'a [u8],
    version: &'a str,
    ms: i64,
}

impl<'a> Params<'a> {
    fn new(handled: &'a HandledId, ms: i64) -> Self {
        Self {
            group: &handled.group,
            topic: &handled.topic,
            key: handled.key.as_bytes(),
            id: handled.id.as_bytes(),
            version: &handled.version,
            ms,
        }
    }

    fn sql(&self) -> [&(dyn ToSql + Sync); 6] {
        [
            &self.group,
            &self.topic,
            &self.key,
            &self.id,
            &self.version,
            &self.ms,
        ]
    }
}

impl DedupStore for PostgresStore {
    fn contains<'a>(&'a self, handled: &'a HandledId, now_ms: i64) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let params = &Params::new(handled, now_ms);
            let row = self
                .postgres
                .run("dedup lookup", |connection| async move {
                    let statement = &connection.dedup.contains;
                    connection.client.query_opt(statement, &params.sql()).await
                })
                .await?;
            Ok(row.is_some())
        })
    }

    fn record<'a>(&'a self, handled: &'a HandledId, expires_at_ms: i64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let params = &Params::new(handled, expires_at_ms);
            self.postgres
                .run("dedup record", |connection| async move {
                    let statement = &connection.dedup.record;
                    connection.client.execute(statement, &params.sql()).await
                })
                .await?;
            self.purge_expired_now_and_then();
            Ok(())
        })
    }
}

impl PostgresStore {
    /// Deletes expired deduplication records in the background, at most once
    /// per [`PURGE_EVERY`] per store, a bounded number at a time.
    fn purge_expired_now_and_then(&self) {
        let now = super::now_ms();
        let every = i64::try_from(PURGE_EVERY.as_millis()).unwrap_or(i64::MAX);
        let purged_ms = &self.postgres.dedup_purged_ms;
        let last = purged_ms.load(Ordering::Relaxed);
        if now - last < every
            || purged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let postgres = Arc::clone(&self.postgres);
        tokio::spawn(async move {
            let purged = postgres
                .run("dedup purge", |connection| async move {
                    connection
                        .client
                        .execute(&connection.dedup.purge, &[&now, &PURGE_LIMIT])
                        .await
                })
                .await;
            match purged {
                Ok(count) => tracing::debug!(count, "purged expired deduplication records"),
                Err(error) => tracing::warn!(%error, "cannot purge expired deduplication records"),
            }
        });
    }
}
