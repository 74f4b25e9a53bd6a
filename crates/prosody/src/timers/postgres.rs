//! [`PostgresStore`]: durable timers in PostgreSQL.
//!
//! One connection, shared by every call: tokio-postgres pipelines concurrent
//! queries on it. What bounds throughput is the commit (a WAL flush) each
//! statement costs, so the hot writes, `schedule` and `unschedule` (every fired
//! timer is unscheduled), go through a writer task that gathers the calls
//! waiting while the previous batch commits into one multi-row statement. A
//! lone call still runs at once, alone.
//!
//! The connection is replaced lazily: a call that finds it broken fails with a
//! retriable [`StoreError::Unavailable`] and drops it, and the next call opens a
//! new one (re-running the idempotent migration, in case the database was
//! rebuilt meanwhile).

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, NoTls, Row, Statement};

use super::store::{source, PartitionScope, Reason, StoreError, StoreFuture, TimerStore};
use crate::dedup::{DedupStore, HandledId};

/// How long opening a connection may take when the URL sets no `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long any one statement (or opening and migrating a connection) may take
/// before the connection is presumed dead.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Most writes the writer task puts in one statement.
const MAX_BATCH: usize = 512;

/// Key of the transaction-scoped advisory lock that serialises schema
/// migrations across processes ("prosody" in ASCII, then 0x01). Every Prosody
/// component that migrates tables takes this same lock.
pub(crate) const SCHEMA_LOCK_KEY: i64 = 0x7072_6f73_6f64_7901;

/// The timer tables' name in `prosody_schema_version`.
const COMPONENT: &str = "timers";

/// The deduplication records' name in `prosody_schema_version`.
const DEDUP_COMPONENT: &str = "dedup";

/// Deduplication migrations, oldest first (same rules as [`MIGRATIONS`]).
/// `id` is `bytea` for the same reason keys are: any string fits.
const DEDUP_MIGRATIONS: &[&str] = &["
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
"];

/// Most expired deduplication records one sweep deletes.
const PURGE_LIMIT: i64 = 10_000;

/// How often, at most, a store sweeps expired deduplication records.
const PURGE_EVERY: Duration = Duration::from_secs(600);

/// Migrations, oldest first: the schema is at version `n` once the first `n`
/// have run. Never edit one that has shipped; append a new one.
///
/// Keys are `bytea` rather than `text`: PostgreSQL text cannot hold a NUL and
/// its ordering depends on the database's collation, whereas bytes order the
/// same way as Rust's `str`, so `due` agrees with [`super::MemoryStore`].
const MIGRATIONS: &[&str] = &["
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
"];

/// Durable timers (and message-id deduplication records) in PostgreSQL, the
/// store behind `database_url`.
///
/// [`connect`](Self::connect) creates or migrates the schema (tables
/// `prosody_timers`, `prosody_dedup` and `prosody_schema_version`), safely when
/// several processes start at once. The connection and the batching writer are tasks
/// on the tokio runtime `connect` ran in, which must outlive the store.
///
/// TLS is not supported: connections use no TLS, and a URL with
/// `sslmode=require` is rejected as a configuration error.
pub struct PostgresStore {
    shared: Arc<Shared>,
    /// To the writer task, which ends when the store (this sender) is dropped.
    writes: mpsc::UnboundedSender<Write>,
}

/// What the store's calls and its writer task share.
struct Shared {
    config: Config,
    /// The live connection, `None` after one broke. A `tokio` mutex so only one
    /// caller at a time reconnects while the others wait for its result.
    connection: Mutex<Option<Arc<Connection>>>,
    /// When expired deduplication records were last swept (ms since the epoch).
    last_purge_ms: AtomicI64,
}

struct Connection {
    client: Client,
    statements: Statements,
}

/// Every statement the store runs, prepared once per connection.
struct Statements {
    schedule: Statement,
    unschedule: Statement,
    clear: Statement,
    clear_and_schedule: Statement,
    scheduled: Statement,
    due: Statement,
    due_after: Statement,
    dedup_contains: Statement,
    dedup_record: Statement,
    dedup_purge: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Self, tokio_postgres::Error> {
        const KEY: &str = "group_id = $1 AND topic = $2 AND partition = $3 AND key = $4";
        const PARTITION: &str = "group_id = $1 AND topic = $2 AND partition = $3";
        const COLUMNS: &str = "group_id, topic, partition, key, fire_at_ms";
        const ROWS: &str =
            "unnest($1::text[], $2::text[], $3::integer[], $4::bytea[], $5::bigint[])
             AS batch(group_id, topic, partition, key, fire_at_ms)";
        // One statement, so atomic: data-modifying CTEs run exactly once each.
        let clear_and_schedule = format!(
            "WITH removed AS (
                 DELETE FROM prosody_timers WHERE {KEY} AND fire_at_ms <> $5 RETURNING 1
             ), added AS (
                 INSERT INTO prosody_timers ({COLUMNS}) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT DO NOTHING
             )
             SELECT count(*) FROM removed"
        );
        Ok(Self {
            // Batched writes: one row per write, and the rows actually
            // inserted or deleted come back to tell each caller its answer.
            schedule: client
                .prepare(&format!(
                    "INSERT INTO prosody_timers ({COLUMNS})
                     SELECT {COLUMNS} FROM {ROWS}
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
                    "SELECT key, fire_at_ms FROM prosody_timers
                     WHERE {PARTITION} AND fire_at_ms < $4
                     ORDER BY fire_at_ms, key LIMIT $5"
                ))
                .await?,
            due_after: client
                .prepare(&format!(
                    "SELECT key, fire_at_ms FROM prosody_timers
                     WHERE {PARTITION} AND (fire_at_ms, key) > ($4, $5) AND fire_at_ms < $6
                     ORDER BY fire_at_ms, key LIMIT $7"
                ))
                .await?,
            dedup_contains: client
                .prepare(
                    "SELECT 1 FROM prosody_dedup
                     WHERE group_id = $1 AND topic = $2 AND key = $3 AND id = $4
                       AND version = $5 AND expires_at_ms > $6",
                )
                .await?,
            dedup_record: client
                .prepare(
                    "INSERT INTO prosody_dedup (group_id, topic, key, id, version, expires_at_ms)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (group_id, topic, key, id, version)
                     DO UPDATE SET expires_at_ms = excluded.expires_at_ms",
                )
                .await?,
            dedup_purge: client
                .prepare(
                    "DELETE FROM prosody_dedup WHERE ctid IN (
                         SELECT ctid FROM prosody_dedup WHERE expires_at_ms <= $1 LIMIT $2
                     )",
                )
                .await?,
        })
    }
}

