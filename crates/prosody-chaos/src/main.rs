//! The chaos run: Ruby consumers killed and brokers failing, then the verifier.
//!
//! ```text
//! cargo build -p prosody-chaos && cargo run -p prosody-chaos -- [--short | --long] [--seed N] [...]
//! cargo run -p prosody-chaos -- verify <run-dir>
//! ```
//!
//! Needs the Ruby extension (`rake compile`) and the `prosody-mock-broker` binary
//! next to this one. Exits 0 when every message was handled and no key ran out
//! of order, 1 on any violation, 2 on bad arguments or when the harness itself
//! failed. `--help` lists the options.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use prosody_chaos::plan::{self, Action, Scenario};
use prosody_chaos::{
    default_run_dir, run, verify_dir, Error, Report, Result, RunOutcome, RunSettings,
};
use rand::rngs::StdRng;
use rand::SeedableRng;

const USAGE: &str = "\
usage: prosody-chaos [--short | --long] [options]
       prosody-chaos verify <run-dir>

  --short            20k messages, 3 workers, 5 kills, 4 faults, 40 s of chaos (default)
  --long             200k messages, 5 workers, 50 kills, 20 faults, 5 min of chaos
  --seed N           seed for every random choice (printed at start; default: from the clock)
  --messages N       messages to produce            --keys N        distinct keys
  --partitions N     topic partitions               --workers N     Ruby worker processes
  --kills N          worker kills                   --faults N      broker faults
  --window SECS      how long the chaos lasts       --drain SECS    deadline to finish after it
  --dir PATH         where records and logs go (default: a new directory under $TMPDIR)
  --keep             keep that directory when the run passes (it is always kept on failure)
  --plan             print the faults and kills the seed draws, and exit
  --ruby PATH        Ruby interpreter (default: ruby)
  --repo PATH        repository root (default: this checkout)";

/// Options that take a value.
const VALUE_FLAGS: [&str; 12] = [
    "--seed",
    "--dir",
    "--ruby",
    "--repo",
    "--messages",
    "--keys",
    "--partitions",
    "--workers",
    "--kills",
    "--faults",
    "--window",
    "--drain",
];

/// Shown violations, at most.
const SHOWN_VIOLATIONS: usize = 20;

enum Invocation {
    Run(Box<RunArgs>),
    Verify(PathBuf),
    Help,
}

struct RunArgs {
    scenario: Scenario,
    seed: u64,
    dir: Option<PathBuf>,
    keep: bool,
    plan_only: bool,
    ruby: PathBuf,
    repo: PathBuf,
}

