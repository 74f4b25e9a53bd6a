# frozen_string_literal: true

require "open3"
require "rbconfig"
require "tmpdir"

# The README's example spec for Prosody::Testing, run as written: extracted
# from the README into a file of its own and run by a separate rspec process,
# as an application's spec would be.
RSpec.describe "README" do
  readme = File.read(File.expand_path("../README.md", __dir__))

  it "has a 'Testing your handlers' example spec that passes" do
    example = readme[/<!-- testing-example:[^\n]*-->\n```ruby\n(.*?)^```$/m, 1]
    expect(example).not_to be_nil, "the README lost its testing example"

    Dir.mktmpdir("prosody-readme") do |dir|
      File.write(File.join(dir, "invoice_handler_spec.rb"), example)
      lib = File.expand_path("../lib", __dir__)
      output, status = Open3.capture2e(RbConfig.ruby, "-I", lib, "-S", "rspec", "invoice_handler_spec.rb",
                                       chdir: dir)
      expect(status).to be_success, output
      expect(output).to include("3 examples, 0 failures")
    end
  end

  it "lists the dependencies the Rust quick start uses" do
    # crates/prosody/tests/quickstarts.rs checks the block itself against examples/readme.rs,
    # which is also the crate's doctest (lib.rs includes it).
    dependencies = readme[/^## Rust quick start\n.*?```toml\n(.*?)^```$/m, 1]
    expect(dependencies).to include("prosody =", "tokio =", "serde_json =", "thiserror =")
  end
end
