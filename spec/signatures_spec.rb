# frozen_string_literal: true

require "rbs"
require "prosody/runner"

# sig/ matches lib/: one signature file per Ruby file, and every public method
# of the Ruby classes has a signature (so `rbs validate` checks what users call).
RSpec.describe "RBS signatures" do
  root = File.expand_path("..", __dir__)

  # Loading the RBS environment takes seconds: do it once for the whole group.
  shared_builder = nil
  let(:builder) do
    shared_builder ||= begin
      loader = RBS::EnvironmentLoader.new
      loader.add(library: "logger")
      loader.add(library: "monitor")
      loader.add(path: Pathname(File.join(root, "sig")))
      RBS::DefinitionBuilder.new(env: RBS::Environment.from_loader(loader).resolve_type_names)
    end
  end

  def type_name(name)
    RBS::TypeName.new(name: name.to_sym, namespace: RBS::Namespace.parse("::Prosody"))
  end

  it "has one signature file per lib file" do
    lib_files = Dir.glob("lib/**/*.rb", base: root).map { |path| path.delete_prefix("lib/").sub(/\.rb\z/, "") }
    sig_files = Dir.glob("sig/**/*.rbs", base: root).map { |path| path.delete_prefix("sig/").sub(/\.rbs\z/, "") }
    expect(sig_files - ["prosody/prosody_native"]).to match_array(lib_files)
  end

  %w[
    Client Configuration Message Timer EventHandler ErrorClassification Context AsyncTaskProcessor ReactorWatchdog
    CLI Runner
  ].each do |name|
    it "declares every public method of Prosody::#{name}" do
      klass = Prosody.const_get(name)
      declared = builder.build_instance(type_name(name)).methods.keys
      expect(klass.public_instance_methods(false) - declared).to be_empty
    end
  end

  it "declares the singleton methods of Prosody and Prosody::MockCluster" do
    { "Prosody" => Prosody, "MockCluster" => Prosody::MockCluster }.each do |name, mod|
      type = name == "Prosody" ? RBS::TypeName.new(name: :Prosody, namespace: RBS::Namespace.root) : type_name(name)
      declared = builder.build_singleton(type).methods.keys
      expect(mod.singleton_methods(false) - declared).to be_empty
    end
  end
end
