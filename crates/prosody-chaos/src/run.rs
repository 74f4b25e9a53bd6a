//! The orchestrator: one chaos run from start to verdict.
//!
//! 1. Start the mock broker process and set leaders and the group coordinator.
//! 2. Produce the first quarter of the messages.
//! 3. Start the workers; produce the rest in bursts while the plan's kills and
//!    faults play out over the chaos window.
//! 4. Wait (up to the drain deadline) until every message has a completed
//!    handling, then (up to `SETTLE`) until the group has committed every
//!    partition to its end.
//! 5. Stop the workers gracefully (the commits must stay at the end), then
//!    verify their records.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::broker_process::BrokerProcess;
use crate::commits::{describe, lagging, log_ends, moved_back, CommitWatcher};
use crate::error::{Error, Result};
use crate::manifest::{write_manifest, Produced, MANIFEST_FILE};
use crate::plan::{self, Action, Kill, KillKind, Scenario, GROUP, TOPIC};
use crate::producer::Producer;
use crate::records::{Phase, RecordLog, Tail};
use crate::verify::{verify, Report};
use crate::workers::{Worker, WorkerSetup};

/// How often the orchestrator looks at its processes and the record files.
const TICK: Duration = Duration::from_millis(100);
/// How often it prints progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long a SIGTERM'd worker may take to stop (its shutdown_timeout is 30 s).
const STOP_GRACE: Duration = Duration::from_secs(45);
/// A worker that recorded a call this recently counts as busy (a kill target).
const BUSY_WITHIN: Duration = Duration::from_millis(150);
/// How long a due kill waits for a busy worker before taking an idle one.
const KILL_PATIENCE: Duration = Duration::from_secs(5);
/// How often, once everything is handled, the group's commits are checked.
const COMMIT_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Once everything is handled, how long to wait for the group to commit it all
/// before stopping anyway (with a warning).
const SETTLE: Duration = Duration::from_secs(30);
/// How long after an unexpected exit a worker is restarted.
const CRASH_RESTART: Duration = Duration::from_secs(1);

/// What a run needs besides its scenario.
#[derive(Clone, Debug)]
pub struct RunSettings {
    /// Seeds every random choice of the plan.
    pub seed: u64,
    /// Where records, logs and the manifest go.
    pub run_dir: PathBuf,
    /// The `prosody-mock-broker` executable.
    pub broker_exe: PathBuf,
    /// The Ruby interpreter.
    pub ruby: PathBuf,
    /// The repository root.
    pub repo: PathBuf,
}

/// How many kills of each kind happened.
#[derive(Clone, Debug, Default)]
pub struct KillCounts {
    /// SIGKILL.
    pub hard: usize,
    /// SIGTERM (graceful stop and restart).
    pub graceful: usize,
    /// SIGTERM interrupted by SIGKILL.
    pub interrupted: usize,
    /// Planned kills skipped because no worker was running.
    pub skipped: usize,
    /// Workers started in all (initial ones and restarts).
    pub started: usize,
}

/// Everything a run found.
#[derive(Debug)]
pub struct RunOutcome {
    /// The verifier's findings.
    pub report: Report,
    /// Failures seen by the orchestrator itself (crashed workers, unclean stops,
    /// the deadline, a commit moved back).
    pub incidents: Vec<String>,
    /// What looked wrong without breaking the contract (commits left behind).
    pub warnings: Vec<String>,
    /// Kills that happened.
    pub kills: KillCounts,
    /// The faults, one line each.
    pub faults: Vec<String>,
    /// From start to verdict.
    pub elapsed: Duration,
}

impl RunOutcome {
    /// Whether the run proved what it should: no violation and no incident.
    pub fn passed(&self) -> bool {
        self.report.is_ok() && self.incidents.is_empty()
    }
}

