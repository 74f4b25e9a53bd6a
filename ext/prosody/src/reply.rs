//! Delivering the result of work done off the Ruby thread to the Ruby caller
//! waiting on a Thread::Queue (see `client.rs` for why calls work this way).

use std::future::Future;

use magnus::{prelude::*, Ruby, Value};

use crate::bridge::owned::RubyOwned;
use crate::bridge::{self};
use crate::errors::exception_for;
use crate::runtime::runtime;

/// Runs `work` on the tokio runtime and answers on the caller's `queue` with
/// `nil` or the error's exception. The caller's stack only holds `queue` briefly.
pub(crate) fn answer_later<F>(ruby: &Ruby, queue: Value, sending: bool, work: F)
where
    F: Future<Output = prosody::Result<()>> + Send + 'static,
{
    let queue = RubyOwned::new(ruby, queue);
    runtime().spawn(async move { reply(queue, work.await, sending) });
}

/// Pushes `nil` or the error's exception onto the caller's queue, on the bridge thread.
/// `sending` maps broker errors to `Prosody::SendError`.
pub(crate) fn reply(queue: RubyOwned, result: prosody::Result<()>, sending: bool) {
    reply_with(queue, result, sending, |ruby, ()| ruby.qnil().as_value());
}

/// Pushes the converted value, or the error's exception, onto the caller's queue.
pub(crate) fn reply_with<T: Send + 'static>(
    queue: RubyOwned,
    result: prosody::Result<T>,
    sending: bool,
    convert: impl FnOnce(&Ruby, T) -> Value + Send + 'static,
) {
    bridge::run(move |ruby| {
        let item = match result {
            Ok(value) => convert(ruby, value),
            Err(error) => exception_for(ruby, &error, sending),
        };
        let pushed = queue.get(ruby).funcall::<_, _, Value>("push", (item,));
        if let Some(error) = pushed
            .err()
            .and_then(|error| bridge::recoverable(ruby, error))
        {
            tracing::error!("cannot deliver a result to Ruby: {error}");
        }
    });
}
