//! The inbox: which messages a consumer group has already handled.
//!
//! The mark is written in the handler's own unit of work, so a redelivered message whose
//! effects committed is recognised and skipped: at-least-once delivery, effectively-once effects.

use crate::db::UnitOfWork;
use crate::envelope::now_millis;
use crate::sql::{Conn, Error, ToValue};
use std::collections::HashSet;
use uuid::Uuid;

/// Records `message_id` as handled by `group`; false when it already was. Called inside the
/// handler's unit of work, before the handler: if the handler fails, the mark rolls back too.
pub(crate) fn claim(uow: &UnitOfWork, group: &str, message_id: Uuid) -> Result<bool, Error> {
    let inserted = uow.conn().execute(
        "INSERT INTO conveyor_inbox (group_name, message_id, handled_at) VALUES (?, ?, ?) \
         ON CONFLICT (group_name, message_id) DO NOTHING",
        (group, message_id.to_string(), now_millis()),
    )?;
    Ok(inserted == 1)
}

/// Most message ids in one statement: far below every backend's limit on placeholders.
const IDS_PER_STATEMENT: usize = 256;

/// `claim` for several messages: which of `message_ids` were not handled by `group` yet,
/// now marked. One statement per 256 (`INSERT … ON CONFLICT DO NOTHING RETURNING`, whose
/// conflict check always goes by the key), two on MySQL, which has no `RETURNING` (a
/// `SELECT … IN`, then the insert). Another consumer claiming one of
/// them at the same time blocks on its key, then fails, until this unit ends.
pub(crate) fn claim_all(
    uow: &UnitOfWork,
    group: &str,
    message_ids: &[Uuid],
) -> Result<HashSet<Uuid>, Error> {
    if let [only] = message_ids {
        return Ok(if claim(uow, group, *only)? {
            HashSet::from([*only])
        } else {
            HashSet::new()
        });
    }
    // Each id once: a replayed copy can share a read with its original.
    let mut distinct = HashSet::with_capacity(message_ids.len());
    let ids: Vec<String> = message_ids
        .iter()
        .filter(|id| distinct.insert(**id))
        .map(Uuid::to_string)
        .collect();
    let mut claimed = HashSet::with_capacity(ids.len());
    for chunk in ids.chunks(IDS_PER_STATEMENT) {
        let fresh = if uow.conn().has_insert_returning() {
            insert_returning(uow.conn(), group, chunk)?
        } else {
            select_then_insert(uow.conn(), group, chunk)?
        };
        for id in fresh {
            let id = Uuid::parse_str(&id).map_err(|error| Error::corrupt("message_id", error))?;
            claimed.insert(id);
        }
    }
    Ok(claimed)
}

/// Marks `ids`; the ones that were not marked before.
fn insert_returning(conn: &Conn, group: &str, ids: &[String]) -> Result<Vec<String>, Error> {
    let handled_at = now_millis();
    let mut values: Vec<&dyn ToValue> = Vec::with_capacity(ids.len() * 3);
    for id in ids {
        values.extend([&group as &dyn ToValue, id, &handled_at]);
    }
    let rows = vec!["(?, ?, ?)"; ids.len()].join(", ");
    conn.query_map(
        &format!(
            "INSERT INTO conveyor_inbox (group_name, message_id, handled_at) VALUES {rows} \
             ON CONFLICT (group_name, message_id) DO NOTHING RETURNING message_id"
        ),
        values.as_slice(),
        |row| row.get(0),
    )
}

/// `insert_returning` in two statements.
fn select_then_insert(conn: &Conn, group: &str, ids: &[String]) -> Result<Vec<String>, Error> {
    let mut params: Vec<&dyn ToValue> = Vec::with_capacity(ids.len() + 1);
    params.push(&group);
    params.extend(ids.iter().map(|id| id as &dyn ToValue));
    let marks = vec!["?"; ids.len()].join(", ");
    let seen: HashSet<String> = conn
        .query_map(
            &format!(
                "SELECT message_id FROM conveyor_inbox \
                 WHERE group_name = ? AND message_id IN ({marks})"
            ),
            params.as_slice(),
            |row| row.get(0),
        )?
        .into_iter()
        .collect();
    let fresh: Vec<String> = ids
        .iter()
        .filter(|id| !seen.contains(*id))
        .cloned()
        .collect();
    if fresh.is_empty() {
        return Ok(fresh);
    }
    let handled_at = now_millis();
    let mut values: Vec<&dyn ToValue> = Vec::with_capacity(fresh.len() * 3);
    for id in &fresh {
        values.extend([&group as &dyn ToValue, id, &handled_at]);
    }
    let rows = vec!["(?, ?, ?)"; fresh.len()].join(", ");
    conn.execute(
        &format!("INSERT INTO conveyor_inbox (group_name, message_id, handled_at) VALUES {rows}"),
        values.as_slice(),
    )?;
    Ok(fresh)
}
