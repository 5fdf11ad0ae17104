//! The inbox: which messages a consumer group has already handled.
//!
//! The mark is written in the handler's own unit of work, so a redelivered message whose
//! effects committed is recognised and skipped: at-least-once delivery, effectively-once effects.

use crate::db::UnitOfWork;
use crate::envelope::now_millis;
use std::collections::HashSet;
use uuid::Uuid;

/// Records `message_id` as handled by `group`; false when it already was. Called inside the
/// handler's unit of work, before the handler: if the handler fails, the mark rolls back too.
pub(crate) async fn claim(
    uow: &mut UnitOfWork,
    group: &str,
    message_id: Uuid,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO conveyor_inbox (group_name, message_id, handled_at) VALUES (?, ?, ?) \
         ON CONFLICT (group_name, message_id) DO NOTHING",
    )
    .bind(group)
    .bind(message_id.to_string())
    .bind(now_millis())
    .execute(uow.conn())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// `claim` for many messages in one statement; returns the ids claimed now (the others were
/// handled before).
pub(crate) async fn claim_all(
    uow: &mut UnitOfWork,
    group: &str,
    message_ids: &[Uuid],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    let mut claimed = HashSet::with_capacity(message_ids.len());
    let now = now_millis();
    // Three parameters a row stays far below SQLite's limit on bound parameters.
    for chunk in message_ids.chunks(1000) {
        let rows = vec!["(?, ?, ?)"; chunk.len()].join(", ");
        let sql = format!(
            "INSERT INTO conveyor_inbox (group_name, message_id, handled_at) VALUES {rows} \
             ON CONFLICT (group_name, message_id) DO NOTHING RETURNING message_id"
        );
        let mut query = sqlx::query_scalar::<_, String>(&sql);
        for id in chunk {
            query = query.bind(group).bind(id.to_string()).bind(now);
        }
        for id in query.fetch_all(uow.conn()).await? {
            let id = Uuid::parse_str(&id).map_err(|error| sqlx::Error::Decode(Box::new(error)))?;
            claimed.insert(id);
        }
    }
    Ok(claimed)
}
