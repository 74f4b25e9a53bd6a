//! Timers in PostgreSQL: the `prosody_timers` table, its queries, and
//! [`TimerStore`] for [`PostgresStore`] (connection, migration and batching in
//! `store/`).
//!
//! The hot writes, `schedule` and `unschedule` (every fired timer is
//! unscheduled), go through the store's batching writer, one multi-row
//! statement per batch.

use std::collections::HashSet;

use tokio_postgres::{Client, Row, Statement};

use super::store::{PartitionScope, TimerStore};
use crate::store::{query_error, Batch, Postgres, PostgresStore, Schema, StoreError, StoreFuture};

/// The timer tables' migrations.
///
/// Keys are `bytea` rather than `text`: PostgreSQL text cannot hold a NUL and
/// its ordering depends on the database's collation, whereas bytes order the
/// same way as Rust's `str`, so `due` agrees with [`super::MemoryStore`].
pub(crate) const SCHEMA: Schema = Schema {
    component: "timers",
    migrations: &["
        CREATE TABLE IF NOT EXISTS prosody_timers (
            group_id   text    NOT NULL,
            topic      text    NOT NULL,
            partition  integer NOT NULL,
            key        bytea   NOT NULL,
            fire_at_ms bigint  NOT NULL,
            PRIMARY KEY (group_id, topic, partition, key, fire_at_ms)
        );
        CREATE INDEX IF NOT EXISTS prosody_timers_due
            ON prosody_timers (group_id, topic, partition, fire_at_ms, key);
    "],
};

/// `prosody_timers.traceparent`: the W3C trace context of the handler call
/// that scheduled the timer (NULL when it was not traced, and for every timer
/// stored before). A component of its own rather than version 2 of
/// [`SCHEMA`]: releases that know only version 1 refuse a newer `timers`
/// schema, and this nullable column is one they read and write correctly, so
/// in a rolling upgrade the processes not yet upgraded keep working.
pub(crate) const TRACE_SCHEMA: Schema = Schema {
    component: "timer_traces",
    migrations: &["ALTER TABLE prosody_timers ADD COLUMN IF NOT EXISTS traceparent text;"],
};

/// The timer statements, prepared once per connection.
pub(crate) struct Statements {
    schedule: Statement,
    unschedule: Statement,
    clear: Statement,
    clear_and_schedule: Statement,
    scheduled: Statement,
    due: Statement,
    due_after: Statement,
}

impl Statements {
    pub(crate) async fn prepare(client: &Client) -> Result<Self, tokio_postgres::Error> {
        const KEY: &str = "group_id = $1 AND topic = $2 AND partition = $3 AND key = $4";
        const PARTITION: &str = "group_id = $1 AND topic = $2 AND partition = $3";
        // A timer's identity, as the batched writes return it.
        const COLUMNS: &str = "group_id, topic, partition, key, fire_at_ms";
        const ROWS: &str =
            "unnest($1::text[], $2::text[], $3::integer[], $4::bytea[], $5::bigint[])
             AS batch(group_id, topic, partition, key, fire_at_ms)";
        const TRACED_ROWS: &str = "unnest($1::text[], $2::text[], $3::integer[], $4::bytea[],
                    $5::bigint[], $6::text[])
             AS batch(group_id, topic, partition, key, fire_at_ms, traceparent)";
        // One statement, so atomic: data-modifying CTEs run exactly once each.
        // The timer left is the caller's, so it takes the caller's trace
        // context; the row is only rewritten when that changes it.
        let clear_and_schedule = format!(
            "WITH removed AS (
                 DELETE FROM prosody_timers WHERE {KEY} AND fire_at_ms <> $5 RETURNING 1
             ), added AS (
                 INSERT INTO prosody_timers ({COLUMNS}, traceparent)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT ({COLUMNS}) DO UPDATE SET traceparent = excluded.traceparent
                 WHERE prosody_timers.traceparent IS DISTINCT FROM excluded.traceparent
             )
             SELECT count(*) FROM removed"
        );
        Ok(Self {
            // Batched writes: one row per write, and the rows actually
            // inserted or deleted come back to tell each caller its answer.
            // A timer already there keeps its trace context (the first
            // scheduler's): the same timer twice in one batch could not be
            // updated by one statement anyway.
            schedule: client
                .prepare(&format!(
                    "INSERT INTO prosody_timers ({COLUMNS}, traceparent)
                     SELECT {COLUMNS}, traceparent FROM {TRACED_ROWS}
                     ON CONFLICT DO NOTHING
                     RETURNING {COLUMNS}"
                ))
                .await?,
            unschedule: client
                .prepare(&format!(
                    "DELETE FROM prosody_timers AS t USING {ROWS}
                     WHERE t.group_id = batch.group_id AND t.topic = batch.topic
                       AND t.partition = batch.partition AND t.key = batch.key
                       AND t.fire_at_ms = batch.fire_at_ms
                     RETURNING t.group_id, t.topic, t.partition, t.key, t.fire_at_ms"
                ))
                .await?,
            clear: client
                .prepare(&format!("DELETE FROM prosody_timers WHERE {KEY}"))
                .await?,
            clear_and_schedule: client.prepare(&clear_and_schedule).await?,
            scheduled: client
                .prepare(&format!(
                    "SELECT fire_at_ms FROM prosody_timers WHERE {KEY} ORDER BY fire_at_ms"
                ))
                .await?,
            due: client
                .prepare(&format!(
                    "SELECT key, fire_at_ms, traceparent FROM prosody_timers
                     WHERE {PARTITION} AND fire_at_ms < $4
                     ORDER BY fire_at_ms, key LIMIT $5"
                ))
                .await?,
            due_after: client
                .prepare(&format!(
                    "SELECT key, fire_at_ms, traceparent FROM prosody_timers
                     WHERE {PARTITION} AND (fire_at_ms, key) > ($4, $5) AND fire_at_ms < $6
                     ORDER BY fire_at_ms, key LIMIT $7"
                ))
                .await?,
        })
    }
}

