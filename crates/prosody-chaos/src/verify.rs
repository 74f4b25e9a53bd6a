//! The verifier: from the produced-messages manifest and the workers' record
//! logs, proves that nothing was lost and no key ran out of order.
//!
//! What it checks:
//!
//! 1. **No loss.** Every produced message (partition, offset) has at least one
//!    completed handling (an `E` record).
//! 2. **Per-key order.** For each key, take its messages in offset order. Every
//!    start of message *n + 1*, in any process, comes after some completed
//!    handling of message *n* ended. A handling cut short by SIGKILL (a start with
//!    no end) or cancelled (`X`) does not count as completed, so a later message
//!    that starts after only such handlings of its predecessor is a violation.
//!    Handlings of message *n* that start again later (redelivery after a crash)
//!    are duplicates, which at-least-once allows.
//! 3. **No overlap inside a process.** Within one worker process, two handlings of
//!    the same key never run at the same time. A start with no end counts as
//!    running until the process died, so any later start of the same key in that
//!    process overlaps it.
//! 4. **Records match the manifest.** Every record names a produced
//!    (partition, offset) with the key and sequence number that was produced there,
//!    and every end follows a start.
//!
//! It also counts duplicates: completed handlings beyond one per message.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;

use crate::manifest::Produced;
use crate::records::{Phase, Record, RecordLog};

/// One way Prosody (or a record) broke the contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// A produced message was never handled to completion.
    Lost {
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
        /// Key.
        key: String,
        /// Per-key sequence number.
        seq: u64,
        /// How many handlings of it started (and were killed or cancelled).
        started: usize,
    },
    /// A message started before any handling of the previous message of its key had completed.
    OutOfOrder {
        /// Key.
        key: String,
        /// Partition.
        partition: i32,
        /// The message that started too early.
        offset: i64,
        /// Where that start was recorded.
        source: String,
        /// When it started (monotonic ns).
        started_at: u64,
        /// The previous message of the key.
        previous_offset: i64,
        /// When the first completed handling of the previous message ended, if any did.
        previous_completed_at: Option<u64>,
    },
    /// Two handlings of one key ran at the same time in one process.
    Overlap {
        /// The process's record log.
        source: String,
        /// Key.
        key: String,
        /// The handling still running.
        running_offset: i64,
        /// When it started.
        running_started_at: u64,
        /// When it ended (`None`: it never did).
        running_ended_at: Option<u64>,
        /// The handling that started while the other ran.
        offset: i64,
        /// When that one started.
        started_at: u64,
    },
    /// A record that does not fit the manifest or its own log.
    BadRecord {
        /// The process's record log.
        source: String,
        /// The record, as its line.
        line: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Lost {
                partition,
                offset,
                key,
                seq,
                started,
            } => write!(
                f,
                "LOST: partition {partition} offset {offset} (key {key} seq {seq}) never completed \
                 by the end of the run ({started} start(s) without a completion)"
            ),
            Violation::OutOfOrder {
                key,
                partition,
                offset,
                source,
                started_at,
                previous_offset,
                previous_completed_at,
            } => {
                write!(
                    f,
                    "OUT OF ORDER: key {key}: partition {partition} offset {offset} started at \
                     {started_at} ns in {source}, but the key's previous message (offset \
                     {previous_offset}) "
                )?;
                match previous_completed_at {
                    Some(at) => write!(
                        f,
                        "first completed at {at} ns ({} ns later)",
                        at - started_at
                    ),
                    None => write!(f, "never completed"),
                }
            }
            Violation::Overlap {
                source,
                key,
                running_offset,
                running_started_at,
                running_ended_at,
                offset,
                started_at,
            } => {
                write!(
                    f,
                    "OVERLAP: key {key} in {source}: offset {offset} started at {started_at} ns \
                     while offset {running_offset} (started {running_started_at} ns) was running"
                )?;
                match running_ended_at {
                    Some(at) => write!(f, " until {at} ns"),
                    None => write!(f, " and never ended"),
                }
            }
            Violation::BadRecord {
                source,
                line,
                reason,
            } => write!(f, "BAD RECORD in {source}: `{line}`: {reason}"),
        }
    }
}

