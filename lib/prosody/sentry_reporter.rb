# frozen_string_literal: true

module Prosody
  # Reports to Sentry (the sentry-ruby gem) what ends a message's retries and
  # what stops the consumer; installed by {Prosody.install_integrations} when
  # sentry-ruby is loaded, and active once `Sentry.init` has run.
  #
  # Captured as Sentry events: a message dead-lettered, a message skipped after
  # failing, the handler thread dying, a partition stalling. Each carries the tags `prosody.topic`,
  # `prosody.partition`, `prosody.offset`, `prosody.key`, `prosody.group_id`,
  # `prosody.mode` and `prosody.error_class`. Failed attempts that will be
  # retried become breadcrumbs, so a captured event shows the attempts before it.
  class SentryReporter
    # Events that become Sentry events.
    CAPTURED = %w[message.dead_lettered message.skipped processor.died consumer.stalled].freeze
    # Events that become breadcrumbs.
    BREADCRUMBS = %w[message.failed].freeze
    # Payload fields that become tags.
    TAGS = %i[topic partition offset key group_id mode error_class].freeze
    private_constant :TAGS

    # @param monitor [Monitor]
    # @return [Proc] the subscriber
    def subscribe(monitor)
      monitor.subscribe(*CAPTURED, *BREADCRUMBS) { |event| call(event) }
    end

    # @param event [Event]
    # @return [void]
    def call(event)
      return unless ::Sentry.initialized?
      return breadcrumb(event) if BREADCRUMBS.include?(event.name)
      # Skips by filters (own messages, event types, duplicates) are not failures.
      return if event.name == "message.skipped" && event[:reason] != "failed"

      capture(event)
    end

    private

    def capture(event)
      ::Sentry.with_scope do |scope|
        scope.set_tags(TAGS.filter_map { |field| ["prosody.#{field}", event[field].to_s] if event[field] }.to_h)
        scope.set_extras(event.payload.transform_keys(&:to_s))
        scope.set_fingerprint(["prosody", event.name, event[:topic].to_s, event[:error_class].to_s])
        ::Sentry.capture_message(summary(event), level: :error)
      end
    end

    def breadcrumb(event)
      ::Sentry.add_breadcrumb(
        ::Sentry::Breadcrumb.new(category: "prosody", type: "error", level: "warning",
                                 message: summary(event), data: event.payload.transform_keys(&:to_s))
      )
    end

    def summary(event)
      where = [event[:topic], event[:partition], event[:offset]].compact.join("/")
      return "#{event.name} #{where}" unless event[:error_class]

      "#{event.name} #{where}: #{event[:error_class]}: #{event[:error_message]}".strip
    end
  end
end
