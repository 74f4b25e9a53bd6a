//! Timer stores: one conformance suite run against both [`MemoryStore`] and
//! [`PostgresStore`], then what only PostgreSQL has: migration by several
//! processes at once and from an older schema, schema versions, configuration
//! errors, and the database going away and coming back.
//!
//! The PostgreSQL tests need `PROSODY_TEST_DATABASE_URL`, which `./script/test`
//! sets (it starts a private cluster with `./script/postgres`); they fail rather
//! than skip without it. The outage test starts and stops a cluster of its own.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use prosody::{MemoryStore, PartitionScope, PostgresStore, StoreError, TimerStore};
use support::{database_url, unique};
use tokio::task::JoinSet;

/// `url` with its database name replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (path, query) = match url.split_once('?') {
        Some((path, query)) => (path, format!("?{query}")),
        None => (url, String::new()),
    };
    let (base, _) = path.rsplit_once('/').expect("URL has a database path");
    format!("{base}/{database}{query}")
}

/// A scope in a group no other test (or earlier run on the same database) uses.
fn fresh_scope() -> PartitionScope {
    PartitionScope::new(unique("group"), unique("topic"), 0)
}

fn pairs(items: &[(&str, i64)]) -> Vec<(String, i64)> {
    items
        .iter()
        .map(|(key, at)| ((*key).to_owned(), *at))
        .collect()
}

/// The `timers` schema version the store migrates to: a test that pins it changes with it.
const SCHEMA_VERSION: i32 = 1;

/// Two W3C `traceparent`s, as a traced handler call's context gives them.
const TRACE_A: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const TRACE_B: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn traced(items: &[(&str, i64, Option<&str>)]) -> Vec<(String, i64, Option<String>)> {
    items
        .iter()
        .map(|(key, at, trace)| ((*key).to_owned(), *at, trace.map(str::to_owned)))
        .collect()
}

