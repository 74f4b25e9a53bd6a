//! A librdkafka mock Kafka cluster in its own process, so it outlives the
//! consumers a chaos run kills, and takes fault-injection commands on stdin.
//!
//! ```text
//! prosody-mock-broker [--brokers N] [--topic NAME:PARTITIONS[:REPLICATION]]...
//! ```
//!
//! Prints the bootstrap servers as its first stdout line, then reads one command
//! per line (see `prosody_chaos::BrokerCommand`: `down 2`, `up 2`, `rtt 1 200`,
//! `errors Fetch 3 NOT_LEADER_FOR_PARTITION`, ...) and answers each with `ok` or
//! `error: <reason>`. Exits when stdin closes.

use std::io::{self, BufRead, Write};
use std::process::ExitCode;

use prosody_chaos::{BrokerCommand, Error, MockCluster, Result};

struct Options {
    brokers: i32,
    topics: Vec<(String, i32, i32)>,
}

fn parse_options(args: impl Iterator<Item = String>) -> Result<Options> {
    let mut options = Options {
        brokers: 3,
        topics: Vec::new(),
    };
    let mut args = args;
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| Error::Usage(format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--brokers" => {
                let text = value()?;
                options.brokers = text
                    .parse()
                    .map_err(|_| Error::Usage(format!("--brokers: not a number: `{text}`")))?;
            }
            "--topic" => options.topics.push(parse_topic(&value()?)?),
            "-h" | "--help" => {
                return Err(Error::Usage(
                    "usage: prosody-mock-broker [--brokers N] [--topic NAME:PARTITIONS[:REPLICATION]]..."
                        .to_owned(),
                ))
            }
            other => return Err(Error::Usage(format!("unknown argument `{other}` (see --help)"))),
        }
    }
    Ok(options)
}

fn parse_topic(spec: &str) -> Result<(String, i32, i32)> {
    let bad = || {
        Error::Usage(format!(
            "--topic {spec}: expected NAME:PARTITIONS[:REPLICATION]"
        ))
    };
    let mut parts = spec.split(':');
    let name = parts
        .next()
        .filter(|name| !name.is_empty())
        .ok_or_else(bad)?;
    let partitions = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let replication = match parts.next() {
        Some(r) => r.parse().map_err(|_| bad())?,
        None => 1,
    };
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok((name.to_owned(), partitions, replication))
}

fn serve(options: &Options) -> Result<()> {
    let cluster = MockCluster::start(options.brokers)?;
    for (name, partitions, replication) in &options.topics {
        cluster.create_topic(name, *partitions, *replication)?;
    }
    let mut out = io::stdout().lock();
    let written = writeln!(out, "{}", cluster.bootstrap_servers()).and_then(|()| out.flush());
    written.map_err(Error::io("writing the bootstrap servers"))?;
    eprintln!(
        "prosody-mock-broker: {} broker(s) at {}",
        cluster.brokers(),
        cluster.bootstrap_servers()
    );

    for line in io::stdin().lock().lines() {
        let line = line.map_err(Error::io("reading a command"))?;
        if line.trim().is_empty() {
            continue;
        }
        let outcome = line
            .parse::<BrokerCommand>()
            .and_then(|command| cluster.apply(&command));
        let answer = match &outcome {
            Ok(()) => "ok".to_owned(),
            Err(error) => format!("error: {error}"),
        };
        eprintln!("prosody-mock-broker: {} -> {answer}", line.trim());
        let written = writeln!(out, "{answer}").and_then(|()| out.flush());
        written.map_err(Error::io("answering a command"))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let outcome = parse_options(std::env::args().skip(1)).and_then(|options| serve(&options));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("prosody-mock-broker: {error}");
            ExitCode::from(if matches!(error, Error::Usage(_)) {
                2
            } else {
                1
            })
        }
    }
}