/// One `schedule` or `unschedule` call, queued for the batching writer.
pub(crate) struct TimerWrite {
    /// True to insert (schedule), false to delete (unschedule).
    insert: bool,
    scope: PartitionScope,
    key: String,
    at_ms: i64,
    /// The scheduler's `traceparent` (inserts only).
    trace_parent: Option<String>,
}

/// A timer as a batched statement returns it: group, topic, partition, key, time.
type TimerId = (String, String, i32, Vec<u8>, i64);

/// The writer's lanes: one statement each.
const SCHEDULE: usize = 0;
const UNSCHEDULE: usize = 1;

impl Batch for TimerWrite {
    type Id = TimerId;

    const LANES: usize = 2;

    fn lane(&self) -> usize {
        if self.insert {
            SCHEDULE
        } else {
            UNSCHEDULE
        }
    }

    fn operation(lane: usize) -> &'static str {
        if lane == SCHEDULE {
            "schedule"
        } else {
            "unschedule"
        }
    }

    fn id(&self) -> TimerId {
        (
            self.scope.group.to_string(),
            self.scope.topic.to_string(),
            self.scope.partition,
            self.key.as_bytes().to_vec(),
            self.at_ms,
        )
    }

    fn apply<'a>(
        postgres: &'a Postgres,
        lane: usize,
        writes: &'a [Self],
    ) -> StoreFuture<'a, HashSet<TimerId>> {
        Box::pin(async move {
            let operation = Self::operation(lane);
            let groups: Vec<&str> = writes.iter().map(|write| &*write.scope.group).collect();
            let topics: Vec<&str> = writes.iter().map(|write| &*write.scope.topic).collect();
            let partitions: Vec<i32> = writes.iter().map(|write| write.scope.partition).collect();
            let keys: Vec<&[u8]> = writes.iter().map(|write| write.key.as_bytes()).collect();
            let times: Vec<i64> = writes.iter().map(|write| write.at_ms).collect();
            let trace_parents: Vec<Option<&str>> = if lane == SCHEDULE {
                writes
                    .iter()
                    .map(|write| write.trace_parent.as_deref())
                    .collect()
            } else {
                Vec::new()
            };
            let (groups, topics, partitions, keys, times, trace_parents) =
                (&groups, &topics, &partitions, &keys, &times, &trace_parents);
            let rows = postgres
                .run(operation, move |connection| async move {
                    if lane == SCHEDULE {
                        connection
                            .client
                            .query(
                                &connection.timers.schedule,
                                &[groups, topics, partitions, keys, times, trace_parents],
                            )
                            .await
                    } else {
                        connection
                            .client
                            .query(
                                &connection.timers.unschedule,
                                &[groups, topics, partitions, keys, times],
                            )
                            .await
                    }
                })
                .await?;
            rows.iter()
                .map(|row| timer_id(row).map_err(|error| query_error(operation, error)))
                .collect()
        })
    }
}

fn timer_id(row: &Row) -> Result<TimerId, tokio_postgres::Error> {
    Ok((
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
        row.try_get(4)?,
    ))
}