/// Runs `scenario` and returns what was found. An `Err` means the harness itself
/// failed (a process would not start, the broker refused a command).
pub fn run(scenario: &Scenario, settings: &RunSettings) -> Result<RunOutcome> {
    let started = Instant::now();
    let plan = plan::draw(scenario, &mut StdRng::seed_from_u64(settings.seed));
    let dir = &settings.run_dir;
    std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;

    let mut broker = BrokerProcess::start(
        &settings.broker_exe,
        scenario.brokers,
        &[(TOPIC.to_owned(), scenario.partitions, scenario.brokers)],
        &dir.join("broker.log"),
    )?;
    for command in &plan.setup {
        broker.send(command)?;
    }
    let bootstrap = broker.bootstrap_servers().to_owned();
    say(started, &format!("mock cluster at {bootstrap}"));

    let producer = Producer::new(&bootstrap, TOPIC)?;
    let (upfront, during) = plan.messages.split_at(plan.upfront);
    let produced = producer.produce(upfront, &[(Duration::ZERO, upfront.len())])?;
    say(
        started,
        &format!("produced {} messages up front", produced.len()),
    );

    let setup = WorkerSetup {
        ruby: settings.ruby.clone(),
        repo: settings.repo.clone(),
        run_dir: dir.clone(),
        bootstrap_servers: bootstrap.clone(),
        topic: TOPIC.to_owned(),
        group: GROUP.to_owned(),
    };
    setup.check()?;
    let fleet = Fleet::start(setup, scenario.workers, started)?;
    let commits = CommitWatcher::new(&bootstrap, GROUP, TOPIC)?;

    let during = during.to_vec();
    let bursts = plan.bursts.clone();
    let production = std::thread::spawn(move || producer.produce(&during, &bursts));
    let mut chaos = Chaos {
        scenario,
        plan: &plan,
        started,
        window_opened: Instant::now(),
        broker,
        fleet,
        commits,
        progress: Progress::default(),
        produced,
        production: Some(production),
        next_step: 0,
        pending_kills: VecDeque::new(),
        all_handled: None,
        last_commit_check: None,
        commit_state: "not checked yet".to_owned(),
        warnings: Vec::new(),
    };
    chaos.play()?;
    chaos.finish(dir)
}

/// A run in progress, from the moment the workers start.
struct Chaos<'a> {
    scenario: &'a Scenario,
    plan: &'a plan::Plan,
    started: Instant,
    window_opened: Instant,
    broker: BrokerProcess,
    fleet: Fleet,
    commits: CommitWatcher,
    progress: Progress,
    /// What has been acknowledged so far (all of it once `production` is joined).
    produced: Vec<Produced>,
    production: Option<JoinHandle<Result<Vec<Produced>>>>,
    /// The first step of the plan not yet carried out.
    next_step: usize,
    /// Kills that are due, with when they became due.
    pending_kills: VecDeque<(usize, Instant)>,
    all_handled: Option<Instant>,
    last_commit_check: Option<Instant>,
    commit_state: String,
    warnings: Vec<String>,
}

