//! Batch handlers (`Subscription::on_batch`), idempotent groups, lingering for a fuller
//! batch, and the log's topic watch and backlog, on SQLite, PostgreSQL and MariaDB.

#![allow(clippy::unwrap_used)]

mod common;

use common::{impatient, publish, scalar, wait_until};
use platform::conformance::{Ping, MIGRATIONS};
use platform::testing::Scratch;
use platform::{
    Bus, ConsumerOptions, Database, HandlerError, Incoming, SqlLog, Subscription, UnitOfWork,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

on_every_backend!(
    a_batch_handler_takes_many_messages_in_one_call_and_each_is_marked_handled,
    a_message_failing_a_batch_is_dead_lettered_alone_and_the_rest_are_handled,
    a_backlog_keeps_its_order_and_loses_nothing_when_a_batch_deep_in_it_fails,
    an_idempotent_group_handles_everything_and_writes_no_inbox_marks,
    a_lingering_consumer_waits_for_a_fuller_batch,
    a_consumer_lingering_only_under_load_handles_a_message_at_rest_at_once,
    the_topic_watch_moves_when_a_message_on_its_topic_commits,
    the_backlog_counts_what_waits_in_each_partition,
);

async fn migrated(scratch: &Scratch) -> Database {
    let db = scratch.open().await;
    db.migrate(MIGRATIONS).await.unwrap();
    db
}

/// Sizes of the handler's calls, and a handler recording each ping it gets; a ping whose
/// `seq` is `poison` fails its call permanently.
fn batch_recorder(poison: Option<u32>) -> (Arc<Mutex<Vec<usize>>>, Subscription) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let recorded = calls.clone();
    let subscription = Subscription::new("batches.recorder").on_batch(
        move |pings: Vec<Incoming<Ping>>, uow: &mut UnitOfWork| -> Result<(), HandlerError> {
            if pings.iter().any(|ping| Some(ping.message.seq) == poison) {
                return Err(HandlerError::permanent("poisoned"));
            }
            for ping in &pings {
                uow.conn().execute(
                    "INSERT INTO conformance_handled (group_name, consumer, message_id, \"key\", seq) \
                     VALUES ('batches.recorder', 'c', ?, ?, ?)",
                    (
                        ping.envelope.id.to_string(),
                        &ping.message.key,
                        ping.message.seq,
                    ),
                )?;
            }
            recorded.lock().unwrap().push(pings.len());
            Ok(())
        },
    );
    (calls, subscription)
}

async fn handled(db: &Database) -> i64 {
    scalar(db, "SELECT COUNT(*) FROM conformance_handled").await
}

async fn a_batch_handler_takes_many_messages_in_one_call_and_each_is_marked_handled(
    scratch: Scratch,
) {
    let db = migrated(&scratch).await;
    publish(&db, 60).await;
    let (calls, subscription) = batch_recorder(None);
    let consumer = SqlLog::new(db.clone())
        .subscribe(subscription.with_options(ConsumerOptions {
            partitions: 1,
            ..impatient()
        }))
        .await
        .unwrap();
    wait_until("60 pings handled", async || handled(&db).await == 60).await;
    consumer.stop().await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.iter().sum::<usize>(), 60);
    assert!(calls.len() < 60, "one call per message: {calls:?}");
    let marks: i64 = scalar(
        &db,
        "SELECT COUNT(*) FROM conveyor_inbox WHERE group_name = 'batches.recorder'",
    )
    .await;
    assert_eq!(marks, 60);
    db.close().await;
}

async fn a_message_failing_a_batch_is_dead_lettered_alone_and_the_rest_are_handled(
    scratch: Scratch,
) {
    let db = migrated(&scratch).await;
    publish(&db, 40).await;
    let (_calls, subscription) = batch_recorder(Some(17));
    let consumer = SqlLog::new(db.clone())
        .subscribe(subscription.with_options(impatient()))
        .await
        .unwrap();
    wait_until("the other 39 pings handled", async || {
        handled(&db).await == 39
    })
    .await;
    wait_until("ping 17 dead-lettered", async || {
        scalar::<i64>(&db, "SELECT COUNT(*) FROM conveyor_dead_letters").await == 1
    })
    .await;
    consumer.stop().await;
    let seventeen: i64 = scalar(
        &db,
        "SELECT COUNT(*) FROM conformance_handled WHERE seq = 17",
    )
    .await;
    assert_eq!(seventeen, 0);
    db.close().await;
}

