//! [`MemoryDedup`]: deduplication records in process memory, for mock mode.

use std::collections::HashMap;
use std::future::ready;
use std::sync::{Mutex, PoisonError};

use super::{DedupStore, HandledId};
use crate::store::StoreFuture;

/// Handled message ids in process memory: not durable, gone with the process.
///
/// One per process in mock mode, so records outlive a client the way they
/// would in PostgreSQL. Expired records are dropped whenever the map has
/// doubled since the last sweep, which keeps sweeping cheap per call.
#[derive(Debug, Default)]
pub(crate) struct MemoryDedup {
    records: Mutex<Records>,
}

#[derive(Debug, Default)]
struct Records {
    expiry: HashMap<HandledId, i64>,
    /// Size after the last sweep of expired records.
    swept_at: usize,
}

impl DedupStore for MemoryDedup {
    fn contains<'a>(&'a self, handled: &'a HandledId, now_ms: i64) -> StoreFuture<'a, bool> {
        let records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        let found = records
            .expiry
            .get(handled)
            .is_some_and(|expires| *expires > now_ms);
        Box::pin(ready(Ok(found)))
    }

    fn record<'a>(&'a self, handled: &'a HandledId, expires_at_ms: i64) -> StoreFuture<'a, ()> {
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        records.expiry.insert(handled.clone(), expires_at_ms);
        if records.expiry.len() >= 2 * records.swept_at.max(1024) {
            let now = super::now_ms();
            records.expiry.retain(|_, expires| *expires > now);
            records.swept_at = records.expiry.len();
        }
        Box::pin(ready(Ok(())))
    }
}
