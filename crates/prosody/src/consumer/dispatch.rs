//! Type erasure for user handlers, so the consumer machinery is not generic.

use std::future::Future;
use std::pin::Pin;

pub(crate) use crate::handler::FailureKind;
use crate::handler::{ClassifyError, Context, EventHandler};
use crate::message::{Message, Timer};

/// How one handler call ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    Succeeded,
    Failed(Failure),
}

/// Why a handler call failed, as logs and dead-letter headers report it.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) kind: FailureKind,
    pub(crate) class: String,
    pub(crate) message: String,
}

pub(crate) type OutcomeFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

pub(crate) trait DynHandler: Send + Sync + 'static {
    fn on_message(&self, context: Context, message: Message) -> OutcomeFuture<'_>;
    fn on_timer(&self, context: Context, timer: Timer) -> OutcomeFuture<'_>;
    fn is_alive(&self) -> bool;
    fn failure_class(&self, kind: FailureKind) -> String;
    fn queue_ahead(&self, max_concurrency: usize) -> usize;
}

impl<H: EventHandler> DynHandler for H {
    fn on_message(&self, context: Context, message: Message) -> OutcomeFuture<'_> {
        Box::pin(async move { outcome(EventHandler::on_message(self, context, message).await) })
    }

    fn on_timer(&self, context: Context, timer: Timer) -> OutcomeFuture<'_> {
        Box::pin(async move { outcome(EventHandler::on_timer(self, context, timer).await) })
    }

    fn is_alive(&self) -> bool {
        EventHandler::is_alive(self)
    }

    fn failure_class(&self, kind: FailureKind) -> String {
        EventHandler::failure_class(self, kind)
    }

    fn queue_ahead(&self, max_concurrency: usize) -> usize {
        EventHandler::queue_ahead(self, max_concurrency)
    }
}

fn outcome<E: std::error::Error + ClassifyError>(result: Result<(), E>) -> Outcome {
    match result {
        Ok(()) => Outcome::Succeeded,
        Err(error) => Outcome::Failed(Failure {
            kind: if error.is_permanent() {
                FailureKind::Permanent
            } else {
                FailureKind::Transient
            },
            class: error.class_name(),
            message: error_chain(&error),
        }),
    }
}

/// "outer: cause: root cause", so logs carry the whole story.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
