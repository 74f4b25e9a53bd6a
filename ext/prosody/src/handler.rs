//! Running Rust-side handler calls in Ruby: `RubyHandler`, `Native::Inbox` and
//! `Native::Context`.
//!
//! A call goes straight to the processor's thread: the tokio task pushes it (Rust
//! data only) onto the processor's [`Inbox`], and writes one byte to the inbox's
//! wake socket only when the processor said it was idle (its reactor waits for
//! that socket to turn readable). The processor takes the queued calls in one go
//! (`Native::Inbox#take`), which builds their Ruby messages and `Native::Context`s
//! with the GVL it holds anyway, runs the user's handler and reports back through
//! the same `Native::Context` (`complete`). So no other Ruby thread (the bridge)
//! is on the path of a call, and a busy processor takes calls without any
//! wake-up at all.
//!
//! The consumer hands the processor up to [`QUEUE_AHEAD`] × `max_concurrency`
//! calls beyond `max_concurrency` (`EventHandler::queue_ahead`): they wait in
//! the inbox, and the processor takes only as many as leave it running at most
//! `max_concurrency` handlers, marking each started (`Context::start`) as it
//! takes it. So a finished call's successor is already there: no round trip
//! through the tokio tasks and no wake-up of the processor per slot. Cancelling
//! a call still in the inbox removes it; one already taken is cancelled on the
//! processor, which takes cancellations whatever its running calls.
//!
//! The processor's thread defers its completions (`Native.defer_completions`) and
//! sends them in one go with the GVL released (`Native.flush_completions`), so
//! waking the tokio side never holds up Ruby.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use magnus::error::ErrorType;
use magnus::value::{LazyId, ReprValue};
use magnus::{
    function, method, prelude::*, Error, IntoValue, RArray, RHash, RModule, RObject, RString, Ruby,
    Value,
};
use prosody::{ClassifyError, Context, EventHandler, FailureKind, HandlerSlot, Message, Timer};
use tokio::sync::oneshot;
use tracing::warn;

use crate::bridge::owned::RubyOwned;
use crate::bridge::{self};
use crate::classes;
use crate::convert::{from_json, interned, lossy};
use crate::errors;
use crate::gvl::without_gvl;
use crate::process;
use crate::reply::{answer_later, reply_with};
use crate::runtime::runtime;

/// Why a Ruby handler call did not succeed.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct HandlerFailure {
    class: String,
    message: String,
    permanent: bool,
}

impl HandlerFailure {
    fn internal(message: &str) -> Self {
        Self {
            class: errors::qualified_name(errors::Kind::Bridge),
            message: message.to_owned(),
            permanent: false,
        }
    }
}

impl ClassifyError for HandlerFailure {
    fn is_permanent(&self) -> bool {
        self.permanent
    }

    fn class_name(&self) -> String {
        self.class.clone()
    }
}

type Outcome = Result<(), HandlerFailure>;
/// A call's completion: taken by the first outcome.
type SharedSender = Mutex<Option<oneshot::Sender<Outcome>>>;

/// Takes the sender, unless an outcome was delivered already.
fn take_sender(sender: &SharedSender) -> Option<oneshot::Sender<Outcome>> {
    sender
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
}

/// A finished call: its outcome, and its handler slot, given back with it.
type Completed = (Option<HandlerSlot>, oneshot::Sender<Outcome>, Outcome);

/// Gives the slot back first: the next waiting call gets it at once, and
/// starts while the finished call's task is still being woken.
fn send((slot, sender, outcome): Completed) {
    drop(slot);
    let _ = sender.send(outcome);
}

thread_local! {
    /// Set on the processor's thread: its completions wait for `flush_completions`.
    static DEFERRING: Cell<bool> = const { Cell::new(false) };
    static DEFERRED: RefCell<Vec<Completed>> = const { RefCell::new(Vec::new()) };
    /// The process generation `DEFERRED` belongs to (see `NativeContext::born`).
    static DEFERRED_BORN: Cell<u64> = const { Cell::new(0) };
}

