//! A partition's prefetch queue, read a batch at a time.
//!
//! rdkafka's `PartitionQueue::poll` hands over one message per call through
//! librdkafka's event path: per message a wait set-up and three clock reads in
//! librdkafka, an event object, and an `Arc` on the Rust side: about a
//! seventh of the core's CPU per message with a no-op handler.
//! `rd_kafka_consume_batch_queue` hands over up to a buffer's worth of
//! messages in one call (one clock read, one poll-interval mark, the
//! consumed positions updated once); each is copied out and released at once.

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka_sys as rdsys;

use super::fetched_after;
use super::hooks::Hooks;
use super::partition::Fetched;
use crate::message::Header;

/// Messages taken per librdkafka call: the pointers sit on the stack.
const READ_CHUNK: usize = 256;

/// One partition's prefetch queue (librdkafka's fetch queue for it), split
/// off the consumer's main queue.
pub(crate) struct PrefetchQueue {
    /// Our own reference to the queue, read in batches.
    raw: NonNull<rdsys::rd_kafka_queue_t>,
    /// rdkafka's handle on the same queue. It split the queue off the main
    /// one, keeps the consumer (which `raw` needs) alive, and holds the
    /// callback run when the queue turns non-empty. Dropped after `raw` is
    /// destroyed.
    _split: PartitionQueue<Hooks>,
}

// SAFETY: librdkafka queues may be used from any thread (every operation takes
// the queue's own lock); `raw` is destroyed once, in `Drop`, and the split
// handle is `Send + Sync` itself.
unsafe impl Send for PrefetchQueue {}
// SAFETY: as for `Send`: `read` only calls thread-safe librdkafka functions.
unsafe impl Sync for PrefetchQueue {}

impl PrefetchQueue {
    /// Splits `topic`/`partition`'s queue off `consumer`'s main queue;
    /// `on_nonempty` runs (on a librdkafka thread) whenever it turns non-empty.
    /// `None` when the partition is unknown to the consumer.
    pub(crate) fn split(
        consumer: &Arc<BaseConsumer<Hooks>>,
        topic: &str,
        partition: i32,
        on_nonempty: impl Fn() + Send + Sync + 'static,
    ) -> Option<Self> {
        let mut split = consumer.split_partition_queue(topic, partition)?;
        split.set_nonempty_callback(on_nonempty);
        let topic = CString::new(topic).ok()?;
        // SAFETY: the client handle is alive (held by `consumer`) and `topic` is
        // a valid C string for the call. The result is a new reference to the
        // partition's fetch queue, the one `split` reads, destroyed in `Drop`.
        let raw = unsafe {
            rdsys::rd_kafka_queue_get_partition(
                consumer.client().native_ptr(),
                topic.as_ptr(),
                partition,
            )
        };
        NonNull::new(raw).map(|raw| Self { raw, _split: split })
    }

    /// Moves up to `max` queued messages into `into` (without waiting),
    /// passing fetch errors to `on_error`. `previous` is as for
    /// [`fetched_after`]. Returns how many entries librdkafka handed over,
    /// errors included: fewer than `max` means the queue is empty now.
    pub(crate) fn read(
        &self,
        max: usize,
        previous: &mut Arc<[Header]>,
        into: &mut Vec<Fetched>,
        mut on_error: impl FnMut(KafkaError),
    ) -> usize {
        let mut slots: [*mut rdsys::rd_kafka_message_t; READ_CHUNK] = [ptr::null_mut(); READ_CHUNK];
        let mut read = 0;
        while read < max {
            let asked = (max - read).min(READ_CHUNK);
            // SAFETY: the queue is alive (destroyed only in `Drop`) and `slots`
            // has room for `asked` pointers. A timeout of 0 never blocks.
            let got = unsafe {
                rdsys::rd_kafka_consume_batch_queue(self.raw.as_ptr(), 0, slots.as_mut_ptr(), asked)
            };
            // -1 is an invalid queue (it is not): read as empty.
            let got = usize::try_from(got).unwrap_or(0).min(asked);
            for &message in &slots[..got] {
                // SAFETY: librdkafka returned `got` valid message pointers, ours
                // to destroy; each is read here, then destroyed exactly once.
                unsafe {
                    let record = RawRecord(&*message);
                    if record.0.err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                        into.push(fetched_after(&record, previous));
                    } else {
                        on_error(KafkaError::MessageConsumption(record.0.err.into()));
                    }
                    rdsys::rd_kafka_message_destroy(message);
                }
            }
            read += got;
            if got < asked {
                break;
            }
        }
        read
    }
}

