//! Schema migrations: each kind of state names its tables' versions in
//! `prosody_schema_version`, and every migration runs under one advisory lock.

use tokio_postgres::Client;

use super::error::{query_error, Reason, StoreError};
use super::postgres::{classify, Phase};

/// Key of the transaction-scoped advisory lock that serialises schema
/// migrations across processes ("prosody" in ASCII, then 0x01). Every Prosody
/// component that migrates tables takes this same lock.
const SCHEMA_LOCK_KEY: i64 = 0x7072_6f73_6f64_7901;

/// One component's tables: its name in `prosody_schema_version` and its
/// migrations, oldest first. The schema is at version `n` once the first `n`
/// have run. Never edit a migration that has shipped; append a new one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schema {
    pub(crate) component: &'static str,
    pub(crate) migrations: &'static [&'static str],
}

impl Schema {
    /// Brings the component's tables to the newest migration, under
    /// [`SCHEMA_LOCK_KEY`] inside one transaction: concurrent starters queue on
    /// the lock, and the later ones find the work done. Without the lock, two
    /// `CREATE TABLE IF NOT EXISTS` can still collide on the catalog.
    pub(crate) async fn migrate(self, client: &mut Client) -> Result<(), StoreError> {
        let Self {
            component,
            migrations,
        } = self;
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
}
