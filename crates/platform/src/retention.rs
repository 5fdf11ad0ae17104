//! Retention: the log and the inbox stay bounded.
//!
//! A log row goes once it is older than the log's retention and every consumer group that
//! reads its topic has acknowledged it (the partition it falls in has moved past it). An
//! inbox mark goes once it is older than the inbox's retention, which must be longer than
//! any redelivery can take. Dead letters stay until purged. Deletes run in small units of
//! work, so the writer never stalls behind a long delete.

use crate::db::{Database, StoreError};
use crate::envelope::now_millis;
use crate::sql::Backend;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a process prunes.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// Rows looked at, or deleted, per unit of work.
const BATCH: i64 = 500;

/// How long acknowledged messages and inbox marks are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub log: Duration,
    pub inbox: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            log: Duration::from_secs(7 * 24 * 3600),
            inbox: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// What one pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub log_rows: u64,
    pub inbox_marks: u64,
}

/// Prunes every `PRUNE_INTERVAL` until `stop`.
pub async fn run(db: Database, retention: Retention, stop: CancellationToken) {
    every_interval(stop, || async {
        match prune(&db, retention).await {
            Ok(pruned) => tracing::debug!(?pruned, "retention pass"),
            Err(error) => tracing::warn!(%error, "retention pass failed; will try again"),
        }
    })
    .await;
}

/// Prunes `broker` by the log's retention every `PRUNE_INTERVAL` until `stop`.
pub async fn run_on_broker(
    broker: std::sync::Arc<dyn crate::Broker>,
    retention: Retention,
    stop: CancellationToken,
) {
    every_interval(stop, || async {
        match broker.prune(retention.log).await {
            Ok(pruned) => tracing::debug!(pruned, "broker retention pass"),
            Err(error) => tracing::warn!(%error, "broker retention pass failed; will try again"),
        }
    })
    .await;
}

/// Runs `pass` every `PRUNE_INTERVAL` until `stop`.
async fn every_interval<F, P>(stop: CancellationToken, mut pass: P)
where
    P: FnMut() -> F,
    F: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(PRUNE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        pass().await;
    }
}

/// One retention pass over the log and the inbox.
pub async fn prune(db: &Database, retention: Retention) -> Result<Pruned, StoreError> {
    let now = now_millis();
    Ok(Pruned {
        log_rows: prune_log(db, now.saturating_sub(millis(retention.log))).await?,
        inbox_marks: prune_inbox(db, now.saturating_sub(millis(retention.inbox))).await?,
    })
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// A row is still wanted while some group reading its topic (or the one group a replayed
/// row is for), or the relay to a broker (which reads every topic: `*`), has not
/// acknowledged the partition it falls in past it. Groups from before
/// groups recorded their topics (they have partitions but no `conveyor_groups` row, until
/// they join again) may read anything: no row past the lowest of their offsets goes.
/// Its parameters: the window's start and end, the cutoff, and the window's end again.
const DELETE_ACKNOWLEDGED: &str = "\
    DELETE FROM conveyor_log WHERE position > ? AND position <= ? AND occurred_at < ? \
      AND position <= ( \
        SELECT COALESCE(MIN(p.position), ?) FROM conveyor_partitions AS p \
        WHERE p.group_name NOT IN (SELECT group_name FROM conveyor_groups)) \
      AND NOT EXISTS ( \
        SELECT 1 FROM conveyor_group_topics AS reader \
        JOIN conveyor_groups AS g ON g.group_name = reader.group_name \
        JOIN conveyor_partitions AS p ON p.group_name = reader.group_name \
          AND p.\"partition\" = conveyor_log.key_hash % g.partitions \
        WHERE p.position < conveyor_log.position \
          AND ((reader.topic = conveyor_log.topic \
                AND (conveyor_log.only_group IS NULL OR conveyor_log.only_group = reader.group_name)) \
               OR reader.topic = '*'))";

/// Walks the log from its oldest row in windows of `BATCH`, up to the first row newer than
/// `cutoff`; each window is one unit of work. What stays behind (rows a group has not
/// acknowledged yet) is looked at again next pass.
async fn prune_log(db: &Database, cutoff: i64) -> Result<u64, StoreError> {
    let mut after = 0;
    let mut deleted = 0;
    loop {
        let (window_end, reached_cutoff, count) = db
            .write(move |uow| {
                let conn = uow.conn();
                let window: Vec<(i64, i64)> = conn.query_map(
                    "SELECT position, occurred_at FROM conveyor_log \
                     WHERE position > ? ORDER BY position LIMIT ?",
                    (after, BATCH),
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )?;
                let Some(&(end, _)) = window.last() else {
                    return Ok::<_, StoreError>((None, true, 0));
                };
                let count = conn.execute(DELETE_ACKNOWLEDGED, (after, end, cutoff, end))?;
                let reached = window.iter().any(|(_, occurred_at)| *occurred_at >= cutoff);
                Ok((Some(end), reached, count))
            })
            .await?;
        deleted += count;
        match window_end {
            Some(end) if !reached_cutoff => after = end,
            _ => return Ok(deleted),
        }
    }
}

/// Deletes each group's inbox marks written before `cutoff`. Message ids are UUIDv7, so
/// "older than" is a range of the inbox's key; `handled_at` keeps a replayed old message's
/// new mark.
async fn prune_inbox(db: &Database, cutoff: i64) -> Result<u64, StoreError> {
    let groups: Vec<String> = db
        .read(|conn| {
            Ok::<_, StoreError>(conn.query_map(
                "SELECT group_name FROM conveyor_groups",
                (),
                |row| row.get(0),
            )?)
        })
        .await?;
    let below = uuid_v7_floor(cutoff);
    let mut deleted = 0;
    for group in groups {
        loop {
            let (group, below) = (group.clone(), below.clone());
            let count = db
                .write(move |uow| {
                    let conn = uow.conn();
                    let count = match conn.backend() {
                        // MySQL has no LIMIT in an IN subquery, but has DELETE … LIMIT.
                        Backend::Mysql => conn.execute(
                            "DELETE FROM conveyor_inbox \
                             WHERE group_name = ? AND message_id < ? AND handled_at < ? LIMIT ?",
                            (&group, &below, cutoff, BATCH),
                        )?,
                        Backend::Sqlite | Backend::Postgres => conn.execute(
                            "DELETE FROM conveyor_inbox WHERE group_name = ? AND message_id IN ( \
                               SELECT message_id FROM conveyor_inbox \
                               WHERE group_name = ? AND message_id < ? AND handled_at < ? \
                               LIMIT ?)",
                            (&group, &group, &below, cutoff, BATCH),
                        )?,
                    };
                    Ok::<_, StoreError>(count)
                })
                .await?;
            deleted += count;
            if count < BATCH as u64 {
                break;
            }
        }
    }
    Ok(deleted)
}

/// The smallest UUIDv7, as text, minted at `millis`: every id minted earlier sorts below it.
fn uuid_v7_floor(millis: i64) -> String {
    let hex = format!("{:012x}", millis.max(0));
    format!("{}-{}-0000-0000-000000000000", &hex[..8], &hex[8..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uuid_floor_sorts_between_ids_minted_before_and_after() {
        let before = uuid::Uuid::now_v7().to_string();
        std::thread::sleep(Duration::from_millis(2));
        let floor = uuid_v7_floor(now_millis());
        std::thread::sleep(Duration::from_millis(2));
        let after = uuid::Uuid::now_v7().to_string();
        assert!(before < floor, "{before} < {floor}");
        assert!(floor < after, "{floor} < {after}");
    }
}
