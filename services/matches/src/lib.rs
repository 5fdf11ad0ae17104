//! GoGo matches: Go games with the real rules. So far its domain only (`domain`: the board,
//! the moves, the events, the scoring); the event store, the command and query services
//! and their HTTP API come with the rest of the matches issue.

pub mod domain;
