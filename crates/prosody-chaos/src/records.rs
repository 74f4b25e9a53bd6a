//! Record files: what each worker process says it did, one line per event.
//!
//! `chaos/recording_handler.rb` appends, to a file of its own process,
//!
//! ```text
//! S <key> <partition> <offset> <seq> <pid> <monotonic_ns>   a handler call started
//! E <key> <partition> <offset> <seq> <pid> <monotonic_ns>   it finished successfully
//! X <key> <partition> <offset> <seq> <pid> <monotonic_ns>   it ended without finishing (cancelled)
//! ```
//!
//! Times are `CLOCK_MONOTONIC`, which Linux keeps system-wide, so lines of
//! different processes compare. A process killed with SIGKILL may leave a torn
//! last line without its newline; readers ignore it (and count it).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What a record line says happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// `S`: a handler call started.
    Start,
    /// `E`: the call finished successfully.
    End,
    /// `X`: the call ended without finishing (cancelled or failed).
    Abort,
}

/// One line of a record file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// What happened.
    pub phase: Phase,
    /// The message key.
    pub key: String,
    /// The message's partition.
    pub partition: i32,
    /// The message's offset.
    pub offset: i64,
    /// The per-key sequence number from the payload.
    pub seq: u64,
    /// The worker process.
    pub pid: u32,
    /// `CLOCK_MONOTONIC` in nanoseconds.
    pub at_ns: u64,
}

impl Record {
    /// Parses one line (without its newline).
    pub fn parse(line: &str) -> std::result::Result<Record, String> {
        let fields: Vec<&str> = line.split(' ').collect();
        let [phase, key, partition, offset, seq, pid, at_ns] = fields[..] else {
            return Err(format!(
                "expected 7 space-separated fields, got {}: `{line}`",
                fields.len()
            ));
        };
        let phase = match phase {
            "S" => Phase::Start,
            "E" => Phase::End,
            "X" => Phase::Abort,
            other => return Err(format!("unknown phase `{other}` (S, E or X)")),
        };
        if key.is_empty() {
            return Err("empty key".to_owned());
        }
        Ok(Record {
            phase,
            key: key.to_owned(),
            partition: field(partition, "partition")?,
            offset: field(offset, "offset")?,
            seq: field(seq, "seq")?,
            pid: field(pid, "pid")?,
            at_ns: field(at_ns, "time")?,
        })
    }

    /// The line this record is written as (without newline).
    pub fn to_line(&self) -> String {
        let phase = match self.phase {
            Phase::Start => 'S',
            Phase::End => 'E',
            Phase::Abort => 'X',
        };
        format!(
            "{phase} {} {} {} {} {} {}",
            self.key, self.partition, self.offset, self.seq, self.pid, self.at_ns
        )
    }
}

fn field<T: std::str::FromStr>(text: &str, name: &str) -> std::result::Result<T, String> {
    text.parse()
        .map_err(|_| format!("{name} is not a number: `{text}`"))
}

/// Every record of one worker process, in the order it wrote them.
#[derive(Clone, Debug, Default)]
pub struct RecordLog {
    /// Where the records came from (a name for reports).
    pub source: String,
    /// The records, in file order (which is time order: one thread writes them).
    pub records: Vec<Record>,
    /// Whether the file ended in a line without newline (a write torn by SIGKILL).
    pub torn_tail: bool,
}

impl RecordLog {
    /// Reads a whole record file.
    pub fn read(path: &Path) -> Result<RecordLog> {
        let mut tail = Tail::new(path.to_owned());
        let records = tail.read_new()?;
        Ok(RecordLog {
            source: path.display().to_string(),
            records,
            torn_tail: !tail.pending.is_empty(),
        })
    }

    /// Reads every `*.records` file in `dir`, sorted by name.
    pub fn read_dir(dir: &Path) -> Result<Vec<RecordLog>> {
        let mut paths = Vec::new();
        let entries =
            std::fs::read_dir(dir).map_err(Error::io(format!("listing {}", dir.display())))?;
        for entry in entries {
            let path = entry
                .map_err(Error::io(format!("listing {}", dir.display())))?
                .path();
            if path.extension().is_some_and(|ext| ext == "records") {
                paths.push(path);
            }
        }
        paths.sort();
        paths.iter().map(|path| RecordLog::read(path)).collect()
    }
}

/// Follows a record file that is still being written, returning complete lines only.
#[derive(Debug)]
pub struct Tail {
    path: PathBuf,
    position: u64,
    pending: Vec<u8>,
    lines: usize,
}

impl Tail {
    /// Follows `path` from its beginning; the file need not exist yet.
    pub fn new(path: PathBuf) -> Tail {
        Tail {
            path,
            position: 0,
            pending: Vec::new(),
            lines: 0,
        }
    }

    /// The records completed since the last call (none if the file does not exist yet).
    pub fn read_new(&mut self) -> Result<Vec<Record>> {
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(Error::io(format!("opening {}", self.path.display()))(error)),
        };
        let context = || format!("reading {}", self.path.display());
        file.seek(SeekFrom::Start(self.position))
            .map_err(Error::io(context()))?;
        let mut fresh = Vec::new();
        file.read_to_end(&mut fresh).map_err(Error::io(context()))?;
        self.position += fresh.len() as u64;
        self.pending.extend_from_slice(&fresh);

        let Some(last_newline) = self.pending.iter().rposition(|&byte| byte == b'\n') else {
            return Ok(Vec::new());
        };
        let complete: Vec<u8> = self.pending.drain(..=last_newline).collect();
        let text = String::from_utf8(complete).map_err(|_| Error::Record {
            path: self.path.clone(),
            line: self.lines + 1,
            reason: "not UTF-8".to_owned(),
        })?;
        let mut records = Vec::new();
        for line in text.lines() {
            self.lines += 1;
            let record = Record::parse(line).map_err(|reason| Error::Record {
                path: self.path.clone(),
                line: self.lines,
                reason,
            })?;
            records.push(record);
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let line = "E key-007 3 1042 17 4242 123456789012";
        let record = Record::parse(line).unwrap();
        assert_eq!(record.phase, Phase::End);
        assert_eq!(record.key, "key-007");
        assert_eq!((record.partition, record.offset, record.seq), (3, 1042, 17));
        assert_eq!(record.to_line(), line);
    }

    #[test]
    fn malformed_lines_are_rejected() {
        assert!(Record::parse("S key 1 2 3 4").is_err());
        assert!(Record::parse("Q key 1 2 3 4 5").is_err());
        assert!(Record::parse("S key one 2 3 4 5").is_err());
    }

    #[test]
    fn a_tail_returns_complete_lines_and_keeps_a_torn_one() {
        let dir = std::env::temp_dir().join(format!("prosody-chaos-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("worker.records");
        std::fs::write(&path, "S k 0 1 0 9 100\nE k 0 1 0 9 2").unwrap();

        let mut tail = Tail::new(path.clone());
        assert_eq!(tail.read_new().unwrap().len(), 1);
        let log = RecordLog::read(&path).unwrap();
        assert!(log.torn_tail);

        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, b"00\n").unwrap();
        let more = tail.read_new().unwrap();
        assert_eq!(more.len(), 1);
        assert_eq!(more[0].at_ns, 200);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