/// `Prosody::Native.defer_completions(on)`: while on, completions made on the
/// calling thread wait for `flush_completions` instead of being sent at once.
/// The processor turns it off when its thread ends: Ruby may reuse the native
/// thread for another Ruby thread, which must not inherit it.
fn defer_completions(on: bool) {
    DEFERRING.with(|deferring| deferring.set(on));
    DEFERRED_BORN.with(|born| born.set(process::generation()));
}

/// `Prosody::Native.flush_completions`: sends the calling thread's deferred
/// completions, with the GVL released when there are several. Returns how many.
fn flush_completions() -> usize {
    let mut batch = DEFERRED.with(|deferred| std::mem::take(&mut *deferred.borrow_mut()));
    let count = batch.len();
    if DEFERRED_BORN.with(Cell::get) != process::generation() {
        // A forked child's copy of the parent's completions: the parent sends
        // them; here they would take locks the parent's threads may have held.
        std::mem::forget(batch);
        return 0;
    }
    if count > 1 {
        // Waking tokio tasks touches no Ruby; nothing to interrupt, it is quick.
        let _ = without_gvl(|| batch.drain(..).for_each(send), || {});
    }
    // One completion, or an interrupt was pending and the batch did not run.
    batch.drain(..).for_each(send);
    // Keep the emptied buffer for the next batch rather than grow a new one.
    DEFERRED.with(|deferred| {
        let mut deferred = deferred.borrow_mut();
        if deferred.is_empty() {
            *deferred = batch;
        }
    });
    count
}

/// Calls taken per `Native::Inbox#take`: the processor lets waiting handlers
/// run between two takes, so one take must not hold it up for long.
const TAKE: usize = 256;

/// Calls queued in the inbox beyond `max_concurrency`, per handler slot.
/// Measured on the no-op path (100k messages, loopback broker): room for
/// 1 call more per slot gave +10%, 2 gave +16% (and CPU per message 0.89x);
/// 3 no more. Fair scheduling decides that much earlier (up to two handler
/// durations under saturation).
pub(crate) const QUEUE_AHEAD: usize = 2;

/// What a handler call is about.
enum Subject {
    Message(Message),
    Timer(Timer),
}

impl Subject {
    /// Where the call is, for error messages; like the Ruby objects' `summary`.
    fn summary(&self) -> String {
        match self {
            Self::Message(message) => format!(
                "topic={} partition={} offset={} key={:?}",
                message.topic(),
                message.partition(),
                message.offset(),
                message.key()
            ),
            Self::Timer(timer) => format!("timer key={:?}", timer.key()),
        }
    }

    fn to_ruby(&self, ruby: &Ruby, headers: &mut SharedHeaders) -> Result<Value, Error> {
        match self {
            Self::Message(message) => ruby_message(ruby, message, headers),
            Self::Timer(timer) => ruby_timer(ruby, timer),
        }
    }
}

/// A handler call waiting in an [`Inbox`].
struct Queued {
    task_id: u64,
    context: Context,
    subject: Subject,
    sender: oneshot::Sender<Outcome>,
}

struct InboxState {
    calls: std::collections::VecDeque<Queued>,
    /// Cancellations of calls the processor has taken already (a call still
    /// queued is removed instead): taken after the calls, whatever the limit.
    cancels: Vec<u64>,
    /// The most calls the processor runs at once (`max_concurrency`).
    max_running: usize,
    /// The processor took no call and waits for the wake socket.
    waiting: bool,
    /// The processor stopped taking calls: pushes are refused.
    closed: bool,
}

/// What [`Inbox::cancel`] did with a call.
enum Cancelled {
    /// It was still queued: removed, never started.
    Unstarted(Box<Queued>),
    /// The processor has it: it was told.
    Told,
    /// The processor has stopped taking calls and cancellations.
    Refused,
}

/// The queue between the tokio tasks calling a Ruby handler and the processor
/// thread running them. Pushing never touches Ruby; the processor is woken
/// (one byte on a socket its reactor watches) only when it said it was idle.
pub(crate) struct Inbox {
    state: Mutex<InboxState>,
    wake_write: UnixStream,
    wake_read: UnixStream,
}

