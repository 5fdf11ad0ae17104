//! The inbox: which messages a consumer group has already handled.
//!
//! The mark is written in the handler's own unit of work, so a redelivered message whose
//! effects committed is recognised and skipped: at-least-once delivery, effectively-once effects.

use crate::db::UnitOfWork;
use crate::envelope::now_millis;
use uuid::Uuid;

pub(crate) async fn seen(
    uow: &mut UnitOfWork,
    group: &str,
    message_id: Uuid,
) -> Result<bool, sqlx::Error> {
    let found: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM conveyor_inbox WHERE group_name = ? AND message_id = ?")
            .bind(group)
            .bind(message_id.to_string())
            .fetch_optional(uow.conn())
            .await?;
    Ok(found.is_some())
}

pub(crate) async fn mark(
    uow: &mut UnitOfWork,
    group: &str,
    message_id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO conveyor_inbox (group_name, message_id, handled_at) VALUES (?, ?, ?)")
        .bind(group)
        .bind(message_id.to_string())
        .bind(now_millis())
        .execute(uow.conn())
        .await?;
    Ok(())
}
