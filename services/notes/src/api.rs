//! The notes service's messages: the command its API queues and the event its workers
//! publish once a batch of notes is written.

use platform::{Kind, Message};
use serde::{Deserialize, Serialize};

/// Write this note. Queued by `POST /save`, handled by the workers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveNote {
    pub id: String,
    pub content: String,
    /// When the API accepted it, in Unix milliseconds.
    pub created_at: i64,
}

impl Message for SaveNote {
    const NAME: &'static str = "notes.SaveNote";
    const TOPIC: &'static str = "notes.commands";
    const KIND: Kind = Kind::Command;

    fn key(&self) -> String {
        self.id.clone()
    }
}

/// A batch of notes was written and can be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotesWritten {
    /// How many notes the batch wrote (a note queued twice counts once it is stored).
    pub count: usize,
    /// The newest note's id.
    pub newest: String,
}

impl Message for NotesWritten {
    const NAME: &'static str = "notes.NotesWritten";
    const TOPIC: &'static str = "notes.events";

    fn key(&self) -> String {
        self.newest.clone()
    }
}
