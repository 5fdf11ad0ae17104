//! `conveyor dlq`: list, show, replay and purge dead letters.

use clap::Subcommand;
use platform::dead_letter::{self, DeadLetter};
use platform::{Database, Envelope};
use std::io::Write;

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Lists dead letters, oldest first.
    List {
        /// Only this consumer group's.
        #[arg(long)]
        group: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Shows one dead letter with its message, headers and error, as JSON.
    Show { id: i64 },
    /// Delivers a dead letter again to its group and removes it from the dead letters.
    Replay { id: i64 },
    /// Deletes dead letters: one by id, a group's with --group, or every one with --all.
    Purge {
        id: Option<i64>,
        #[arg(long, conflicts_with = "id")]
        group: Option<String>,
        #[arg(long, conflicts_with_all = ["id", "group"])]
        all: bool,
    },
}

/// Runs the command; its output goes to `out`.
pub async fn run(db: &Database, command: DlqCommand, out: &mut impl Write) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { group, limit } => {
            let letters = dead_letter::list(db, group.as_deref(), limit).await?;
            writeln!(
                out,
                "{:>6}  {:<24}  {:<28}  {:>8}  ERROR",
                "ID", "GROUP", "MESSAGE", "ATTEMPTS"
            )?;
            for letter in &letters {
                let error: String = letter.error.chars().take(80).collect();
                let name = letter
                    .envelope
                    .as_ref()
                    .map_or("(undecodable)", |envelope| envelope.name.as_str());
                writeln!(
                    out,
                    "{:>6}  {:<24}  {:<28}  {:>8}  {error}",
                    letter.id, letter.group, name, letter.attempts
                )?;
            }
            writeln!(out, "{} dead letter(s)", letters.len())?;
        }
        DlqCommand::Show { id } => {
            let letter = dead_letter::get(db, id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no dead letter {id}"))?;
            writeln!(out, "{}", serde_json::to_string_pretty(&describe(&letter))?)?;
        }
        DlqCommand::Replay { id } => {
            anyhow::ensure!(dead_letter::replay(db, id).await?, "no dead letter {id}");
            writeln!(out, "dead letter {id} queued for redelivery")?;
        }
        DlqCommand::Purge { id, group, all } => {
            anyhow::ensure!(
                id.is_some() || group.is_some() || all,
                "say which dead letters to purge: an id, --group GROUP or --all"
            );
            let purged = dead_letter::purge(db, id, group).await?;
            writeln!(out, "purged {purged} dead letter(s)")?;
        }
    }
    Ok(())
}

fn describe(letter: &DeadLetter) -> serde_json::Value {
    let message = match &letter.envelope {
        Ok(envelope) => describe_message(envelope),
        Err(error) => serde_json::json!({ "undecodable": error }),
    };
    serde_json::json!({
        "id": letter.id,
        "group": letter.group,
        "error": letter.error,
        "attempts": letter.attempts,
        "failed_at": letter.failed_at,
        "message": message,
    })
}

fn describe_message(envelope: &Envelope) -> serde_json::Value {
    let payload =
        serde_json::from_slice::<serde_json::Value>(&envelope.payload).unwrap_or_else(|_| {
            String::from_utf8_lossy(&envelope.payload)
                .into_owned()
                .into()
        });
    serde_json::json!({
        "id": envelope.id.to_string(),
        "kind": envelope.kind.as_str(),
        "name": envelope.name,
        "topic": envelope.topic,
        "key": envelope.key,
        "occurred_at": envelope.occurred_at,
        "headers": envelope.headers,
        "payload": payload,
    })
}
