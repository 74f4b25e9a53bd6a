//! Deferred messages in PostgreSQL: the `prosody_deferred` table, its queries,
//! and [`DeferStore`] for [`PostgresStore`] (connection and migration in
//! `store/`).

use tokio_postgres::{Client, Statement};

use super::store::{DeferStore, DeferredRecord};
use crate::store::{query_error, PostgresStore, Schema, StoreFuture};
use crate::timers::PartitionScope;

/// The deferred-message table's migrations. Keys are `bytea` as in the timer
/// table: any string fits.
pub(crate) const SCHEMA: Schema = Schema {
    component: "deferred",
    migrations: &["
        CREATE TABLE IF NOT EXISTS prosody_deferred (
            group_id    text    NOT NULL,
            topic       text    NOT NULL,
            partition   integer NOT NULL,
            msg_offset  bigint  NOT NULL,
            key         bytea   NOT NULL,
            attempt     integer NOT NULL,
            retry_at_ms bigint  NOT NULL,
            PRIMARY KEY (group_id, topic, partition, msg_offset)
        );
    "],
};

/// The deferred-message statements, prepared once per connection.
pub(crate) struct Statements {
    load: Statement,
    put: Statement,
    remove: Statement,
}

impl Statements {
    pub(crate) async fn prepare(client: &Client) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            load: client
                .prepare(
                    "SELECT key, msg_offset, attempt, retry_at_ms FROM prosody_deferred
                     WHERE group_id = $1 AND topic = $2 AND partition = $3
                     ORDER BY msg_offset",
                )
                .await?,
            put: client
                .prepare(
                    "INSERT INTO prosody_deferred
                         (group_id, topic, partition, msg_offset, key, attempt, retry_at_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (group_id, topic, partition, msg_offset)
                     DO UPDATE SET key = excluded.key, attempt = excluded.attempt,
                                   retry_at_ms = excluded.retry_at_ms",
                )
                .await?,
            remove: client
                .prepare(
                    "DELETE FROM prosody_deferred
                     WHERE group_id = $1 AND topic = $2 AND partition = $3 AND msg_offset = $4",
                )
                .await?,
        })
    }
}

impl DeferStore for PostgresStore {
    fn load<'a>(&'a self, scope: &'a PartitionScope) -> StoreFuture<'a, Vec<DeferredRecord>> {
        Box::pin(async move {
            let (group, topic) = (&*scope.group, &*scope.topic);
            let rows = self
                .postgres
                .run("deferred load", |connection| async move {
                    connection
                        .client
                        .query(
                            &connection.deferred.load,
                            &[&group, &topic, &scope.partition],
                        )
                        .await
                })
                .await?;
            rows.iter()
                .map(|row| {
                    let key: Vec<u8> = row.try_get(0)?;
                    let attempt: i32 = row.try_get(2)?;
                    Ok(DeferredRecord {
                        key: String::from_utf8_lossy(&key).into_owned(),
                        offset: row.try_get(1)?,
                        attempt: u32::try_from(attempt).unwrap_or(0),
                        retry_at_ms: row.try_get(3)?,
                    })
                })
                .collect::<Result<_, tokio_postgres::Error>>()
                .map_err(|error| query_error("deferred load", error))
        })
    }

    fn put<'a>(
        &'a self,
        scope: &'a PartitionScope,
        record: &'a DeferredRecord,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let (group, topic, key) = (&*scope.group, &*scope.topic, record.key.as_bytes());
            let attempt = i32::try_from(record.attempt).unwrap_or(i32::MAX);
            self.postgres
                .run("deferred put", |connection| async move {
                    connection
                        .client
                        .execute(
                            &connection.deferred.put,
                            &[
                                &group,
                                &topic,
                                &scope.partition,
                                &record.offset,
                                &key,
                                &attempt,
                                &record.retry_at_ms,
                            ],
                        )
                        .await
                })
                .await?;
            Ok(())
        })
    }

    fn remove<'a>(&'a self, scope: &'a PartitionScope, offset: i64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let (group, topic) = (&*scope.group, &*scope.topic);
            self.postgres
                .run("deferred remove", |connection| async move {
                    connection
                        .client
                        .execute(
                            &connection.deferred.remove,
                            &[&group, &topic, &scope.partition, &offset],
                        )
                        .await
                })
                .await?;
            Ok(())
        })
    }
}