impl Chaos<'_> {
    /// Plays the plan and waits until everything is handled (and committed, or
    /// `SETTLE` has passed), or the deadline.
    fn play(&mut self) -> Result<()> {
        let deadline = self.window_opened + self.scenario.window + self.scenario.drain;
        let mut last_report = Instant::now();
        loop {
            let now = Instant::now();
            self.run_due_steps(now)?;
            self.fleet.tick()?;
            self.progress.update(&self.fleet.record_files)?;
            self.run_pending_kill()?;
            self.collect_production()?;
            if self.done(now) {
                return Ok(());
            }
            if now >= deadline {
                return self.missed_deadline();
            }
            if now - last_report >= PROGRESS_EVERY {
                last_report = now;
                self.report_progress();
            }
            std::thread::sleep(TICK);
        }
    }

    fn run_due_steps(&mut self, now: Instant) -> Result<()> {
        let steps = &self.plan.steps;
        while let Some(step) = steps.get(self.next_step) {
            if step.at > now - self.window_opened {
                break;
            }
            match &step.action {
                Action::Kill(_) => self.pending_kills.push_back((self.next_step, now)),
                Action::Broker(command) => {
                    say(self.started, &format!("broker: {command}"));
                    self.broker.send(command)?;
                }
            }
            self.next_step += 1;
        }
        Ok(())
    }

    fn run_pending_kill(&mut self) -> Result<()> {
        let Some(&(step, due)) = self.pending_kills.front() else {
            return Ok(());
        };
        let Action::Kill(kill) = &self.plan.steps[step].action else {
            unreachable!("only kills are queued");
        };
        let progress = &self.progress;
        if self
            .fleet
            .try_kill(kill, due, |instance| progress.last_active(instance))?
        {
            self.pending_kills.pop_front();
        }
        Ok(())
    }

    fn collect_production(&mut self) -> Result<()> {
        if !self
            .production
            .as_ref()
            .is_some_and(JoinHandle::is_finished)
        {
            return Ok(());
        }
        if let Some(handle) = self.production.take() {
            let more = handle
                .join()
                .map_err(|_| Error::Broker("the producing thread panicked".to_owned()))??;
            self.produced.extend(more);
            say(
                self.started,
                &format!("produced all {} messages", self.produced.len()),
            );
        }
        Ok(())
    }

    /// Whether the run can stop: everything produced, planned and handled, and
    /// the group committed to the end (which after a kill means the partitions'
    /// new owners have handled the uncommitted messages again), or `SETTLE`
    /// passed waiting for that.
    fn done(&mut self, now: Instant) -> bool {
        let planned = self.production.is_none()
            && self.next_step == self.plan.steps.len()
            && self.pending_kills.is_empty();
        if !planned {
            return false;
        }
        let handled_at = match self.all_handled {
            Some(at) => at,
            None if self.progress.covers(&self.produced) => {
                self.all_handled = Some(now);
                say(
                    self.started,
                    &format!(
                        "all {} messages handled; waiting for the group to commit them",
                        self.produced.len()
                    ),
                );
                now
            }
            None => return false,
        };
        if self
            .last_commit_check
            .is_none_or(|at| now - at >= COMMIT_CHECK_EVERY)
        {
            self.last_commit_check = Some(now);
            let ends = log_ends(&self.produced);
            match self.commits.committed(&ends) {
                Ok(committed) => {
                    let lags = lagging(&committed, &ends);
                    if lags.is_empty() {
                        say(self.started, "every partition committed to its end");
                        return true;
                    }
                    self.commit_state = format!("committed behind: {}", describe(&lags));
                }
                Err(error) => self.commit_state = format!("cannot read commits: {error}"),
            }
        }
        if now - handled_at < SETTLE {
            return false;
        }
        self.warnings.push(format!(
            "{}s after every message was handled the group had still not committed them all \
             ({}); stopping anyway",
            SETTLE.as_secs(),
            self.commit_state
        ));
        say(
            self.started,
            self.warnings.last().map_or("", String::as_str),
        );
        true
    }

    fn missed_deadline(&mut self) -> Result<()> {
        if self.production.is_some() {
            return Err(Error::Timeout(
                "producing did not finish before the deadline".to_owned(),
            ));
        }
        let missing = self.produced.len().saturating_sub(self.progress.done.len());
        self.fleet.incidents.push(format!(
            "deadline: {:.0}s after the chaos window ended, {missing} message(s) never handled",
            self.scenario.drain.as_secs_f64()
        ));
        Ok(())
    }

    fn report_progress(&self) {
        let commits = if self.all_handled.is_some() {
            format!("; {}", self.commit_state)
        } else {
            String::new()
        };
        say(
            self.started,
            &format!(
                "progress: {} of {} messages handled, {}/{} workers running{commits}",
                self.progress.done.len(),
                self.plan.messages.len(),
                self.fleet.running(),
                self.scenario.workers
            ),
        );
    }

    /// Stops the workers, checks the commits around the stop, and verifies.
    fn finish(mut self, dir: &Path) -> Result<RunOutcome> {
        let ends = log_ends(&self.produced);
        let before = self.commits.committed(&ends);
        self.fleet.stop_all(self.started)?;
        // A graceful stop commits what is finished; it must never move a commit back.
        match (before, self.commits.committed(&ends)) {
            (Ok(before), Ok(after)) => {
                for (partition, was, now) in moved_back(&before, &after) {
                    self.fleet.incidents.push(format!(
                        "the graceful stop moved partition {partition}'s commit back from {was} to {}",
                        now.map_or_else(|| "nothing".to_owned(), |offset| offset.to_string())
                    ));
                }
                let lags = lagging(&after, &ends);
                if !lags.is_empty() {
                    self.warnings.push(format!(
                        "after the workers stopped, partitions are committed short of their end: {}",
                        describe(&lags)
                    ));
                }
            }
            (Err(error), _) | (_, Err(error)) => self.warnings.push(format!(
                "cannot compare commits around the final stop: {error}"
            )),
        }
        drop(self.commits);
        self.broker.stop()?;
        write_manifest(&dir.join(MANIFEST_FILE), &self.produced)?;
        let logs = RecordLog::read_dir(dir)?;
        Ok(RunOutcome {
            report: verify(&self.produced, &logs),
            incidents: self.fleet.incidents,
            warnings: self.warnings,
            kills: self.fleet.kills,
            faults: self.plan.faults.clone(),
            elapsed: self.started.elapsed(),
        })
    }
}

