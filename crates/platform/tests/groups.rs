//! Joining a consumer group on every backend: members that start at once are admitted
//! together when they agree, and never together when their handlers differ, also where the
//! database does not serialise transactions.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use platform::conformance::MIGRATIONS;
use platform::testing::Scratch;
use platform::{Bus, BusError, Incoming, SqlLog, UnitOfWork};

on_every_backend!(
    members_that_agree_join_at_once,
    members_that_differ_are_never_admitted_together
);

/// Each member on a database handle of its own, as separate processes would be.
async fn handles(scratch: &Scratch, count: usize) -> Vec<platform::Database> {
    let mut handles = Vec::new();
    for _ in 0..count {
        let db = scratch.open().await;
        db.migrate(MIGRATIONS).await.unwrap();
        handles.push(db);
    }
    handles
}

async fn members_that_agree_join_at_once(scratch: Scratch) {
    let joins: Vec<_> = handles(&scratch, 4)
        .await
        .into_iter()
        .map(|db| {
            tokio::spawn(async move {
                SqlLog::new(db)
                    .subscribe(handling_pings("agreeing", 4))
                    .await
            })
        })
        .collect();
    let mut consumers = Vec::new();
    for join in joins {
        consumers.push(join.await.unwrap().expect("a member that agrees joins"));
    }
    for consumer in consumers {
        consumer.stop().await;
    }
}

async fn members_that_differ_are_never_admitted_together(scratch: Scratch) {
    let dbs = handles(&scratch, 2).await;
    let older = SqlLog::new(dbs[0].clone());
    let newer = SqlLog::new(dbs[1].clone());
    let with_pongs =
        handling_pings("differing", 4).on(|_: Incoming<Pong>, _: &mut UnitOfWork| Ok(()));
    let (first, second) = tokio::join!(
        older.subscribe(handling_pings("differing", 4)),
        newer.subscribe(with_pongs)
    );
    let refused = |joined: &Result<platform::Consumer, BusError>| {
        matches!(joined, Err(BusError::SubscriptionMismatch { .. }))
    };
    assert!(
        first.is_ok() != second.is_ok() && (refused(&first) || refused(&second)),
        "exactly one is admitted, the other refused: {:?} / {:?}",
        first.as_ref().err(),
        second.as_ref().err()
    );
    for admitted in [first, second].into_iter().flatten() {
        admitted.stop().await;
    }
}
