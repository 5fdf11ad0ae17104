//! `conveyor projections`: list the services' projections and rebuild one from the event
//! store while the services keep serving.

use anyhow::Context;
use clap::Subcommand;
use edge::ServiceModule;
use indicatif::{ProgressBar, ProgressStyle};
use platform::{Database, Projection, SqlLog};
use std::io::Write;
use std::time::Instant;

#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Lists each projection: its tables, how many of the event store's streams it has
    /// applied in full, and how many published events wait for it.
    List,
    /// Rebuilds a projection from the event store into shadow tables and swaps them in
    /// when caught up; the services may keep serving (and moving it) meanwhile.
    Rebuild {
        /// The projection, as `list` names it (e.g. matches-query.views).
        name: String,
    },
}

/// Runs the command on the projections of `services`; its output goes to `out`.
pub async fn run(
    db: &Database,
    services: &[&'static ServiceModule],
    command: ProjectionsCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let projections: Vec<Projection> = services
        .iter()
        .flat_map(|service| (service.projections)())
        .collect();
    match command {
        ProjectionsCommand::List => list(db, &projections, out).await,
        ProjectionsCommand::Rebuild { name } => {
            let projection = projections
                .iter()
                .find(|projection| projection.name() == name)
                .with_context(|| {
                    let known: Vec<_> = projections.iter().map(Projection::name).collect();
                    format!(
                        "no projection {name:?}; the services have: {}",
                        known.join(", ")
                    )
                })?;
            rebuild(db, projection, out).await
        }
    }
}

async fn list(
    db: &Database,
    projections: &[Projection],
    out: &mut impl Write,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "{:<28}  {:>8}  {:>8}  {:>8}  TABLES",
        "PROJECTION", "STREAMS", "CURRENT", "WAITING"
    )?;
    let log = SqlLog::new(db.clone());
    for projection in projections {
        let status = projection.status(db).await?;
        let waiting = log.backlog(projection.name(), projection.topic()).await?;
        writeln!(
            out,
            "{:<28}  {:>8}  {:>8}  {:>8}  {}",
            projection.name(),
            status.streams,
            status.current,
            waiting,
            projection.tables().join(", ")
        )?;
    }
    Ok(())
}

async fn rebuild(
    db: &Database,
    projection: &Projection,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let bar = ProgressBar::new(0).with_message(format!("streams into {}", projection.name()));
    bar.set_style(
        ProgressStyle::with_template("rebuild: {bar:40} {pos}/{len} {msg} ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let streams = projection
        .rebuild(db, |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })
        .await
        .with_context(|| format!("rebuilding {}", projection.name()))?;
    bar.finish_and_clear();
    writeln!(
        out,
        "rebuilt {} from {streams} stream(s) in {:.1?}",
        projection.name(),
        started.elapsed()
    )?;
    Ok(())
}
