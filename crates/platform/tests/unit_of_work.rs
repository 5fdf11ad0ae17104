//! The storage conformance suite: the unit of work is all or nothing per unit, also when
//! many share one group commit, on SQLite, PostgreSQL and MariaDB alike. The time-limit
//! tests at the end are SQLite's: only its statements can be interrupted.

mod common;

use platform::conformance::{Ping, MIGRATIONS};
use platform::sql::Conn;
use platform::sql::FromValue;
use platform::testing::Scratch;
use platform::{Backend, Bus, Database, SqlLog, StoreError};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn open(scratch: &Scratch) -> Database {
    let db = scratch.open().await;
    db.migrate(MIGRATIONS).await.expect("migrate");
    db
}

/// The first column of every row `sql` selects.
async fn column<T: FromValue + Send + 'static>(db: &Database, sql: &'static str) -> Vec<T> {
    db.read(move |conn| Ok::<_, StoreError>(conn.query_map(sql, (), |row| row.get(0))?))
        .await
        .expect(sql)
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
        uow.conn()
            .execute(
                "INSERT INTO conformance_handled (group_name, consumer, message_id, \"key\", seq) \
                 VALUES ('g', 'c', 'm', 'k', ?)",
                [seq],
            )
            .map_err(StoreError::from)?;
        uow.emit(&Ping {
            key: "k".into(),
            seq,
        })?;
        assert_ne!(seq, 7, "a unit of work that panics");
        if seq % 2 == 1 {
            return Err(Failure::Refused);
        }
        Ok(())
    })
    .await
}

on_every_backend!(
    failing_units_roll_back_alone_and_their_messages_are_never_published,
    a_lone_failing_unit_rolls_back_and_the_next_one_commits,
    what_committed_is_there_after_reopening,
    a_unit_may_emit_many_messages_and_they_keep_their_order,
    migrations_apply_once_however_often_they_run,
    a_write_is_read_back_as_soon_as_it_returns,
    text_compares_by_its_bytes,
    a_lease_shorter_than_two_handler_timeouts_is_refused,
    a_unit_that_swallows_a_failed_statement_is_never_told_it_committed_when_it_did_not,
    units_batched_with_one_that_swallows_a_failed_statement_are_each_told_the_truth,
    processes_open_the_database_while_another_appends_to_the_log,
    another_process_s_message_between_this_one_s_on_other_topics_is_delivered,
    a_commit_of_another_process_wakes_consumers_at_once,
    rows_units_insert_are_read_by_the_statements_after_them_in_the_batch,
    a_row_that_fails_to_insert_with_others_fails_its_own_unit_only,
    a_row_that_fails_with_a_later_units_statement_fails_its_own_unit_only,
    a_unit_that_rolls_back_keeps_the_rows_of_the_units_before_it,
    a_unit_may_insert_more_rows_than_a_writer_holds_at_once,
    text_with_quotes_escapes_and_placeholders_is_stored_byte_for_byte,
);

mod postgres_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_unit_whose_statement_is_cancelled_runs_again_and_commits() {
        let scratch = platform::testing::Scratch::new(platform::Backend::Postgres).await;
        super::a_unit_whose_statement_is_cancelled_runs_again_and_commits(scratch).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_unit_on_a_connection_lost_right_after_a_commit_runs_again_and_commits() {
        let scratch = platform::testing::Scratch::new(platform::Backend::Postgres).await;
        super::a_unit_on_a_connection_lost_right_after_a_commit_runs_again_and_commits(scratch)
            .await;
    }
}

mod mariadb_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_unit_whose_statement_is_cancelled_runs_again_and_commits() {
        let scratch = platform::testing::Scratch::new(platform::Backend::Mysql).await;
        super::a_unit_whose_statement_is_cancelled_runs_again_and_commits(scratch).await;
    }
}

async fn failing_units_roll_back_alone_and_their_messages_are_never_published(scratch: Scratch) {
    let db = open(&scratch).await;
    let writes: Vec<_> = (0..200)
        .map(|seq| tokio::spawn(write(db.clone(), seq)))
        .collect();
    for (seq, handle) in writes.into_iter().enumerate() {
        let result = handle.await.expect("join");
        match seq {
            7 => assert!(
                matches!(result, Err(Failure::Store(StoreError::Panicked))),
                "{result:?}"
            ),
            _ if seq % 2 == 1 => assert!(matches!(result, Err(Failure::Refused)), "{result:?}"),
            _ => assert!(result.is_ok(), "{seq}: {result:?}"),
        }
    }
    let rows: Vec<i64> = column(&db, "SELECT seq FROM conformance_handled ORDER BY seq").await;
    assert_eq!(rows, (0..200).step_by(2).collect::<Vec<i64>>());
    let published: Vec<i64> = column(&db, "SELECT COUNT(*) FROM conveyor_log").await;
    assert_eq!(published, [100]);
    assert_eq!(
        *db.head().borrow(),
        100,
        "the head is the last committed position"
    );
}

