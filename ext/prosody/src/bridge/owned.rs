//! Ruby values owned by Rust code that may run on any thread.
//!
//! A [`RubyOwned`] keeps its value alive (registered with the GC, like magnus's
//! `BoxValue`) and can be moved to tokio threads, but its value can only be read
//! with a `&Ruby` and it is only ever unregistered on a Ruby thread holding the
//! GVL: dropped anywhere else, it sends itself to the bridge thread to be dropped.

use magnus::value::BoxValue;
use magnus::{Ruby, Value};

use crate::gvl::gvl_released;

pub(crate) struct RubyOwned {
    value: Option<BoxValue<Value>>,
}

// SAFETY: the boxed value is only read through `get`, which requires a `&Ruby`
// (proof of being on a Ruby thread with the GVL), and only unregistered in `Drop`
// on such a thread; a Ruby VALUE itself is a plain word that may be moved freely.
unsafe impl Send for RubyOwned {}
// SAFETY: as above; shared access only reads the VALUE with the GVL held.
unsafe impl Sync for RubyOwned {}

impl RubyOwned {
    pub(crate) fn new(_ruby: &Ruby, value: Value) -> Self {
        Self {
            value: Some(BoxValue::new(value)),
        }
    }

    pub(crate) fn get(&self, _ruby: &Ruby) -> Value {
        match &self.value {
            Some(value) => **value,
            // `value` is only taken in `drop`.
            None => unreachable!("RubyOwned read after drop"),
        }
    }
}

impl Drop for RubyOwned {
    fn drop(&mut self) {
        let Some(value) = self.value.take() else {
            return;
        };
        if !gvl_released() && Ruby::get().is_ok() {
            drop(value);
            return;
        }
        let value = SendBox(value);
        // If the bridge is gone (process exit) the value is leaked, which is harmless then.
        super::run(move |_ruby| drop(value));
    }
}

/// Carries a `BoxValue` to the bridge thread, where it is dropped.
struct SendBox(#[allow(dead_code)] BoxValue<Value>);

// SAFETY: the box is only moved, never read, until it is dropped by a bridge job,
// which runs on the bridge's Ruby thread with the GVL held.
unsafe impl Send for SendBox {}
