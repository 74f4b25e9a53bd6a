//! Type erasure for user handlers, so the consumer machinery is not generic.

use std::future::Future;
use std::pin::Pin;

use crate::handler::{ClassifyError, Context, EventHandler};
use crate::message::Message;

/// How one handler call ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    Succeeded,
    Failed { permanent: bool, error: String },
}

pub(crate) type OutcomeFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

pub(crate) trait DynHandler: Send + Sync + 'static {
    fn on_message(&self, context: Context, message: Message) -> OutcomeFuture<'_>;
}

impl<H: EventHandler> DynHandler for H {
    fn on_message(&self, context: Context, message: Message) -> OutcomeFuture<'_> {
        Box::pin(async move {
            match EventHandler::on_message(self, context, message).await {
                Ok(()) => Outcome::Succeeded,
                Err(error) => Outcome::Failed {
                    permanent: error.is_permanent(),
                    error: error_chain(&error),
                },
            }
        })
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