/// A lane reads a backlog's next batch while the writer commits the one in hand: the batch
/// read past a failing one must be read again after the failure is dealt with, not
/// delivered past it.
async fn a_backlog_keeps_its_order_and_loses_nothing_when_a_batch_deep_in_it_fails(
    scratch: Scratch,
) {
    let db = migrated(&scratch).await;
    publish(&db, 200).await;
    let (_calls, subscription) = batch_recorder(Some(150));
    let consumer = SqlLog::new(db.clone())
        .subscribe(subscription.with_options(ConsumerOptions {
            partitions: 1,
            batch: 16,
            ..impatient()
        }))
        .await
        .unwrap();
    wait_until("ping 150 dead-lettered", async || {
        scalar::<i64>(&db, "SELECT COUNT(*) FROM conveyor_dead_letters").await == 1
    })
    .await;
    wait_until("the other 199 pings handled", async || {
        handled(&db).await == 199
    })
    .await;
    consumer.stop().await;
    let seqs: Vec<i64> = db
        .read(|conn| {
            Ok::<_, platform::StoreError>(conn.query_map(
                "SELECT seq FROM conformance_handled ORDER BY row_id",
                (),
                |row| row.get(0),
            )?)
        })
        .await
        .unwrap();
    assert_eq!(
        seqs,
        (0..200).filter(|seq| *seq != 150).collect::<Vec<i64>>()
    );
    db.close().await;
}

async fn an_idempotent_group_handles_everything_and_writes_no_inbox_marks(scratch: Scratch) {
    let db = migrated(&scratch).await;
    publish(&db, 30).await;
    let (_calls, subscription) = batch_recorder(None);
    let consumer = SqlLog::new(db.clone())
        .subscribe(subscription.idempotent().with_options(impatient()))
        .await
        .unwrap();
    wait_until("30 pings handled", async || handled(&db).await == 30).await;
    consumer.stop().await;
    let marks: i64 = scalar(&db, "SELECT COUNT(*) FROM conveyor_inbox").await;
    assert_eq!(marks, 0);
    db.close().await;
}

