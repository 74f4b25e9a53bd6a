//! The quick starts work as written: README's Rust quick start is
//! `examples/readme.rs` word for word, and both it and `examples/quickstart.rs`
//! run here to completion (each returns an error unless its messages were handled).

mod readme {
    include!("../examples/readme.rs");

    pub(crate) fn run() -> Result<(), Box<dyn std::error::Error>> {
        main()
    }
}

mod quickstart {
    include!("../examples/quickstart.rs");

    pub(crate) fn run() -> Result<(), Box<dyn std::error::Error>> {
        main()
    }
}

#[test]
fn the_readme_rust_quick_start_is_examples_readme_rs() {
    let readme = include_str!("../../../README.md");
    let example = include_str!("../examples/readme.rs");
    let block = format!("```rust\n{example}```\n");
    assert!(
        readme.contains(&block),
        "README.md's Rust quick start differs from crates/prosody/examples/readme.rs; keep them identical"
    );
}

#[test]
fn the_readme_rust_quick_start_handles_its_message() {
    readme::run().expect("the README quick start handles its message and returns Ok");
}

#[test]
fn the_quickstart_example_handles_all_its_orders_in_order() {
    quickstart::run().expect("every order handled, each customer's in order");
}
