//! The unit of work: all or nothing per unit, also when many share one group commit.

use futures::FutureExt;
use platform::conformance::{Ping, MIGRATIONS};
use platform::{Database, StoreError};

async fn open() -> (Database, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Database::open(&dir.path().join("uow.db"))
        .await
        .expect("open");
    db.migrate(MIGRATIONS).await.expect("migrate");
    (db, dir)
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("refused")]
    Refused,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Writes a row and emits a message, then fails when `seq` is odd (and panics for 7).
async fn write(db: Database, seq: u32) -> Result<(), Failure> {
    db.write(move |uow| {
        async move {
            sqlx::query("INSERT INTO conformance_handled (group_name, consumer, message_id, key, seq) VALUES ('g', 'c', 'm', 'k', ?)")
                .bind(seq)
                .execute(uow.conn())
                .await
                .map_err(StoreError::from)?;
            uow.emit(&Ping { key: "k".into(), seq })?;
            assert_ne!(seq, 7, "a unit of work that panics");
            if seq % 2 == 1 {
                return Err(Failure::Refused);
            }
            Ok(())
        }
        .boxed()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_units_roll_back_alone_and_their_messages_are_never_published() {
    let (db, _dir) = open().await;
    let writes: Vec<_> = (0..200)
        .map(|seq| tokio::spawn(write(db.clone(), seq)))
        .collect();
    for (seq, handle) in writes.into_iter().enumerate() {
        let result = handle.await.expect("join");
        match seq {
            7 => assert!(
                matches!(result, Err(Failure::Store(StoreError::Abandoned))),
                "{result:?}"
            ),
            _ if seq % 2 == 1 => assert!(matches!(result, Err(Failure::Refused)), "{result:?}"),
            _ => assert!(result.is_ok(), "{seq}: {result:?}"),
        }
    }
    let rows: Vec<i64> = sqlx::query_scalar("SELECT seq FROM conformance_handled ORDER BY seq")
        .fetch_all(db.reader())
        .await
        .expect("rows");
    assert_eq!(rows, (0..200).step_by(2).collect::<Vec<i64>>());
    let published: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM conveyor_log")
        .fetch_one(db.reader())
        .await
        .expect("count");
    assert_eq!(published, 100);
    assert_eq!(
        *db.head().borrow(),
        100,
        "the head is the last committed position"
    );
}

#[tokio::test]
async fn a_lone_failing_unit_rolls_back_and_the_next_one_commits() {
    let (db, _dir) = open().await;
    assert!(matches!(write(db.clone(), 1).await, Err(Failure::Refused)));
    write(db.clone(), 2).await.expect("commits");
    let rows: Vec<i64> = sqlx::query_scalar("SELECT seq FROM conformance_handled")
        .fetch_all(db.reader())
        .await
        .expect("rows");
    assert_eq!(rows, vec![2]);
}

#[tokio::test]
async fn what_committed_is_there_after_reopening() {
    let (db, dir) = open().await;
    write(db.clone(), 4).await.expect("commits");
    db.close().await;
    let reopened = Database::open(&dir.path().join("uow.db"))
        .await
        .expect("reopen");
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM conformance_handled")
        .fetch_one(reopened.reader())
        .await
        .expect("count");
    assert_eq!(count, 1);
    assert_eq!(*reopened.head().borrow(), 1);
}

#[tokio::test]
async fn a_unit_may_emit_more_messages_than_one_insert_holds() {
    let (db, _dir) = open().await;
    db.write(|uow| {
        async move {
            for seq in 0..1200 {
                uow.emit(&Ping {
                    key: format!("k{}", seq % 7),
                    seq,
                })?;
            }
            Ok::<_, StoreError>(())
        }
        .boxed()
    })
    .await
    .expect("commits");
    let payloads: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT payload FROM conveyor_log ORDER BY position")
            .fetch_all(db.reader())
            .await
            .expect("log");
    let seqs: Vec<u32> = payloads
        .iter()
        .map(|payload| serde_json::from_slice::<Ping>(payload).expect("ping").seq)
        .collect();
    assert_eq!(seqs, (0..1200).collect::<Vec<u32>>());
    assert_eq!(*db.head().borrow(), 1200);
}

#[tokio::test]
async fn a_lease_shorter_than_two_handler_timeouts_is_refused() {
    use platform::{
        Bus, BusError, ConsumerOptions, HandlerError, Incoming, SqlLog, Subscription, UnitOfWork,
    };
    use std::time::Duration;
    let (db, _dir) = open().await;
    let options = ConsumerOptions {
        lease: Duration::from_secs(5),
        handler_timeout: Duration::from_secs(3),
        ..ConsumerOptions::default()
    };
    let subscription = Subscription::new("impatient").with_options(options).on(
        |_incoming: Incoming<Ping>, _uow: &mut UnitOfWork| {
            async { Ok::<(), HandlerError>(()) }.boxed()
        },
    );
    let refused = SqlLog::new(db.clone()).subscribe(subscription).await;
    assert!(matches!(refused, Err(BusError::LeaseTooShort { .. })));
}
