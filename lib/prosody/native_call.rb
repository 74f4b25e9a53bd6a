# frozen_string_literal: true

module Prosody
  # Waits for a native call that finishes on a Rust thread.
  #
  # Native methods that reach Kafka or the database never run that work on the
  # caller's stack (a fiber's stack is small); they take a Thread::Queue and push
  # the result, or an exception, onto it when done. Popping the queue yields the
  # fiber inside an Async reactor and blocks only the calling thread elsewhere.
  #
  # @api private
  module NativeCall
    # @yieldparam queue [Thread::Queue] to hand to the native method
    # @return [Object] what the native side pushed
    # @raise [Error] the exception the native side pushed
    def self.await
      queue = Thread::Queue.new
      yield queue
      result = queue.pop
      raise result if result.is_a?(Exception)

      result
    end
  end
end
