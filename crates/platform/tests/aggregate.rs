//! Aggregates on the event store, on SQLite, PostgreSQL and MariaDB: a command's events are
//! appended and published under each variant's own name; loading from a snapshot plus its
//! tail equals a full replay; a snapshot in an old shape is ignored; an event stored at an
//! old revision is upcast on load.

#![allow(clippy::unwrap_used)]

mod common;

use common::scalar;
use platform::aggregate::{self, Cache, ExecuteError, Executed, Loaded};
use platform::event_store::EventStoreError;
use platform::testing::Scratch;
use platform::{Aggregate, Message, Snapshots, StoreError, Upcaster};
use serde::{Deserialize, Serialize};

on_every_backend!(
    each_event_is_stored_and_published_under_its_own_name,
    a_refused_command_appends_nothing,
    a_snapshot_plus_its_tail_loads_what_a_replay_does,
    a_snapshot_in_another_shape_is_ignored,
    an_event_stored_at_an_old_revision_loads_as_its_new_form,
    a_command_from_an_older_cached_state_reads_the_events_since,
);

/// A running total: the smallest aggregate with two kinds of events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Tally {
    total: i64,
    changes: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
enum Changed {
    /// Revision 1 called `amount` `n`.
    Added {
        amount: i64,
    },
    Cleared,
}

impl Message for Changed {
    const NAME: &'static str = "tests.Changed";
    const TOPIC: &'static str = "tests.events";
    const NAMES: &'static [&'static str] = &["tests.Added", "tests.Cleared"];
    const UPCASTERS: &'static [Upcaster] = &[Upcaster {
        name: "tests.Added",
        from: 1,
        map: rename_n_to_amount,
    }];

    fn key(&self) -> String {
        "tally".to_owned()
    }

    fn name(&self) -> &'static str {
        match self {
            Changed::Added { .. } => "tests.Added",
            Changed::Cleared => "tests.Cleared",
        }
    }
}

fn rename_n_to_amount(mut value: serde_json::Value) -> Result<serde_json::Value, String> {
    let object = value.as_object_mut().ok_or("not an object")?;
    let n = object.remove("n").ok_or("no `n`")?;
    object.insert("amount".to_owned(), n);
    Ok(value)
}

#[derive(Debug)]
enum Command {
    Add(i64),
    Clear,
}

#[derive(Debug, PartialEq)]
struct NothingToClear;

impl Aggregate for Tally {
    type Event = Changed;
    type Command = Command;
    type Error = NothingToClear;

    fn decide(&self, command: &Command) -> Result<Vec<Changed>, NothingToClear> {
        match command {
            Command::Add(amount) => Ok(vec![Changed::Added { amount: *amount }]),
            Command::Clear if self.total == 0 => Err(NothingToClear),
            Command::Clear => Ok(vec![Changed::Cleared]),
        }
    }

    fn apply(&mut self, event: &Changed) {
        match event {
            Changed::Added { amount } => self.total += amount,
            Changed::Cleared => self.total = 0,
        }
        self.changes += 1;
    }
}

async fn execute(
    db: &platform::Database,
    snapshots: Snapshots,
    command: Command,
) -> Result<Executed<Tally>, ExecuteError<NothingToClear>> {
    let command = std::sync::Arc::new(command);
    db.write(move |uow| aggregate::execute::<Tally>(uow, "tally", snapshots, &command))
        .await
}

async fn load(db: &platform::Database) -> (Loaded<Tally>, Loaded<Tally>) {
    db.read(|conn| {
        Ok::<_, EventStoreError>((
            aggregate::load::<Tally>(conn, "tally")?,
            aggregate::replay::<Tally>(conn, "tally")?,
        ))
    })
    .await
    .unwrap()
}

/// Replaces the snapshot's state with a total of 1000, in `shape`.
async fn doctor_snapshot(db: &platform::Database, shape: i64) {
    db.write(move |uow| {
        Ok::<_, StoreError>(uow.conn().execute(
            "UPDATE conveyor_snapshots SET shape = ?, state = ?",
            (shape, br#"{"total":1000,"changes":8}"#.to_vec()),
        )?)
    })
    .await
    .unwrap();
}

async fn each_event_is_stored_and_published_under_its_own_name(scratch: Scratch) {
    let db = scratch.open().await;
    for command in [Command::Add(2), Command::Clear, Command::Add(5)] {
        execute(&db, Snapshots::OFF, command).await.unwrap();
    }
    let names = |table: &'static str| {
        let db = db.clone();
        async move {
            db.read(move |conn| {
                Ok::<_, StoreError>(conn.query_map(
                    &format!("SELECT name FROM {table}"),
                    (),
                    |row| row.get::<String>(0),
                )?)
            })
            .await
            .unwrap()
        }
    };
    let expected = ["tests.Added", "tests.Cleared", "tests.Added"];
    assert_eq!(names("conveyor_events ORDER BY version").await, expected);
    assert_eq!(names("conveyor_log ORDER BY position").await, expected);
    let (loaded, _) = load(&db).await;
    assert_eq!(
        loaded,
        Loaded {
            state: Tally {
                total: 5,
                changes: 3
            },
            version: 3
        }
    );
    db.close().await;
}

async fn a_refused_command_appends_nothing(scratch: Scratch) {
    let db = scratch.open().await;
    let refused = execute(&db, Snapshots::OFF, Command::Clear).await;
    assert!(
        matches!(refused, Err(ExecuteError::Refused(NothingToClear))),
        "{refused:?}"
    );
    let stored: i64 = scalar(&db, "SELECT COUNT(*) FROM conveyor_events").await;
    let published: i64 = scalar(&db, "SELECT COUNT(*) FROM conveyor_log").await;
    assert_eq!((stored, published), (0, 0));
    db.close().await;
}

