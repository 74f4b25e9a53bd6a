//! Events for an observer outside the core (the Ruby gem's `Prosody.monitor`,
//! error reporting): what happened to messages, partitions and sends.
//!
//! An event is built only when the observer wants its kind, so a client with no
//! observer, or one that wants few kinds, pays one check per event site. The
//! observer is called on the consumer's own threads and must not block: queue
//! the event and return.

use std::sync::Arc;
use std::time::Duration;

/// What an [`Event`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// A message was taken from Kafka into its partition's buffer.
    MessageReceived,
    /// A message's handler succeeded.
    MessageHandled,
    /// A handler attempt on a message failed (it may be retried).
    MessageFailed,
    /// A failed message will be attempted again after a backoff.
    MessageRetried,
    /// A message was written to `failure_topic` after its last failure.
    MessageDeadLettered,
    /// A message was counted as done without a successful handler run.
    MessageSkipped,
    /// This consumer took a partition.
    PartitionAssigned,
    /// A rebalance took a partition from this consumer (not sent at `unsubscribe`).
    PartitionRevoked,
    /// The broker acknowledged a sent message.
    SendDelivered,
    /// A send failed or timed out.
    SendFailed,
    /// A partition has had work pending and finished nothing for `stall_threshold`
    /// (once per stall; `duration` is the threshold).
    ConsumerStalled,
}

impl EventKind {
    /// Every kind, in a stable order (its index is its bit in observer masks).
    pub const ALL: [Self; 11] = [
        Self::MessageReceived,
        Self::MessageHandled,
        Self::MessageFailed,
        Self::MessageRetried,
        Self::MessageDeadLettered,
        Self::MessageSkipped,
        Self::PartitionAssigned,
        Self::PartitionRevoked,
        Self::SendDelivered,
        Self::SendFailed,
        Self::ConsumerStalled,
    ];

    /// The event's name, e.g. `message.handled`.
    pub fn name(self) -> &'static str {
        match self {
            Self::MessageReceived => "message.received",
            Self::MessageHandled => "message.handled",
            Self::MessageFailed => "message.failed",
            Self::MessageRetried => "message.retried",
            Self::MessageDeadLettered => "message.dead_lettered",
            Self::MessageSkipped => "message.skipped",
            Self::PartitionAssigned => "partition.assigned",
            Self::PartitionRevoked => "partition.revoked",
            Self::SendDelivered => "send.delivered",
            Self::SendFailed => "send.failed",
            Self::ConsumerStalled => "consumer.stalled",
        }
    }

    /// The kind named `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// This kind's bit in a mask of wanted kinds.
    pub fn bit(self) -> u32 {
        let index = Self::ALL
            .iter()
            .position(|kind| *kind == self)
            .unwrap_or_default();
        1 << index
    }
}

/// One thing that happened. Fields that do not apply to the kind are `None`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The topic of the message, partition or send.
    pub topic: Arc<str>,
    /// The partition, for message and partition events.
    pub partition: Option<i32>,
    /// The message's offset.
    pub offset: Option<i64>,
    /// The message's key.
    pub key: Option<Arc<str>>,
    /// How long the handler attempt or the send took.
    pub duration: Option<Duration>,
    /// Attempts so far (`message.retried`, `message.dead_lettered`, `message.skipped` after failures).
    pub attempts: Option<u32>,
    /// The failure kind (`transient`, `permanent`, `timeout`, `bad-input`), why a message was
    /// skipped (`own_message`, `event_type`, `duplicate`, `failed`), or why a send failed
    /// (`timeout`, `kafka`).
    pub reason: Option<&'static str>,
    /// The failing error's class (a Ruby class name for Ruby handlers).
    pub error_class: Option<String>,
    /// The failing error's message.
    pub error_message: Option<String>,
}

impl Event {
    /// An event of `kind` about `topic` with nothing else set.
    pub fn new(kind: EventKind, topic: Arc<str>) -> Self {
        Self {
            kind,
            topic,
            partition: None,
            offset: None,
            key: None,
            duration: None,
            attempts: None,
            reason: None,
            error_class: None,
            error_message: None,
        }
    }

    pub(crate) fn at(
        mut self,
        partition: i32,
        offset: Option<i64>,
        key: Option<&Arc<str>>,
    ) -> Self {
        self.partition = Some(partition);
        self.offset = offset;
        self.key = key.cloned();
        self
    }

    pub(crate) fn took(mut self, duration: Duration) -> Self {
        self.duration = Some(duration);
        self
    }

    pub(crate) fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = Some(attempts);
        self
    }

    pub(crate) fn because(mut self, reason: &'static str) -> Self {
        self.reason = Some(reason);
        self
    }

    pub(crate) fn error(mut self, class: &str, message: &str) -> Self {
        self.error_class = Some(class.to_owned());
        self.error_message = Some(message.to_owned());
        self
    }
}

/// Receives a client's events; see the module docs.
pub trait Observer: Send + Sync + 'static {
    /// Whether events of `kind` should be built and passed to [`observe`](Self::observe).
    /// Called at every event site: make it cheap (e.g. one atomic load).
    fn wants(&self, kind: EventKind) -> bool;

    /// Takes one event. Must not block.
    fn observe(&self, event: Event);
}
