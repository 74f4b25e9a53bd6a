//! [`PostgresStore`]: durable timers in PostgreSQL.
//!
//! One connection, shared by every call: tokio-postgres pipelines concurrent
//! queries on it, so a pool buys little for these one-row statements. The
//! connection is replaced lazily: a call that finds it broken fails with a
//! retriable [`StoreError::Unavailable`] and drops it, and the next call opens a
//! new one (re-running the idempotent migration, in case the database was
//! rebuilt meanwhile).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, NoTls, Statement};

use super::store::{BoxError, PartitionScope, StoreError, StoreFuture, TimerStore};

/// How long opening a connection may take when the URL sets no `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long any one call (or opening and migrating a connection) may take
/// before the connection is presumed dead.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Key of the transaction-scoped advisory lock that serialises schema
/// migrations across processes ("prosody" in ASCII, then 0x01). Every Prosody
/// component that migrates tables takes this same lock.
pub(crate) const SCHEMA_LOCK_KEY: i64 = 0x7072_6f73_6f64_7901;

/// This component's name in `prosody_schema_version`.
const COMPONENT: &str = "timers";

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

/// Durable timers in PostgreSQL, the store behind `database_url`.
///
/// [`connect`](Self::connect) creates or migrates the schema (tables
/// `prosody_timers` and `prosody_schema_version`), safely when several
/// processes start at once. TLS is not supported: connections use no TLS, and a
/// URL with `sslmode=require` is rejected as a configuration error.
pub struct PostgresStore {
    config: Config,
    /// The live connection, `None` after one broke. A `tokio` mutex so only one
    /// caller at a time reconnects while the others wait for its result.
    connection: Mutex<Option<Arc<Connection>>>,
}

struct Connection {
    client: Client,
    statements: Statements,
}

/// Every statement a call runs, prepared once per connection.
struct Statements {
    schedule: Statement,
    unschedule: Statement,
    clear: Statement,
    clear_and_schedule: Statement,
    scheduled: Statement,
    due: Statement,
    due_after: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Self, tokio_postgres::Error> {
        const KEY: &str = "group_id = $1 AND topic = $2 AND partition = $3 AND key = $4";
        const PARTITION: &str = "group_id = $1 AND topic = $2 AND partition = $3";
        let schedule = "INSERT INTO prosody_timers (group_id, topic, partition, key, fire_at_ms)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING";
        // One statement, so atomic: data-modifying CTEs run exactly once each.
        let clear_and_schedule = format!(
            "WITH removed AS (
                 DELETE FROM prosody_timers WHERE {KEY} AND fire_at_ms <> $5 RETURNING 1
             ), added AS (
                 {schedule} RETURNING 1
             )
             SELECT count(*) FROM removed"
        );
        Ok(Self {
            schedule: client.prepare(schedule).await?,
            unschedule: client
                .prepare(&format!(
                    "DELETE FROM prosody_timers WHERE {KEY} AND fire_at_ms = $5"
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
    if error.is_closed() {
        return StoreError::Unavailable {
            operation,
            source: error.into(),
        };
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
            return StoreError::Unavailable {
                operation,
                source: error.into(),
            };
        }
        // 28 invalid authorisation, 3D000 no such database.
        if code.starts_with("28") || code == "3D000" {
            return StoreError::Configuration {
                reason: describe(&error),
            };
        }
        return StoreError::Query {
            operation,
            source: error.into(),
        };
    }
    let io = std::error::Error::source(&error).is_some_and(|source| source.is::<std::io::Error>());
    match (io, phase) {
        (true, _) => StoreError::Unavailable {
            operation,
            source: error.into(),
        },
        (false, Phase::Connect) => StoreError::Configuration {
            reason: describe(&error),
        },
        (false, Phase::Query) => StoreError::Query {
            operation,
            source: error.into(),
        },
    }
}

/// A failed [`PostgresStore::attempt`].
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
    let supported = i32::try_from(migrations.len()).map_err(|_| StoreError::Query {
        operation: "migrate",
        source: "too many migrations".into(),
    })?;
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

impl PostgresStore {
    /// Connects to `url` (a `postgres://` URL or a `key=value` connection
    /// string) and creates or migrates the timer tables.
    ///
    /// Must run inside a tokio runtime: the connection is driven by a spawned
    /// task. Fails with a retriable [`StoreError::Unavailable`] when the
    /// database cannot be reached, so a caller may keep trying.
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
        Ok(Self {
            config,
            connection: Mutex::new(Some(Arc::new(connection))),
        })
    }

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
    /// effect is that `unschedule` whose first attempt ran but whose answer was
    /// lost reports false.
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
                Err(_) => (
                    StoreError::Unavailable {
                        operation,
                        source: format!("no answer within {OPERATION_TIMEOUT:?}").into(),
                    },
                    false,
                ),
            };
        if error.is_retriable() {
            tracing::warn!(%error, "timer store: dropping PostgreSQL connection");
            self.discard(connection).await;
        }
        Err(Failure { error, lost })
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
                let key: Vec<u8> = row.try_get(0).map_err(|error| StoreError::Query {
                    operation: "due",
                    source: error.into(),
                })?;
                let at_ms: i64 = row.try_get(1).map_err(|error| StoreError::Query {
                    operation: "due",
                    source: error.into(),
                })?;
                let key = String::from_utf8(key).map_err(|error| StoreError::Query {
                    operation: "due",
                    source: BoxError::from(format!("stored timer key is not UTF-8: {error}")),
                })?;
                Ok((key, at_ms))
            })
            .collect()
    }
}

