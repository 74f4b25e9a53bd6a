//! Invalid options are rejected with `Error::Configuration` naming the option,
//! whichever way they arrive: builder, raw `set`, environment, or at subscribe.

mod support;

use std::time::Duration;

use prosody::{Client, Config, ConfigBuilder, Error, OptionValue};

fn rejected_option(result: prosody::Result<impl std::fmt::Debug>) -> (String, String) {
    match result {
        Err(error @ Error::Configuration { .. }) => {
            let Error::Configuration { option, .. } = &error else {
                unreachable!()
            };
            (option.clone(), error.to_string())
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

fn mock() -> ConfigBuilder {
    Config::builder().mock(true).group_id("validation")
}

fn set(option: &str, value: OptionValue) -> prosody::Result<Config> {
    mock().set(option, value)?.build_with_env(Vec::new())
}

#[test]
fn invalid_values_name_their_option() {
    let cases = [
        ("max_concurrency", OptionValue::Int(0)),
        ("max_concurrency", OptionValue::Str("lots".into())),
        ("max_uncommitted", OptionValue::Int(-3)),
        ("commit_interval", OptionValue::Str("soon".into())),
        ("poll_interval", OptionValue::Float(-1.0)),
        ("send_timeout", OptionValue::Str("0ms".into())),
        ("shutdown_timeout", OptionValue::Bool(true)),
        ("mock", OptionValue::Str("perhaps".into())),
        ("group_id", OptionValue::Str("   ".into())),
        (
            "subscribed_topics",
            OptionValue::Str("orders,,payments".into()),
        ),
        ("kafka", OptionValue::Str("acks=all".into())),
    ];
    for (option, value) in cases {
        let (named, message) = rejected_option(set(option, value.clone()));
        assert_eq!(named, option, "{value:?}");
        assert!(
            message.contains(option),
            "the message names the option: {message}"
        );
    }
}

#[test]
fn unknown_and_missing_options_are_named() {
    let (named, _) = rejected_option(mock().set("max_concurency", OptionValue::Int(4)));
    assert_eq!(named, "max_concurency");
    let (named, _) = rejected_option(Config::builder().group_id("g").build_with_env(Vec::new()));
    assert_eq!(named, "bootstrap_servers");
}

#[test]
fn invalid_environment_values_are_named() {
    let env = vec![("PROSODY_MAX_UNCOMMITTED".to_owned(), "none".to_owned())];
    let (named, _) = rejected_option(mock().build_with_env(env));
    assert_eq!(named, "max_uncommitted");
}

#[test]
fn valid_values_are_accepted() {
    let config = mock()
        .set("commit_interval", OptionValue::Str("250ms".into()))
        .and_then(|builder| builder.set("send_timeout", OptionValue::Float(2.5)))
        .and_then(|builder| builder.set("subscribed_topics", OptionValue::Str("a, b".into())))
        .and_then(|builder| builder.build_with_env(Vec::new()))
        .expect("valid options");
    assert_eq!(config.commit_interval(), Duration::from_millis(250));
    assert_eq!(config.send_timeout(), Duration::from_millis(2_500));
    assert_eq!(config.subscribed_topics(), ["a", "b"]);
}

#[tokio::test]
async fn subscribing_without_group_or_topics_names_the_option() {
    let client = Client::new(
        Config::builder()
            .mock(true)
            .source_system("producer-only")
            .build()
            .expect("config"),
    )
    .expect("client");
    let (named, _) = rejected_option(client.subscribe(support::Seen::default().recorder()));
    assert_eq!(named, "group_id");

    let client = Client::new(mock().build().expect("config")).expect("client");
    let (named, _) = rejected_option(client.subscribe(support::Seen::default().recorder()));
    assert_eq!(named, "subscribed_topics");
}