impl Inbox {
    fn new() -> std::io::Result<Self> {
        let (wake_write, wake_read) = UnixStream::pair()?;
        wake_write.set_nonblocking(true)?;
        wake_read.set_nonblocking(true)?;
        Ok(Self {
            state: Mutex::new(InboxState {
                calls: std::collections::VecDeque::new(),
                cancels: Vec::new(),
                max_running: usize::MAX,
                waiting: false,
                closed: false,
            }),
            wake_write,
            wake_read,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `call`, waking the processor if it waits; gives it back
    /// (boxed: a cold path) when the inbox is closed.
    fn push(&self, call: Queued) -> Result<(), Box<Queued>> {
        let wake = {
            let mut state = self.state();
            if state.closed {
                return Err(Box::new(call));
            }
            state.calls.push_back(call);
            std::mem::replace(&mut state.waiting, false)
        };
        if wake {
            self.wake();
        }
        Ok(())
    }

    /// Cancels call `task_id`: removes it while still queued (a linear search:
    /// cancellations are rare and the queue is short), or tells the processor.
    fn cancel(&self, task_id: u64) -> Cancelled {
        let wake = {
            let mut state = self.state();
            if let Some(index) = state.calls.iter().position(|call| call.task_id == task_id) {
                return state
                    .calls
                    .remove(index)
                    .map_or(Cancelled::Told, |call| Cancelled::Unstarted(Box::new(call)));
            }
            if state.closed {
                return Cancelled::Refused;
            }
            state.cancels.push(task_id);
            std::mem::replace(&mut state.waiting, false)
        };
        if wake {
            self.wake();
        }
        Cancelled::Told
    }

    /// One byte for the processor's reactor. A full socket already holds
    /// unread bytes, which wake it just as well.
    fn wake(&self) {
        let _ = (&self.wake_write).write(&[1]);
    }
}

/// `Prosody::Native::Inbox`: the processor's side of an [`Inbox`].
///
/// In a forked child (a later process generation) the inbox is the parent's:
/// its lock may have been held by a thread that does not exist there, so the
/// child never touches it: it reads as closed and empty, and is leaked.
#[magnus::wrap(class = "Prosody::Native::Inbox", free_immediately, size)]
pub(crate) struct InboxHandle {
    inbox: ManuallyDrop<Arc<Inbox>>,
    born: u64,
    /// An empty queue with room, swapped for the inbox's queue by `take`, so
    /// neither side allocates per batch. Only the processor's thread uses it.
    spare: Mutex<std::collections::VecDeque<Queued>>,
}

impl Drop for InboxHandle {
    fn drop(&mut self) {
        if self.in_own_process() {
            // SAFETY: dropped once, here; the field is never used afterwards.
            unsafe { ManuallyDrop::drop(&mut self.inbox) };
        }
    }
}

impl InboxHandle {
    fn in_own_process(&self) -> bool {
        process::generation() == self.born
    }

    /// The inbox, unless this is a forked child of the process that made it.
    fn inbox(&self) -> Option<&Inbox> {
        self.in_own_process().then_some(&**self.inbox)
    }

    fn create(ruby: &Ruby) -> Result<Self, Error> {
        Inbox::new()
            .map(|inbox| Self {
                inbox: ManuallyDrop::new(Arc::new(inbox)),
                born: process::generation(),
                spare: Mutex::default(),
            })
            .map_err(|error| {
                errors::error(
                    ruby,
                    errors::Kind::Bridge,
                    format!("cannot create the handler inbox: {error}"),
                )
            })
    }

    /// The descriptor that turns readable when the processor should `take`.
    /// It stays open as long as this object; read it with `autoclose: false`.
    fn wake_fd(&self) -> i32 {
        self.inbox.wake_read.as_raw_fd()
    }

    /// The queued calls that leave at most `max_concurrency` running, given
    /// `running` calls the processor runs now (and at most [`TAKE`]): an
    /// Array of calls (`task_id, context, completion, message`: a
    /// `Prosody::Context` and its `Native::Context`, which is also the call's
    /// completion), each marked started, with the task ids of cancelled calls
    /// taken earlier pushed onto `cancels`. An empty Array when it takes no
    /// call (the next push, cancellation or `wake` then wakes the reader),
    /// `nil` once closed and empty.
    fn take(
        ruby: &Ruby,
        rb_self: &Self,
        cancels: RArray,
        running: usize,
    ) -> Result<Option<RArray>, Error> {
        let Some(inbox) = rb_self.inbox() else {
            return Ok(None);
        };
        let mut taken = std::mem::take(
            &mut *rb_self
                .spare
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let cancelled = {
            let mut state = inbox.state();
            if state.closed && state.calls.is_empty() && state.cancels.is_empty() {
                state.waiting = true;
                return Ok(None);
            }
            let room = state.max_running.saturating_sub(running).min(TAKE);
            let count = state.calls.len().min(room);
            if count == 0 {
                state.waiting = true;
            }
            if count == state.calls.len() {
                std::mem::swap(&mut state.calls, &mut taken);
            } else {
                taken.extend(state.calls.drain(..count));
            }
            std::mem::take(&mut state.cancels)
        };
        for task_id in cancelled {
            cancels.push(task_id)?;
        }
        let calls = ruby.ary_new_capa(taken.len() * 4);
        let mut shared_headers = None;
        for queued in &taken {
            queued.context.start();
        }
        for queued in taken.drain(..) {
            let Queued {
                task_id,
                context,
                subject,
                sender,
            } = queued;
            match subject.to_ruby(ruby, &mut shared_headers) {
                Ok(subject) => {
                    let native = NativeContext {
                        context: ManuallyDrop::new(context),
                        sender: ManuallyDrop::new(Mutex::new(Some(sender))),
                        born: process::generation(),
                    }
                    .into_value_with(ruby);
                    let context = ruby_context(ruby, native, subject)?;
                    push_all(
                        calls,
                        &[task_id.into_value_with(ruby), context, native, subject],
                    )?;
                }
                Err(error) => {
                    let _ = sender.send(Err(HandlerFailure::internal(&error.to_string())));
                    // A termination (Thread#kill, a signal, exit) is the
                    // processor's to handle: the calls not yet built are dropped,
                    // which fails them.
                    if terminates(ruby, &error) {
                        return Err(error);
                    }
                    warn!("cannot hand handler call {task_id} to Ruby: {error}");
                }
            }
        }
        *rb_self
            .spare
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = taken;
        Ok(Some(calls))
    }

    /// Wakes the reader if it waits (for work queued by other means).
    fn wake(&self) {
        let Some(inbox) = self.inbox() else { return };
        let wake = std::mem::replace(&mut inbox.state().waiting, false);
        if wake {
            inbox.wake();
        }
    }

    /// Refuses further pushes (their calls fail as cancelled) and wakes the
    /// reader; what is queued can still be taken.
    fn close(&self) {
        let Some(inbox) = self.inbox() else { return };
        inbox.state().closed = true;
        inbox.wake();
    }
}

/// Whether `error` ends the thread rather than fails one call.
fn terminates(ruby: &Ruby, error: &Error) -> bool {
    match error.error_type() {
        ErrorType::Jump(_) => true,
        ErrorType::Error(..) => false,
        ErrorType::Exception(_) => {
            error.is_kind_of(ruby.exception_signal())
                || error.is_kind_of(ruby.exception_system_exit())
        }
    }
}

/// The core's view of a Ruby `AsyncTaskProcessor`.
pub(crate) struct RubyHandler {
    inbox: Arc<Inbox>,
    next_task: AtomicU64,
    /// Cleared when the processor's thread died (`Client#processor_died`).
    alive: Arc<AtomicBool>,
}

impl RubyHandler {
    /// A handler feeding `processor` (an `AsyncTaskProcessor`) through its inbox.
    pub(crate) fn new(
        _ruby: &Ruby,
        processor: Value,
        alive: Arc<AtomicBool>,
        max_concurrency: usize,
    ) -> Result<Self, Error> {
        let inbox: Value = processor.funcall("inbox", ())?;
        let inbox = <&InboxHandle>::try_convert(inbox)?;
        inbox.inbox.state().max_running = max_concurrency;
        Ok(Self {
            inbox: Arc::clone(&inbox.inbox),
            next_task: AtomicU64::new(1),
            alive,
        })
    }
}

impl EventHandler for RubyHandler {
    type Error = HandlerFailure;

    async fn on_message(&self, context: Context, message: Message) -> Outcome {
        self.call(context, Subject::Message(message)).await
    }

    async fn on_timer(&self, context: Context, timer: Timer) -> Outcome {
        self.call(context, Subject::Timer(timer)).await
    }

    /// Calls can run only while the processor thread is alive, and the
    /// bridge thread too (handlers need it to send messages and set timers).
    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire) && bridge::is_running()
    }

    fn failure_class(&self, kind: FailureKind) -> String {
        errors::failure_class(kind)
    }

    fn queue_ahead(&self, max_concurrency: usize) -> usize {
        max_concurrency.saturating_mul(QUEUE_AHEAD)
    }
}

impl RubyHandler {
    /// Hands one call to the Ruby processor and waits for its completion;
    /// forwards cancellation of `context` to the processor.
    async fn call(&self, context: Context, subject: Subject) -> Outcome {
        let (sender, mut receiver) = oneshot::channel();
        let task_id = self.next_task.fetch_add(1, Ordering::Relaxed);
        // A handle on the call's cancellation; waiting on it makes no token.
        let cancellation = context.clone();
        let pushed = self.inbox.push(Queued {
            task_id,
            context,
            subject,
            sender,
        });
        if let Err(refused) = pushed {
            return Err(cancelled(format!(
                "the processor has stopped; {} was not handled",
                refused.subject.summary()
            )));
        }
        let unreported = || {
            Err(HandlerFailure::internal(
                "the handler was dropped without reporting",
            ))
        };
        tokio::select! {
            // The outcome first: it is the usual case, and this skips the
            // random pick (a thread-local RNG call per poll).
            biased;
            outcome = &mut receiver => return outcome.unwrap_or_else(|_| unreported()),
            () = cancellation.on_cancel() => {}
        }
        match self.inbox.cancel(task_id) {
            Cancelled::Unstarted(call) => {
                return Err(cancelled(format!(
                    "{} was cancelled before its handler started",
                    call.subject.summary()
                )))
            }
            // Refused once the processor stopped taking calls: it finishes or
            // abandons the calls it has either way.
            Cancelled::Told | Cancelled::Refused => {}
        }
        receiver.await.unwrap_or_else(|_| unreported())
    }
}

/// A call's failure as `Prosody::CancelledError`.
fn cancelled(message: String) -> HandlerFailure {
    HandlerFailure {
        class: errors::qualified_name(errors::Kind::Cancelled),
        message,
        permanent: false,
    }
}

/// A Ruby Time; times before 1970 too (timers may be set there).
fn ruby_time(ruby: &Ruby, time: SystemTime) -> Result<Value, Error> {
    let (seconds, nanos) = match time.duration_since(UNIX_EPOCH) {
        Ok(since) => (
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
            i64::from(since.subsec_nanos()),
        ),
        Err(before) => {
            // Ruby counts whole seconds down and the fraction up: -1.5 s is -2 s + 0.5 s.
            let before = before.duration();
            let seconds = -i64::try_from(before.as_secs()).unwrap_or(i64::MAX);
            match before.subsec_nanos() {
                0 => (seconds, 0),
                fraction => (seconds - 1, i64::from(1_000_000_000 - fraction)),
            }
        }
    };
    Ok(ruby.time_nano_new(seconds, nanos)?.as_value())
}

fn ruby_timer(ruby: &Ruby, timer: &Timer) -> Result<Value, Error> {
    classes::timer(ruby).new_instance((timer.key(), ruby_time(ruby, timer.time())?))
}

// The instance variables of `Prosody::Message`, set here in the order its
// `initialize` sets them.
static TOPIC: LazyId = LazyId::new("@topic");
static PARTITION: LazyId = LazyId::new("@partition");
static OFFSET: LazyId = LazyId::new("@offset");
static KEY: LazyId = LazyId::new("@key");
static TIMESTAMP: LazyId = LazyId::new("@timestamp");
static PAYLOAD: LazyId = LazyId::new("@payload");
static HEADERS: LazyId = LazyId::new("@headers");

/// The last message of a batch that had headers, and its frozen headers Hash:
/// the next messages with the same headers share that Hash (the core shares
/// their list too, see `prosody::consumer::fetched_after`). Messages from one
/// producer usually carry the same headers, so this saves a Hash and a String
/// per header for most messages. The Hash is referenced by the batch's Array.
type SharedHeaders = Option<(Message, RHash)>;

/// Builds a frozen `Prosody::Message` directly (allocate, set its instance
/// variables, freeze), without a Ruby-level `initialize` per message.
fn ruby_message(
    ruby: &Ruby,
    message: &Message,
    shared_headers: &mut SharedHeaders,
) -> Result<Value, Error> {
    // Nanoseconds since the epoch (a Fixnum until 2116): `Message#timestamp`
    // builds the Time when read, which most handlers never do.
    let timestamp = match message
        .timestamp()
        .map(|time| time.duration_since(UNIX_EPOCH))
    {
        Some(Ok(since_epoch)) => i64::try_from(since_epoch.as_nanos())
            .unwrap_or(i64::MAX)
            .into_value_with(ruby),
        _ => ruby.qnil().as_value(),
    };
    let headers = if message.headers().is_empty() {
        classes::empty_headers(ruby)
    } else if let Some((_, headers)) = shared_headers
        .as_ref()
        .filter(|(last, _)| last.headers() == message.headers())
    {
        *headers
    } else {
        let headers = ruby.hash_new();
        for (name, value) in message.headers() {
            let value = match value {
                None => ruby.qnil().as_value(),
                // Frozen: messages with the same headers share them.
                Some(bytes) => {
                    let value = match std::str::from_utf8(bytes) {
                        Ok(text) => ruby.str_new(text),
                        Err(_) => ruby.str_from_slice(bytes),
                    };
                    value.freeze();
                    value.as_value()
                }
            };
            // Hash keys are frozen and deduplicated by Ruby anyway: intern at once.
            headers.aset(interned(ruby, name), value)?;
        }
        headers.freeze();
        *shared_headers = Some((message.clone(), headers));
        headers
    };
    let payload = from_json(ruby, message.payload())?;
    let object = allocate(ruby, classes::message(ruby))?;
    set_ivars(
        ruby,
        object,
        &[
            (*TOPIC, interned(ruby, message.topic()).as_value()),
            (*PARTITION, message.partition().into_value_with(ruby)),
            (*OFFSET, message.offset().into_value_with(ruby)),
            (*KEY, ruby.str_new(message.key()).as_value()),
            (*TIMESTAMP, timestamp),
            (*PAYLOAD, payload),
            (*HEADERS, headers.as_value()),
        ],
    )?;
    object.freeze();
    Ok(object.as_value())
}

// The instance variables a `Prosody::Context` starts with (the others are
// set when first used).
static NATIVE: LazyId = LazyId::new("@native");
static SUBJECT: LazyId = LazyId::new("@subject");

/// Builds a `Prosody::Context` for a call directly, as `Context.new(native,
/// subject)` would, without a Ruby-level `initialize` per call.
fn ruby_context(ruby: &Ruby, native: Value, subject: Value) -> Result<Value, Error> {
    let object = allocate(ruby, classes::context(ruby))?;
    set_ivars(ruby, object, &[(*NATIVE, native), (*SUBJECT, subject)])?;
    Ok(object.as_value())
}

/// Appends `values` to `array` in one protected call (magnus's `push`
/// protects each one).
fn push_all(array: RArray, values: &[Value]) -> Result<(), Error> {
    use magnus::rb_sys::AsRawValue;
    magnus::rb_sys::protect(|| {
        for value in values {
            // SAFETY: on a Ruby thread holding the GVL (called from Ruby);
            // `array` and the values are live, referenced from this stack. What
            // Ruby may raise here (NoMemoryError) is caught by `protect`.
            unsafe { rb_sys::rb_ary_push(array.as_raw(), value.as_raw()) };
        }
        array.as_raw()
    })?;
    Ok(())
}

/// A new instance of `class`, a plain Ruby class, without calling `initialize`.
fn allocate(ruby: &Ruby, class: magnus::RClass) -> Result<RObject, Error> {
    RObject::from_value(class.obj_alloc()?).ok_or_else(|| {
        Error::new(
            ruby.exception_type_error(),
            format!("{} did not allocate a plain object", class.inspect()),
        )
    })
}

/// Sets instance variables of `object`, just allocated and not frozen, in one
/// protected call (magnus's `ivar_set` protects each one: a measurable cost
/// per message).
fn set_ivars(
    ruby: &Ruby,
    object: RObject,
    ivars: &[(magnus::value::OpaqueId, Value)],
) -> Result<(), Error> {
    use magnus::rb_sys::{AsRawId, AsRawValue};
    use magnus::value::IntoId;
    magnus::rb_sys::protect(|| {
        for &(id, value) in ivars {
            let id = id.into_id_with(ruby);
            // SAFETY: on a Ruby thread holding the GVL (every caller is a method
            // called from Ruby); `object` and the values are live, referenced
            // from this stack where the GC sees them. What Ruby may raise here
            // (NoMemoryError, FrozenError) is caught by `protect`.
            unsafe { rb_sys::rb_ivar_set(object.as_raw(), id.as_raw(), value.as_raw()) };
        }
        object.as_raw()
    })?;
    Ok(())
}

/// `Prosody::Native::Context`: the core's per-call context, seen from Ruby, and
/// the call's completion, which reports its outcome once.
#[magnus::wrap(class = "Prosody::Native::Context", free_immediately, size)]
pub(crate) struct NativeContext {
    context: ManuallyDrop<Context>,
    sender: ManuallyDrop<SharedSender>,
    /// The process generation it was made in: a forked child (a handler that
    /// called `fork` without a block) must not touch it, as the parent's
    /// threads may have held its locks (the scheduler's, tokio's) at the fork.
    born: u64,
}

impl NativeContext {
    fn in_own_process(&self) -> bool {
        process::generation() == self.born
    }

    /// The context, or a `BridgeError` in a forked child.
    fn live_context(&self, ruby: &Ruby) -> Result<&Context, Error> {
        process::check_same_process(ruby, self.born, "handler context")?;
        Ok(&self.context)
    }

    fn should_cancel(&self) -> bool {
        self.context.should_cancel()
    }

    /// The attempt span's `traceparent`; `nil` when tracing is off.
    fn trace_context(&self) -> Option<String> {
        self.context.trace_parent().map(str::to_owned)
    }

    /// `nil` for success, an exception for failure; returns false if already
    /// completed. Deferred on a thread that called `defer_completions`.
    fn complete(ruby: &Ruby, rb_self: &Self, error: Value) -> Result<bool, Error> {
        if !rb_self.in_own_process() {
            // The parent reports this call itself.
            return Ok(false);
        }
        let outcome = if error.is_nil() {
            Ok(())
        } else {
            Err(describe(ruby, error)?)
        };
        let Some(sender) = take_sender(&rb_self.sender) else {
            return Ok(false);
        };
        // The handler is done: its slot need not wait for the tokio task.
        let completed = (rb_self.context.take_slot(), sender, outcome);
        if DEFERRING.with(Cell::get) {
            DEFERRED.with(|deferred| deferred.borrow_mut().push(completed));
        } else {
            send(completed);
        }
        Ok(true)
    }

    // Timer calls reach the store (PostgreSQL): like `Client#send_message` they
    // run on a tokio task and answer through the caller's Thread::Queue.

    fn schedule(ruby: &Ruby, rb_self: &Self, at_ms: i64, queue: Value) -> Result<(), Error> {
        let context = rb_self.live_context(ruby)?.clone();
        answer_later(ruby, queue, false, async move {
            context.schedule(from_millis(at_ms)).await
        });
        Ok(())
    }

    fn clear_and_schedule(
        ruby: &Ruby,
        rb_self: &Self,
        at_ms: i64,
        queue: Value,
    ) -> Result<(), Error> {
        let context = rb_self.live_context(ruby)?.clone();
        answer_later(ruby, queue, false, async move {
            context.clear_and_schedule(from_millis(at_ms)).await
        });
        Ok(())
    }

    fn unschedule(ruby: &Ruby, rb_self: &Self, at_ms: i64, queue: Value) -> Result<(), Error> {
        let context = rb_self.live_context(ruby)?.clone();
        answer_later(ruby, queue, false, async move {
            context.unschedule(from_millis(at_ms)).await
        });
        Ok(())
    }

    fn clear_scheduled(ruby: &Ruby, rb_self: &Self, queue: Value) -> Result<(), Error> {
        let context = rb_self.live_context(ruby)?.clone();
        answer_later(ruby, queue, false, async move {
            context.clear_scheduled().await
        });
        Ok(())
    }

    /// Pushes an Array of Integer milliseconds since the epoch, earliest first.
    fn scheduled(ruby: &Ruby, rb_self: &Self, queue: Value) -> Result<(), Error> {
        let context = rb_self.live_context(ruby)?.clone();
        let queue = RubyOwned::new(ruby, queue);
        runtime().spawn(async move {
            let times = context.scheduled().await;
            reply_with(queue, times, false, |ruby, times| {
                let list = ruby.ary_new();
                for time in times {
                    let millis = time
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |since| since.as_millis());
                    let _ = list.push(u64::try_from(millis).unwrap_or(u64::MAX));
                }
                list.as_value()
            });
        });
        Ok(())
    }
}

fn from_millis(at_ms: i64) -> SystemTime {
    let magnitude = std::time::Duration::from_millis(at_ms.unsigned_abs());
    if at_ms >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

impl Drop for NativeContext {
    fn drop(&mut self) {
        // Garbage-collected without a word: never leave the Rust side waiting.
        // (Nearly every context was completed: the failure is built only when
        // it is not, as this runs in the GC's sweep, once per call.)
        if !self.in_own_process() {
            // Leaked: dropping the last handle on a call gives back its slot,
            // which takes the scheduler's lock (see the `born` field).
            return;
        }
        if let Some(sender) = take_sender(&self.sender) {
            let _ = sender.send(Err(HandlerFailure::internal(
                "the handler's completion was discarded",
            )));
        }
        // SAFETY: dropped once, here; the fields are never used afterwards.
        unsafe {
            ManuallyDrop::drop(&mut self.context);
            ManuallyDrop::drop(&mut self.sender);
        }
    }
}

fn describe(ruby: &Ruby, error: Value) -> Result<HandlerFailure, Error> {
    let permanent_class = classes::permanent_error(ruby);
    let class = class_name(error);
    // Lossy: a message with bytes that are not UTF-8 (`raise "...".b`) was lost.
    let message = error
        .funcall::<_, _, Value>("message", ())
        .ok()
        .and_then(RString::from_value)
        .map(lossy)
        .unwrap_or_default();
    Ok(HandlerFailure {
        class,
        message,
        permanent: error.is_kind_of(permanent_class),
    })
}

fn class_name(value: Value) -> String {
    value.class().inspect()
}

pub(crate) fn init(ruby: &Ruby, native: RModule) -> Result<(), Error> {
    let inbox = native.define_class("Inbox", ruby.class_object())?;
    inbox.undef_default_alloc_func();
    inbox.define_singleton_method("new", function!(InboxHandle::create, 0))?;
    inbox.define_method("wake_fd", method!(InboxHandle::wake_fd, 0))?;
    inbox.define_method("take", method!(InboxHandle::take, 2))?;
    inbox.define_method("wake", method!(InboxHandle::wake, 0))?;
    inbox.define_method("close", method!(InboxHandle::close, 0))?;
    let context = native.define_class("Context", ruby.class_object())?;
    context.undef_default_alloc_func();
    context.define_method("should_cancel?", method!(NativeContext::should_cancel, 0))?;
    context.define_method("trace_context", method!(NativeContext::trace_context, 0))?;
    context.define_method("schedule", method!(NativeContext::schedule, 2))?;
    context.define_method(
        "clear_and_schedule",
        method!(NativeContext::clear_and_schedule, 2),
    )?;
    context.define_method("unschedule", method!(NativeContext::unschedule, 2))?;
    context.define_method(
        "clear_scheduled",
        method!(NativeContext::clear_scheduled, 1),
    )?;
    context.define_method("scheduled", method!(NativeContext::scheduled, 1))?;
    context.define_method("complete", method!(NativeContext::complete, 1))?;
    native.define_module_function("defer_completions", function!(defer_completions, 1))?;
    native.define_module_function("flush_completions", function!(flush_completions, 0))?;
    native.define_module_function("process_generation", function!(process::generation, 0))?;
    for id in [
        &TOPIC, &PARTITION, &OFFSET, &KEY, &TIMESTAMP, &PAYLOAD, &HEADERS, &NATIVE, &SUBJECT,
    ] {
        LazyId::force(id, ruby);
    }
    Ok(())
}