fn say(started: Instant, text: &str) {
    println!("[{:>6.1}s] {text}", started.elapsed().as_secs_f64());
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of the record files, so a kill
/// can be lined up with the records around it.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the duration of the call;
    // CLOCK_MONOTONIC is always available on Linux.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    if result != 0 {
        return 0;
    }
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// Which messages have a completed handling, from the record files as they grow.
#[derive(Default)]
struct Progress {
    /// One per worker instance, in instance order.
    tails: Vec<Tail>,
    /// When each instance last recorded anything.
    last_active: Vec<Option<Instant>>,
    done: HashSet<(i32, i64)>,
}

impl Progress {
    fn update(&mut self, files: &[PathBuf]) -> Result<()> {
        while self.tails.len() < files.len() {
            self.tails.push(Tail::new(files[self.tails.len()].clone()));
            self.last_active.push(None);
        }
        let now = Instant::now();
        for (tail, last_active) in self.tails.iter_mut().zip(&mut self.last_active) {
            let records = tail.read_new()?;
            if !records.is_empty() {
                *last_active = Some(now);
            }
            for record in records {
                if record.phase == Phase::End {
                    self.done.insert((record.partition, record.offset));
                }
            }
        }
        Ok(())
    }

    /// When worker `instance` last recorded a call.
    fn last_active(&self, instance: usize) -> Option<Instant> {
        self.last_active.get(instance).copied().flatten()
    }

    fn covers(&self, produced: &[Produced]) -> bool {
        self.done.len() >= produced.len()
            && produced
                .iter()
                .all(|message| self.done.contains(&(message.partition, message.offset)))
    }
}

/// A worker slot's state.
enum Slot {
    Running(Worker),
    /// SIGTERM sent; SIGKILL follows if it is interrupted, or overdue.
    Stopping {
        worker: Worker,
        kind: KillKind,
        since: Instant,
        restart_after: Duration,
    },
    Down {
        restart_at: Instant,
    },
}

/// The worker processes, by slot.
struct Fleet {
    setup: WorkerSetup,
    slots: Vec<Slot>,
    record_files: Vec<PathBuf>,
    incidents: Vec<String>,
    kills: KillCounts,
    started: Instant,
}

impl Fleet {
    fn start(setup: WorkerSetup, count: usize, started: Instant) -> Result<Fleet> {
        let mut fleet = Fleet {
            setup,
            slots: Vec::new(),
            record_files: Vec::new(),
            incidents: Vec::new(),
            kills: KillCounts::default(),
            started,
        };
        for _ in 0..count {
            let worker = fleet.spawn()?;
            fleet.slots.push(Slot::Running(worker));
        }
        Ok(fleet)
    }

    fn spawn(&mut self) -> Result<Worker> {
        let worker = self.setup.spawn(self.kills.started)?;
        self.kills.started += 1;
        self.record_files.push(worker.records().to_owned());
        say(
            self.started,
            &format!(
                "started worker-{:03} (pid {})",
                worker.instance(),
                worker.pid()
            ),
        );
        Ok(worker)
    }