async fn a_snapshot_plus_its_tail_loads_what_a_replay_does(scratch: Scratch) {
    let db = scratch.open().await;
    for amount in 1..=10 {
        let executed = execute(&db, Snapshots::every(4), Command::Add(amount))
            .await
            .unwrap();
        assert_eq!(executed.version, amount as u64);
    }
    let snapshot_version: i64 = scalar(&db, "SELECT version FROM conveyor_snapshots").await;
    assert_eq!(snapshot_version, 8, "the newest multiple of 4");
    let (loaded, replayed) = load(&db).await;
    assert_eq!(loaded, replayed);
    assert_eq!(loaded.state.total, 55);
    // Proof that the load starts from the snapshot, not from the first event: a doctored
    // snapshot shows through, a replay ignores it.
    doctor_snapshot(&db, 1).await;
    let (loaded, replayed) = load(&db).await;
    assert_eq!(loaded.state.total, 1000 + 9 + 10);
    assert_eq!(replayed.state.total, 55);
    db.close().await;
}

async fn a_snapshot_in_another_shape_is_ignored(scratch: Scratch) {
    let db = scratch.open().await;
    for amount in 1..=4 {
        execute(&db, Snapshots::every(2), Command::Add(amount))
            .await
            .unwrap();
    }
    doctor_snapshot(&db, 99).await;
    let (loaded, replayed) = load(&db).await;
    assert_eq!(loaded, replayed);
    assert_eq!(loaded.state.total, 10);
    db.close().await;
}

async fn an_event_stored_at_an_old_revision_loads_as_its_new_form(scratch: Scratch) {
    let db = scratch.open().await;
    // What an older build wrote: revision 1 of tests.Added, with `n`.
    db.write(|uow| {
        Ok::<_, StoreError>(uow.conn().execute(
            "INSERT INTO conveyor_events (stream_id, version, name, revision, payload, recorded_at) \
             VALUES ('tally', 1, 'tests.Added', 1, ?, 0)",
            [br#"{"type":"Added","n":7}"#.to_vec()],
        )?)
    })
    .await
    .unwrap();
    let executed = execute(&db, Snapshots::OFF, Command::Add(3)).await.unwrap();
    assert_eq!(executed.state.total, 10, "decided on the upcast old event");
    let revisions: Vec<i64> = db
        .read(|conn| {
            Ok::<_, StoreError>(conn.query_map(
                "SELECT revision FROM conveyor_events ORDER BY version",
                (),
                |row| row.get(0),
            )?)
        })
        .await
        .unwrap();
    assert_eq!(
        revisions,
        [1, 2],
        "new events are written at the newest revision"
    );
    let header: String = scalar(&db, "SELECT headers FROM conveyor_log").await;
    assert!(header.contains("\"revision\":\"2\""), "{header}");
    let (loaded, _) = load(&db).await;
    assert_eq!(loaded.state.total, 10);
    db.close().await;
}

proptest::proptest! {
    /// Whatever an old event held, upcast it is the event written today, and a tally
    /// replayed from either form ends the same.
    #[test]
    fn an_upcast_old_event_is_its_new_form(amounts in proptest::collection::vec(-1_000_000i64..1_000_000, 0..20)) {
        let (mut from_old, mut from_new) = (Tally::default(), Tally::default());
        for amount in amounts {
            let old = serde_json::to_vec(&serde_json::json!({"type": "Added", "n": amount})).unwrap();
            let new = serde_json::to_vec(&Changed::Added { amount }).unwrap();
            let upcast: Changed = platform::envelope::decode("tests.Added", 1, &old).unwrap();
            let current: Changed = platform::envelope::decode("tests.Added", 2, &new).unwrap();
            proptest::prop_assert_eq!(&upcast, &current);
            from_old.apply(&upcast);
            from_new.apply(&current);
        }
        proptest::prop_assert_eq!(from_old, from_new);
    }
}

async fn a_command_from_an_older_cached_state_reads_the_events_since(scratch: Scratch) {
    let db = scratch.open().await;
    let cache = Cache::<Tally>::new(10);
    let first = execute(&db, Snapshots::OFF, Command::Add(1)).await.unwrap();
    cache.put(
        "tally",
        Loaded {
            state: first.state,
            version: first.version,
        },
    );
    // Another process moves the stream on; this one's cache still holds version 1.
    for amount in [10, 100] {
        execute(&db, Snapshots::OFF, Command::Add(amount))
            .await
            .unwrap();
    }
    let known = cache.get("tally");
    assert_eq!(known.as_ref().map(|known| known.version), Some(1));
    let executed = db
        .write(move |uow| {
            aggregate::execute_from::<Tally>(
                uow,
                "tally",
                known.clone(),
                Snapshots::OFF,
                &Command::Add(1000),
            )
        })
        .await
        .unwrap();
    assert_eq!((executed.state.total, executed.version), (1111, 4));
    cache.put(
        "tally",
        Loaded {
            state: executed.state.clone(),
            version: executed.version,
        },
    );
    // An older state never replaces a newer one.
    cache.put("tally", Loaded::default());
    assert_eq!(cache.get("tally").map(|kept| kept.version), Some(4));
    let (loaded, _) = load(&db).await;
    assert_eq!(loaded.state.total, 1111);
    db.close().await;
}
