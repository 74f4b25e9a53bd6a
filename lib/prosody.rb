# frozen_string_literal: true

# Prosody: Kafka consumer/producer with per-key ordering and cross-key
# concurrency inside a partition. This file only loads the pieces; see
# Prosody::Client for where to start.

require_relative "prosody/version"
# The native extension resolves these classes once when it loads, so they must
# exist before it does.
require_relative "prosody/errors"
require_relative "prosody/message"
require_relative "prosody/timer"
require_relative "prosody/context"
require "prosody/prosody_native"
require_relative "prosody/log_line"
require_relative "prosody/json_log_formatter"
require_relative "prosody/logging"
require_relative "prosody/message_logger"
require_relative "prosody/trace_context"
require_relative "prosody/configuration"
require_relative "prosody/event"
require_relative "prosody/monitor"
require_relative "prosody/sentry_reporter"
require_relative "prosody/instrumentation"
require_relative "prosody/native_call"
require_relative "prosody/error_classification"
require_relative "prosody/event_handler"
require_relative "prosody/reactor_watchdog"
require_relative "prosody/fiber_pool"
require_relative "prosody/forked_child"
require_relative "prosody/async_task_processor"
require_relative "prosody/client"
require_relative "prosody/app_client"
require_relative "prosody/mock_cluster"
# Rails integration, only inside a Rails app (Rails loads before its gems).
require_relative "prosody/railtie" if defined?(Rails::Railtie)
