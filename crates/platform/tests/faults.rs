//! The platform under faults: a full disk, a batch that rolls back, a corrupt log row, a
//! group joined with other handlers, another process committing to the same file, and the
//! retention that keeps the tables bounded.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use platform::conformance::Ping;
use platform::{
    dead_letter, Bus, BusError, ConsumerOptions, Database, HandlerError, Incoming, SqlLog,
    StoreError, Subscription, UnitOfWork,
};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_delays_messages_and_dead_letters_none() {
    let (db, _dir) = open().await;
    publish(&db, 40).await;
    // Each message takes new pages (a big row); the file is held at its size, and filled.
    execute(
        &db,
        "CREATE TABLE received (message_id TEXT PRIMARY KEY, padding BLOB); \
         CREATE TABLE filler (blob BLOB); \
         PRAGMA max_page_count = 1;",
    )
    .await;
    // Until SQLite says the disk is full (which may roll back the transaction it happens in).
    loop {
        let inserted = db
            .write(|uow| {
                let conn = uow.conn();
                Ok::<_, StoreError>(conn.execute("INSERT INTO filler VALUES (zeroblob(512))", ())?)
            })
            .await;
        match inserted {
            Ok(_) => {}
            Err(error) => {
                assert!(error.to_string().contains("full"), "{error}");
                break;
            }
        }
    }

    let receiving = Subscription::new("disk-full").with_options(impatient()).on(
        |incoming: Incoming<Ping>, uow: &mut UnitOfWork| -> Result<(), HandlerError> {
            uow.conn().execute(
                "INSERT INTO received VALUES (?, zeroblob(8192))",
                [incoming.envelope.id.to_string()],
            )?;
            Ok(())
        },
    );
    let consumer = SqlLog::new(db.clone())
        .subscribe(receiving)
        .await
        .expect("subscribe");
    let received = async || scalar::<i64>(&db, "SELECT COUNT(*) FROM received").await;
    // Many times the two attempts the handler has, were the failures counted.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(received().await, 0, "nothing fits on a full disk");

    execute(&db, "DROP TABLE filler; PRAGMA max_page_count = 1000000;").await;
    wait_until("every message handled", async || received().await == 40).await;
    let letters = dead_letter::list(&db, None, 100).await.expect("list");
    assert!(
        letters.is_empty(),
        "dead-lettered on a full disk: {letters:?}"
    );
    consumer.stop().await;
}