impl Drop for PrefetchQueue {
    fn drop(&mut self) {
        // SAFETY: `raw` came from rd_kafka_queue_get_partition and is destroyed
        // once, here, while `_split` still keeps the consumer alive.
        unsafe { rdsys::rd_kafka_queue_destroy(self.raw.as_ptr()) };
    }
}

/// A message librdkafka handed over, not yet destroyed, read field by field.
pub(crate) struct RawRecord<'a>(&'a rdsys::rd_kafka_message_t);

/// `len` bytes at `data`, or `None` for a null pointer.
///
/// # Safety
/// A non-null `data` points to `len` readable bytes that live as long as `'a`.
unsafe fn bytes<'a>(data: *const c_void, len: usize) -> Option<&'a [u8]> {
    if data.is_null() {
        None
    } else {
        // SAFETY: per this function's contract.
        Some(unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) })
    }
}

impl<'a> RawRecord<'a> {
    /// The record behind an rdkafka message.
    pub(crate) fn borrowed(message: &'a BorrowedMessage<'_>) -> Self {
        // SAFETY: a `BorrowedMessage` points to a live librdkafka message for
        // as long as it is borrowed.
        Self(unsafe { &*message.ptr() })
    }

    fn header_list(&self) -> Option<*mut rdsys::rd_kafka_headers_t> {
        let mut headers = ptr::null_mut();
        // SAFETY: the message is alive; librdkafka parses its headers once and
        // keeps them with the message (the list lives as long as it).
        let err = unsafe { rdsys::rd_kafka_message_headers(self.0, &mut headers) };
        (err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && !headers.is_null())
            .then_some(headers)
    }

    pub(crate) fn key(&self) -> Option<&[u8]> {
        // SAFETY: `key` and `key_len` describe the message's key buffer, which
        // lives as long as the message.
        unsafe { bytes(self.0.key, self.0.key_len) }
    }

    pub(crate) fn payload(&self) -> Option<&[u8]> {
        // SAFETY: as for `key`.
        unsafe { bytes(self.0.payload, self.0.len) }
    }

    pub(crate) fn offset(&self) -> i64 {
        self.0.offset
    }

    pub(crate) fn timestamp_millis(&self) -> Option<i64> {
        let mut kind = rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: the message is alive and `kind` is writable.
        let millis = unsafe { rdsys::rd_kafka_message_timestamp(self.0, &mut kind) };
        (kind != rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE)
            .then_some(millis)
    }

    pub(crate) fn headers(
        &self,
    ) -> Option<impl ExactSizeIterator<Item = (&[u8], Option<&[u8]>)> + Clone> {
        let list = self.header_list()?;
        // SAFETY: `list` belongs to the live message.
        let count = unsafe { rdsys::rd_kafka_header_cnt(list) };
        Some((0..count).map(move |index| {
            let mut name: *const c_char = ptr::null();
            let mut value: *const c_void = ptr::null();
            let mut size = 0;
            // SAFETY: `index` is below the list's count; the name (a C string)
            // and value stay valid as long as the message. A name that cannot
            // be read shows as empty rather than failing the message.
            unsafe {
                let err =
                    rdsys::rd_kafka_header_get_all(list, index, &mut name, &mut value, &mut size);
                if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                    return (&[][..], None);
                }
                (CStr::from_ptr(name).to_bytes(), bytes(value, size))
            }
        }))
    }
}