/// Opens a connection, migrates and prepares, within [`OPERATION_TIMEOUT`].
async fn open(config: &Config) -> Result<Connection, StoreError> {
    let open = async {
        let (mut client, connection) = config
            .connect(NoTls)
            .await
            .map_err(|error| classify("connect", Phase::Connect, error))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(%error, "timer store: PostgreSQL connection ended");
            }
        });
        migrate(&mut client, COMPONENT, MIGRATIONS).await?;
        let statements = Statements::prepare(&client)
            .await
            .map_err(|error| classify("prepare", Phase::Query, error))?;
        Ok(Connection { client, statements })
    };
    tokio::time::timeout(OPERATION_TIMEOUT, open)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable {
                operation: "connect",
                source: format!("no answer within {OPERATION_TIMEOUT:?}").into(),
            })
        })
}

impl fmt::Debug for PostgresStore {
    /// Names the database without its credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("host", &self.config.get_hosts())
            .field("port", &self.config.get_ports())
            .field("dbname", &self.config.get_dbname())
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
        Box::pin(async move {
            let added = self
                .run("schedule", |connection| async move {
                    connection
                        .client
                        .execute(
                            &connection.statements.schedule,
                            &[
                                &&*scope.group,
                                &&*scope.topic,
                                &scope.partition,
                                &key.as_bytes(),
                                &at_ms,
                            ],
                        )
                        .await
                })
                .await?;
            Ok(added == 1)
        })
    }

    fn unschedule<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let removed = self
                .run("unschedule", |connection| async move {
                    connection
                        .client
                        .execute(
                            &connection.statements.unschedule,
                            &[
                                &&*scope.group,
                                &&*scope.topic,
                                &scope.partition,
                                &key.as_bytes(),
                                &at_ms,
                            ],
                        )
                        .await
                })
                .await?;
            Ok(removed == 1)
        })
    }

    fn clear<'a>(&'a self, scope: &'a PartitionScope, key: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(self.run("clear", move |connection| async move {
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
                    row.try_get(0).map_err(|error| StoreError::Query {
                        operation: "scheduled",
                        source: error.into(),
                    })
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
        Box::pin(self.range(scope, None, before_ms, limit))
    }

    fn due_after<'a>(
        &'a self,
        scope: &'a PartitionScope,
        after_ms: i64,
        after_key: &'a str,
        before_ms: i64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<(String, i64)>> {
        Box::pin(self.range(scope, Some((after_ms, after_key)), before_ms, limit))
    }
}