/// Where an error happened: at connect time, errors without a SQLSTATE are
/// configuration problems unless they are I/O; later they are query failures.
#[derive(Clone, Copy)]
enum Phase {
    Connect,
    Query,
}

/// Sorts a driver error into the [`StoreError`] variant that tells the caller
/// whether to retry.
fn classify(operation: &'static str, phase: Phase, error: tokio_postgres::Error) -> StoreError {
    let unavailable = |error| StoreError::Unavailable {
        operation,
        source: source(error),
    };
    if error.is_closed() {
        return unavailable(error);
    }
    if let Some(code) = error.code() {
        let code = code.code();
        // 08 connection exception, 53 insufficient resources, 57 operator
        // intervention (shutdown, cannot connect now, query cancelled),
        // 40 transaction rollback (serialisation failure, deadlock).
        if ["08", "53", "57", "40"]
            .iter()
            .any(|class| code.starts_with(class))
        {
            return unavailable(error);
        }
        // 28 invalid authorisation, 3D000 no such database.
        if code.starts_with("28") || code == "3D000" {
            return StoreError::Configuration {
                reason: describe(&error),
            };
        }
        return query_error(operation, error);
    }
    let io = std::error::Error::source(&error).is_some_and(|source| source.is::<std::io::Error>());
    match (io, phase) {
        (true, _) => unavailable(error),
        (false, Phase::Connect) => StoreError::Configuration {
            reason: describe(&error),
        },
        (false, Phase::Query) => query_error(operation, error),
    }
}

fn query_error(
    operation: &'static str,
    error: impl std::error::Error + Send + Sync + 'static,
) -> StoreError {
    StoreError::Query {
        operation,
        source: source(error),
    }
}

/// A failed [`Shared::attempt`].
struct Failure {
    error: StoreError,
    /// The connection was found closed or terminated by the server.
    lost: bool,
}

/// True when `error` says the connection itself is gone (closed, connection
/// exception, server shutdown) rather than that one statement failed.
fn connection_lost(error: &tokio_postgres::Error) -> bool {
    error.is_closed()
        || error.code().is_some_and(|code| {
            let code = code.code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        })
}

