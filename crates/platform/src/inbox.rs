//! The inbox: which messages a consumer group has already handled.
//!
//! The mark is written in the handler's own unit of work, so a redelivered message whose
//! effects committed is recognised and skipped: at-least-once delivery, effectively-once effects.

use crate::db::UnitOfWork;
use crate::envelope::now_millis;
use crate::sql::Error;
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
