# frozen_string_literal: true

module Prosody
  # The gem's version; the Rust crates share it through the Cargo workspace.
  VERSION = "0.1.0"
end
