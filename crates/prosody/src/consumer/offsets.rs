//! Which offsets of a partition are safe to commit, and which finished out of order.
//!
//! Kafka commits one number per partition: "everything below this is done". With
//! keys running concurrently, later offsets often finish before earlier ones. The
//! tracker commits the lowest unfinished offset (the watermark) and writes the
//! finished offsets above it into the commit's metadata, so a consumer that takes
//! the partition over skips them instead of running them again.

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Write as _;

/// Metadata prefix; the version lets a later format coexist with this one.
const METADATA_PREFIX: &str = "prosody1:";

/// Brokers cap offset metadata (offset.metadata.max.bytes, 4096 by default).
const METADATA_BUDGET: usize = 3_000;

/// What to do with a newly fetched offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Hand it to the handler.
    Run,
    /// A previous owner finished it; count it as done without running it.
    AlreadyDone,
}

#[derive(Debug, Default)]
pub(crate) struct OffsetTracker {
    /// Accepted offsets at or above the watermark, ascending, each with whether
    /// it finished. The front is the watermark itself (unfinished): finished
    /// offsets reaching the front are dropped. Fetches come in offset order, so
    /// admitting appends, and the window is reused: no allocation per message,
    /// unlike the ordered sets this replaced.
    window: VecDeque<(i64, bool)>,
    /// Unfinished offsets in `window`.
    pending: usize,
    /// Finished by a previous owner and not fetched yet (from commit metadata).
    inherited: BTreeSet<i64>,
    /// One past the highest offset seen.
    next_unseen: Option<i64>,
}

impl OffsetTracker {
    /// Starts from what a previous owner committed: its offset and metadata.
    pub(crate) fn resume_from(committed: Option<i64>, metadata: &str) -> Self {
        let inherited = committed
            .map(|base| decode(base, metadata))
            .unwrap_or_default();
        Self {
            inherited,
            ..Self::default()
        }
    }

    /// Records a fetched offset.
    pub(crate) fn admit(&mut self, offset: i64) -> Admission {
        self.next_unseen = Some(
            self.next_unseen
                .map_or(offset + 1, |next| next.max(offset + 1)),
        );
        if self.inherited.remove(&offset) {
            self.record(offset, true);
            self.prune();
            Admission::AlreadyDone
        } else {
            self.record(offset, false);
            Admission::Run
        }
    }

    /// Puts `offset` in the window, finished or not; an offset already there
    /// (fetched again) keeps its place and is unfinished again unless `done`.
    fn record(&mut self, offset: i64, done: bool) {
        let index = match self.window.back() {
            Some(&(last, _)) if last < offset => self.window.len(),
            None => 0,
            Some(_) => match self.window.binary_search_by_key(&offset, |&(at, _)| at) {
                Ok(found) => {
                    let entry = &mut self.window[found];
                    if entry.1 && !done {
                        entry.1 = false;
                        self.pending += 1;
                    }
                    return;
                }
                Err(index) => index,
            },
        };
        self.window.insert(index, (offset, done));
        if !done {
            self.pending += 1;
        }
    }

    /// Records that the handler finished `offset`.
    pub(crate) fn finish(&mut self, offset: i64) {
        let Some(index) = self.position(offset) else {
            return;
        };
        let entry = &mut self.window[index];
        if !entry.1 {
            entry.1 = true;
            self.pending -= 1;
            if index == 0 {
                self.prune();
            }
        }
    }

    /// Where `offset` is in the window. Offsets are usually consecutive, so
    /// its distance from the front is tried first.
    fn position(&self, offset: i64) -> Option<usize> {
        let front = self.window.front()?.0;
        let guess = usize::try_from(offset - front).ok()?;
        if self.window.get(guess).is_some_and(|&(at, _)| at == offset) {
            return Some(guess);
        }
        self.window
            .binary_search_by_key(&offset, |&(at, _)| at)
            .ok()
    }

    /// Accepted offsets not finished yet.
    pub(crate) fn pending(&self) -> usize {
        self.pending
    }

    /// The offset to commit: everything below it is finished.
    pub(crate) fn watermark(&self) -> Option<i64> {
        self.window
            .front()
            .map(|&(offset, _)| offset)
            .or(self.next_unseen)
    }

    /// The offset to commit and the metadata naming finished offsets above it.
    pub(crate) fn commit_point(&self) -> Option<(i64, String)> {
        let watermark = self.watermark()?;
        let above = self
            .window
            .iter()
            .filter(|&&(_, done)| done)
            .map(|&(offset, _)| offset)
            .chain(self.inherited.iter().copied())
            .filter(|&offset| offset > watermark)
            .collect::<BTreeSet<_>>();
        Some((watermark, encode(watermark, &above)))
    }

    /// Drops finished offsets from the front: the watermark moves past them.
    fn prune(&mut self) {
        while self.window.front().is_some_and(|&(_, done)| done) {
            self.window.pop_front();
        }
    }
}