/// The driver's message with its database detail, if any.
/// A failed connect, with its causes and the server it tried: tokio-postgres
/// shows only "error connecting to server" and keeps the reason (connection
/// refused, unknown host, timeout) in its source. Never shows the password.
fn connect_error(config: &Config, error: tokio_postgres::Error) -> StoreError {
    let detail = format!("{} ({})", with_causes(&error), target(config));
    let detail = match config.get_password() {
        Some(password) if !password.is_empty() => {
            detail.replace(String::from_utf8_lossy(password).as_ref(), "***")
        }
        _ => detail,
    };
    let is_db_error = error.as_db_error().is_some();
    match classify("connect", Phase::Connect, error) {
        StoreError::Unavailable { operation, .. } => StoreError::Unavailable {
            operation,
            source: source(Reason(detail)),
        },
        StoreError::Configuration { .. } if !is_db_error => {
            StoreError::Configuration { reason: detail }
        }
        other => other,
    }
}

/// `error` followed by each of its sources, `: `-separated.
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let shown = next.to_string();
        if !text.ends_with(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        cause = next.source();
    }
    text
}

/// Where a connect went: hosts, ports, database and user (no password).
fn target(config: &Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(index, host)| {
            let port = ports
                .get(index)
                .or_else(|| ports.first())
                .copied()
                .unwrap_or(5432);
            match host {
                tokio_postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
                tokio_postgres::config::Host::Unix(path) => {
                    format!("{}/.s.PGSQL.{port}", path.display())
                }
            }
        })
        .collect();
    let mut text = format!("server {}", hosts.join(", "));
    if let Some(database) = config.get_dbname() {
        text.push_str(&format!(", database {database}"));
    }
    if let Some(user) = config.get_user() {
        text.push_str(&format!(", user {user}"));
    }
    text
}

fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => error.to_string(),
    }
}

/// Brings `component`'s tables to the newest of `migrations`, under
/// [`SCHEMA_LOCK_KEY`] inside one transaction: concurrent starters queue on the
/// lock, and the later ones find the work done. Without the lock, two
/// `CREATE TABLE IF NOT EXISTS` can still collide on the catalog.
pub(crate) async fn migrate(
    client: &mut Client,
    component: &str,
    migrations: &[&str],
) -> Result<(), StoreError> {
    let err = |error| classify("migrate", Phase::Query, error);
    let supported = i32::try_from(migrations.len())
        .map_err(|_| query_error("migrate", Reason("too many migrations".to_owned())))?;
    let transaction = client.transaction().await.map_err(err)?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_KEY])
        .await
        .map_err(err)?;
    transaction
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS prosody_schema_version (
                 component  text        PRIMARY KEY,
                 version    integer     NOT NULL,
                 updated_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(err)?;
    let found: i32 = match transaction
        .query_opt(
            "SELECT version FROM prosody_schema_version WHERE component = $1",
            &[&component],
        )
        .await
        .map_err(err)?
    {
        Some(row) => row.try_get(0).map_err(err)?,
        None => 0,
    };
    if found > supported {
        return Err(StoreError::SchemaTooNew { found, supported });
    }
    if found == supported {
        // Nothing to do; dropping the transaction rolls it back and frees the lock.
        return Ok(());
    }
    for migration in migrations.iter().skip(usize::try_from(found).unwrap_or(0)) {
        transaction.batch_execute(migration).await.map_err(err)?;
    }
    transaction
        .execute(
            "INSERT INTO prosody_schema_version (component, version) VALUES ($1, $2)
             ON CONFLICT (component) DO UPDATE SET version = excluded.version, updated_at = now()",
            &[&component, &supported],
        )
        .await
        .map_err(err)?;
    transaction.commit().await.map_err(err)?;
    tracing::info!(
        component,
        from = found,
        to = supported,
        "migrated PostgreSQL schema"
    );
    Ok(())
}

