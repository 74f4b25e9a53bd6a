# frozen_string_literal: true

module ProsodySpec
  # An event handler whose on_message runs a block; specs build handlers with it
  # instead of defining classes.
  class BlockHandler < Prosody::EventHandler
    def initialize(&block)
      super()
      @block = block
    end

    def on_message(context, message)
      @block.call(context, message)
    end
  end
end
