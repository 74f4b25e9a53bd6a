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

#[test]
fn durations_beyond_what_clocks_and_librdkafka_take_are_named() {
    // 1e12 s used to reach librdkafka as message.timeout.ms=1000000000000000 and
    // fail later as a Kafka error with the overflowed number.
    for value in [
        OptionValue::Float(1e12),
        OptionValue::Int(i64::MAX),
        OptionValue::Str("25d".into()),
        OptionValue::Float(f64::NAN),
        OptionValue::Float(-2.0),
        OptionValue::Float(f64::INFINITY),
    ] {
        let (named, message) = rejected_option(set("send_timeout", value.clone()));
        assert_eq!(named, "send_timeout", "{value:?}: {message}");
    }
    let (_, message) = rejected_option(set("send_timeout", OptionValue::Str("25d".into())));
    assert!(message.contains("2147483647 ms"), "{message}");
    for option in [
        "shutdown_timeout",
        "commit_interval",
        "idempotence_ttl",
        "timeout",
    ] {
        let (named, message) = rejected_option(set(option, OptionValue::Float(1e12)));
        assert_eq!(named, option, "{message}");
        assert!(message.contains("365 days"), "{message}");
    }
    let config = set("send_timeout", OptionValue::Str("24d".into())).expect("24 days fit");
    assert_eq!(config.send_timeout(), Duration::from_secs(24 * 86_400));
}

#[test]
fn unknown_or_invalid_kafka_settings_are_configuration_errors_naming_the_key() {
    let (named, message) = rejected_option(
        mock()
            .kafka("sesion.timeout.ms", "9000")
            .build_with_env(Vec::new()),
    );
    assert_eq!(named, "kafka");
    assert!(message.contains("`sesion.timeout.ms`"), "{message}");
    assert!(message.contains("unknown"), "{message}");

    let (named, message) = rejected_option(
        mock()
            .kafka("acks", "sometimes-secret")
            .build_with_env(Vec::new()),
    );
    assert_eq!(named, "kafka");
    assert!(message.contains("`acks`"), "{message}");
    assert!(
        !message.contains("sometimes-secret"),
        "values stay out: {message}"
    );

    let env = vec![("PROSODY_KAFKA_NOT_A_SETTING".to_owned(), "1".to_owned())];
    let (named, message) = rejected_option(mock().build_with_env(env));
    assert_eq!(named, "kafka");
    assert!(message.contains("`not.a.setting`"), "{message}");

    mock()
        .kafka("session.timeout.ms", "9000")
        .kafka("linger.ms", "20")
        .kafka("sasl.password", "hunter2")
        .build_with_env(Vec::new())
        .expect("known settings pass");
}

#[test]
fn integer_options_take_numbers_from_code_and_text_only_from_the_environment() {
    for option in [
        "max_concurrency",
        "max_uncommitted",
        "max_retries",
        "idempotence_cache_size",
    ] {
        let (named, message) = rejected_option(set(option, OptionValue::Str("10".into())));
        assert_eq!(named, option);
        assert!(message.contains("string"), "{message}");
        let env = vec![(
            format!("PROSODY_{}", option.to_ascii_uppercase()),
            "10".to_owned(),
        )];
        mock()
            .build_with_env(env)
            .unwrap_or_else(|error| panic!("{option} from the environment: {error}"));
    }
    let env = vec![("PROSODY_MAX_CONCURRENCY".to_owned(), "10".to_owned())];
    let config = mock().build_with_env(env).expect("env");
    assert_eq!(config.max_concurrency(), 10);
}