async fn a_lone_failing_unit_rolls_back_and_the_next_one_commits(scratch: Scratch) {
    let db = open(&scratch).await;
    assert!(matches!(write(db.clone(), 1).await, Err(Failure::Refused)));
    write(db.clone(), 2).await.expect("commits");
    let rows: Vec<i64> = column(&db, "SELECT seq FROM conformance_handled").await;
    assert_eq!(rows, vec![2]);
}

async fn what_committed_is_there_after_reopening(scratch: Scratch) {
    let db = open(&scratch).await;
    write(db.clone(), 4).await.expect("commits");
    db.close().await;
    let reopened = scratch.open().await;
    let count: Vec<i64> = column(&reopened, "SELECT COUNT(*) FROM conformance_handled").await;
    assert_eq!(count, [1]);
    assert_eq!(*reopened.head().borrow(), 1);
}

async fn a_unit_may_emit_many_messages_and_they_keep_their_order(scratch: Scratch) {
    let db = open(&scratch).await;
    db.write(|uow| {
        for seq in 0..1200 {
            uow.emit(&Ping {
                key: format!("k{}", seq % 7),
                seq,
            })?;
        }
        Ok::<_, StoreError>(())
    })
    .await
    .expect("commits");
    let payloads: Vec<Vec<u8>> =
        column(&db, "SELECT payload FROM conveyor_log ORDER BY position").await;
    let seqs: Vec<u32> = payloads
        .iter()
        .map(|payload| serde_json::from_slice::<Ping>(payload).expect("ping").seq)
        .collect();
    assert_eq!(seqs, (0..1200).collect::<Vec<u32>>());
    assert_eq!(*db.head().borrow(), 1200);
}

async fn migrations_apply_once_however_often_they_run(scratch: Scratch) {
    let db = open(&scratch).await;
    write(db.clone(), 2).await.expect("commits");
    db.migrate(MIGRATIONS).await.expect("migrate again");
    let second = scratch.open().await;
    second
        .migrate(MIGRATIONS)
        .await
        .expect("migrate from another handle");
    let applied: Vec<i64> = column(
        &db,
        "SELECT COUNT(*) FROM conveyor_migrations WHERE service = 'conformance'",
    )
    .await;
    assert_eq!(applied, [1]);
    let rows: Vec<i64> = column(&db, "SELECT seq FROM conformance_handled").await;
    assert_eq!(rows, [2], "migrating again lost or duplicated data");
}

async fn a_write_is_read_back_as_soon_as_it_returns(scratch: Scratch) {
    let db = open(&scratch).await;
    for seq in (0..40).step_by(2) {
        write(db.clone(), seq).await.expect("commits");
        let count: Vec<i64> = column(&db, "SELECT COUNT(*) FROM conformance_handled").await;
        assert_eq!(
            count,
            [i64::from(seq / 2 + 1)],
            "a committed write was not visible"
        );
        assert_eq!(*db.head().borrow(), i64::from(seq / 2 + 1));
    }
}

async fn text_compares_by_its_bytes(scratch: Scratch) {
    let db = open(&scratch).await;
    db.write(|uow| {
        for key in ["Concert", "Concert ", "concert"] {
            uow.conn().execute(
                "INSERT INTO conformance_handled (group_name, consumer, message_id, \"key\", seq) \
                 VALUES ('g', 'c', 'm', ?, 0)",
                [key],
            )?;
        }
        Ok::<_, StoreError>(())
    })
    .await
    .expect("insert");
    let same: Vec<i64> = column(
        &db,
        "SELECT COUNT(*) FROM conformance_handled WHERE \"key\" = 'Concert'",
    )
    .await;
    assert_eq!(same, [1], "neither case nor trailing spaces are ignored");
}

