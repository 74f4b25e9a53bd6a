# frozen_string_literal: true

# Loads Prosody (the compiled extension must exist: `rake compile`) and the
# helpers every spec shares. Specs run against the in-process mock cluster.

$LOAD_PATH.unshift(File.expand_path("../lib", __dir__))

require "async"
require "logger"
require "securerandom"
require "socket"
require "stringio"
require "prosody"

Dir[File.join(__dir__, "support", "**", "*.rb")].each { |file| require file }

RSpec.configure do |config|
  config.include ProsodySpec::Helpers

  config.disable_monkey_patching!
  config.expect_with(:rspec) { |expectations| expectations.include_chain_clauses_in_custom_matcher_descriptions = true }
  config.mock_with(:rspec) { |mocks| mocks.verify_partial_doubles = true }
  config.order = :random
  # spec/gem_install_spec.rb builds and installs the gem (minutes): `script/test --gem`.
  config.filter_run_excluding(gem_install: true) unless ENV["PROSODY_TEST_GEM"]
  Kernel.srand(config.seed)

  # Native logs (subscribe/unsubscribe lines) would drown the progress output;
  # examples that look at logs install their own logger.
  config.before(:suite) { Prosody.logger = Logger.new($stderr, level: Logger::WARN) }

  # Never leave a consumer running into the next example.
  config.after { cleanup_clients }
end