async fn a_lingering_consumer_waits_for_a_fuller_batch(scratch: Scratch) {
    let db = migrated(&scratch).await;
    let (calls, subscription) = batch_recorder(None);
    let consumer = SqlLog::new(db.clone())
        .subscribe(subscription.with_options(ConsumerOptions {
            partitions: 1,
            linger: Duration::from_millis(800),
            ..impatient()
        }))
        .await
        .unwrap();
    publish(&db, 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    publish(&db, 1).await;
    wait_until("both pings handled", async || handled(&db).await == 2).await;
    consumer.stop().await;
    assert_eq!(
        *calls.lock().unwrap(),
        [2],
        "the first ping did not wait for the second"
    );
    db.close().await;
}

/// `linger_at_rest: false`: with the writers idle a message is handled without the linger;
/// while they run batches of several units, a short read waits for more. The second half
/// needs another process to publish while this one's writers are busy: a server (SQLite's
/// one writer would hold the file's lock).
async fn a_consumer_lingering_only_under_load_handles_a_message_at_rest_at_once(scratch: Scratch) {
    let db = migrated(&scratch).await;
    let (calls, subscription) = batch_recorder(None);
    let linger = Duration::from_secs(3);
    let consumer = SqlLog::new(db.clone())
        .subscribe(subscription.with_options(ConsumerOptions {
            partitions: 1,
            linger,
            linger_at_rest: false,
            ..impatient()
        }))
        .await
        .unwrap();
    let published = std::time::Instant::now();
    publish(&db, 1).await;
    wait_until("the ping at rest handled", async || handled(&db).await == 1).await;
    assert!(
        published.elapsed() < linger / 2,
        "the ping at rest waited {:?}",
        published.elapsed()
    );
    let mut expected = vec![1];
    if db.backend() != platform::Backend::Sqlite {
        // Under load: two units running on this process's writers, while another process
        // publishes a ping, then another. A short unit ahead of them holds a writer, so
        // that the two queue behind it: one writer then takes both in one batch, where it
        // might have taken the first alone; of two writers, each runs one.
        let sleeping = |millis| {
            let db = db.clone();
            tokio::spawn(async move {
                db.write(move |_uow| {
                    std::thread::sleep(Duration::from_millis(millis));
                    Ok::<_, platform::StoreError>(())
                })
                .await
            })
        };
        let ahead = sleeping(300);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let units = [ahead, sleeping(1500), sleeping(1500)];
        tokio::time::sleep(Duration::from_millis(350)).await;
        let other = scratch.open().await;
        publish(&other, 1).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        publish(&other, 1).await;
        for unit in units {
            unit.await.unwrap().unwrap();
        }
        wait_until("the pings under load handled", async || {
            handled(&db).await == 3
        })
        .await;
        other.close().await;
        expected.push(2);
    }
    consumer.stop().await;
    assert_eq!(
        *calls.lock().unwrap(),
        expected,
        "the ping read under load did not wait for the next"
    );
    db.close().await;
}

async fn the_topic_watch_moves_when_a_message_on_its_topic_commits(scratch: Scratch) {
    let db = migrated(&scratch).await;
    let mut watch = SqlLog::new(db.clone()).watch("conformance.pings");
    // Nothing on the topic yet.
    assert_eq!(*watch.borrow_and_update(), 0);
    publish(&db, 3).await;
    tokio::time::timeout(Duration::from_secs(5), watch.changed())
        .await
        .expect("the watch moved")
        .unwrap();
    let last: i64 = scalar(&db, "SELECT MAX(position) FROM conveyor_log").await;
    assert_eq!(*watch.borrow(), last);
    db.close().await;
}

async fn the_backlog_counts_what_waits_in_each_partition(scratch: Scratch) {
    let db = migrated(&scratch).await;
    let log = SqlLog::new(db.clone());
    publish(&db, 25).await;
    // Before any member joined, everything waits.
    assert_eq!(
        log.backlog("batches.recorder", "conformance.pings")
            .await
            .unwrap(),
        25
    );
    let (_calls, subscription) = batch_recorder(None);
    let consumer = log
        .subscribe(subscription.with_options(impatient()))
        .await
        .unwrap();
    wait_until("25 pings handled", async || handled(&db).await == 25).await;
    consumer.stop().await;
    // Every partition caught up, whichever keys it holds (five keys over four partitions).
    assert_eq!(
        log.backlog("batches.recorder", "conformance.pings")
            .await
            .unwrap(),
        0
    );
    publish(&db, 10).await;
    assert_eq!(
        log.backlog("batches.recorder", "conformance.pings")
            .await
            .unwrap(),
        10
    );
    db.close().await;
}

/// A replayed dead letter is appended again with its id; after a crash between recording
/// the dead letter and acknowledging the original, both copies can come in one read. Made
/// here directly, on SQLite, by copying a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_of_one_message_in_a_read_are_handled_once() {
    let scratch = Scratch::new(platform::Backend::Sqlite).await;
    let db = migrated(&scratch).await;
    publish(&db, 1).await;
    common::execute(
        &db,
        "INSERT INTO conveyor_log (message_id, kind, name, topic, \"key\", key_hash, payload, \
         headers, occurred_at, only_group) \
         SELECT message_id, kind, name, topic, \"key\", key_hash, payload, headers, \
         occurred_at, 'batches.recorder' FROM conveyor_log",
    )
    .await;
    let (calls, subscription) = batch_recorder(None);
    let consumer = SqlLog::new(db.clone())
        .subscribe(subscription.with_options(ConsumerOptions {
            partitions: 1,
            ..impatient()
        }))
        .await
        .unwrap();
    wait_until("the copies read", async || {
        !calls.lock().unwrap().is_empty()
    })
    .await;
    // Let a second handling, if any, commit.
    tokio::time::sleep(Duration::from_millis(200)).await;
    consumer.stop().await;
    assert_eq!(handled(&db).await, 1);
    assert_eq!(*calls.lock().unwrap(), [1]);
    db.close().await;
}