/// The conformance suite: the same checks against each store.
macro_rules! conformance {
    ($store:ident, $make:expr) => {
        mod $store {
            use super::*;

            async fn store() -> Arc<dyn TimerStore> {
                $make
            }

            #[tokio::test]
            async fn schedule_unschedule_and_scheduled() {
                let store = store().await;
                let scope = fresh_scope();
                assert!(store.scheduled(&scope, "k").await.unwrap().is_empty());
                for at in [3_000, 1_000, 2_000] {
                    assert!(store.schedule(&scope, "k", at).await.unwrap(), "new timer");
                }
                assert_eq!(
                    store.scheduled(&scope, "k").await.unwrap(),
                    vec![1_000, 2_000, 3_000]
                );
                assert!(store.unschedule(&scope, "k", 2_000).await.unwrap());
                assert!(!store.unschedule(&scope, "k", 2_000).await.unwrap());
                assert!(!store.unschedule(&scope, "other", 1_000).await.unwrap());
                assert_eq!(
                    store.scheduled(&scope, "k").await.unwrap(),
                    vec![1_000, 3_000]
                );
            }

            #[tokio::test]
            async fn schedule_is_idempotent() {
                let store = store().await;
                let scope = fresh_scope();
                assert!(store.schedule(&scope, "k", 5).await.unwrap());
                assert!(!store.schedule(&scope, "k", 5).await.unwrap());
                assert_eq!(store.scheduled(&scope, "k").await.unwrap(), vec![5]);
                assert_eq!(
                    store.due(&scope, None, i64::MAX, 10).await.unwrap().len(),
                    1
                );
            }

            #[tokio::test]
            async fn a_timer_keeps_the_trace_context_of_the_call_that_scheduled_it() {
                let store = store().await;
                let scope = fresh_scope();
                assert!(store
                    .schedule_traced(&scope, "k", 10, Some(TRACE_A))
                    .await
                    .unwrap());
                assert!(store.schedule(&scope, "k", 20).await.unwrap());
                assert!(store
                    .schedule_traced(&scope, "other", 10, None)
                    .await
                    .unwrap());
                // The same timer again: it stays as it is, trace context and all.
                assert!(!store
                    .schedule_traced(&scope, "k", 10, Some(TRACE_B))
                    .await
                    .unwrap());
                assert_eq!(
                    store.due_traced(&scope, None, 100, 10).await.unwrap(),
                    traced(&[
                        ("k", 10, Some(TRACE_A)),
                        ("other", 10, None),
                        ("k", 20, None)
                    ])
                );
                assert_eq!(
                    store
                        .due_traced(&scope, Some((10, "")), 100, 1)
                        .await
                        .unwrap(),
                    traced(&[("k", 10, Some(TRACE_A))]),
                    "pages carry it too"
                );
                assert_eq!(
                    store.due(&scope, None, 100, 10).await.unwrap(),
                    pairs(&[("k", 10), ("other", 10), ("k", 20)])
                );
                // Replaced, the timer left is the caller's, with its trace context.
                assert_eq!(
                    store
                        .clear_and_schedule_traced(&scope, "k", 10, Some(TRACE_B))
                        .await
                        .unwrap(),
                    1
                );
                assert_eq!(
                    store.due_traced(&scope, None, 100, 10).await.unwrap(),
                    traced(&[("k", 10, Some(TRACE_B)), ("other", 10, None)])
                );
                assert_eq!(store.clear_and_schedule(&scope, "k", 10).await.unwrap(), 0);
                assert_eq!(
                    store.due_traced(&scope, None, 100, 10).await.unwrap(),
                    traced(&[("k", 10, None), ("other", 10, None)])
                );
                assert!(store.unschedule(&scope, "k", 10).await.unwrap());
                assert!(store
                    .schedule_traced(&scope, "k", 10, Some(TRACE_A))
                    .await
                    .unwrap());
                assert_eq!(
                    store.due_traced(&scope, None, 100, 1).await.unwrap(),
                    traced(&[("k", 10, Some(TRACE_A))]),
                    "a timer scheduled anew takes the new call's"
                );
            }

            #[tokio::test]
            async fn clear_removes_only_that_key() {
                let store = store().await;
                let scope = fresh_scope();
                for at in [1, 2, 3] {
                    store.schedule(&scope, "a", at).await.unwrap();
                }
                store.schedule(&scope, "b", 2).await.unwrap();
                assert_eq!(store.clear(&scope, "a").await.unwrap(), 3);
                assert_eq!(store.clear(&scope, "a").await.unwrap(), 0);
                assert!(store.scheduled(&scope, "a").await.unwrap().is_empty());
                assert_eq!(
                    store.due(&scope, None, i64::MAX, 10).await.unwrap(),
                    pairs(&[("b", 2)])
                );
            }

            #[tokio::test]
            async fn clear_and_schedule_replaces_a_keys_timers() {
                let store = store().await;
                let scope = fresh_scope();
                assert_eq!(store.clear_and_schedule(&scope, "k", 9).await.unwrap(), 0);
                store.schedule(&scope, "k", 5).await.unwrap();
                store.schedule(&scope, "other", 5).await.unwrap();
                // The timer already at 9 stays and is not counted.
                assert_eq!(store.clear_and_schedule(&scope, "k", 9).await.unwrap(), 1);
                assert_eq!(store.scheduled(&scope, "k").await.unwrap(), vec![9]);
                assert_eq!(store.clear_and_schedule(&scope, "k", 7).await.unwrap(), 1);
                assert_eq!(store.scheduled(&scope, "k").await.unwrap(), vec![7]);
                assert_eq!(store.scheduled(&scope, "other").await.unwrap(), vec![5]);
            }

            #[tokio::test]
            async fn due_orders_by_time_then_key_and_respects_limit() {
                let store = store().await;
                let scope = fresh_scope();
                let timers = [
                    ("b", 20),
                    ("a", 20),
                    ("c", 10),
                    ("a", 30),
                    ("z", -5),
                    ("d", 40),
                ];
                for (key, at) in timers {
                    store.schedule(&scope, key, at).await.unwrap();
                }
                assert_eq!(
                    store.due(&scope, None, 40, 100).await.unwrap(),
                    pairs(&[("z", -5), ("c", 10), ("a", 20), ("b", 20), ("a", 30)]),
                    "before_ms is exclusive"
                );
                assert_eq!(
                    store.due(&scope, None, 40, 3).await.unwrap(),
                    pairs(&[("z", -5), ("c", 10), ("a", 20)])
                );
                assert!(store.due(&scope, None, 40, 0).await.unwrap().is_empty());
                assert!(store.due(&scope, None, -5, 10).await.unwrap().is_empty());
                assert_eq!(
                    store
                        .due(&scope, None, i64::MAX, usize::MAX)
                        .await
                        .unwrap()
                        .len(),
                    6
                );
            }

            #[tokio::test]
            async fn due_from_a_cursor_pages_through_a_window() {
                let store = store().await;
                let scope = fresh_scope();
                for key in ["k1", "k2", "k3", "k4", "k5"] {
                    store.schedule(&scope, key, 100).await.unwrap();
                }
                store.schedule(&scope, "k0", 200).await.unwrap();
                let mut seen = Vec::new();
                let mut page = store.due(&scope, None, 1_000, 2).await.unwrap();
                while let Some((key, at)) = page.last().cloned() {
                    seen.extend(page);
                    page = store.due(&scope, Some((at, &key)), 1_000, 2).await.unwrap();
                }
                assert_eq!(
                    seen,
                    pairs(&[
                        ("k1", 100),
                        ("k2", 100),
                        ("k3", 100),
                        ("k4", 100),
                        ("k5", 100),
                        ("k0", 200)
                    ])
                );
                assert!(store
                    .due(&scope, Some((100, "k5")), 200, 10)
                    .await
                    .unwrap()
                    .is_empty());
                assert!(store
                    .due(&scope, Some((500, "")), 200, 10)
                    .await
                    .unwrap()
                    .is_empty());
            }

            #[tokio::test]
            async fn keys_compare_as_bytes_and_may_hold_anything() {
                let store = store().await;
                let scope = fresh_scope();
                // Byte order: "" < "B" < "a" < "a\0" < "z" < "é" < "😀".
                let keys = ["😀", "é", "z", "a\0", "a", "B", ""];
                for key in keys {
                    store.schedule(&scope, key, 1).await.unwrap();
                }
                let due: Vec<String> = store
                    .due(&scope, None, 2, 100)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|(key, _)| key)
                    .collect();
                let mut expected: Vec<String> = keys.iter().map(|key| (*key).to_owned()).collect();
                expected.sort();
                assert_eq!(due, expected);
                assert_eq!(store.scheduled(&scope, "a\0").await.unwrap(), vec![1]);
                assert_eq!(store.scheduled(&scope, "").await.unwrap(), vec![1]);
            }

            #[tokio::test]
            async fn scopes_are_isolated() {
                let store = store().await;
                let base = fresh_scope();
                let scopes = [
                    base.clone(),
                    PartitionScope::new(unique("group"), base.topic.clone(), 0),
                    PartitionScope::new(base.group.clone(), unique("topic"), 0),
                    PartitionScope::new(base.group.clone(), base.topic.clone(), 1),
                ];
                for (index, scope) in scopes.iter().enumerate() {
                    let at = i64::try_from(index).unwrap();
                    store.schedule(scope, "k", at).await.unwrap();
                }
                for (index, scope) in scopes.iter().enumerate() {
                    let at = i64::try_from(index).unwrap();
                    assert_eq!(store.scheduled(scope, "k").await.unwrap(), vec![at]);
                    assert_eq!(
                        store.due(scope, None, 100, 10).await.unwrap(),
                        vec![("k".to_owned(), at)]
                    );
                }
                assert_eq!(store.clear(&scopes[0], "k").await.unwrap(), 1);
                assert!(!store.unschedule(&scopes[0], "k", 1).await.unwrap());
                for scope in &scopes[1..] {
                    assert_eq!(store.scheduled(scope, "k").await.unwrap().len(), 1);
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_calls_all_land() {
                let store = store().await;
                let scope = Arc::new(fresh_scope());
                let mut tasks = JoinSet::new();
                for index in 0..400_i64 {
                    let (store, scope) = (Arc::clone(&store), Arc::clone(&scope));
                    tasks.spawn(async move {
                        let key = format!("key-{}", index % 20);
                        store.schedule(&scope, &key, index).await.unwrap();
                        // Every other one twice, concurrently with the rest.
                        if index % 2 == 0 {
                            assert!(!store.schedule(&scope, &key, index).await.unwrap());
                        }
                    });
                }
                while let Some(result) = tasks.join_next().await {
                    result.unwrap();
                }
                let due = store.due(&scope, None, i64::MAX, 1_000).await.unwrap();
                assert_eq!(due.len(), 400);
                assert!(due.windows(2).all(|pair| pair[0].1 < pair[1].1));
                assert_eq!(store.scheduled(&scope, "key-7").await.unwrap().len(), 20);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_duplicates_change_once() {
                let store = store().await;
                let scope = Arc::new(fresh_scope());
                for (schedule, expected_len) in [(true, 1), (false, 0)] {
                    let mut tasks = JoinSet::new();
                    for _ in 0..32 {
                        let (store, scope) = (Arc::clone(&store), Arc::clone(&scope));
                        tasks.spawn(async move {
                            if schedule {
                                store.schedule(&scope, "k", 42).await.unwrap()
                            } else {
                                store.unschedule(&scope, "k", 42).await.unwrap()
                            }
                        });
                    }
                    let mut changed = 0;
                    while let Some(result) = tasks.join_next().await {
                        changed += usize::from(result.unwrap());
                    }
                    assert_eq!(changed, 1, "exactly one caller changes the timer");
                    assert_eq!(
                        store.scheduled(&scope, "k").await.unwrap().len(),
                        expected_len
                    );
                }
            }
        }
    };
}

conformance!(memory, Arc::new(MemoryStore::new()));
conformance!(
    postgres,
    Arc::new(
        PostgresStore::connect(&database_url())
            .await
            .expect("connect to PROSODY_TEST_DATABASE_URL")
    )
);

/// A database of its own on the test server, dropped when the value is.
struct ScratchDatabase {
    admin: tokio_postgres::Client,
    name: String,
    url: String,
}

impl ScratchDatabase {
    async fn create() -> Self {
        let admin_url = database_url();
        let (admin, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .expect("connect to PROSODY_TEST_DATABASE_URL");
        tokio::spawn(connection);
        let name = unique("prosody_scratch").replace('-', "_");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create scratch database");
        let url = with_database(&admin_url, &name);
        Self { admin, name, url }
    }

    async fn drop(self) {
        self.admin
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .await
            .expect("drop scratch database");
    }

    async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect to scratch database");
        tokio::spawn(connection);
        client
    }

    async fn query_one_i64(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .expect(sql)
            .get(0)
    }

    async fn execute(&self, sql: &str) {
        self.client().await.batch_execute(sql).await.expect(sql);
    }
}

/// A database made by a release before timers kept a trace context (only the
/// `timers` component, at version 1), with one timer in it, as it wrote it.
const SCHEMA_VERSION_1: &str = "
    CREATE TABLE prosody_schema_version (
        component  text        PRIMARY KEY,
        version    integer     NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    INSERT INTO prosody_schema_version (component, version) VALUES ('timers', 1);
    CREATE TABLE prosody_timers (
        group_id   text    NOT NULL,
        topic      text    NOT NULL,
        partition  integer NOT NULL,
        key        bytea   NOT NULL,
        fire_at_ms bigint  NOT NULL,
        PRIMARY KEY (group_id, topic, partition, key, fire_at_ms)
    );
    CREATE INDEX prosody_timers_due
        ON prosody_timers (group_id, topic, partition, fire_at_ms, key);
    INSERT INTO prosody_timers VALUES ('old-group', 'old-topic', 0, 'old-key', 5);
";

#[tokio::test]
async fn a_database_of_the_previous_schema_is_migrated_and_keeps_its_timers() {
    let database = ScratchDatabase::create().await;
    database.execute(SCHEMA_VERSION_1).await;
    let old = PartitionScope::new("old-group", "old-topic", 0);
    let store = PostgresStore::connect(&database.url)
        .await
        .expect("migrate");
    let version = "SELECT version::bigint FROM prosody_schema_version WHERE component = 'timers'";
    let traces =
        "SELECT version::bigint FROM prosody_schema_version WHERE component = 'timer_traces'";
    // `timers` stays at 1, so a release that knows only version 1 (and would
    // refuse a newer one) still starts against this database in a rolling upgrade.
    assert_eq!(database.query_one_i64(version).await, 1);
    assert_eq!(database.query_one_i64(traces).await, 1);
    assert_eq!(
        store.due_traced(&old, None, 100, 10).await.unwrap(),
        traced(&[("old-key", 5, None)]),
        "a timer stored before has no trace context"
    );
    // What such a release writes (no traceparent column named) still works.
    database
        .execute("INSERT INTO prosody_timers VALUES ('old-group', 'old-topic', 0, 'older', 7)")
        .await;
    assert!(store
        .schedule_traced(&old, "new-key", 6, Some(TRACE_A))
        .await
        .unwrap());
    assert_eq!(
        store.clear_and_schedule(&old, "old-key", 5).await.unwrap(),
        0
    );
    assert_eq!(
        store.due_traced(&old, None, 100, 10).await.unwrap(),
        traced(&[
            ("old-key", 5, None),
            ("new-key", 6, Some(TRACE_A)),
            ("older", 7, None)
        ])
    );
    drop(store);

    // Run again over a migrated table (a version row lost, say): a no-op.
    database
        .execute("DELETE FROM prosody_schema_version WHERE component = 'timer_traces'")
        .await;
    let store = PostgresStore::connect(&database.url)
        .await
        .expect("migrate again");
    assert_eq!(database.query_one_i64(traces).await, 1);
    assert_eq!(
        store.due_traced(&old, None, 100, 10).await.unwrap().len(),
        3
    );
    drop(store);
    database.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_migrate_a_fresh_database_once() {
    let database = ScratchDatabase::create().await;
    let mut connects = JoinSet::new();
    for _ in 0..4 {
        let url = database.url.clone();
        connects.spawn(async move { PostgresStore::connect(&url).await });
    }
    let mut stores = Vec::new();
    while let Some(result) = connects.join_next().await {
        stores.push(result.unwrap().expect("every concurrent connect succeeds"));
    }
    assert_eq!(stores.len(), 4);

    let scope = fresh_scope();
    for (index, store) in stores.iter().enumerate() {
        store
            .schedule(&scope, "k", i64::try_from(index).unwrap())
            .await
            .unwrap();
    }
    for store in &stores {
        assert_eq!(
            store.scheduled(&scope, "k").await.unwrap(),
            vec![0, 1, 2, 3]
        );
    }
    assert_eq!(
        database
            .query_one_i64(
                "SELECT version::bigint FROM prosody_schema_version WHERE component = 'timers'"
            )
            .await,
        i64::from(SCHEMA_VERSION)
    );
    drop(stores);
    database.drop().await;
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let database = ScratchDatabase::create().await;
    drop(PostgresStore::connect(&database.url).await.unwrap());
    database
        .query_one_i64(
            "WITH bumped AS (UPDATE prosody_schema_version SET version = 99
             WHERE component = 'timers' RETURNING 1) SELECT count(*) FROM bumped",
        )
        .await;
    let error = PostgresStore::connect(&database.url).await.unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::SchemaTooNew {
                found: 99,
                supported: SCHEMA_VERSION
            }
        ),
        "{error:?}"
    );
    assert!(!error.is_retriable());
    database.drop().await;
}

#[tokio::test]
async fn bad_configuration_is_not_retriable_and_hides_the_password() {
    let url = database_url();
    for bad in [
        "postgres://user:s3cret@127.0.0.1:notaport/db".to_owned(),
        "postgres://user:s3cret@127.0.0.1/db?sslmode=require".to_owned(),
        with_database(&url, "prosody_no_such_database"),
    ] {
        let error = PostgresStore::connect(&bad).await.unwrap_err();
        assert!(
            matches!(error, StoreError::Configuration { .. }),
            "{bad}: {error:?}"
        );
        assert!(!error.is_retriable());
        assert!(!error.to_string().contains("s3cret"), "{error}");
        assert!(!prosody::Error::from(error).is_retriable());
    }
}

#[tokio::test]
async fn an_unreachable_database_error_gives_the_cause_and_server_but_not_the_password() {
    // Needs no database: nothing listens on the port.
    let port = free_port();
    let error = PostgresStore::connect(&format!(
        "postgres://prosody:s3cret@127.0.0.1:{port}/orders"
    ))
    .await
    .unwrap_err();
    let shown = prosody::Error::from(error).to_string();
    assert!(
        shown.contains("connection refused") || shown.contains("Connection refused"),
        "{shown}"
    );
    assert!(shown.contains(&format!("127.0.0.1:{port}")), "{shown}");
    assert!(shown.contains("orders"), "{shown}");
    assert!(!shown.contains("s3cret"), "{shown}");
}

#[tokio::test]
async fn an_unreachable_database_is_retriable() {
    let _ = database_url();
    let port = free_port();
    let error = PostgresStore::connect(&format!("postgres://postgres@127.0.0.1:{port}/db"))
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    assert!(error.is_retriable());
    assert!(prosody::Error::from(error).is_retriable());
}

#[tokio::test]
async fn a_lazy_store_connects_on_first_use_and_reports_a_bad_url_there() {
    let bad = PostgresStore::lazy("postgres://user:s3cret@127.0.0.1:notaport/db");
    let scope = fresh_scope();
    let error = bad.scheduled(&scope, "k").await.unwrap_err();
    assert!(
        matches!(error, StoreError::Configuration { .. }),
        "{error:?}"
    );
    assert!(!format!("{bad:?}").contains("s3cret"), "{bad:?}");

    let store = PostgresStore::lazy(&database_url());
    assert!(store.schedule(&scope, "k", 7).await.unwrap());
    assert_eq!(store.scheduled(&scope, "k").await.unwrap(), vec![7]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_write_does_not_fail_the_writes_batched_with_it() {
    let store = Arc::new(PostgresStore::connect(&database_url()).await.unwrap());
    let good = Arc::new(fresh_scope());
    // PostgreSQL text cannot hold a NUL, so this group is refused.
    let bad = Arc::new(PartitionScope::new("bad\0group", "topic", 0));
    let mut tasks = JoinSet::new();
    for index in 0..64_i64 {
        let (store, good, bad) = (Arc::clone(&store), Arc::clone(&good), Arc::clone(&bad));
        tasks.spawn(async move {
            if index % 8 == 0 {
                let error = store.schedule(&bad, "k", index).await.unwrap_err();
                assert!(matches!(error, StoreError::Query { .. }), "{error:?}");
                assert!(!error.is_retriable());
            } else {
                assert!(store.schedule(&good, "k", index).await.unwrap());
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    assert_eq!(store.scheduled(&good, "k").await.unwrap().len(), 56);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// A PostgreSQL cluster of this test's own, run by `script/postgres`, which
/// the test can stop and start. Stopped and deleted on drop, even on failure.
struct OwnCluster {
    dir: PathBuf,
    port: u16,
}

impl OwnCluster {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("prosody-pg"));
        Self {
            dir,
            port: free_port(),
        }
    }

    fn script(&self, command: &str) -> String {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../script/postgres");
        let output = Command::new(script)
            .arg(command)
            .env("PROSODY_PG_DIR", &self.dir)
            .env("PROSODY_PG_PORT", self.port.to_string())
            .env_remove("PROSODY_PG_HOLDER")
            .output()
            .expect("run script/postgres");
        assert!(
            output.status.success(),
            "script/postgres {command}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        if self.dir.exists() {
            let _ = std::panic::catch_unwind(|| self.script("stop"));
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn assert_unavailable<T: std::fmt::Debug>(result: Result<T, StoreError>) {
    let error = result.expect_err("the database is down");
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    assert!(error.is_retriable(), "{error}");
}

// Multi-threaded so the driver's connection task runs while the test blocks on
// script/postgres, as it would in an application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_survives_the_database_going_away() {
    let _ = database_url();
    let cluster = OwnCluster::new();
    let url = cluster.script("start");
    let store = PostgresStore::connect(&url).await.expect("connect");
    let scope = fresh_scope();
    store.schedule(&scope, "k", 1).await.unwrap();

    // Down: the call that finds the connection gone, and calls while the
    // server refuses connections, fail with a retriable error.
    cluster.script("stop");
    assert_unavailable(store.scheduled(&scope, "k").await);
    assert_unavailable(store.schedule(&scope, "k", 2).await);
    assert_unavailable(store.due(&scope, None, 10, 10).await);

    // Back: the next call reconnects, and the data is still there.
    cluster.script("start");
    assert_eq!(store.scheduled(&scope, "k").await.unwrap(), vec![1]);
    store.schedule(&scope, "k", 2).await.unwrap();

    // A restart while idle is noticed before the next call, which just works.
    cluster.script("stop");
    cluster.script("start");
    assert_eq!(store.scheduled(&scope, "k").await.unwrap(), vec![1, 2]);
}
