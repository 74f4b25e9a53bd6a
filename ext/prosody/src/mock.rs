//! `Prosody::Native.mock_*`: the per-process mock cluster, for tests and demos.

use magnus::{function, prelude::*, Error, RModule, Ruby};

use crate::errors::from_core;
use crate::process::off_ruby_stack;

fn bootstrap_servers(ruby: &Ruby) -> Result<String, Error> {
    off_ruby_stack(ruby, prosody::mock::bootstrap_servers)?.map_err(|error| from_core(ruby, &error))
}

fn create_topic(ruby: &Ruby, name: String, partitions: i32) -> Result<bool, Error> {
    off_ruby_stack(ruby, move || prosody::mock::create_topic(&name, partitions))?
        .map_err(|error| from_core(ruby, &error))
}

pub(crate) fn init(_ruby: &Ruby, native: RModule) -> Result<(), Error> {
    native.define_singleton_method("mock_bootstrap_servers", function!(bootstrap_servers, 0))?;
    native.define_singleton_method("mock_create_topic", function!(create_topic, 2))?;
    Ok(())
}
