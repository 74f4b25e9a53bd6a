# frozen_string_literal: true

module Prosody
  # The in-process mock Kafka cluster (librdkafka's), one per process, for tests
  # and demos. Clients built with `mock: true` connect to it automatically.
  #
  # @example
  #   Prosody::MockCluster.create_topic("invoices", partitions: 4)
  #   client = Prosody::Client.new(mock: true, group_id: "billing", subscribed_topics: "invoices")
  module MockCluster
    class << self
      # Starts the mock cluster if needed.
      #
      # @return [String] its bootstrap address, e.g. "127.0.0.1:40123"
      # @raise [MockClusterError] if the cluster cannot start
      def bootstrap_servers
        Native.mock_bootstrap_servers
      end

      # Creates a topic on the mock cluster (starting it if needed).
      #
      # @param name [String]
      # @param partitions [Integer]
      # @return [Boolean] true if created, false if it already existed
      # @raise [ArgumentError] for an empty name or a partition count below 1
      # @raise [MockClusterError] if the cluster refuses
      def create_topic(name, partitions: 1)
        raise ArgumentError, "topic name must be a non-empty String" unless name.is_a?(String) && !name.empty?

        unless partitions.is_a?(Integer) && partitions >= 1
          raise ArgumentError, "partitions must be an Integer of at least 1, got #{partitions.inspect}"
        end

        Native.mock_create_topic(name, partitions)
      end
    end
  end
end
