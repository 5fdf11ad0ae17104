//! Retention keeps the log and the inbox bounded, on every backend: it deletes only what
//! every reading group has acknowledged and is old enough, and positions never go back.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use platform::conformance::MIGRATIONS;
use platform::retention::{self, Retention};
use platform::testing::Scratch;
use platform::Bus;
use platform::SqlLog;
use std::time::Duration;

on_every_backend!(retention_keeps_only_what_a_group_still_needs_or_is_young);

async fn retention_keeps_only_what_a_group_still_needs_or_is_young(scratch: Scratch) {
    let db = scratch.open().await;
    db.migrate(MIGRATIONS).await.expect("migrate");
    let consumer = SqlLog::new(db.clone())
        .subscribe(recording("retained"))
        .await
        .expect("subscribe");
    publish(&db, 1200).await;
    wait_until("all handled", async || handled(&db).await == 1200).await;
    consumer.stop().await;
    // A group that has fallen behind holds back the rows it has not acknowledged.
    publish(&db, 1).await;
    let rows: i64 = scalar(&db, "SELECT COUNT(*) FROM conveyor_log").await;
    assert_eq!(rows, 1201);
    let marks: i64 = scalar(&db, "SELECT COUNT(*) FROM conveyor_inbox").await;
    assert_eq!(marks, 1200);

    let young = retention::prune(&db, Retention::default())
        .await
        .expect("prune");
    assert_eq!(
        young,
        retention::Pruned::default(),
        "nothing is old enough yet"
    );

    tokio::time::sleep(Duration::from_millis(20)).await;
    let short = Retention {
        log: Duration::from_millis(1),
        inbox: Duration::from_millis(2),
    };
    // A group from before groups recorded their topics may read anything: its offset holds.
    execute(
        &db,
        "INSERT INTO conveyor_partitions (group_name, \"partition\", position) \
         VALUES ('legacy', 0, 600)",
    )
    .await;
    let held = retention::prune(&db, short).await.expect("prune");
    assert_eq!(held.log_rows, 600, "only what the legacy group read");
    execute(
        &db,
        "DELETE FROM conveyor_partitions WHERE group_name = 'legacy'",
    )
    .await;
    let pruned = retention::prune(&db, short).await.expect("prune");
    assert_eq!(held.log_rows + pruned.log_rows, 1200);
    assert_eq!(held.inbox_marks + pruned.inbox_marks, 1200);
    let rows: i64 = scalar(&db, "SELECT COUNT(*) FROM conveyor_log").await;
    assert_eq!(rows, 1, "the unacknowledged row stays");
    let head = *db.head().borrow();
    assert_eq!(head, 1201, "positions never go back");
    db.close().await;
    let reopened = scratch.open().await;
    assert_eq!(
        *reopened.head().borrow(),
        1201,
        "not after a restart either"
    );
}