/// PostgreSQL aborts the transaction at a failed statement, and `COMMIT` then rolls back
/// without an error: a unit that carried on after the failure must hear of it.
async fn a_unit_that_swallows_a_failed_statement_is_never_told_it_committed_when_it_did_not(
    scratch: Scratch,
) {
    let db = open(&scratch).await;
    let written = db
        .write(|uow| {
            uow.conn().execute(
                "INSERT INTO conformance_handled (group_name, consumer, message_id, \"key\", seq) \
                 VALUES ('g', 'c', 'm', 'k', 1)",
                (),
            )?;
            let _ignored = uow.conn().execute("SELECT * FROM no_such_table", ());
            Ok::<_, StoreError>(())
        })
        .await;
    let rows: Vec<i64> = column(&db, "SELECT COUNT(*) FROM conformance_handled").await;
    match written {
        Ok(()) => assert_eq!(rows, [1], "told it committed, but its row is not there"),
        Err(_) => assert_eq!(rows, [0], "told it failed, but its row is there"),
    }
}

/// As above, with units queued behind the one that swallows the failure, likely in its
/// batch: on PostgreSQL the step after a unit goes out with the next unit's first
/// statement, so the failure surfaces there, and no unit of the batch may hear `Ok`.
async fn units_batched_with_one_that_swallows_a_failed_statement_are_each_told_the_truth(
    scratch: Scratch,
) {
    let db = open(&scratch).await;
    let writes: Vec<_> = (0..40u32)
        .map(|seq| {
            let db = db.clone();
            tokio::spawn(async move {
                db.write(move |uow| {
                    uow.conn().execute(
                        "INSERT INTO conformance_handled \
                         (group_name, consumer, message_id, \"key\", seq) \
                         VALUES ('g', 'c', ?, 'k', ?)",
                        (format!("m{seq}"), seq),
                    )?;
                    if seq % 10 == 3 {
                        let _ignored = uow.conn().execute("SELECT * FROM no_such_table", ());
                    }
                    Ok::<_, StoreError>(())
                })
                .await
            })
        })
        .collect();
    let mut told = Vec::new();
    for (seq, write) in writes.into_iter().enumerate() {
        told.push((seq as i64, write.await.expect("a write task").is_ok()));
    }
    let stored: Vec<i64> = column(&db, "SELECT seq FROM conformance_handled").await;
    for (seq, committed) in told {
        assert_eq!(
            stored.contains(&seq),
            committed,
            "unit {seq}: told Ok is {committed}"
        );
    }
}