/// Opens a connection, migrates and prepares, within [`OPERATION_TIMEOUT`].
async fn open(config: &Config) -> Result<Connection, StoreError> {
    let open = async {
        let (mut client, connection) = config
            .connect(NoTls)
            .await
            .map_err(|error| connect_error(config, error))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(%error, "timer store: PostgreSQL connection ended");
            }
        });
        migrate(&mut client, COMPONENT, MIGRATIONS).await?;
        migrate(&mut client, DEDUP_COMPONENT, DEDUP_MIGRATIONS).await?;
        let statements = Statements::prepare(&client)
            .await
            .map_err(|error| classify("prepare", Phase::Query, error))?;
        Ok(Connection { client, statements })
    };
    tokio::time::timeout(OPERATION_TIMEOUT, open)
        .await
        .unwrap_or_else(|_| Err(timed_out("connect")))
}

fn timed_out(operation: &'static str) -> StoreError {
    StoreError::Unavailable {
        operation,
        source: source(Reason(format!("no answer within {OPERATION_TIMEOUT:?}"))),
    }
}

impl Shared {
    /// The live connection, opening a new one if the last one broke; true
    /// when it was opened by this call.
    async fn connection(&self) -> Result<(Arc<Connection>, bool), StoreError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            if !connection.client.is_closed() {
                return Ok((Arc::clone(connection), false));
            }
        }
        *slot = None;
        let connection = Arc::new(open(&self.config).await?);
        *slot = Some(Arc::clone(&connection));
        tracing::info!("connected to PostgreSQL");
        Ok((connection, true))
    }

    /// Forgets `broken` unless another caller already replaced it.
    async fn discard(&self, broken: &Arc<Connection>) {
        let mut slot = self.connection.lock().await;
        if slot
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, broken))
        {
            *slot = None;
        }
    }

    /// Runs `call` on the live connection with a deadline.
    ///
    /// A connection that went stale while idle (the server restarted, say) can
    /// look alive until it is used. When a reused connection turns out lost,
    /// the call is made once more on a new one, so a database that came back is
    /// used transparently. Every statement is safe to repeat; the only visible
    /// effect is that a write whose first attempt ran but whose answer was lost
    /// reports false ("already scheduled", "did not exist").
    async fn run<T, F, Fut>(&self, operation: &'static str, call: F) -> Result<T, StoreError>
    where
        F: Fn(Arc<Connection>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let (connection, fresh) = self.connection().await?;
        match self.attempt(operation, &connection, &call).await {
            Err(Failure { lost: true, .. }) if !fresh => {
                let (connection, _) = self.connection().await?;
                self.attempt(operation, &connection, &call)
                    .await
                    .map_err(|failure| failure.error)
            }
            result => result.map_err(|failure| failure.error),
        }
    }

    /// One try of `call`, discarding the connection when the failure says it
    /// is unusable.
    async fn attempt<T, F, Fut>(
        &self,
        operation: &'static str,
        connection: &Arc<Connection>,
        call: &F,
    ) -> Result<T, Failure>
    where
        F: Fn(Arc<Connection>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let (error, lost) =
            match tokio::time::timeout(OPERATION_TIMEOUT, call(Arc::clone(connection))).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(error)) => {
                    let lost = connection_lost(&error);
                    (classify(operation, Phase::Query, error), lost)
                }
                Err(_) => (timed_out(operation), false),
            };
        if error.is_retriable() {
            tracing::warn!(%error, "timer store: dropping PostgreSQL connection");
            self.discard(connection).await;
        }
        Err(Failure { error, lost })
    }

    /// Runs one batch of `kind` writes; the timers it actually inserted or deleted.
    async fn write_batch(
        &self,
        kind: WriteKind,
        writes: &[Write],
    ) -> Result<HashSet<TimerId>, StoreError> {
        let operation = kind.operation();
        let groups: Vec<&str> = writes.iter().map(|write| &*write.scope.group).collect();
        let topics: Vec<&str> = writes.iter().map(|write| &*write.scope.topic).collect();
        let partitions: Vec<i32> = writes.iter().map(|write| write.scope.partition).collect();
        let keys: Vec<&[u8]> = writes.iter().map(|write| write.key.as_bytes()).collect();
        let times: Vec<i64> = writes.iter().map(|write| write.at_ms).collect();
        let (groups, topics, partitions, keys, times) =
            (&groups, &topics, &partitions, &keys, &times);
        let rows = self
            .run(operation, move |connection| async move {
                let statement = match kind {
                    WriteKind::Schedule => &connection.statements.schedule,
                    WriteKind::Unschedule => &connection.statements.unschedule,
                };
                connection
                    .client
                    .query(statement, &[groups, topics, partitions, keys, times])
                    .await
            })
            .await?;
        rows.iter()
            .map(|row| timer_id(row).map_err(|error| query_error(operation, error)))
            .collect()
    }

    /// Runs `writes` as one batch and answers each caller.
    async fn write(&self, kind: WriteKind, writes: Vec<Write>) {
        if writes.is_empty() {
            return;
        }
        match self.write_batch(kind, &writes).await {
            Ok(changed) => {
                // The same timer twice in one batch changes once: the first
                // caller gets the answer, later ones see it already done.
                let mut seen = HashSet::new();
                for write in writes {
                    let id = write.id();
                    let changed = changed.contains(&id) && seen.insert(id);
                    // A caller that stopped waiting needs no answer.
                    let _ = write.reply.send(Ok(changed));
                }
            }
            // A write the database rejects (say, a NUL in a group name) must
            // not fail its neighbours: try each alone.
            Err(error) if !error.is_retriable() && writes.len() > 1 => {
                for write in writes {
                    let result = self
                        .write_batch(kind, std::slice::from_ref(&write))
                        .await
                        .map(|changed| !changed.is_empty());
                    let _ = write.reply.send(result);
                }
            }
            Err(error) => {
                for write in writes {
                    let _ = write.reply.send(Err(error.clone()));
                }
            }
        }
    }

    async fn range(
        &self,
        scope: &PartitionScope,
        after: Option<(i64, &str)>,
        before_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .run("due", |connection| async move {
                let (group, topic, partition) = (&*scope.group, &*scope.topic, &scope.partition);
                match after {
                    None => {
                        connection
                            .client
                            .query(
                                &connection.statements.due,
                                &[&group, &topic, partition, &before_ms, &limit],
                            )
                            .await
                    }
                    Some((after_ms, after_key)) => {
                        connection
                            .client
                            .query(
                                &connection.statements.due_after,
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
                let key = String::from_utf8(key).map_err(|error| query_error("due", error))?;
                Ok((key, at_ms))
            })
            .collect()
    }
}

/// The writes the writer task batches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WriteKind {
    Schedule,
    Unschedule,
}

impl WriteKind {
    fn operation(self) -> &'static str {
        match self {
            Self::Schedule => "schedule",
            Self::Unschedule => "unschedule",
        }
    }
}