impl PostgresStore {
    async fn write_timer(
        &self,
        insert: bool,
        scope: &PartitionScope,
        key: &str,
        at_ms: i64,
        trace_parent: Option<&str>,
    ) -> Result<bool, StoreError> {
        let write = TimerWrite {
            insert,
            scope: scope.clone(),
            key: key.to_owned(),
            at_ms,
            trace_parent: trace_parent.map(str::to_owned),
        };
        self.timer_writes.write(&self.postgres, write).await
    }
}

impl TimerStore for PostgresStore {
    fn schedule<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
    ) -> StoreFuture<'a, bool> {
        self.schedule_traced(scope, key, at_ms, None)
    }

    fn unschedule<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(self.write_timer(false, scope, key, at_ms, None))
    }

    fn clear<'a>(&'a self, scope: &'a PartitionScope, key: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(self.postgres.run("clear", move |connection| async move {
            connection
                .client
                .execute(
                    &connection.timers.clear,
                    &[
                        &&*scope.group,
                        &&*scope.topic,
                        &scope.partition,
                        &key.as_bytes(),
                    ],
                )
                .await
        }))
    }

    fn clear_and_schedule<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
    ) -> StoreFuture<'a, u64> {
        self.clear_and_schedule_traced(scope, key, at_ms, None)
    }

    fn scheduled<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
    ) -> StoreFuture<'a, Vec<i64>> {
        Box::pin(async move {
            let rows = self
                .postgres
                .run("scheduled", |connection| async move {
                    connection
                        .client
                        .query(
                            &connection.timers.scheduled,
                            &[
                                &&*scope.group,
                                &&*scope.topic,
                                &scope.partition,
                                &key.as_bytes(),
                            ],
                        )
                        .await
                })
                .await?;
            rows.iter()
                .map(|row| {
                    row.try_get(0)
                        .map_err(|error| query_error("scheduled", error))
                })
                .collect()
        })
    }

    fn due<'a>(
        &'a self,
        scope: &'a PartitionScope,
        after: Option<(i64, &'a str)>,
        before_ms: i64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<(String, i64)>> {
        let due = self.due_traced(scope, after, before_ms, limit);
        Box::pin(async move {
            Ok(due
                .await?
                .into_iter()
                .map(|(key, at_ms, _)| (key, at_ms))
                .collect())
        })
    }

    fn schedule_traced<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
        trace_parent: Option<&'a str>,
    ) -> StoreFuture<'a, bool> {
        Box::pin(self.write_timer(true, scope, key, at_ms, trace_parent))
    }

    fn clear_and_schedule_traced<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
        trace_parent: Option<&'a str>,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let removed: i64 = self
                .postgres
                .run("clear_and_schedule", |connection| async move {
                    connection
                        .client
                        .query_one(
                            &connection.timers.clear_and_schedule,
                            &[
                                &&*scope.group,
                                &&*scope.topic,
                                &scope.partition,
                                &key.as_bytes(),
                                &at_ms,
                                &trace_parent,
                            ],
                        )
                        .await?
                        .try_get(0)
                })
                .await?;
            Ok(u64::try_from(removed).unwrap_or(0))
        })
    }

    fn due_traced<'a>(
        &'a self,
        scope: &'a PartitionScope,
        after: Option<(i64, &'a str)>,
        before_ms: i64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<(String, i64, Option<String>)>> {
        Box::pin(async move {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = self
                .postgres
                .run("due", |connection| async move {
                    let (group, topic, partition) =
                        (&*scope.group, &*scope.topic, &scope.partition);
                    match after {
                        None => {
                            connection
                                .client
                                .query(
                                    &connection.timers.due,
                                    &[&group, &topic, partition, &before_ms, &limit],
                                )
                                .await
                        }
                        Some((after_ms, after_key)) => {
                            connection
                                .client
                                .query(
                                    &connection.timers.due_after,
                                    &[
                                        &group,
                                        &topic,
                                        partition,
                                        &after_ms,
                                        &after_key.as_bytes(),
                                        &before_ms,
                                        &limit,
                                    ],
                                )
                                .await
                        }
                    }
                })
                .await?;
            rows.iter()
                .map(|row| {
                    let key: Vec<u8> = row.try_get(0).map_err(|error| query_error("due", error))?;
                    let at_ms: i64 = row.try_get(1).map_err(|error| query_error("due", error))?;
                    let trace_parent: Option<String> =
                        row.try_get(2).map_err(|error| query_error("due", error))?;
                    let key = String::from_utf8(key).map_err(|error| query_error("due", error))?;
                    Ok((key, at_ms, trace_parent))
                })
                .collect()
        })
    }
}