/// What the verifier found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Produced messages.
    pub messages: usize,
    /// Messages with at least one completed handling.
    pub handled: usize,
    /// Completed handlings (`E` records).
    pub completions: usize,
    /// Completed handlings beyond one per message.
    pub duplicates: usize,
    /// Handler calls started (`S` records).
    pub starts: usize,
    /// Calls that ended without finishing (`X` records: cancelled).
    pub aborted: usize,
    /// Calls that never ended (their process was killed during them).
    pub unfinished: usize,
    /// Record logs read (one per worker process).
    pub processes: usize,
    /// Logs whose last line was torn by a kill (ignored).
    pub torn_tails: usize,
    /// Everything that broke the contract.
    pub violations: Vec<Violation>,
}

impl Report {
    /// Whether no violation was found.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// Duplicates per produced message.
    pub fn duplicate_rate(&self) -> f64 {
        if self.messages == 0 {
            0.0
        } else {
            self.duplicates as f64 / self.messages as f64
        }
    }

    /// Per partition with lost messages: how many, and the lowest lost offset.
    pub fn lost_by_partition(&self) -> BTreeMap<i32, (usize, i64)> {
        let mut lost = BTreeMap::new();
        for violation in &self.violations {
            if let Violation::Lost {
                partition, offset, ..
            } = violation
            {
                let entry = lost.entry(*partition).or_insert((0, *offset));
                entry.0 += 1;
                entry.1 = entry.1.min(*offset);
            }
        }
        lost
    }

    /// Counts of violations by kind: (lost, out of order, overlap, bad record).
    pub fn violation_counts(&self) -> (usize, usize, usize, usize) {
        let mut counts = (0, 0, 0, 0);
        for violation in &self.violations {
            match violation {
                Violation::Lost { .. } => counts.0 += 1,
                Violation::OutOfOrder { .. } => counts.1 += 1,
                Violation::Overlap { .. } => counts.2 += 1,
                Violation::BadRecord { .. } => counts.3 += 1,
            }
        }
        counts
    }
}

/// One handler call as seen in one log.
struct Call {
    message: usize,
    started_at: u64,
    ended_at: Option<u64>,
}

/// Per produced message: its completions and the starts of its handlings.
#[derive(Default)]
struct Seen {
    completions: usize,
    first_completed_at: Option<u64>,
    starts: Vec<(usize, u64)>,
}

/// Checks `logs` against `produced` (see the module docs for what is checked).
pub fn verify(produced: &[Produced], logs: &[RecordLog]) -> Report {
    let mut report = Report {
        messages: produced.len(),
        processes: logs.len(),
        torn_tails: logs.iter().filter(|log| log.torn_tail).count(),
        ..Report::default()
    };
    let index: HashMap<(i32, i64), usize> = produced
        .iter()
        .enumerate()
        .map(|(i, message)| ((message.partition, message.offset), i))
        .collect();
    let mut seen: Vec<Seen> = (0..produced.len()).map(|_| Seen::default()).collect();

    for (log_index, log) in logs.iter().enumerate() {
        let calls = pair_calls(log, log_index, produced, &index, &mut seen, &mut report);
        check_overlaps(log, &calls, produced, &mut report);
    }

    for (message, seen) in produced.iter().zip(&seen) {
        if seen.completions == 0 {
            report.violations.push(Violation::Lost {
                partition: message.partition,
                offset: message.offset,
                key: message.key.clone(),
                seq: message.seq,
                started: seen.starts.len(),
            });
        } else {
            report.handled += 1;
            report.duplicates += seen.completions - 1;
        }
    }
    check_order(produced, &seen, logs, &mut report);
    report
}