/// One queued `schedule` or `unschedule` call.
struct Write {
    kind: WriteKind,
    scope: PartitionScope,
    key: String,
    at_ms: i64,
    /// True when the timer was inserted (schedule) or deleted (unschedule).
    reply: oneshot::Sender<Result<bool, StoreError>>,
}

/// A timer as a batched statement returns it: group, topic, partition, key, time.
type TimerId = (String, String, i32, Vec<u8>, i64);

impl Write {
    fn id(&self) -> TimerId {
        (
            self.scope.group.to_string(),
            self.scope.topic.to_string(),
            self.scope.partition,
            self.key.as_bytes().to_vec(),
            self.at_ms,
        )
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

/// The writer task: takes every write queued while the previous batch ran
/// (up to [`MAX_BATCH`]) and commits them together. Ends with the store.
async fn write_batches(shared: Arc<Shared>, mut queue: mpsc::UnboundedReceiver<Write>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (schedules, unschedules): (Vec<Write>, Vec<Write>) = batch
            .drain(..)
            .partition(|write| write.kind == WriteKind::Schedule);
        // Calls still waiting in one batch were concurrent, so either order is
        // one they could have had; running both at once pipelines them.
        tokio::join!(
            shared.write(WriteKind::Schedule, schedules),
            shared.write(WriteKind::Unschedule, unschedules),
        );
    }
}

impl PostgresStore {
    /// Connects to `url` (a `postgres://` URL or a `key=value` connection
    /// string) and creates or migrates the timer tables.
    ///
    /// Must run inside a tokio runtime: the connection and the writer are
    /// spawned tasks. Fails with a retriable [`StoreError::Unavailable`] when
    /// the database cannot be reached, so a caller may keep trying.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let mut config: Config =
            url.parse()
                .map_err(|error: tokio_postgres::Error| StoreError::Configuration {
                    reason: error.to_string(),
                })?;
        if !matches!(config.get_ssl_mode(), SslMode::Disable | SslMode::Prefer) {
            return Err(StoreError::Configuration {
                reason: "TLS is not supported; use sslmode=disable or sslmode=prefer".to_owned(),
            });
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("prosody");
        let connection = open(&config).await?;
        let shared = Arc::new(Shared {
            config,
            connection: Mutex::new(Some(Arc::new(connection))),
            last_purge_ms: AtomicI64::new(0),
        });
        let (writes, queue) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(Arc::clone(&shared), queue));
        Ok(Self { shared, writes })
    }