/// Encodes offsets as ranges of distances from `base`: "prosody1:2-4,7".
fn encode(base: i64, offsets: &BTreeSet<i64>) -> String {
    let mut text = String::from(METADATA_PREFIX);
    let mut iter = offsets.iter().map(|offset| offset - base).peekable();
    let mut first = true;
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        let before = text.len();
        if !first {
            text.push(',');
        }
        if start == end {
            let _ = write!(text, "{start}");
        } else {
            let _ = write!(text, "{start}-{end}");
        }
        if text.len() > METADATA_BUDGET {
            // Whatever does not fit is simply run again: at-least-once still holds.
            text.truncate(before);
            break;
        }
        first = false;
    }
    text
}

/// Decodes [`encode`]'s output; anything unrecognised means "nothing inherited".
fn decode(base: i64, metadata: &str) -> BTreeSet<i64> {
    let Some(body) = metadata.strip_prefix(METADATA_PREFIX) else {
        return BTreeSet::new();
    };
    let mut offsets = BTreeSet::new();
    for part in body.split(',').filter(|part| !part.is_empty()) {
        let (start, end) = match part.split_once('-') {
            Some((start, end)) => (start.parse::<i64>(), end.parse::<i64>()),
            None => (part.parse::<i64>(), part.parse::<i64>()),
        };
        let (Ok(start), Ok(end)) = (start, end) else {
            return BTreeSet::new();
        };
        if start <= 0 || end < start || end - start > 1_000_000 {
            return BTreeSet::new();
        }
        offsets.extend((start..=end).map(|delta| base + delta));
    }
    offsets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_stops_at_the_lowest_unfinished_offset() {
        let mut tracker = OffsetTracker::default();
        for offset in 10..15 {
            assert_eq!(tracker.admit(offset), Admission::Run);
        }
        tracker.finish(12);
        tracker.finish(14);
        assert_eq!(tracker.watermark(), Some(10));
        tracker.finish(10);
        assert_eq!(tracker.watermark(), Some(11));
        assert_eq!(
            tracker.commit_point(),
            Some((11, "prosody1:1,3".to_owned()))
        );
        tracker.finish(11);
        tracker.finish(13);
        assert_eq!(tracker.commit_point(), Some((15, "prosody1:".to_owned())));
        assert_eq!(tracker.pending(), 0);
    }

    #[test]
    fn gaps_in_offsets_do_not_hold_the_watermark() {
        let mut tracker = OffsetTracker::default();
        tracker.admit(3);
        tracker.admit(9);
        tracker.finish(3);
        assert_eq!(tracker.watermark(), Some(9));
        tracker.finish(9);
        assert_eq!(tracker.watermark(), Some(10));
    }

    #[test]
    fn a_new_owner_skips_what_the_old_one_finished() {
        let mut old = OffsetTracker::default();
        for offset in 0..6 {
            old.admit(offset);
        }
        for offset in [1, 2, 3, 5] {
            old.finish(offset);
        }
        let (committed, metadata) = old.commit_point().unwrap();
        assert_eq!((committed, metadata.as_str()), (0, "prosody1:1-3,5"));

        let mut new = OffsetTracker::resume_from(Some(committed), &metadata);
        let admissions: Vec<_> = (0..6).map(|offset| new.admit(offset)).collect();
        use Admission::{AlreadyDone as Done, Run};
        assert_eq!(admissions, vec![Run, Done, Done, Done, Run, Done]);
        // Inherited offsets not fetched yet are carried into the next commit.
        let mut partial = OffsetTracker::resume_from(Some(committed), &metadata);
        partial.admit(0);
        assert_eq!(
            partial.commit_point(),
            Some((0, "prosody1:1-3,5".to_owned()))
        );
    }

    #[test]
    fn offsets_fetched_out_of_order_or_again_keep_the_watermark_right() {
        let mut tracker = OffsetTracker::default();
        for offset in [5, 7, 6] {
            tracker.admit(offset);
        }
        assert_eq!(tracker.pending(), 3);
        tracker.finish(5);
        tracker.finish(7);
        assert_eq!(tracker.watermark(), Some(6));
        // Fetched again after finishing (a seek back): it must finish again.
        tracker.admit(7);
        tracker.admit(6);
        assert_eq!(tracker.pending(), 2);
        tracker.finish(6);
        assert_eq!(tracker.watermark(), Some(7));
        tracker.finish(7);
        tracker.finish(7);
        assert_eq!((tracker.watermark(), tracker.pending()), (Some(8), 0));
        // An offset below the window finishes nothing it does not know.
        tracker.finish(1);
        assert_eq!(tracker.commit_point(), Some((8, "prosody1:".to_owned())));
    }

    #[test]
    fn garbage_metadata_inherits_nothing() {
        for metadata in [
            "",
            "other",
            "prosody1:x",
            "prosody1:5-2",
            "prosody1:0",
            "prosody1:-3",
        ] {
            assert!(decode(0, metadata).is_empty(), "{metadata}");
        }
    }

    #[test]
    fn metadata_stays_within_budget() {
        let offsets: BTreeSet<i64> = (1..20_000).step_by(2).collect();
        let text = encode(0, &offsets);
        assert!(text.len() <= METADATA_BUDGET);
        let decoded = decode(0, &text);
        assert!(!decoded.is_empty());
        assert!(decoded.iter().all(|offset| offsets.contains(offset)));
    }
}
