//! A lane that cannot acknowledge backs off. Alone in its test binary, because it measures
//! the CPU time of the whole process.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use platform::{Bus, ConsumerOptions, Incoming, SqlLog, Subscription, UnitOfWork};
use std::time::Duration;

/// CPU time this test process has used, from `/proc/self/stat` (in ticks of 10 ms).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_whose_acknowledgement_keeps_failing_backs_off() {
    let (db, _dir) = open().await;
    // Messages the group does not handle, and an acknowledgement the database refuses.
    publish(&db, 10).await;
    execute(
        &db,
        "CREATE TRIGGER refuse_acks BEFORE UPDATE OF position ON conveyor_partitions \
         WHEN NEW.group_name = 'pongs' BEGIN SELECT RAISE(ABORT, 'no acknowledgements'); END",
    )
    .await;
    let pongs = Subscription::new("pongs")
        .with_options(ConsumerOptions {
            partitions: 1,
            ..impatient()
        })
        .on(|_: Incoming<Pong>, _: &mut UnitOfWork| Ok(()));
    let consumer = SqlLog::new(db.clone())
        .subscribe(pongs)
        .await
        .expect("subscribe");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = cpu_ticks();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks() - before;
    // A lane retrying at once would keep a core busy: 100 ticks in that second.
    assert!(used < 30, "{used} ticks of CPU in one second");
    execute(&db, "DROP TRIGGER refuse_acks").await;
    let acknowledged = async || {
        scalar::<i64>(
            &db,
            "SELECT position FROM conveyor_partitions WHERE group_name = 'pongs'",
        )
        .await
    };
    wait_until("acknowledged once allowed", async || {
        acknowledged().await == 10
    })
    .await;
    consumer.stop().await;
}