    /// Queues a write for the writer task and waits for its answer.
    async fn write(
        &self,
        kind: WriteKind,
        scope: &PartitionScope,
        key: &str,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let stopped = || {
            query_error(
                kind.operation(),
                Reason(
                    "the timer store's writer task stopped (was its tokio runtime shut down?)"
                        .to_owned(),
                ),
            )
        };
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(Write {
                kind,
                scope: scope.clone(),
                key: key.to_owned(),
                at_ms,
                reply,
            })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl fmt::Debug for PostgresStore {
    /// Names the database without its credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.shared.config;
        f.debug_struct("PostgresStore")
            .field("host", &config.get_hosts())
            .field("port", &config.get_ports())
            .field("dbname", &config.get_dbname())
            .finish_non_exhaustive()
    }
}

impl TimerStore for PostgresStore {
    fn schedule<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(self.write(WriteKind::Schedule, scope, key, at_ms))
    }

    fn unschedule<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(self.write(WriteKind::Unschedule, scope, key, at_ms))
    }

    fn clear<'a>(&'a self, scope: &'a PartitionScope, key: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(self.shared.run("clear", move |connection| async move {
            connection
                .client
                .execute(
                    &connection.statements.clear,
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
        Box::pin(async move {
            let removed: i64 = self
                .shared
                .run("clear_and_schedule", |connection| async move {
                    connection
                        .client
                        .query_one(
                            &connection.statements.clear_and_schedule,
                            &[
                                &&*scope.group,
                                &&*scope.topic,
                                &scope.partition,
                                &key.as_bytes(),
                                &at_ms,
                            ],
                        )
                        .await?
                        .try_get(0)
                })
                .await?;
            Ok(u64::try_from(removed).unwrap_or(0))
        })
    }

    fn scheduled<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
    ) -> StoreFuture<'a, Vec<i64>> {
        Box::pin(async move {
            let rows = self
                .shared
                .run("scheduled", |connection| async move {
                    connection
                        .client
                        .query(
                            &connection.statements.scheduled,
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
        before_ms: i64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<(String, i64)>> {
        Box::pin(self.shared.range(scope, None, before_ms, limit))
    }

    fn due_after<'a>(
        &'a self,
        scope: &'a PartitionScope,
        after_ms: i64,
        after_key: &'a str,
        before_ms: i64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<(String, i64)>> {
        Box::pin(
            self.shared
                .range(scope, Some((after_ms, after_key)), before_ms, limit),
        )
    }
}

impl DedupStore for PostgresStore {
    fn contains<'a>(&'a self, handled: &'a HandledId, now_ms: i64) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let row = self
                .shared
                .run("dedup lookup", |connection| async move {
                    connection
                        .client
                        .query_opt(
                            &connection.statements.dedup_contains,
                            &[
                                &&*handled.group,
                                &&*handled.topic,
                                &handled.key.as_bytes(),
                                &handled.id.as_bytes(),
                                &&*handled.version,
                                &now_ms,
                            ],
                        )
                        .await
                })
                .await?;
            Ok(row.is_some())
        })
    }

    fn record<'a>(&'a self, handled: &'a HandledId, expires_at_ms: i64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.shared
                .run("dedup record", |connection| async move {
                    connection
                        .client
                        .execute(
                            &connection.statements.dedup_record,
                            &[
                                &&*handled.group,
                                &&*handled.topic,
                                &handled.key.as_bytes(),
                                &handled.id.as_bytes(),
                                &&*handled.version,
                                &expires_at_ms,
                            ],
                        )
                        .await
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
        let now = crate::dedup::now_ms();
        let every = i64::try_from(PURGE_EVERY.as_millis()).unwrap_or(i64::MAX);
        let last = self.shared.last_purge_ms.load(Ordering::Relaxed);
        if now - last < every
            || self
                .shared
                .last_purge_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let purged = shared
                .run("dedup purge", |connection| async move {
                    connection
                        .client
                        .execute(&connection.statements.dedup_purge, &[&now, &PURGE_LIMIT])
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
