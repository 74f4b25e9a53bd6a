//! [`PostgresStore`]: timers and deduplication records in PostgreSQL, on one
//! connection shared by every call (tokio-postgres pipelines concurrent
//! queries on it).
//!
//! The connection is opened by the first call, never by `subscribe`, so a
//! database that is down at start-up is retried by the calls that need it. It
//! is replaced lazily too: a call that finds it broken fails with a retriable
//! [`StoreError::Unavailable`] and drops it, and the next call opens a new one
//! (re-running the idempotent migrations, in case the database was rebuilt
//! meanwhile).

use std::fmt;
use std::future::Future;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, NoTls};

use super::error::{query_error, source, Reason, StoreError};
use super::migrate::Schema;
use super::writer::Writer;
use crate::consumer::defer::postgres as deferred;
use crate::dedup::postgres as dedup;
use crate::timers::postgres as timers;

/// How long opening a connection may take when the URL sets no `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long any one statement (or opening and migrating a connection) may take
/// before the connection is presumed dead.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Every component's tables, migrated on each new connection.
/// (`timers::TRACE_SCHEMA` after `timers::SCHEMA`: it alters its table.)
const SCHEMAS: [Schema; 4] = [
    timers::SCHEMA,
    timers::TRACE_SCHEMA,
    dedup::SCHEMA,
    deferred::SCHEMA,
];

/// Durable timers, message-id deduplication records and deferred messages in
/// PostgreSQL, the store behind `database_url`.
///
/// The first call (or [`connect`](Self::connect)) creates or migrates the
/// schema (tables `prosody_timers`, `prosody_dedup`, `prosody_deferred` and
/// `prosody_schema_version`), safely when several processes start at once.
/// The connection and the batching writer are tasks on the tokio runtime of
/// the call that started them, which must outlive the store.
///
/// TLS is not supported: connections use no TLS, and a URL with
/// `sslmode=require` is rejected as a configuration error.
pub struct PostgresStore {
    pub(crate) postgres: Arc<Postgres>,
    /// Batches `schedule` and `unschedule`: every fired timer is unscheduled.
    pub(crate) timer_writes: Writer<timers::TimerWrite>,
}

/// The connection and what the store's calls and its writer task share.
pub(crate) struct Postgres {
    /// The parsed URL, or why it cannot be used (reported by every call).
    config: Result<Config, StoreError>,
    /// The live connection, `None` before the first call and after one broke.
    /// A `tokio` mutex so only one caller at a time connects while the others
    /// wait for its result.
    connection: Mutex<Option<Arc<Connection>>>,
    /// When expired deduplication records were last swept (ms since the epoch).
    pub(crate) dedup_purged_ms: AtomicI64,
}

/// One open connection and every component's statements, prepared on it.
pub(crate) struct Connection {
    pub(crate) client: Client,
    pub(crate) timers: timers::Statements,
    pub(crate) dedup: dedup::Statements,
    pub(crate) deferred: deferred::Statements,
}

impl PostgresStore {
    /// A store for `url` (a `postgres://` URL or a `key=value` connection
    /// string) that connects on first use. A malformed URL is reported by every
    /// call as [`StoreError::Configuration`].
    pub fn lazy(url: &str) -> Self {
        Self {
            postgres: Arc::new(Postgres {
                config: parse(url),
                connection: Mutex::new(None),
                dedup_purged_ms: AtomicI64::new(0),
            }),
            timer_writes: Writer::default(),
        }
    }

    /// Connects to `url` now and creates or migrates the tables.
    ///
    /// Must run inside a tokio runtime: the connection and the writer are
    /// spawned tasks. Fails with a retriable [`StoreError::Unavailable`] when
    /// the database cannot be reached, so a caller may keep trying.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let store = Self::lazy(url);
        store.postgres.connection().await?;
        Ok(store)
    }
}

fn parse(url: &str) -> Result<Config, StoreError> {
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
    Ok(config)
}

impl fmt::Debug for PostgresStore {
    /// Names the database without its credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("PostgresStore");
        match &self.postgres.config {
            Ok(config) => debug
                .field("host", &config.get_hosts())
                .field("port", &config.get_ports())
                .field("dbname", &config.get_dbname()),
            Err(error) => debug.field("config", &error.to_string()),
        };
        debug.finish_non_exhaustive()
    }
}

/// Where an error happened: at connect time, errors without a SQLSTATE are
/// configuration problems unless they are I/O; later they are query failures.
#[derive(Clone, Copy)]
pub(super) enum Phase {
    Connect,
    Query,
}

/// Sorts a driver error into the [`StoreError`] variant that tells the caller
/// whether to retry.
pub(super) fn classify(
    operation: &'static str,
    phase: Phase,
    error: tokio_postgres::Error,
) -> StoreError {
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

/// A failed [`Postgres::attempt`].
struct Failed {
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

/// The driver's message with its database detail, if any.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => error.to_string(),
    }
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
                tracing::warn!(%error, "state store: PostgreSQL connection ended");
            }
        });
        for schema in SCHEMAS {
            schema.migrate(&mut client).await?;
        }
        let prepare = |error| classify("prepare", Phase::Query, error);
        let timers = timers::Statements::prepare(&client)
            .await
            .map_err(prepare)?;
        let dedup = dedup::Statements::prepare(&client).await.map_err(prepare)?;
        let deferred = deferred::Statements::prepare(&client)
            .await
            .map_err(prepare)?;
        Ok(Connection {
            client,
            timers,
            dedup,
            deferred,
        })
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

impl Postgres {
    /// The live connection, opening a new one if there is none or the last one
    /// broke; true when it was opened by this call.
    async fn connection(&self) -> Result<(Arc<Connection>, bool), StoreError> {
        let config = self.config.as_ref().map_err(Clone::clone)?;
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            if !connection.client.is_closed() {
                return Ok((Arc::clone(connection), false));
            }
        }
        *slot = None;
        let connection = Arc::new(open(config).await?);
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
    pub(crate) async fn run<T, F, Fut>(
        &self,
        operation: &'static str,
        call: F,
    ) -> Result<T, StoreError>
    where
        F: Fn(Arc<Connection>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let (connection, fresh) = self.connection().await?;
        match self.attempt(operation, &connection, &call).await {
            Err(Failed { lost: true, .. }) if !fresh => {
                let (connection, _) = self.connection().await?;
                self.attempt(operation, &connection, &call)
                    .await
                    .map_err(|failed| failed.error)
            }
            result => result.map_err(|failed| failed.error),
        }
    }

    /// One try of `call`, discarding the connection when the failure says it
    /// is unusable.
    async fn attempt<T, F, Fut>(
        &self,
        operation: &'static str,
        connection: &Arc<Connection>,
        call: &F,
    ) -> Result<T, Failed>
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
            tracing::warn!(%error, "state store: dropping PostgreSQL connection");
            self.discard(connection).await;
        }
        Err(Failed { error, lost })
    }
}