fn parse_args(args: Vec<String>) -> Result<Invocation> {
    if args.first().map(String::as_str) == Some("verify") {
        return match &args[1..] {
            [dir] => Ok(Invocation::Verify(PathBuf::from(dir))),
            _ => Err(Error::Usage(format!(
                "verify takes one directory\n\n{USAGE}"
            ))),
        };
    }
    let mut run = RunArgs {
        scenario: Scenario::short(),
        seed: clock_seed(),
        dir: None,
        keep: false,
        plan_only: false,
        ruby: PathBuf::from("ruby"),
        repo: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")),
    };
    // Sizes given explicitly win over --short/--long wherever they appear.
    let mut overrides: Vec<(String, String)> = Vec::new();
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "-h" | "--help" => return Ok(Invocation::Help),
            "--short" => run.scenario = Scenario::short(),
            "--long" => run.scenario = Scenario::long(),
            "--keep" => run.keep = true,
            "--plan" => run.plan_only = true,
            _ if !VALUE_FLAGS.contains(&flag.as_str()) => {
                return Err(Error::Usage(format!("unknown option `{flag}`\n\n{USAGE}")))
            }
            _ => {
                let value = args
                    .next()
                    .ok_or_else(|| Error::Usage(format!("{flag} needs a value\n\n{USAGE}")))?;
                match flag.as_str() {
                    "--seed" => run.seed = number(&flag, &value)?,
                    "--dir" => run.dir = Some(PathBuf::from(value)),
                    "--ruby" => run.ruby = PathBuf::from(value),
                    "--repo" => run.repo = PathBuf::from(value),
                    _ => overrides.push((flag, value)),
                }
            }
        }
    }
    for (flag, value) in overrides {
        let scenario = &mut run.scenario;
        match flag.as_str() {
            "--messages" => scenario.messages = number(&flag, &value)?,
            "--keys" => scenario.keys = number(&flag, &value)?,
            "--partitions" => scenario.partitions = number(&flag, &value)?,
            "--workers" => scenario.workers = number(&flag, &value)?,
            "--kills" => scenario.kills = number(&flag, &value)?,
            "--faults" => scenario.faults = number(&flag, &value)?,
            "--window" => scenario.window = Duration::from_secs(number(&flag, &value)?),
            "--drain" => scenario.drain = Duration::from_secs(number(&flag, &value)?),
            _ => unreachable!("{flag} is in VALUE_FLAGS"),
        }
    }
    let scenario = &run.scenario;
    if scenario.workers == 0
        || scenario.partitions < 1
        || scenario.keys == 0
        || scenario.messages < 2
    {
        return Err(Error::Usage(
            "need at least 1 worker, 1 partition, 1 key and 2 messages".to_owned(),
        ));
    }
    Ok(Invocation::Run(Box::new(run)))
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T> {
    value
        .parse()
        .map_err(|_| Error::Usage(format!("{flag}: `{value}` is not a valid number")))
}

fn clock_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64);
    (nanos ^ u64::from(std::process::id()).rotate_left(32)) % 1_000_000_000
}

fn broker_exe() -> Result<PathBuf> {
    let me = std::env::current_exe().map_err(Error::io("finding this executable"))?;
    let broker = me.with_file_name(format!(
        "prosody-mock-broker{}",
        std::env::consts::EXE_SUFFIX
    ));
    if broker.is_file() {
        Ok(broker)
    } else {
        Err(Error::Usage(format!(
            "{} not found: build it with `cargo build -p prosody-chaos`",
            broker.display()
        )))
    }
}

fn chaos(args: &RunArgs) -> Result<bool> {
    let scenario = &args.scenario;
    let per_partition = scenario.messages / scenario.partitions.max(1) as usize;
    println!(
        "prosody-chaos {}: seed {} (rerun with --seed {}): {} messages over {} keys, {} partitions \
         (~{per_partition} each), {} brokers, {} workers, {} kills, {} faults, {}s window",
        scenario.name,
        args.seed,
        args.seed,
        scenario.messages,
        scenario.keys,
        scenario.partitions,
        scenario.brokers,
        scenario.workers,
        scenario.kills,
        scenario.faults,
        scenario.window.as_secs()
    );
    if per_partition > 25_000 {
        println!("warning: over 25k messages per partition; the mock cluster's fetches slow down");
    }
    if args.plan_only {
        print_plan(scenario, args.seed);
        return Ok(true);
    }
    let run_dir = args
        .dir
        .clone()
        .unwrap_or_else(|| default_run_dir(args.seed));
    println!("records and logs: {}", run_dir.display());
    let settings = RunSettings {
        seed: args.seed,
        run_dir: run_dir.clone(),
        broker_exe: broker_exe()?,
        ruby: args.ruby.clone(),
        repo: args.repo.clone(),
    };
    let outcome = run(scenario, &settings)?;
    print_outcome(scenario, args.seed, &outcome);
    if outcome.passed() && !args.keep && args.dir.is_none() {
        std::fs::remove_dir_all(&run_dir)
            .map_err(Error::io(format!("removing {}", run_dir.display())))?;
    } else {
        println!("records and logs kept in {}", run_dir.display());
    }
    Ok(outcome.passed())
}