#[test]
fn scheduler_and_monopolization_options_default_parse_and_validate() {
    let config = mock().build_with_env(Vec::new()).expect("defaults");
    assert_eq!(config.scheduler_decay(), Duration::from_secs(120));
    assert!((config.scheduler_failure_share() - 0.3).abs() < f64::EPSILON);
    assert_eq!(config.scheduler_max_wait(), Duration::from_secs(120));
    assert_eq!(config.scheduler_wait_weight(), 200);
    assert_eq!(config.monopolization_window(), Duration::from_secs(300));
    assert!((config.monopolization_threshold() - 0.9).abs() < f64::EPSILON);
    let config = mock()
        .set("scheduler_failure_share", OptionValue::Float(0.5))
        .and_then(|b| b.set("monopolization_threshold", OptionValue::Int(1)))
        .and_then(|b| b.set("scheduler_max_wait", "5s".into()))
        .and_then(|b| b.set("scheduler_wait_weight", OptionValue::Int(0)))
        .and_then(|b| {
            b.build_with_env(vec![(
                "PROSODY_SCHEDULER_DECAY".to_owned(),
                "30s".to_owned(),
            )])
        })
        .expect("valid options");
    assert!((config.scheduler_failure_share() - 0.5).abs() < f64::EPSILON);
    assert!((config.monopolization_threshold() - 1.0).abs() < f64::EPSILON);
    assert_eq!(config.scheduler_max_wait(), Duration::from_secs(5));
    assert_eq!(config.scheduler_wait_weight(), 0);
    assert_eq!(config.scheduler_decay(), Duration::from_secs(30));
    let env = vec![(
        "PROSODY_MONOPOLIZATION_THRESHOLD".to_owned(),
        "0.75".to_owned(),
    )];
    let config = mock().build_with_env(env).expect("env");
    assert!((config.monopolization_threshold() - 0.75).abs() < f64::EPSILON);
    for (option, value) in [
        ("scheduler_failure_share", OptionValue::Float(0.0)),
        ("scheduler_failure_share", OptionValue::Float(1.5)),
        ("scheduler_failure_share", OptionValue::Str("0.3".into())),
        ("monopolization_threshold", OptionValue::Float(f64::NAN)),
        ("monopolization_threshold", OptionValue::Int(-1)),
        ("scheduler_decay", OptionValue::Int(0)),
        ("scheduler_max_wait", OptionValue::Str("0s".into())),
        ("scheduler_wait_weight", OptionValue::Int(-1)),
        ("scheduler_wait_weight", OptionValue::Float(2.5)),
        ("monopolization_window", OptionValue::Str("never".into())),
    ] {
        let (named, message) = rejected_option(set(option, value.clone()));
        assert_eq!(named, option, "{value:?}: {message}");
    }
    let env = vec![(
        "PROSODY_SCHEDULER_FAILURE_SHARE".to_owned(),
        "most".to_owned(),
    )];
    let (named, _) = rejected_option(mock().build_with_env(env));
    assert_eq!(named, "scheduler_failure_share");
}

#[test]
fn a_malformed_database_url_is_rejected_when_the_config_is_built() {
    for url in [
        "not a url",
        "postgres://user:hunter2@db:notaport/app",
        "host=db port=x",
    ] {
        let (named, message) = rejected_option(set("database_url", OptionValue::Str(url.into())));
        assert_eq!(named, "database_url", "{url}: {message}");
        assert!(!message.contains("hunter2"), "{message}");
    }
    for url in [
        "postgres://user:pw@localhost:5432/app",
        "host=localhost dbname=app",
    ] {
        set("database_url", OptionValue::Str(url.into())).expect(url);
    }
}

#[test]
fn defer_options_are_checked_and_fall_back_to_the_environment() {
    let defaults = mock().build_with_env(Vec::new()).expect("defaults");
    assert!(defaults.defer());
    assert!((defaults.defer_failure_threshold() - 0.9).abs() < f64::EPSILON);
    for value in [
        OptionValue::Float(0.0),
        OptionValue::Float(1.5),
        OptionValue::Str("0.5".into()),
    ] {
        let (named, _) = rejected_option(set("defer_failure_threshold", value.clone()));
        assert_eq!(named, "defer_failure_threshold", "{value:?}");
    }
    let (named, _) = rejected_option(set("defer", OptionValue::Int(2)));
    assert_eq!(named, "defer");
    let env = vec![
        ("PROSODY_DEFER".to_owned(), "false".to_owned()),
        (
            "PROSODY_DEFER_FAILURE_THRESHOLD".to_owned(),
            "0.5".to_owned(),
        ),
    ];
    let config = mock().build_with_env(env).expect("from the environment");
    assert!(!config.defer());
    assert!((config.defer_failure_threshold() - 0.5).abs() < f64::EPSILON);
}

#[test]
fn deferral_backoff_window_and_toggles_default_and_parse() {
    let config = mock().build_with_env(Vec::new()).expect("defaults");
    assert_eq!(config.defer_base(), Duration::from_secs(1));
    assert_eq!(config.defer_max_delay(), Duration::from_secs(86_400));
    assert_eq!(config.defer_failure_window(), Duration::from_secs(300));
    assert!(config.monopolization_enabled());
    let config = mock()
        .set("defer_base", "250ms".into())
        .and_then(|b| b.set("monopolization_enabled", OptionValue::Bool(false)))
        .and_then(|b| {
            b.build_with_env(vec![
                ("PROSODY_DEFER_MAX_DELAY".to_owned(), "1h".to_owned()),
                ("PROSODY_DEFER_FAILURE_WINDOW".to_owned(), "30s".to_owned()),
            ])
        })
        .expect("valid options");
    assert_eq!(config.defer_base(), Duration::from_millis(250));
    assert_eq!(config.defer_max_delay(), Duration::from_secs(3600));
    assert_eq!(config.defer_failure_window(), Duration::from_secs(30));
    assert!(!config.monopolization_enabled());
    for (option, value) in [
        ("defer_base", OptionValue::Int(0)),
        ("defer_max_delay", OptionValue::Str("later".into())),
        ("defer_failure_window", OptionValue::Str("0s".into())),
        ("monopolization_enabled", OptionValue::Str("maybe".into())),
    ] {
        let (named, message) = rejected_option(set(option, value.clone()));
        assert_eq!(named, option, "{value:?}: {message}");
    }
}

