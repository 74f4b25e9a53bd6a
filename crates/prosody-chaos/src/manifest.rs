//! The produced-messages manifest: every message the broker acknowledged, with
//! where it landed. Written by the orchestrator as `produced.tsv`, so the verifier
//! can also run later, on its own, over a run directory.
//!
//! One line per message: `<partition> <offset> <key> <seq>`.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// A message the broker acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Produced {
    /// Partition it was written to.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// Its key.
    pub key: String,
    /// Its per-key sequence number (0, 1, 2, ... in send order).
    pub seq: u64,
}

/// The manifest's file name inside a run directory.
pub const MANIFEST_FILE: &str = "produced.tsv";

/// Writes `messages` to `path`, replacing it.
pub fn write_manifest(path: &Path, messages: &[Produced]) -> Result<()> {
    let context = || format!("writing {}", path.display());
    let file = std::fs::File::create(path).map_err(Error::io(context()))?;
    let mut out = std::io::BufWriter::new(file);
    for message in messages {
        writeln!(
            out,
            "{} {} {} {}",
            message.partition, message.offset, message.key, message.seq
        )
        .map_err(Error::io(context()))?;
    }
    out.flush().map_err(Error::io(context()))
}

/// Reads a manifest written by [`write_manifest`].
pub fn read_manifest(path: &Path) -> Result<Vec<Produced>> {
    let text =
        std::fs::read_to_string(path).map_err(Error::io(format!("reading {}", path.display())))?;
    text.lines()
        .enumerate()
        .map(|(index, line)| {
            parse_line(line).ok_or_else(|| Error::Record {
                path: path.to_owned(),
                line: index + 1,
                reason: format!("expected `<partition> <offset> <key> <seq>`, got `{line}`"),
            })
        })
        .collect()
}

fn parse_line(line: &str) -> Option<Produced> {
    let mut fields = line.split(' ');
    let produced = Produced {
        partition: fields.next()?.parse().ok()?,
        offset: fields.next()?.parse().ok()?,
        key: fields.next().filter(|key| !key.is_empty())?.to_owned(),
        seq: fields.next()?.parse().ok()?,
    };
    fields.next().is_none().then_some(produced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_round_trips() {
        let dir =
            std::env::temp_dir().join(format!("prosody-chaos-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(MANIFEST_FILE);
        let messages = vec![
            Produced {
                partition: 0,
                offset: 0,
                key: "key-001".to_owned(),
                seq: 0,
            },
            Produced {
                partition: 2,
                offset: 7,
                key: "key-002".to_owned(),
                seq: 3,
            },
        ];
        write_manifest(&path, &messages).unwrap();
        assert_eq!(read_manifest(&path).unwrap(), messages);

        std::fs::write(&path, "0 0 key\n").unwrap();
        let error = read_manifest(&path).unwrap_err();
        assert!(error.to_string().contains(":1:"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