fn print_plan(scenario: &Scenario, seed: u64) {
    let plan = plan::draw(scenario, &mut StdRng::seed_from_u64(seed));
    println!("faults (seconds after the workers start):");
    for fault in &plan.faults {
        println!("  {fault}");
    }
    println!("kills (the orchestrator waits up to 5 s for a busy worker):");
    for step in &plan.steps {
        if let Action::Kill(kill) = &step.action {
            println!(
                "  {:>6.1}s slot {} {}, restart {:.1}s after it exits",
                step.at.as_secs_f64(),
                kill.slot,
                kill.kind,
                kill.restart_after.as_secs_f64()
            );
        }
    }
}

fn print_outcome(scenario: &Scenario, seed: u64, outcome: &RunOutcome) {
    let verdict = if outcome.passed() { "PASSED" } else { "FAILED" };
    println!();
    println!("== prosody-chaos {}: {verdict} ==", scenario.name);
    println!(
        "seed        {seed}  (rerun: prosody-chaos --{} --seed {seed})",
        scenario.name
    );
    let kills = &outcome.kills;
    println!(
        "workers     {} at a time, {} started in all; kills: {} SIGKILL, {} SIGTERM, \
         {} SIGTERM interrupted by SIGKILL{}",
        scenario.workers,
        kills.started,
        kills.hard,
        kills.graceful,
        kills.interrupted,
        if kills.skipped > 0 {
            format!(", {} skipped (no worker running)", kills.skipped)
        } else {
            String::new()
        }
    );
    println!("faults      {}", outcome.faults.len());
    for fault in &outcome.faults {
        println!("            {fault}");
    }
    print_report(&outcome.report);
    println!("time        {:.1}s", outcome.elapsed.as_secs_f64());
    if !outcome.warnings.is_empty() {
        println!("warnings    {}", outcome.warnings.len());
        for warning in &outcome.warnings {
            println!("            {warning}");
        }
    }
    if !outcome.incidents.is_empty() {
        println!("incidents   {}", outcome.incidents.len());
        for incident in &outcome.incidents {
            println!("            {incident}");
        }
    }
}

fn print_report(report: &Report) {
    println!(
        "messages    {} handled of {} ({} completed handlings: {} duplicates, rate {:.2}%)",
        report.handled,
        report.messages,
        report.completions,
        report.duplicates,
        report.duplicate_rate() * 100.0
    );
    println!(
        "calls       {} started by {} processes; {} cancelled, {} cut short by a kill, {} torn record lines",
        report.starts, report.processes, report.aborted, report.unfinished, report.torn_tails
    );
    let (lost, out_of_order, overlap, bad) = report.violation_counts();
    if report.is_ok() {
        println!("violations  none: nothing lost, every key in order, no overlap within a process");
        return;
    }
    println!(
        "violations  {} ({lost} lost, {out_of_order} out of order, {overlap} overlapping, {bad} bad records)",
        report.violations.len()
    );
    let lost = report.lost_by_partition();
    if !lost.is_empty() {
        let summary: Vec<String> = lost
            .iter()
            .map(|(partition, (count, first))| format!("p{partition}: {count} from offset {first}"))
            .collect();
        println!("lost        {}", summary.join(", "));
    }
    for violation in report.violations.iter().take(SHOWN_VIOLATIONS) {
        println!("            {violation}");
    }
    if report.violations.len() > SHOWN_VIOLATIONS {
        println!(
            "            ... and {} more",
            report.violations.len() - SHOWN_VIOLATIONS
        );
    }
}

fn main() -> ExitCode {
    let outcome =
        parse_args(std::env::args().skip(1).collect()).and_then(|invocation| match invocation {
            Invocation::Help => {
                println!("{USAGE}");
                Ok(true)
            }
            Invocation::Verify(dir) => {
                let report = verify_dir(&dir)?;
                println!("verifying {}", dir.display());
                print_report(&report);
                Ok(report.is_ok())
            }
            Invocation::Run(args) => chaos(&args),
        });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("prosody-chaos: {error}");
            ExitCode::from(2)
        }
    }
}