    fn running(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| matches!(slot, Slot::Running(_)))
            .count()
    }

    /// Carries out a planned kill that has been due since `due`, if it can now.
    ///
    /// A kill should interrupt work in flight, and the workers are idle most of
    /// the time (they outpace production, and a rebalance stalls them all), so it
    /// waits for a worker that recorded a call within `BUSY_WITHIN`, preferring
    /// the planned slot. After `KILL_PATIENCE` it settles for the worker that
    /// recorded a call most recently (it likely owns partitions), else the next
    /// running one from the planned slot. Returns whether the kill is done.
    fn try_kill(
        &mut self,
        kill: &Kill,
        due: Instant,
        last_active: impl Fn(usize) -> Option<Instant>,
    ) -> Result<bool> {
        let count = self.slots.len();
        let running: Vec<(usize, Option<Instant>)> = (0..count)
            .map(|step| (kill.slot + step) % count)
            .filter_map(|index| match &self.slots[index] {
                Slot::Running(worker) => Some((index, last_active(worker.instance()))),
                _ => None,
            })
            .collect();
        let busy = running
            .iter()
            .find(|(_, active)| active.is_some_and(|at| at.elapsed() <= BUSY_WITHIN))
            .map(|(index, _)| *index);
        let index = match busy {
            Some(index) => index,
            None if due.elapsed() < KILL_PATIENCE => return Ok(false),
            None => {
                let most_recent = running
                    .iter()
                    .filter(|(_, active)| active.is_some())
                    .max_by_key(|(_, active)| *active)
                    .map(|(index, _)| *index);
                let Some(index) = most_recent.or_else(|| running.first().map(|(index, _)| *index))
                else {
                    self.kills.skipped += 1;
                    say(self.started, "kill skipped: no worker running");
                    return Ok(true);
                };
                index
            }
        };
        let now = Instant::now();
        let Slot::Running(mut worker) =
            std::mem::replace(&mut self.slots[index], Slot::Down { restart_at: now })
        else {
            unreachable!("slot {index} was found running");
        };
        say(
            self.started,
            &format!(
                "kill worker-{:03} (pid {}) with {} at {} ns, restart {:.1}s after it exits",
                worker.instance(),
                worker.pid(),
                kill.kind,
                monotonic_ns(),
                kill.restart_after.as_secs_f64()
            ),
        );
        match kill.kind {
            KillKind::Hard => {
                self.kills.hard += 1;
                worker.kill_and_reap()?;
                self.slots[index] = Slot::Down {
                    restart_at: now + kill.restart_after,
                };
            }
            KillKind::Graceful | KillKind::Interrupted(_) => {
                if kill.kind == KillKind::Graceful {
                    self.kills.graceful += 1;
                } else {
                    self.kills.interrupted += 1;
                }
                worker.terminate()?;
                self.slots[index] = Slot::Stopping {
                    worker,
                    kind: kill.kind,
                    since: now,
                    restart_after: kill.restart_after,
                };
            }
        }
        Ok(true)
    }

    /// Reaps stopping workers, notices crashed ones, restarts what is due.
    fn tick(&mut self) -> Result<()> {
        let now = Instant::now();
        for index in 0..self.slots.len() {
            let slot = std::mem::replace(&mut self.slots[index], Slot::Down { restart_at: now });
            self.slots[index] = match slot {
                Slot::Running(mut worker) => match worker.try_wait()? {
                    None => Slot::Running(worker),
                    Some(status) => {
                        self.incidents.push(format!(
                            "worker-{:03} (pid {}) exited on its own with {status}; see {}",
                            worker.instance(),
                            worker.pid(),
                            worker.log().display()
                        ));
                        say(
                            self.started,
                            self.incidents.last().map_or("", String::as_str),
                        );
                        Slot::Down {
                            restart_at: now + CRASH_RESTART,
                        }
                    }
                },
                Slot::Stopping {
                    mut worker,
                    kind,
                    since,
                    restart_after,
                } => match self.reap_stopping(&mut worker, kind, since, now)? {
                    true => Slot::Down {
                        restart_at: now + restart_after,
                    },
                    false => Slot::Stopping {
                        worker,
                        kind,
                        since,
                        restart_after,
                    },
                },
                Slot::Down { restart_at } if now >= restart_at => Slot::Running(self.spawn()?),
                down @ Slot::Down { .. } => down,
            };
        }
        Ok(())
    }

    /// Whether a SIGTERM'd worker is gone (reaped), escalating to SIGKILL when due.
    fn reap_stopping(
        &mut self,
        worker: &mut Worker,
        kind: KillKind,
        since: Instant,
        now: Instant,
    ) -> Result<bool> {
        if let Some(status) = worker.try_wait()? {
            // A TERM that lands while Ruby itself boots, before the runner traps
            // signals, ends the process by the signal: it had not started consuming.
            let booting = std::os::unix::process::ExitStatusExt::signal(&status)
                == Some(libc::SIGTERM)
                && !std::fs::read_to_string(worker.log())
                    .is_ok_and(|log| log.contains("prosody: running"));
            if !status.success() && !booting {
                self.incidents.push(format!(
                    "worker-{:03} (pid {}) exited with {status} after SIGTERM (expected 0); see {}",
                    worker.instance(),
                    worker.pid(),
                    worker.log().display()
                ));
            }
            return Ok(true);
        }
        let kill_at = match kind {
            KillKind::Interrupted(after) => since + after,
            _ => since + STOP_GRACE,
        };
        if now < kill_at {
            return Ok(false);
        }
        if !matches!(kind, KillKind::Interrupted(_)) {
            self.incidents.push(format!(
                "worker-{:03} (pid {}) did not stop within {STOP_GRACE:?} of SIGTERM; see {}",
                worker.instance(),
                worker.pid(),
                worker.log().display()
            ));
        }
        worker.kill_and_reap()?;
        Ok(true)
    }

    /// SIGTERMs every running worker and waits for all to exit.
    fn stop_all(&mut self, started: Instant) -> Result<()> {
        let now = Instant::now();
        for slot in &mut self.slots {
            let state = std::mem::replace(slot, Slot::Down { restart_at: now });
            *slot = match state {
                Slot::Running(worker) => {
                    worker.terminate()?;
                    Slot::Stopping {
                        worker,
                        kind: KillKind::Graceful,
                        since: now,
                        restart_after: Duration::ZERO,
                    }
                }
                // Not restarted: the run is over.
                Slot::Down { .. } => Slot::Down {
                    restart_at: now + Duration::from_secs(3600),
                },
                stopping => stopping,
            };
        }
        say(started, "stopping the workers (SIGTERM)");
        loop {
            let now = Instant::now();
            let mut stopping = 0;
            for index in 0..self.slots.len() {
                let state = std::mem::replace(
                    &mut self.slots[index],
                    Slot::Down {
                        restart_at: now + Duration::from_secs(3600),
                    },
                );
                if let Slot::Stopping {
                    mut worker,
                    kind,
                    since,
                    restart_after,
                } = state
                {
                    if !self.reap_stopping(&mut worker, kind, since, now)? {
                        stopping += 1;
                        self.slots[index] = Slot::Stopping {
                            worker,
                            kind,
                            since,
                            restart_after,
                        };
                    }
                }
            }
            if stopping == 0 {
                say(started, "all workers stopped");
                return Ok(());
            }
            std::thread::sleep(TICK);
        }
    }
}

/// The default place for a run's files: `<tmp>/prosody-chaos-<seed>-<pid>`.
pub fn default_run_dir(seed: u64) -> PathBuf {
    std::env::temp_dir().join(format!("prosody-chaos-{seed}-{}", std::process::id()))
}

/// Verifies a finished run's directory on its own (manifest plus record files).
pub fn verify_dir(dir: &Path) -> Result<Report> {
    let produced = crate::manifest::read_manifest(&dir.join(MANIFEST_FILE))?;
    let logs = RecordLog::read_dir(dir)?;
    Ok(verify(&produced, &logs))
}
