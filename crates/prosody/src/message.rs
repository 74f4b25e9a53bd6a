//! Consumed messages as handlers see them.

use std::sync::Arc;
use std::time::SystemTime;

/// One message header: name and raw value (`None` for a null header).
pub type Header = (String, Option<Vec<u8>>);

/// A consumed message with its payload decoded from JSON.
#[derive(Debug, Clone)]
pub struct Message {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Arc<str>,
    pub(crate) timestamp: Option<SystemTime>,
    pub(crate) payload: Arc<serde_json::Value>,
    pub(crate) headers: Arc<[Header]>,
    /// `traceparent` of the span processing this message, when tracing is on.
    pub(crate) trace_parent: Option<Arc<str>>,
}

impl Message {
    /// The W3C `traceparent` of the span processing this message, when traces are
    /// exported (see README "Traces"). Sends from a Rust handler continue the trace
    /// by themselves; code that sends another way passes this as the `traceparent`
    /// header.
    pub fn trace_parent(&self) -> Option<&str> {
        self.trace_parent.as_deref()
    }

    /// Topic the message came from.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Partition the message came from.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Offset within its partition.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// The message key; ordering is guaranteed per key within a partition.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Create or log-append time, when the broker supplied one.
    pub fn timestamp(&self) -> Option<SystemTime> {
        self.timestamp
    }

    /// The decoded JSON payload.
    pub fn payload(&self) -> &serde_json::Value {
        &self.payload
    }

    /// All headers in wire order.
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// The first header with this name, if its value is UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header == name)
            .and_then(|(_, value)| value.as_deref())
            .and_then(|value| std::str::from_utf8(value).ok())
    }
}

/// A timer firing: the key it belongs to and the time it was scheduled for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timer {
    pub(crate) key: Arc<str>,
    pub(crate) time: SystemTime,
}

impl Timer {
    /// The key the timer was scheduled for.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// When the timer was due (it fires at or after this time).
    pub fn time(&self) -> SystemTime {
        self.time
    }
}