/// Matches each log's starts with their ends, recording what was seen per message.
fn pair_calls(
    log: &RecordLog,
    log_index: usize,
    produced: &[Produced],
    index: &HashMap<(i32, i64), usize>,
    seen: &mut [Seen],
    report: &mut Report,
) -> Vec<Call> {
    let mut calls: Vec<Call> = Vec::new();
    let mut open: HashMap<usize, VecDeque<usize>> = HashMap::new();
    let bad = |record: &Record, reason: String| Violation::BadRecord {
        source: log.source.clone(),
        line: record.to_line(),
        reason,
    };

    for record in &log.records {
        let Some(&message) = index.get(&(record.partition, record.offset)) else {
            report
                .violations
                .push(bad(record, "no such message was produced".to_owned()));
            continue;
        };
        let expected = &produced[message];
        if expected.key != record.key || expected.seq != record.seq {
            report.violations.push(bad(
                record,
                format!(
                    "the message produced there has key {} seq {}",
                    expected.key, expected.seq
                ),
            ));
            continue;
        }
        match record.phase {
            Phase::Start => {
                report.starts += 1;
                open.entry(message).or_default().push_back(calls.len());
                seen[message].starts.push((log_index, record.at_ns));
                calls.push(Call {
                    message,
                    started_at: record.at_ns,
                    ended_at: None,
                });
            }
            Phase::End | Phase::Abort => {
                let Some(call) = open.get_mut(&message).and_then(VecDeque::pop_front) else {
                    report
                        .violations
                        .push(bad(record, "ends a call that never started".to_owned()));
                    continue;
                };
                let call = &mut calls[call];
                if record.at_ns < call.started_at {
                    report.violations.push(bad(
                        record,
                        format!("ends before its start at {} ns", call.started_at),
                    ));
                }
                call.ended_at = Some(record.at_ns);
                if record.phase == Phase::End {
                    report.completions += 1;
                    let seen = &mut seen[message];
                    seen.completions += 1;
                    seen.first_completed_at = Some(
                        seen.first_completed_at
                            .map_or(record.at_ns, |at| at.min(record.at_ns)),
                    );
                } else {
                    report.aborted += 1;
                }
            }
        }
    }
    report.unfinished += open.values().map(VecDeque::len).sum::<usize>();
    calls
}

/// Within one log, no call of a key may start while another call of that key runs.
fn check_overlaps(log: &RecordLog, calls: &[Call], produced: &[Produced], report: &mut Report) {
    // Per key: the call that ends last among those started so far (None = never ends).
    let mut busy: HashMap<&str, &Call> = HashMap::new();
    for call in calls {
        let key = produced[call.message].key.as_str();
        if let Some(running) = busy.get(key) {
            let still_running = running.ended_at.is_none_or(|end| call.started_at < end);
            if still_running {
                report.violations.push(Violation::Overlap {
                    source: log.source.clone(),
                    key: key.to_owned(),
                    running_offset: produced[running.message].offset,
                    running_started_at: running.started_at,
                    running_ended_at: running.ended_at,
                    offset: produced[call.message].offset,
                    started_at: call.started_at,
                });
            }
            let ends_later = match (running.ended_at, call.ended_at) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(a), Some(b)) => b > a,
            };
            if !ends_later {
                continue;
            }
        }
        busy.insert(key, call);
    }
}

