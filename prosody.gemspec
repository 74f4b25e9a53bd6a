# frozen_string_literal: true

require_relative "lib/prosody/version"

Gem::Specification.new do |spec|
  spec.name = "prosody"
  spec.version = Prosody::VERSION
  spec.summary = "Kafka consumer/producer with per-key ordering and cross-key concurrency inside a partition"
  spec.description = <<~TEXT
    Prosody runs a Ruby handler over Kafka topics: inside one partition, messages with
    different keys run concurrently (as Async fibers), messages with the same key run
    strictly in order, and a slow or failing key never blocks the others. The Kafka work
    is done by a Rust core (rdkafka + tokio) built with cargo when the gem is installed.
  TEXT
  spec.license = "MIT"
  spec.authors = ["Prosody contributors"]
  spec.required_ruby_version = ">= 3.1"
  spec.metadata["rubygems_mfa_required"] = "true"

  root = __dir__
  rust_sources = Dir.glob(
    %w[
      Cargo.toml Cargo.lock
      ext/prosody/Cargo.toml ext/prosody/src/**/*.rs
      crates/*/Cargo.toml crates/*/src/**/*.rs crates/*/benches/**/*.rs crates/*/examples/**/*.rs
      crates/*/build.rs
    ],
    base: root
  )
  ruby_files = Dir.glob(%w[lib/**/*.rb sig/**/*.rbs exe/* ext/prosody/*.rb README.md ARCHITECTURE.md], base: root)
  spec.files = (ruby_files + rust_sources).reject { |path| path.split("/").include?("target") }.uniq.sort
  spec.bindir = "exe"
  spec.executables = Dir.glob("exe/*", base: root).map { |path| File.basename(path) }
  spec.require_paths = ["lib"]
  spec.extensions = ["ext/prosody/extconf.rb"]

  spec.add_dependency "async", ">= 1.30", "< 3"
end
