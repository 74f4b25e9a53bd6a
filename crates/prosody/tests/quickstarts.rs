//! The quick starts work as written: README's Rust quick start is
//! `examples/readme.rs` word for word, and both it and `examples/quickstart.rs`
//! run here to completion (each returns an error unless its messages were handled).
//! They share this process's mock cluster, so they use different topics.

// The examples' `main` is `pub` so that these modules can call it.
#[allow(unreachable_pub)]
#[path = "../examples/readme.rs"]
mod readme;

#[allow(unreachable_pub)]
#[path = "../examples/quickstart.rs"]
mod quickstart;

#[test]
fn the_readme_rust_quick_start_is_examples_readme_rs() {
    let readme = include_str!("../../../README.md");
    let example = include_str!("../examples/readme.rs");
    // The README shows the file without its first line (the example's crate doc).
    let example = example.split_once("\n\n").map_or(example, |(_, code)| code);
    let block = format!("```rust\n{example}```\n");
    assert!(
        readme.contains(&block),
        "README.md's Rust quick start differs from crates/prosody/examples/readme.rs; keep them identical"
    );
}

#[test]
fn the_readme_rust_quick_start_handles_its_message() {
    readme::main().expect("the README quick start handles its message and returns Ok");
}

#[test]
fn the_quickstart_example_handles_all_its_orders_in_order() {
    quickstart::main().expect("every order handled, each customer's in order");
}