/// Keeps every writer busy for a while, so that the units queued meanwhile share one batch:
/// one unit per writer that sleeps on it (two on MySQL; where one writer runs, on SQLite and
/// PostgreSQL, the second waits in the queue and joins the units' batch).
async fn occupy_writers(db: &Database) -> Vec<tokio::task::JoinHandle<()>> {
    let mut sleepers = Vec::new();
    for _ in 0..2 {
        let db = db.clone();
        sleepers.push(tokio::spawn(async move {
            db.write(|_uow| {
                std::thread::sleep(Duration::from_millis(400));
                Ok::<_, StoreError>(())
            })
            .await
            .expect("a sleeping unit commits");
        }));
        // Each writer takes one: a writer takes everything queued as its batch.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    sleepers
}

/// A unit of work, boxed so that different ones go in one list.
type Unit<T> = Box<dyn Fn(&mut platform::UnitOfWork) -> Result<T, Failure> + Send + Sync>;

/// Queues `units` in order behind busy writers, so they share a batch; what each was told.
async fn in_one_batch<T: Send + 'static>(
    db: &Database,
    units: Vec<Unit<T>>,
) -> Vec<Result<T, Failure>> {
    let sleepers = occupy_writers(db).await;
    let mut writes = Vec::new();
    for unit in units {
        let db = db.clone();
        writes.push(tokio::spawn(async move { db.write(unit).await }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut told = Vec::new();
    for write in writes {
        told.push(write.await.expect("a write task"));
    }
    for sleeper in sleepers {
        sleeper.await.expect("a sleeping unit");
    }
    told
}

const INSERT_HANDLED: &str = "INSERT INTO conformance_handled \
    (row_id, group_name, consumer, message_id, \"key\", seq) VALUES (?, ?, ?, ?, ?, ?)";

/// `UnitOfWork::insert` of a row whose `row_id` is `seq`.
fn insert_handled(uow: &platform::UnitOfWork, seq: i64) -> Result<(), StoreError> {
    Ok(uow.insert(INSERT_HANDLED, (seq, "g", "c", format!("m{seq}"), "k", seq))?)
}

/// Values reach the database as they are, in held rows and log rows alike: quotes,
/// backslashes, placeholders and control characters in text are data, never SQL.
async fn text_with_quotes_escapes_and_placeholders_is_stored_byte_for_byte(scratch: Scratch) {
    let db = open(&scratch).await;
    let tricky =
        |seq: u32| format!("{seq}: it's \\' \\\\ \"q\" `b` ? ; -- /* é 💥 \n\t\u{1b} 0x27 X'27'");
    // From 1: MySQL's AUTO_INCREMENT `row_id` takes a 0 for "number it for me".
    let writes = (1..=6).map(|seq| {
        let db = db.clone();
        tokio::spawn(async move {
            db.write(move |uow| {
                let key = tricky(seq);
                uow.insert(
                    INSERT_HANDLED,
                    (
                        i64::from(seq),
                        "g",
                        "c",
                        format!("m{seq}"),
                        key.as_str(),
                        seq,
                    ),
                )?;
                uow.emit(&Ping { key, seq })
            })
            .await
        })
    });
    for write in writes.collect::<Vec<_>>() {
        write.await.expect("a write task").expect("commits");
    }
    let expected: Vec<String> = (1..=6).map(tricky).collect();
    let mut rows: Vec<String> = column(
        &db,
        "SELECT \"key\" FROM conformance_handled ORDER BY row_id",
    )
    .await;
    assert_eq!(rows, expected, "held rows");
    rows = column(&db, "SELECT \"key\" FROM conveyor_log ORDER BY position").await;
    rows.sort_by_key(|key| {
        key.split(':')
            .next()
            .and_then(|seq| seq.parse::<u32>().ok())
    });
    assert_eq!(rows, expected, "log rows");
    let payloads: Vec<Vec<u8>> = column(&db, "SELECT payload FROM conveyor_log").await;
    for payload in payloads {
        let ping: Ping = serde_json::from_slice(&payload).expect("a ping");
        assert_eq!(ping.key, tricky(ping.seq));
    }
}

/// A server's writer holds the rows of `UnitOfWork::insert` to insert them with the next
/// units' (see `sql::held`): any other statement after them, in the same unit or a later
/// one, must find them written.
async fn rows_units_insert_are_read_by_the_statements_after_them_in_the_batch(scratch: Scratch) {
    let db = open(&scratch).await;
    let count = |uow: &platform::UnitOfWork| -> Result<i64, Failure> {
        Ok(uow
            .conn()
            .scalar("SELECT COUNT(*) FROM conformance_handled", ())
            .map_err(StoreError::from)?)
    };
    let told = in_one_batch(
        &db,
        vec![
            Box::new(move |uow| {
                insert_handled(uow, 1)?;
                insert_handled(uow, 2)?;
                count(uow)
            }),
            Box::new(move |uow| {
                insert_handled(uow, 3)?;
                Ok(0)
            }),
            Box::new(move |uow| count(uow)),
        ],
    )
    .await;
    let counts: Vec<i64> = told
        .into_iter()
        .map(|told| told.expect("commits"))
        .collect();
    assert_eq!(
        counts,
        [2, 0, 3],
        "a statement did not see the rows inserted before it"
    );
}

/// Rows inserted together fail together: the unit whose row failed must hear it, and the
/// others must commit theirs, each once.
async fn a_row_that_fails_to_insert_with_others_fails_its_own_unit_only(scratch: Scratch) {
    let db = open(&scratch).await;
    db.write(|uow| insert_handled(uow, 3))
        .await
        .expect("the row unit 3 will collide with");
    let units = (0..8)
        .map(|seq| {
            Box::new(move |uow: &mut platform::UnitOfWork| Ok(insert_handled(uow, seq)?))
                as Unit<()>
        })
        .collect();
    let told = in_one_batch(&db, units).await;
    for (seq, told) in told.iter().enumerate() {
        assert_eq!(told.is_ok(), seq != 3, "unit {seq} was told {told:?}");
    }
    let rows: Vec<i64> = column(&db, "SELECT seq FROM conformance_handled ORDER BY seq").await;
    assert_eq!(rows, [0, 1, 2, 3, 4, 5, 6, 7]);
}

/// Held rows go out with the next statement (on PostgreSQL in its flight): when one of them
/// fails, the statement of the later unit fails with it, yet only the row's unit is told.
async fn a_row_that_fails_with_a_later_units_statement_fails_its_own_unit_only(scratch: Scratch) {
    let db = open(&scratch).await;
    db.write(|uow| insert_handled(uow, 3))
        .await
        .expect("the row unit 3 will collide with");
    let mut units: Vec<Unit<i64>> = (0..5)
        .map(|seq| {
            Box::new(move |uow: &mut platform::UnitOfWork| {
                insert_handled(uow, seq)?;
                Ok(seq)
            }) as Unit<i64>
        })
        .collect();
    units.push(Box::new(|uow| {
        let rows = uow
            .conn()
            .scalar("SELECT COUNT(*) FROM conformance_handled", ())
            .map_err(StoreError::from)?;
        Ok(rows)
    }));
    let told = in_one_batch(&db, units).await;
    for (seq, told) in told.iter().enumerate().take(5) {
        assert_eq!(told.is_ok(), seq != 3, "unit {seq} was told {told:?}");
    }
    // Run again alone, the units may commit in any order: what it read is not checked.
    assert!(told[5].is_ok(), "the reading unit was told {:?}", told[5]);
    let rows: Vec<i64> = column(&db, "SELECT seq FROM conformance_handled ORDER BY seq").await;
    assert_eq!(rows, [0, 1, 2, 3, 4]);
}

/// A unit that rolls back after a statement of its own has rolled back the rows of earlier
/// units that statement wrote (they went in inside its savepoint): they must still commit,
/// and its own held rows must not.
async fn a_unit_that_rolls_back_keeps_the_rows_of_the_units_before_it(scratch: Scratch) {
    let db = open(&scratch).await;
    let told = in_one_batch(
        &db,
        vec![
            Box::new(|uow| Ok(insert_handled(uow, 1)?)),
            Box::new(|uow| {
                insert_handled(uow, 2)?;
                uow.conn()
                    .execute("UPDATE conformance_handled SET seq = seq", ())
                    .map_err(StoreError::from)?;
                insert_handled(uow, 3)?;
                Err(Failure::Refused)
            }),
            Box::new(|uow| Ok(insert_handled(uow, 4)?)),
        ],
    )
    .await;
    assert!(told[0].is_ok() && told[2].is_ok(), "{told:?}");
    assert!(matches!(told[1], Err(Failure::Refused)), "{told:?}");
    let rows: Vec<i64> = column(&db, "SELECT seq FROM conformance_handled ORDER BY seq").await;
    assert_eq!(rows, [1, 4]);
}

/// A writer holds a bounded number of rows: a unit inserting more has them written as it
/// goes (and the rest at the commit), every one once.
async fn a_unit_may_insert_more_rows_than_a_writer_holds_at_once(scratch: Scratch) {
    let db = open(&scratch).await;
    db.write(|uow| {
        for seq in 1..=5000 {
            insert_handled(uow, seq)?;
        }
        Ok::<_, StoreError>(())
    })
    .await
    .expect("commits");
    let counted: Vec<i64> = column(
        &db,
        "SELECT COUNT(DISTINCT seq) FROM conformance_handled WHERE seq BETWEEN 1 AND 5000",
    )
    .await;
    let rows: Vec<i64> = column(&db, "SELECT COUNT(*) FROM conformance_handled").await;
    assert_eq!((counted, rows), (vec![5000], vec![5000]));
}

async fn a_lease_shorter_than_two_handler_timeouts_is_refused(scratch: Scratch) {
    use platform::{
        Bus, BusError, ConsumerOptions, HandlerError, Incoming, SqlLog, Subscription, UnitOfWork,
    };
    use std::time::Duration;
    let db = open(&scratch).await;
    let options = ConsumerOptions {
        lease: Duration::from_secs(5),
        handler_timeout: Duration::from_secs(3),
        ..ConsumerOptions::default()
    };
    let subscription = Subscription::new("impatient")
        .with_options(options)
        .on(|_incoming: Incoming<Ping>, _uow: &mut UnitOfWork| Ok::<(), HandlerError>(()));
    let refused = SqlLog::new(db.clone()).subscribe(subscription).await;
    assert!(matches!(refused, Err(BusError::LeaseTooShort { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_over_its_time_limit_is_interrupted_and_dead_lettered() {
    use platform::dead_letter;
    use std::time::{Duration, Instant};
    let scratch = Scratch::new(Backend::Sqlite).await;
    let db = open(&scratch).await;
    // A query that would run for minutes: only the time limit ends it.
    let _consumer = run_past_time_limit(&db, "endless", |conn| {
        conn.scalar::<i64>(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) \
             SELECT COUNT(*) FROM n",
            (),
        )
        .map(|_| ())
    })
    .await;

    let deadline = Instant::now() + Duration::from_secs(20);
    let letters = loop {
        let letters = dead_letter::list(&db, Some("endless"), 10)
            .await
            .expect("list");
        if !letters.is_empty() {
            break letters;
        }
        assert!(Instant::now() < deadline, "the handler was never cut off");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(letters[0].attempts, 2);
    assert!(
        letters[0].error.contains("timed out"),
        "{}",
        letters[0].error
    );
    // The writer is free again.
    db.write(|uow| {
        uow.emit(&Ping {
            key: "k".into(),
            seq: 1,
        })
    })
    .await
    .expect("a later unit of work commits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_interrupted_at_its_time_limit_leaves_every_unit_committed_or_told() {
    use platform::dead_letter;
    use std::time::{Duration, Instant};
    let scratch = Scratch::new(Backend::Sqlite).await;
    let db = open(&scratch).await;
    // A write that would run for minutes. SQLite rolls the whole transaction back when a
    // write statement is interrupted, taking the other units of the batch with it.
    let consumer = run_past_time_limit(&db, "endless-writer", |conn| {
        conn.execute(
            "INSERT INTO conformance_handled (group_name, consumer, message_id, \"key\", seq) \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) \
             SELECT 'endless', 'c', 'm', 'k', i FROM n",
            (),
        )
        .map(|_| ())
    })
    .await;

    // Even writes, one after another, while the handler is cut off twice.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut committed = Vec::new();
    let mut seq = 0;
    while dead_letter::list(&db, Some("endless-writer"), 10)
        .await
        .expect("list")
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the handler was never cut off");
        let writes: Vec<_> = (0..20)
            .map(|n| tokio::spawn(write(db.clone(), seq + 2 * n)))
            .collect();
        for (n, handle) in writes.into_iter().enumerate() {
            match handle.await.expect("join") {
                Ok(()) => committed.push(i64::from(seq) + 2 * n as i64),
                Err(Failure::Store(StoreError::Commit(_))) => {}
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        seq += 40;
    }
    let mut rows: Vec<i64> = column(
        &db,
        "SELECT seq FROM conformance_handled WHERE group_name = 'g'",
    )
    .await;
    rows.sort_unstable();
    assert_eq!(rows, committed, "a unit was told one thing and did another");
    let endless_rows: Vec<i64> = column(
        &db,
        "SELECT COUNT(*) FROM conformance_handled WHERE group_name = 'endless'",
    )
    .await;
    assert_eq!(endless_rows, [0], "the interrupted write left rows behind");
    // The pings written meanwhile keep the endless handler busy; without it, writes commit.
    consumer.stop().await;
    write(db.clone(), 1_000_000)
        .await
        .expect("the writer goes on");
}

/// Starts consumer group `group`, whose handler runs `sql` with a 200 ms time limit and two
/// attempts, and publishes one message to it.
async fn run_past_time_limit(
    db: &Database,
    group: &'static str,
    sql: fn(&platform::Conn) -> Result<(), platform::sql::Error>,
) -> platform::Consumer {
    use platform::{
        Bus, ConsumerOptions, HandlerError, Incoming, RetryPolicy, SqlLog, Subscription, UnitOfWork,
    };
    use std::time::Duration;
    let options = ConsumerOptions {
        lease: Duration::from_secs(2),
        handler_timeout: Duration::from_millis(200),
        retry: RetryPolicy {
            max_attempts: 2,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(10),
        },
        ..ConsumerOptions::default()
    };
    let endless = Subscription::new(group).with_options(options).on(
        move |_incoming: Incoming<Ping>, uow: &mut UnitOfWork| {
            sql(uow.conn()).map_err(HandlerError::transient)
        },
    );
    let consumer = SqlLog::new(db.clone())
        .subscribe(endless)
        .await
        .expect("subscribe");
    db.write(|uow| {
        uow.emit(&Ping {
            key: "k".into(),
            seq: 0,
        })
    })
    .await
    .expect("publish");
    consumer
}

/// A message on a topic no consumer here follows.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Chatter;

impl platform::Message for Chatter {
    const NAME: &'static str = "unit_of_work.Chatter";
    const TOPIC: &'static str = "unit_of_work.chatter";

    fn key(&self) -> String {
        "chatter".into()
    }
}

async fn chatter(db: &Database) {
    db.write(|uow| uow.emit(&Chatter)).await.expect("chatter");
}

/// Consumers skip reading the log after commits that appended only on topics they do not
/// follow, as this process's writers record them. Positions another process appended are
/// on topics unknown: however far this process's own appends moved past them, they wake
/// the consumers, whether the watcher saw them first or a later append of this process.
async fn another_process_s_message_between_this_one_s_on_other_topics_is_delivered(
    scratch: Scratch,
) {
    let consuming = open(&scratch).await;
    let producing = scratch.open().await;
    let consumer = SqlLog::new(consuming.clone())
        .subscribe(common::recording("between"))
        .await
        .expect("subscribe");
    for round in 1..=5 {
        chatter(&consuming).await;
        common::publish(&producing, 1).await;
        chatter(&consuming).await;
        common::wait_until("the other process's ping handled", async || {
            common::handled(&consuming).await == round
        })
        .await;
    }
    consumer.stop().await;
    producing.close().await;
    consuming.close().await;
}

/// Another process's commits wake this one's consumers through the watcher (SQLite's
/// look at the WAL, PostgreSQL's `LISTEN`, MySQL's poll of the counter row), not at the
/// lanes' safety poll.
async fn a_commit_of_another_process_wakes_consumers_at_once(scratch: Scratch) {
    let consuming = open(&scratch).await;
    let producing = scratch.open().await;
    let consumer = SqlLog::new(consuming.clone())
        .subscribe(common::recording("woken"))
        .await
        .expect("subscribe");
    // Let every lane go idle, waiting for a wake-up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut slowest = Duration::ZERO;
    for round in 1..=5 {
        let published = Instant::now();
        common::publish(&producing, 1).await;
        common::wait_until("handled", async || {
            common::handled(&consuming).await == round
        })
        .await;
        slowest = slowest.max(published.elapsed());
    }
    // The safety poll is 5 s; a wake-up is milliseconds (the benchmark measures it).
    assert!(slowest < Duration::from_millis(2500), "slowest {slowest:?}");
    consumer.stop().await;
    producing.close().await;
    consuming.close().await;
}

/// Opening a database another process is busy appending to its log must not deadlock with
/// that process's batches (as the platform's `CREATE … IF NOT EXISTS` script did, by locking
/// `conveyor_log` against inserts while it waited for the counter row).
async fn processes_open_the_database_while_another_appends_to_the_log(scratch: Scratch) {
    let db = open(&scratch).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|writer| {
            let (db, stop) = (db.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seq = writer * 1_000_000;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    db.write(move |uow| {
                        uow.emit(&Ping {
                            key: format!("k{writer}"),
                            seq,
                        })
                    })
                    .await
                    .expect("an append beside the opens");
                    seq += 1;
                }
            })
        })
        .collect();
    for _ in 0..10 {
        let other = scratch.open().await;
        other.close().await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("a writer task");
    }
    db.close().await;
}

/// A statement cancelled from outside the unit (an administrator's `pg_cancel_backend` or
/// `KILL QUERY`; PostgreSQL's lock timeout has also been seen to cancel the next statement
/// of its session) fails that run of the unit only: it runs again and commits.
async fn a_unit_whose_statement_is_cancelled_runs_again_and_commits(scratch: Scratch) {
    let db = open(&scratch).await;
    let backend = scratch.backend();
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let write = db.write(move |uow| {
        if counted.fetch_add(1, Ordering::SeqCst) == 0 {
            uow.conn().scalar::<i64>(long_statement(backend), ())?;
        }
        uow.conn().execute(
            "INSERT INTO conformance_handled (group_name, consumer, message_id, \"key\", seq) \
             VALUES ('g', 'c', 'm', 'k', 1)",
            (),
        )?;
        Ok::<_, StoreError>(())
    });
    let (written, ()) = std::thread::scope(|scope| {
        let admin = scope.spawn(|| scratch.connect()).join().expect("connect");
        if backend == Backend::Mysql {
            admin
                .execute_batch(
                    "BEGIN; INSERT INTO conformance_handled \
                     (group_name, consumer, message_id, `key`, seq) \
                     VALUES ('g', 'c', 'held', 'k', 0)",
                )
                .expect("hold a row lock");
        }
        let cancel = scope.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !cancel_the_long_statement(&admin, backend) {
                assert!(Instant::now() < deadline, "the statement never started");
                std::thread::sleep(Duration::from_millis(20));
            }
            admin.execute_batch("ROLLBACK").expect("release the lock");
        });
        let written =
            tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(write));
        (written, cancel.join().expect("cancel"))
    });
    written.expect("the unit runs again and commits");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let rows: Vec<i64> = column(&db, "SELECT seq FROM conformance_handled").await;
    assert_eq!(rows, [1]);
}

/// A writer that committed a moment ago sends its next `BEGIN` with the batch's first
/// statement (PostgreSQL): when the server has closed the connection meanwhile, that flight
/// is the first to fail, and the units of the batch run again on a new connection.
async fn a_unit_on_a_connection_lost_right_after_a_commit_runs_again_and_commits(scratch: Scratch) {
    let db = open(&scratch).await;
    for sleeper in occupy_writers(&db).await {
        sleeper.await.expect("a sleeping unit");
    }
    let admin =
        std::thread::scope(|scope| scope.spawn(|| scratch.connect()).join()).expect("connect");
    tokio::task::block_in_place(|| end_every_other_session(&admin));
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    db.write(move |uow| {
        counted.fetch_add(1, Ordering::SeqCst);
        uow.conn().execute(
            "INSERT INTO conformance_handled (group_name, consumer, message_id, \"key\", seq) \
             VALUES ('g', 'c', 'm', 'k', 1)",
            (),
        )?;
        Ok::<_, StoreError>(())
    })
    .await
    .expect("the unit runs again and commits");
    assert!(
        runs.load(Ordering::SeqCst) >= 2,
        "it never met the lost connection"
    );
    let rows: Vec<i64> = column(&db, "SELECT seq FROM conformance_handled").await;
    assert_eq!(rows, [1]);
    tokio::task::block_in_place(|| drop(admin));
}

/// Ends every other session on `admin`'s database, as a failover would, and waits until
/// they are gone.
fn end_every_other_session(admin: &Conn) {
    let others = "FROM pg_stat_activity WHERE datname = current_database() \
                  AND pid <> pg_backend_pid()";
    let ended: Vec<i32> = admin
        .query_map(&format!("SELECT pid {others}"), (), |row| row.get(0))
        .expect("list sessions");
    assert!(ended.len() >= 2, "the writers' sessions were not found");
    for pid in &ended {
        admin
            .execute("SELECT pg_terminate_backend(?)", (pid,))
            .expect("end a session");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<i32> = admin
            .query_map(&format!("SELECT pid {others}"), (), |row| row.get(0))
            .expect("list sessions");
        if !left.iter().any(|pid| ended.contains(pid)) {
            return;
        }
        assert!(Instant::now() < deadline, "the sessions never ended");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A statement that runs until it is cancelled: a sleep on PostgreSQL; on MariaDB, where a
/// cancelled prepared `SLEEP` just returns early, a wait for the administrator's row lock.
fn long_statement(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "SELECT COUNT(*) FROM pg_sleep(30)",
        _ => "SELECT COUNT(*) FROM conformance_handled FOR UPDATE",
    }
}

/// Cancels `long_statement` as an administrator would; whether it was running.
fn cancel_the_long_statement(admin: &Conn, backend: Backend) -> bool {
    let (running, cancel) = match backend {
        // Sleeping, not just named: the statement's text shows while it is prepared too,
        // and a cancel sent between the prepare and the execution is lost.
        Backend::Postgres => (
            "SELECT pid FROM pg_stat_activity \
             WHERE query = 'SELECT COUNT(*) FROM pg_sleep(30)' AND wait_event = 'PgSleep' \
             AND pid <> pg_backend_pid()",
            "SELECT pg_cancel_backend",
        ),
        _ => (
            "SELECT id FROM information_schema.processlist \
             WHERE info LIKE 'SELECT COUNT(*) FROM conformance_handled FOR UPDATE%'",
            "KILL QUERY ",
        ),
    };
    let sessions: Vec<i64> = admin
        .query_map(running, (), |row| row.get(0))
        .expect("list sessions");
    for session in &sessions {
        admin
            .execute_batch(&format!("{cancel}({session})"))
            .expect("cancel the statement");
    }
    !sessions.is_empty()
}
