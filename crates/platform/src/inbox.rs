//! The inbox: which messages a consumer group has already handled.
//!
//! The mark is written in the handler's own unit of work, so a redelivered message whose
//! effects committed is recognised and skipped: at-least-once delivery, effectively-once effects.

use crate::db::UnitOfWork;
use crate::envelope::now_millis;
use crate::sql::{Error, ToValue};
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

/// `claim` for several messages in two statements per 256 rather than one per message:
/// which of `message_ids` were not handled by `group` yet, now marked. Another consumer
/// claiming one of them at the same time blocks on its key, then fails, until this unit ends.
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
    let conn = uow.conn();
    let handled_at = now_millis();
    let mut claimed = HashSet::with_capacity(message_ids.len());
    for chunk in message_ids.chunks(IDS_PER_STATEMENT) {
        let ids: Vec<String> = chunk.iter().map(Uuid::to_string).collect();
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
        let fresh: Vec<(&Uuid, &String)> = chunk
            .iter()
            .zip(&ids)
            .filter(|(id, text)| !seen.contains(*text) && claimed.insert(**id))
            .collect();
        if fresh.is_empty() {
            continue;
        }
        let mut values: Vec<&dyn ToValue> = Vec::with_capacity(fresh.len() * 3);
        for (_, text) in &fresh {
            values.extend([&group as &dyn ToValue, *text, &handled_at]);
        }
        let rows = vec!["(?, ?, ?)"; fresh.len()].join(", ");
        conn.execute(
            &format!(
                "INSERT INTO conveyor_inbox (group_name, message_id, handled_at) VALUES {rows}"
            ),
            values.as_slice(),
        )?;
    }
    Ok(claimed)
}
