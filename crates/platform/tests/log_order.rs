//! The log on a server database is read gap-free: transactions that append commit in any
//! order they like, yet a reader that has seen position N never sees a position at or below
//! N appear later. Writers here pause at random between numbering their rows and committing,
//! and roll back one time in ten; the reader reads as consumers do (`position > offset`).

use platform::testing::{append_numbered, Scratch};
use platform::{Backend, Conn};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WRITERS: usize = 6;
const TRANSACTIONS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_no_position_commits_behind_one_already_read() {
    commits_out_of_order(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_mariadb_no_position_commits_behind_one_already_read() {
    commits_out_of_order(Backend::Mysql).await;
}

/// The harness catches what it is for: positions handed out as a sequence hands them out
/// (a counter bumped outside the appending transaction) do commit behind the reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_from_a_sequence_are_caught_committing_behind_the_reader() {
    let scratch = Arc::new(Scratch::new(Backend::Postgres).await);
    scratch.open().await.close().await;
    let outcome = race(&scratch, |conn, sequence, rows| {
        let last: i64 = sequence
            .scalar(
                "UPDATE conveyor_log_head SET position = position + ? RETURNING position",
                (rows as i64,),
            )
            .expect("bump");
        for position in last - rows as i64 + 1..=last {
            conn.execute(
                "INSERT INTO conveyor_log (position, message_id, kind, name, topic, \"key\", \
                 key_hash, payload, headers, occurred_at) \
                 VALUES (?, 'm', 'event', 'n', 't', 'k', 0, ?, '{}', 0)",
                (position, b"{}".to_vec()),
            )
            .expect("insert");
        }
    });
    assert!(outcome.is_err(), "no late commit was caught: {outcome:?}");
}

async fn commits_out_of_order(backend: Backend) {
    let scratch = Arc::new(Scratch::new(backend).await);
    // Creates the platform's tables.
    scratch.open().await.close().await;
    let outcome = race(&scratch, |conn, _, rows| {
        append_numbered(conn, rows).expect("append");
    });
    outcome.expect("every row read in order");
}

/// Runs the writers, each appending with `append(transaction, spare connection, rows)`, and
/// the reader; the rows committed and read, or how the reader was overtaken.
fn race(scratch: &Arc<Scratch>, append: fn(&Conn, &Conn, usize)) -> Result<usize, String> {
    let done = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let scratch = scratch.clone();
            std::thread::spawn(move || write(&scratch.connect(), &scratch.connect(), append))
        })
        .collect();
    let reader = {
        let (scratch, done) = (scratch.clone(), done.clone());
        std::thread::spawn(move || read_until(&scratch.connect(), &done))
    };
    let committed: usize = writers
        .into_iter()
        .map(|writer| writer.join().expect("writer"))
        .sum();
    done.store(true, Ordering::Release);
    let read = reader.join().expect("reader")?;
    assert_eq!(read, committed, "the reader saw every committed row once");
    Ok(read)
}

/// Appends in transactions that pause before committing; returns the rows committed.
fn write(conn: &Conn, spare: &Conn, append: fn(&Conn, &Conn, usize)) -> usize {
    let mut committed = 0;
    for _ in 0..TRANSACTIONS {
        let rows = fastrand::usize(1..4);
        conn.execute_batch("BEGIN").expect("begin");
        append(conn, spare, rows);
        std::thread::sleep(Duration::from_micros(fastrand::u64(0..5000)));
        if fastrand::u8(0..10) == 0 {
            conn.execute_batch("ROLLBACK").expect("rollback");
        } else {
            conn.execute_batch("COMMIT").expect("commit");
            committed += rows;
        }
    }
    committed
}

/// Reads as a consumer does until the writers are done and nothing is left; stops the
/// moment a row appears at or below a position already read. Returns the rows read.
fn read_until(conn: &Conn, done: &AtomicBool) -> Result<usize, String> {
    let (mut offset, mut read) = (0_i64, 0_usize);
    loop {
        let finished = done.load(Ordering::Acquire);
        let behind: i64 = conn
            .scalar(
                "SELECT COUNT(*) FROM conveyor_log WHERE position <= ?",
                (offset,),
            )
            .expect("count");
        if behind != read as i64 {
            return Err(format!(
                "a row committed at or below position {offset} after the reader had passed it"
            ));
        }
        let positions: Vec<i64> = conn
            .query_map(
                "SELECT position FROM conveyor_log WHERE position > ? ORDER BY position LIMIT 50",
                (offset,),
                |row| row.get(0),
            )
            .expect("read");
        if positions.is_empty() && finished {
            return Ok(read);
        }
        read += positions.len();
        offset = positions.last().copied().unwrap_or(offset);
    }
}
