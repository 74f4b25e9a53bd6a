//! The handler contract: what user code implements and what it receives.

use std::future::Future;

use tokio_util::sync::CancellationToken;

use crate::message::Message;

/// Tells Prosody whether a handler error is worth retrying.
///
/// The default says "transient": retrying might succeed. Return `true` from
/// [`is_permanent`](Self::is_permanent) for errors that will fail the same way
/// every time (bad data, a rejected request).
pub trait ClassifyError {
    /// True when retrying the same message cannot succeed.
    fn is_permanent(&self) -> bool {
        false
    }

    /// The error's class as logs and dead-letter headers show it; the type name by default.
    fn class_name(&self) -> String {
        std::any::type_name::<Self>().to_owned()
    }
}

impl ClassifyError for std::convert::Infallible {}

/// User code that processes messages.
///
/// Prosody calls [`on_message`](Self::on_message) for every message, concurrently
/// for different keys and strictly one after another for the same key of a partition.
///
/// ```no_run
/// use prosody::{ClassifyError, Context, EventHandler, Message};
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("downstream unavailable")]
/// struct Unavailable;
/// impl ClassifyError for Unavailable {}
///
/// struct Printer;
///
/// impl EventHandler for Printer {
///     type Error = Unavailable;
///
///     async fn on_message(&self, _context: Context, message: Message) -> Result<(), Unavailable> {
///         println!("{} {}: {}", message.key(), message.offset(), message.payload());
///         Ok(())
///     }
/// }
/// ```
pub trait EventHandler: Send + Sync + 'static {
    /// The handler's error; its [`ClassifyError`] decides retries.
    type Error: std::error::Error + ClassifyError + Send + Sync + 'static;

    /// Processes one message. Watch `context` for cancellation on long work.
    fn on_message(
        &self,
        context: Context,
        message: Message,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Per-call context: cancellation now; timers will hang off it too.
#[derive(Debug, Clone)]
pub struct Context {
    cancellation: CancellationToken,
}

impl Context {
    pub(crate) fn new(cancellation: CancellationToken) -> Self {
        Self { cancellation }
    }

    /// True once the partition was revoked, the client is shutting down, or the deadline passed.
    pub fn should_cancel(&self) -> bool {
        self.cancellation.is_cancelled()
    }

    /// Resolves when the call should stop.
    pub async fn on_cancel(&self) {
        self.cancellation.cancelled().await;
    }

    /// The token behind [`should_cancel`](Self::should_cancel), for `select!` and child tasks.
    pub fn cancellation_token(&self) -> &CancellationToken {
        &self.cancellation
    }
}
