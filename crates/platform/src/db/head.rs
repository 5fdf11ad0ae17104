//! The log's head, and which topics the positions up to it were appended on, as far as this
//! process can tell.
//!
//! Every commit that appends moves the head and wakes every consumer lane of the process.
//! Most lanes follow topics the commit did not touch (with every service in one process,
//! eight of twelve lanes on a MyEvents write), and a read that finds nothing is still a
//! round trip on a server. The writers record the topics of what they append, so a lane can
//! tell from memory that nothing new is there for it.
//!
//! What another process appends is known by position only (PostgreSQL's notifications
//! carry the topics too): such positions count as possibly on every topic. The invariant
//! that makes skipping a read safe: every position up to `known_through` is either recorded
//! under its topic or at most `unknown`; and the head never passes `known_through`, because
//! a writer records its positions before it moves the head, and the watchers before they
//! move it. A PostgreSQL writer records right after its commit, whose notification this
//! process's listener ignores; a MySQL writer records before it commits, since the poller
//! cannot tell its process's commits from others'. Records of a batch that rolls back stay;
//! they only cost a read.

use super::Outgoing;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use tokio::sync::watch;

pub(crate) struct LogHead {
    head: watch::Sender<i64>,
    topics: Mutex<Topics>,
}

struct Topics {
    /// The last position recorded on each topic.
    last: HashMap<String, i64>,
    /// Positions up to here may be on any topic.
    unknown: i64,
    /// Every position up to here is accounted for, in `last` or under `unknown`.
    known_through: i64,
}

impl LogHead {
    /// A head at `position`, with what came before it on unknown topics.
    pub(crate) fn new(position: i64) -> LogHead {
        LogHead {
            head: watch::Sender::new(position),
            topics: Mutex::new(Topics {
                last: HashMap::new(),
                unknown: position,
                known_through: position,
            }),
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<i64> {
        self.head.subscribe()
    }

    /// Records that positions `first..=last` are appended on `topics`: called by a writer
    /// before it moves the head past them. Positions skipped since the last record were
    /// another process's, on topics unknown.
    fn record<'a>(&self, first: i64, last: i64, topics: impl Iterator<Item = &'a str>) {
        let mut known = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        if first > known.known_through + 1 {
            known.unknown = known.unknown.max(first - 1);
        }
        known.known_through = known.known_through.max(last);
        for topic in topics {
            match known.last.get_mut(topic) {
                Some(at) => *at = (*at).max(last),
                None => {
                    known.last.insert(topic.to_owned(), last);
                }
            }
        }
    }

    /// `record` of `messages`, appended up to position `last` (None: nothing appended).
    pub(super) fn appended(&self, last: Option<i64>, messages: &[Outgoing]) {
        if let Some(last) = last {
            let first = last + 1 - messages.len() as i64;
            let topics = messages.iter().map(|out| out.envelope.topic.as_str());
            self.record(first, last, topics);
        }
    }

    /// Moves the head to `position`, which this process has recorded. Whether it moved.
    pub(crate) fn advance(&self, position: i64) -> bool {
        self.head.send_if_modified(|head| {
            let moved = position > *head;
            *head = (*head).max(position);
            moved
        })
    }

    /// Moves the head to `position`, seen appended by some process: what this process has
    /// not recorded up to it may be on any topic. Whether it moved.
    pub(crate) fn advance_seen(&self, position: i64) -> bool {
        {
            let mut known = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
            if position > known.known_through {
                known.unknown = position;
                known.known_through = position;
            }
        }
        self.advance(position)
    }

    /// May the log hold a message on one of `topics` after position `after`? False only
    /// when nothing recorded says so. Ask after reading the head: everything up to it has
    /// been recorded by then.
    pub(crate) fn may_hold(&self, topics: &[String], after: i64) -> bool {
        let known = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        known.unknown > after
            || topics
                .iter()
                .any(|topic| known.last.get(topic).is_some_and(|last| *last > after))
    }
}

#[cfg(test)]
mod tests {
    use super::LogHead;

    fn topics(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn what_came_before_the_start_may_be_on_any_topic() {
        let head = LogHead::new(10);
        assert!(head.may_hold(&topics(&["a"]), 9));
        assert!(!head.may_hold(&topics(&["a"]), 10));
    }

    #[test]
    fn a_recorded_append_is_on_its_topics_only() {
        let head = LogHead::new(10);
        head.record(11, 13, ["a", "b"].into_iter());
        head.advance(13);
        assert!(head.may_hold(&topics(&["b"]), 10));
        assert!(head.may_hold(&topics(&["c", "a"]), 12));
        assert!(!head.may_hold(&topics(&["c"]), 10));
        assert!(!head.may_hold(&topics(&["a"]), 13));
        assert_eq!(*head.subscribe().borrow(), 13);
    }

    #[test]
    fn positions_skipped_between_records_were_another_process_s() {
        let head = LogHead::new(10);
        head.record(11, 12, ["a"].into_iter());
        head.record(16, 17, ["a"].into_iter());
        assert!(head.may_hold(&topics(&["c"]), 14));
        assert!(!head.may_hold(&topics(&["c"]), 15));
    }

    #[test]
    fn a_head_seen_past_the_records_may_be_on_any_topic() {
        let head = LogHead::new(10);
        head.record(11, 12, ["a"].into_iter());
        head.advance_seen(12);
        assert!(!head.may_hold(&topics(&["c"]), 10), "its own append");
        head.advance_seen(15);
        assert!(head.may_hold(&topics(&["c"]), 12));
        assert_eq!(*head.subscribe().borrow(), 15);
    }
}