#[derive(Debug, thiserror::Error)]
enum Booking {
    #[error("sold out")]
    SoldOut,
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_never_answered_from_a_batch_that_rolled_back() {
    let (db, _dir) = open().await;
    execute(&db, "CREATE TABLE seats (seat TEXT PRIMARY KEY)").await;
    // Hold the writer, so the next three units queue up and share one transaction.
    let holding = tokio::spawn({
        let db = db.clone();
        async move {
            db.write(|_| {
                std::thread::sleep(Duration::from_millis(300));
                Ok::<_, StoreError>(())
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let take_seat = |db: Database| async move {
        db.write(|uow| {
            let taken: bool = uow
                .conn()
                .scalar("SELECT EXISTS (SELECT 1 FROM seats WHERE seat = 'A1')", ())
                .map_err(StoreError::from)?;
            if taken {
                return Err(Booking::SoldOut);
            }
            uow.conn()
                .execute("INSERT INTO seats VALUES ('A1')", ())
                .map_err(StoreError::from)?;
            Ok(())
        })
        .await
    };
    let first = tokio::spawn(take_seat(db.clone()));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = tokio::spawn(take_seat(db.clone()));
    tokio::time::sleep(Duration::from_millis(20)).await;
    // A unit that makes SQLite abandon the whole transaction.
    let breaker = tokio::spawn({
        let db = db.clone();
        async move {
            db.write(|uow| {
                let _ = uow.conn().execute_batch("ROLLBACK");
                Ok::<_, StoreError>(())
            })
            .await
        }
    });
    holding.await.unwrap().expect("the holding unit commits");
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    let _ = breaker.await.unwrap();
    let seats: i64 = scalar(&db, "SELECT COUNT(*) FROM seats").await;
    assert_eq!(seats, 0, "the batch rolled back");
    assert!(
        matches!(first, Err(Booking::Store(StoreError::Commit(_)))),
        "{first:?}"
    );
    assert!(
        matches!(second, Err(Booking::Store(StoreError::Commit(_)))),
        "told sold out for a seat that stayed free: {second:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_row_is_dead_lettered_and_its_partition_moves_on() {
    let (db, _dir) = open().await;
    // One partition, so the corrupt row stands in front of the good ones.
    let options = ConsumerOptions {
        partitions: 1,
        ..impatient()
    };
    let consumer = SqlLog::new(db.clone())
        .subscribe(recording("corrupt").with_options(options))
        .await
        .expect("subscribe");
    execute(
        &db,
        "INSERT INTO conveyor_log \
         (message_id, kind, name, topic, key, key_hash, payload, headers, occurred_at) VALUES \
         ('0190c0de-0000-7000-8000-000000000001', 'notification', 'conformance.Ping', \
          'conformance.pings', 'k', 1, X'7B7D', '{}', 0), \
         ('0190c0de-0000-7000-8000-000000000002', 'event', 'conformance.Ping', \
          'conformance.pings', 'k', 1, X'7B7D', 'not json', 0)",
    )
    .await;
    publish(&db, 3).await;
    wait_until("the good messages handled", async || {
        handled(&db).await == 3
    })
    .await;
    let letters = dead_letter::list(&db, Some("corrupt"), 10)
        .await
        .expect("list");
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(
        letters[0].error.contains("unknown kind notification"),
        "{}",
        letters[0].error
    );
    assert!(letters[1].error.contains("headers"), "{}", letters[1].error);
    assert!(letters.iter().all(|letter| letter.envelope.is_err()));
    let replayed = dead_letter::replay(&db, letters[0].id).await;
    assert!(
        matches!(replayed, Err(StoreError::Undecodable(_))),
        "{replayed:?}"
    );
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_other_handlers_or_partitions_is_refused() {
    let (db, _dir) = open().await;
    let bus = SqlLog::new(db.clone());
    let old = bus
        .subscribe(handling_pings("versions", 4))
        .await
        .expect("the first member");
    let newer = handling_pings("versions", 4).on(|_: Incoming<Pong>, _: &mut UnitOfWork| Ok(()));
    let refused = bus.subscribe(newer).await.err().expect("refused");
    assert!(
        matches!(&refused, BusError::SubscriptionMismatch { .. }),
        "{refused}"
    );
    assert!(
        refused.to_string().contains("conformance.Pong"),
        "{refused}"
    );
    for partitions in [2, 8] {
        let changed = bus.subscribe(handling_pings("versions", partitions)).await;
        assert!(
            matches!(changed, Err(BusError::PartitionMismatch { .. })),
            "{partitions} partitions"
        );
    }
    let same = bus
        .subscribe(handling_pings("versions", 4))
        .await
        .expect("a member like the others joins");
    same.stop().await;
    old.stop().await;
    // With no live member left, the group takes the new handlers.
    let upgraded = handling_pings("versions", 4).on(|_: Incoming<Pong>, _: &mut UnitOfWork| Ok(()));
    bus.subscribe(upgraded)
        .await
        .expect("the upgrade, once the old members left")
        .stop()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_lapsed_while_the_group_took_other_handlers_stops() {
    let (db, _dir) = open().await;
    let bus = SqlLog::new(db.clone());
    let old = bus
        .subscribe(handling_pings("lapsing", 4))
        .await
        .expect("the old member");
    // As if the old member's process stalled past its lease and was dropped meanwhile. The
    // old member does not stall, so its next renewal may come before the new one joins: then
    // the new one is refused, and the stall is played again.
    let mut attempts = 0;
    let new = loop {
        execute(
            &db,
            "DELETE FROM conveyor_members WHERE group_name = 'lapsing'",
        )
        .await;
        let newer = handling_pings("lapsing", 4).on(|_: Incoming<Pong>, _: &mut UnitOfWork| Ok(()));
        match bus.subscribe(newer).await {
            Ok(new) => break new,
            Err(BusError::SubscriptionMismatch { .. }) if attempts < 5 => attempts += 1,
            Err(error) => panic!("the new version does not join: {error}"),
        }
    };
    let owners = async || {
        scalar::<i64>(
            &db,
            "SELECT COUNT(DISTINCT owner) FROM conveyor_partitions \
             WHERE group_name = 'lapsing' AND owner IS NOT NULL",
        )
        .await
    };
    let members = async || {
        scalar::<i64>(
            &db,
            "SELECT COUNT(*) FROM conveyor_members WHERE group_name = 'lapsing'",
        )
        .await
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(members().await, 1, "the lapsed member came back");
    wait_until("one owner of every partition", async || owners().await == 1).await;
    let free: i64 = scalar(
        &db,
        "SELECT COUNT(*) FROM conveyor_partitions WHERE group_name = 'lapsing' AND owner IS NULL",
    )
    .await;
    assert_eq!(free, 0, "the new member took them all");
    new.stop().await;
    old.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_of_another_process_wakes_consumers_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let consuming = open_at(&dir).await;
    // A second handle with its own writer on the same file, as another process has.
    let producing = Database::open(&dir.path().join("faults.db"))
        .await
        .expect("open again");
    let consumer = SqlLog::new(consuming.clone())
        .subscribe(recording("woken"))
        .await
        .expect("subscribe");
    // Let every lane go idle, waiting for a wake-up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut slowest = Duration::ZERO;
    for round in 1..=10 {
        let published = Instant::now();
        publish(&producing, 1).await;
        wait_until("handled", async || handled(&consuming).await == round).await;
        slowest = slowest.max(published.elapsed());
    }
    // The safety poll is 5 s; a wake-up is milliseconds (the benchmark measures it).
    assert!(slowest < Duration::from_secs(1), "slowest {slowest:?}");
    consumer.stop().await;
    producing.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_wait_out_another_process_holding_the_write_lock() {
    let (db, dir) = open().await;
    execute(&db, "CREATE TABLE waited (n INTEGER)").await;
    // Another process's long write transaction, past the writer's 5 s busy timeout.
    let path = dir.path().join("faults.db");
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(6));
        conn.execute_batch("COMMIT").unwrap();
    });
    locked.recv().unwrap();
    let written = db
        .write(|uow| Ok::<_, StoreError>(uow.conn().execute("INSERT INTO waited VALUES (1)", ())?))
        .await;
    holder.join().unwrap();
    assert!(written.is_ok(), "{written:?}");
    assert_eq!(scalar::<i64>(&db, "SELECT COUNT(*) FROM waited").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_slow_handlers_holds_the_writer_no_longer_than_one_handler_may() {
    let (db, _dir) = open().await;
    let options = ConsumerOptions {
        partitions: 1,
        batch: 32,
        lease: Duration::from_secs(2),
        handler_timeout: Duration::from_millis(300),
        ..ConsumerOptions::default()
    };
    // Each handler takes a fifth of its limit; a batch of 32 would take six limits.
    let slow = Subscription::new("slow").with_options(options).on(
        |incoming: Incoming<Ping>, uow: &mut UnitOfWork| -> Result<(), HandlerError> {
            std::thread::sleep(Duration::from_millis(60));
            uow.conn().execute(
                "INSERT INTO conformance_handled (group_name, consumer, message_id, key, seq) \
                 VALUES ('slow', 'c', ?, 'k', 0)",
                [incoming.envelope.id.to_string()],
            )?;
            Ok(())
        },
    );
    publish(&db, 32).await;
    let consumer = SqlLog::new(db.clone())
        .subscribe(slow)
        .await
        .expect("subscribe");
    let mut longest = Duration::ZERO;
    while handled(&db).await < 32 {
        let started = Instant::now();
        db.write(|_| Ok::<_, StoreError>(()))
            .await
            .expect("a write");
        longest = longest.max(started.elapsed());
    }
    assert!(
        longest < Duration::from_secs(1),
        "another write waited {longest:?}"
    );
    let letters = dead_letter::list(&db, None, 10).await.expect("list");
    assert!(letters.is_empty(), "{letters:?}");
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_while_another_process_keeps_the_file_locked_abandons_the_queued_units() {
    let (db, dir) = open().await;
    let path = dir.path().join("faults.db");
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let (release_tx, release) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked_tx.send(()).unwrap();
        let _ = release.recv_timeout(Duration::from_secs(60));
        conn.execute_batch("COMMIT").unwrap();
    });
    locked.recv().unwrap();
    let queued = tokio::spawn({
        let db = db.clone();
        async move { db.write(|_| Ok::<_, StoreError>(())).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // One busy timeout (5 s) to notice, not as long as the lock is held.
    let closed = tokio::time::timeout(Duration::from_secs(12), db.close()).await;
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    assert!(closed.is_ok(), "close waited for the lock");
    let told = queued.await.unwrap();
    assert!(matches!(told, Err(StoreError::Abandoned)), "{told:?}");
}