/// Every start of a key's message must follow a completion of the key's previous message.
fn check_order(produced: &[Produced], seen: &[Seen], logs: &[RecordLog], report: &mut Report) {
    let mut by_key: BTreeMap<(&str, i32), Vec<usize>> = BTreeMap::new();
    for (i, message) in produced.iter().enumerate() {
        by_key
            .entry((message.key.as_str(), message.partition))
            .or_default()
            .push(i);
    }
    for ((key, partition), mut messages) in by_key {
        messages.sort_by_key(|&i| produced[i].offset);
        for pair in messages.windows(2) {
            let (previous, next) = (pair[0], pair[1]);
            let completed_at = seen[previous].first_completed_at;
            for &(log, started_at) in &seen[next].starts {
                if completed_at.is_none_or(|at| started_at < at) {
                    report.violations.push(Violation::OutOfOrder {
                        key: key.to_owned(),
                        partition,
                        offset: produced[next].offset,
                        source: logs[log].source.clone(),
                        started_at,
                        previous_offset: produced[previous].offset,
                        previous_completed_at: completed_at,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages `(partition, offset, key, seq)`.
    fn produced(messages: &[(i32, i64, &str, u64)]) -> Vec<Produced> {
        messages
            .iter()
            .map(|&(partition, offset, key, seq)| Produced {
                partition,
                offset,
                key: key.to_owned(),
                seq,
            })
            .collect()
    }

    /// A log from lines `"<phase> <offset> <at>"` on partition 0, looking the key and seq
    /// up in `messages`.
    fn log(name: &str, pid: u32, messages: &[Produced], lines: &[&str]) -> RecordLog {
        let records = lines
            .iter()
            .map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                let offset: i64 = fields[1].parse().unwrap();
                let message = messages.iter().find(|m| m.offset == offset).unwrap();
                Record::parse(&format!(
                    "{} {} {} {} {} {pid} {}",
                    fields[0], message.key, message.partition, offset, message.seq, fields[2]
                ))
                .unwrap()
            })
            .collect();
        RecordLog {
            source: name.to_owned(),
            records,
            torn_tail: false,
        }
    }

    /// Offsets 0..4: key a at 0, 2, 3; key b at 1.
    fn two_keys() -> Vec<Produced> {
        produced(&[
            (0, 0, "a", 0),
            (0, 1, "b", 0),
            (0, 2, "a", 1),
            (0, 3, "a", 2),
        ])
    }

    #[test]
    fn a_clean_run_passes() {
        let messages = two_keys();
        let logs = [log(
            "w1",
            1,
            &messages,
            &[
                "S 0 10", "S 1 11", "E 0 20", "S 2 21", "E 1 22", "E 2 30", "S 3 31", "E 3 40",
            ],
        )];
        let report = verify(&messages, &logs);
        assert!(report.is_ok(), "{:?}", report.violations);
        assert_eq!(
            (report.handled, report.completions, report.duplicates),
            (4, 4, 0)
        );
    }

    #[test]
    fn a_kill_mid_call_then_redelivery_elsewhere_passes_with_duplicates() {
        let messages = two_keys();
        let logs = [
            // w1 completes offset 0, is killed during offset 2 (and during b's offset 1).
            log(
                "w1",
                1,
                &messages,
                &["S 0 10", "S 1 11", "E 0 20", "S 2 21"],
            ),
            // w2 takes over from the committed offset 0: redoes 0, then 1, 2, 3.
            log(
                "w2",
                2,
                &messages,
                &[
                    "S 0 100", "S 1 101", "E 0 110", "E 1 111", "S 2 112", "E 2 120", "S 3 121",
                    "E 3 130",
                ],
            ),
        ];
        let report = verify(&messages, &logs);
        assert!(report.is_ok(), "{:?}", report.violations);
        assert_eq!(report.duplicates, 1);
        assert_eq!(report.unfinished, 2);
        assert!((report.duplicate_rate() - 0.25).abs() < 1e-9);
    }

    #[test]
    fn skipping_a_message_completed_elsewhere_passes() {
        // w2 skips offset 2 (recorded as done in the commit metadata by w1) and goes on with 3.
        let messages = two_keys();
        let logs = [
            log(
                "w1",
                1,
                &messages,
                &["S 0 10", "E 0 20", "S 1 21", "E 1 22", "S 2 23", "E 2 30"],
            ),
            log("w2", 2, &messages, &["S 3 100", "E 3 110"]),
        ];
        assert!(verify(&messages, &logs).is_ok());
    }

    #[test]
    fn concurrent_handlings_in_different_processes_are_allowed() {
        // A zombie (w1) and the new owner (w2) both run offset 2 for a while.
        let messages = two_keys();
        let logs = [
            log(
                "w1",
                1,
                &messages,
                &["S 0 10", "E 0 20", "S 1 21", "E 1 22", "S 2 25", "E 2 40"],
            ),
            log(
                "w2",
                2,
                &messages,
                &["S 2 30", "E 2 35", "S 3 36", "E 3 50"],
            ),
        ];
        let report = verify(&messages, &logs);
        assert!(report.is_ok(), "{:?}", report.violations);
        assert_eq!(report.duplicates, 1);
    }

    #[test]
    fn a_missing_message_fails() {
        let messages = two_keys();
        let logs = [log(
            "w1",
            1,
            &messages,
            &["S 0 10", "E 0 20", "S 2 21", "E 2 30", "S 3 31", "E 3 40"],
        )];
        let report = verify(&messages, &logs);
        assert_eq!(
            report.violations,
            vec![Violation::Lost {
                partition: 0,
                offset: 1,
                key: "b".to_owned(),
                seq: 0,
                started: 0,
            }]
        );
        assert!(report.violations[0]
            .to_string()
            .starts_with("LOST: partition 0 offset 1"));
    }

    #[test]
    fn a_message_only_started_and_cancelled_is_lost() {
        let messages = produced(&[(0, 0, "a", 0)]);
        let logs = [
            log("w1", 1, &messages, &["S 0 10", "X 0 12"]),
            log("w2", 2, &messages, &["S 0 20"]),
        ];
        let report = verify(&messages, &logs);
        assert!(matches!(
            report.violations[..],
            [Violation::Lost { started: 2, .. }]
        ));
        assert_eq!((report.aborted, report.unfinished), (1, 1));
    }

    #[test]
    fn starting_before_the_previous_message_completed_fails() {
        // w2 starts offset 2 at 25, but offset 0 (same key) first completes at 30 in w1.
        let messages = two_keys();
        let logs = [
            log(
                "w1",
                1,
                &messages,
                &["S 0 10", "E 0 30", "S 1 31", "E 1 32"],
            ),
            log(
                "w2",
                2,
                &messages,
                &["S 2 25", "E 2 40", "S 3 41", "E 3 50"],
            ),
        ];
        let report = verify(&messages, &logs);
        assert_eq!(report.violations.len(), 1, "{:?}", report.violations);
        let Violation::OutOfOrder {
            offset,
            previous_offset,
            previous_completed_at,
            ..
        } = &report.violations[0]
        else {
            panic!("expected out of order: {:?}", report.violations);
        };
        assert_eq!(
            (*offset, *previous_offset, *previous_completed_at),
            (2, 0, Some(30))
        );
    }

    #[test]
    fn a_predecessor_that_was_only_cancelled_does_not_count() {
        // Offset 0 is cancelled (X), never completed, yet offset 2 runs and completes.
        let messages = two_keys();
        let logs = [log(
            "w1",
            1,
            &messages,
            &[
                "S 0 10", "X 0 12", "S 1 13", "E 1 14", "S 2 15", "E 2 20", "S 3 21", "E 3 22",
            ],
        )];
        let report = verify(&messages, &logs);
        let (lost, out_of_order, overlap, bad) = report.violation_counts();
        assert_eq!(
            (lost, out_of_order, overlap, bad),
            (1, 1, 0, 0),
            "{:?}",
            report.violations
        );
        assert!(report
            .violations
            .iter()
            .any(|v| v.to_string().contains("never completed")));
    }

    #[test]
    fn a_concurrent_replay_of_a_key_in_one_process_is_an_overlap() {
        // A new owner replays offsets 0 and 2 of key a *concurrently* in one process:
        // order against the earlier completion holds, but the overlap check fails it.
        let messages = two_keys();
        let logs = [
            log(
                "w1",
                1,
                &messages,
                &["S 0 10", "E 0 20", "S 1 21", "E 1 22"],
            ),
            log(
                "w2",
                2,
                &messages,
                &[
                    "S 0 100", "S 2 101", "E 0 110", "E 2 111", "S 3 112", "E 3 120",
                ],
            ),
        ];
        let report = verify(&messages, &logs);
        assert_eq!(
            report.violation_counts(),
            (0, 0, 1, 0),
            "{:?}",
            report.violations
        );
    }

    #[test]
    fn overlapping_calls_of_a_key_in_one_process_fail() {
        let messages = produced(&[(0, 0, "a", 0), (0, 1, "a", 1)]);
        // The same offset twice at once, in one process (the first never ends).
        let logs = [log(
            "w1",
            1,
            &messages,
            &["S 0 10", "S 0 11", "E 0 20", "S 1 21", "E 1 30"],
        )];
        let report = verify(&messages, &logs);
        assert_eq!(
            report.violation_counts(),
            (0, 0, 2, 0),
            "{:?}",
            report.violations
        );
        // Ends pair with the earliest open start, so the second call of offset 0 never ends
        // and offset 1 starts during it.
        assert!(
            report.violations[0].to_string().contains("until 20 ns"),
            "{:?}",
            report.violations
        );
        assert!(
            report.violations[1].to_string().contains("never ended"),
            "{:?}",
            report.violations
        );
    }

    #[test]
    fn records_that_do_not_match_the_manifest_fail() {
        let messages = produced(&[(0, 0, "a", 0)]);
        let mut logs = [log("w1", 1, &messages, &["S 0 10", "E 0 20"])];
        logs[0]
            .records
            .push(Record::parse("S a 0 5 0 1 30").unwrap());
        logs[0]
            .records
            .push(Record::parse("S b 0 0 0 1 31").unwrap());
        logs[0]
            .records
            .push(Record::parse("E a 0 0 0 1 32").unwrap());
        let report = verify(&messages, &logs);
        assert_eq!(
            report.violation_counts(),
            (0, 0, 0, 3),
            "{:?}",
            report.violations
        );
        let text: Vec<String> = report.violations.iter().map(ToString::to_string).collect();
        assert!(text[0].contains("no such message was produced"), "{text:?}");
        assert!(text[1].contains("has key a seq 0"), "{text:?}");
        assert!(text[2].contains("never started"), "{text:?}");
    }
}