#[test]
fn span_relations_default_and_take_either_spelling() {
    use prosody::SpanRelation;
    let config = mock().build_with_env(Vec::new()).expect("defaults");
    assert_eq!(config.message_spans(), SpanRelation::Child);
    assert_eq!(config.timer_spans(), SpanRelation::FollowsFrom);
    let config = mock()
        .set("message_spans", ":follows-from".into())
        .and_then(|b| {
            b.build_with_env(vec![("PROSODY_TIMER_SPANS".to_owned(), "child".to_owned())])
        })
        .expect("valid options");
    assert_eq!(config.message_spans(), SpanRelation::FollowsFrom);
    assert_eq!(config.timer_spans(), SpanRelation::Child);
    let (named, message) = rejected_option(set("timer_spans", "parent".into()));
    assert_eq!(named, "timer_spans");
    assert!(message.contains("child, follows_from"), "{message}");
}

/// The specification's names for two options (`defer_enabled`,
/// `scheduler_failure_weight`) set them too, in code and in the environment;
/// one option set under both names is refused, naming both.
#[test]
fn option_aliases_set_their_option_and_both_names_at_once_are_refused() {
    let config = set("defer_enabled", OptionValue::Bool(false)).expect("alias");
    assert!(!config.defer());
    let config = set("scheduler_failure_weight", OptionValue::Float(0.5)).expect("alias");
    assert!((config.scheduler_failure_share() - 0.5).abs() < f64::EPSILON);
    let env = vec![("PROSODY_DEFER_ENABLED".to_owned(), "false".to_owned())];
    assert!(!mock().build_with_env(env).expect("alias from env").defer());
    // Code beats the environment whichever name each uses.
    let env = vec![("PROSODY_DEFER".to_owned(), "true".to_owned())];
    let config = mock()
        .set("defer_enabled", OptionValue::Bool(false))
        .and_then(|b| b.build_with_env(env))
        .expect("code over env");
    assert!(!config.defer());
    // The same name twice is a plain overwrite.
    let config = mock()
        .set("defer_enabled", OptionValue::Bool(true))
        .and_then(|b| b.set("defer_enabled", OptionValue::Bool(false)))
        .and_then(|b| b.build_with_env(Vec::new()))
        .expect("overwrite");
    assert!(!config.defer());

    let twice = mock()
        .set("defer", OptionValue::Bool(true))
        .and_then(|b| b.set("defer_enabled", OptionValue::Bool(false)));
    let (named, message) = rejected_option(twice);
    assert_eq!(named, "defer");
    assert!(
        message.contains("`defer`") && message.contains("`defer_enabled`"),
        "{message}"
    );
    let env = vec![
        (
            "PROSODY_SCHEDULER_FAILURE_WEIGHT".to_owned(),
            "0.2".to_owned(),
        ),
        (
            "PROSODY_SCHEDULER_FAILURE_SHARE".to_owned(),
            "0.4".to_owned(),
        ),
    ];
    let (named, message) = rejected_option(mock().build_with_env(env));
    assert_eq!(named, "scheduler_failure_share");
    assert!(
        message.contains("PROSODY_SCHEDULER_FAILURE_WEIGHT"),
        "{message}"
    );
    assert_eq!(
        prosody::config::option_named("defer_enabled"),
        Some("defer")
    );
    assert_eq!(prosody::config::option_named("defer_enabld"), None);
}

/// librdkafka and PostgreSQL take C strings: text with a NUL byte used to fail
/// later as "FFI nul error" (a `KafkaError` naming nothing) or pass unnoticed.
#[test]
fn text_with_a_nul_byte_is_refused_naming_the_option_not_the_value() {
    for (option, value) in [
        ("group_id", OptionValue::Str("orders\0x".into())),
        ("source_system", OptionValue::Str("billing\0x".into())),
        (
            "bootstrap_servers",
            OptionValue::List(vec!["127.0.0.1:9092\0x".into()]),
        ),
        (
            "subscribed_topics",
            OptionValue::List(vec!["orders".into(), "pay\0ments".into()]),
        ),
        ("failure_topic", OptionValue::Str("dead\0letters".into())),
        (
            "database_url",
            OptionValue::Str("postgres://db\0/app".into()),
        ),
    ] {
        let (named, message) = rejected_option(set(option, value.clone()));
        assert_eq!(named, option, "{value:?}");
        assert!(message.contains("NUL byte"), "{message}");
    }

    for builder in [
        mock().kafka("sasl.password", "s3cret\0x"),
        mock().kafka("sasl.password\0", "s3cret"),
    ] {
        let (named, message) = rejected_option(builder.build_with_env(Vec::new()));
        assert_eq!(named, "kafka");
        assert!(message.contains("sasl.password"), "{message}");
        assert!(!message.contains("s3cret"), "values stay out: {message}");
    }
    let env = vec![(
        "PROSODY_KAFKA_SASL_PASSWORD".to_owned(),
        "s3cret\0x".to_owned(),
    )];
    let (named, message) = rejected_option(mock().build_with_env(env));
    assert_eq!(named, "kafka");
    assert!(!message.contains("s3cret"), "values stay out: {message}");
}
