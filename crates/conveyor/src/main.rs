//! `conveyor`: runs Conveyor's services and operates on their data.

use clap::{Parser, Subcommand};
use conveyor::config::{ConfigError, Settings, SettingsArgs};
use conveyor::dlq::DlqCommand;
use conveyor::{app, telemetry, Application, SERVICES};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Request handling allocates many small, short-lived values across threads; mimalloc
/// serves them with a fraction of the system allocator's CPU time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Conveyor: event-driven services in one binary.
///
/// `conveyor serve` runs every service in one process on an embedded SQLite file that is
/// also the message log: nothing else to install. Every setting is also a CONVEYOR_*
/// environment variable and a key of ./conveyor.toml (flags win over env, env over file).
#[derive(Debug, Parser)]
#[command(name = "conveyor", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the services: HTTP APIs and message handlers.
    Serve(#[command(flatten)] SettingsArgs),
    /// Creates or updates the services' tables, then exits.
    Migrate(#[command(flatten)] SettingsArgs),
    /// Prints the effective configuration (secrets masked).
    Config(#[command(flatten)] SettingsArgs),
    /// Measures throughput and latency against baselines run side by side.
    #[command(subcommand)]
    Bench(conveyor::bench::BenchCommand),
    /// Lists the projections (read models kept from the event store) and rebuilds them.
    Projections {
        #[command(flatten)]
        settings: SettingsArgs,
        #[command(subcommand)]
        command: conveyor::projections::ProjectionsCommand,
    },
    /// Inspects, replays and purges dead letters.
    Dlq {
        #[command(flatten)]
        settings: SettingsArgs,
        #[command(subcommand)]
        command: DlqCommand,
    },
}

/// The error and its causes, each once: most errors here already say their cause, and the
/// drivers' errors repeat their own.
fn describe(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message = format!("{message}: {cause}");
        }
    }
    message
}

fn main() -> ExitCode {
    // Transparent huge pages off, before any thread starts. mimalloc asks the kernel for
    // them, and each thread's heap then holds whole 2 MiB pages, most of them empty: idle
    // RSS was 34 MB on SQLite and 83 – 91 MB on MariaDB with them, 22 and 26 MB without,
    // with the same CPU per request (docs/benchmarks.md). A kernel without the setting
    // keeps them.
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("conveyor: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("conveyor: {}", describe(&error));
            if error.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn resolve(args: SettingsArgs) -> anyhow::Result<Settings> {
    let settings = args.resolve(SERVICES)?;
    telemetry::init(settings.log_format);
    Ok(settings)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            let settings = resolve(args)?;
            let application = Application::build(settings).await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            application.run_until_stopped(shutdown).await
        }
        Command::Migrate(args) => {
            let settings = resolve(args)?;
            let db = app::open_database(&settings).await?;
            db.close().await;
            let names: Vec<_> = settings.services.iter().map(|s| s.name).collect();
            println!(
                "migrated {} ({})",
                settings.database.describe(),
                names.join(", ")
            );
            Ok(())
        }
        Command::Config(args) => {
            println!("{}", args.resolve(SERVICES)?.render());
            Ok(())
        }
        Command::Bench(command) => {
            telemetry::init(conveyor::config::LogFormat::Text);
            conveyor::bench::run(command).await
        }
        Command::Projections { settings, command } => {
            let settings = resolve(settings)?;
            let db = app::open_database(&settings).await?;
            let result = conveyor::projections::run(
                &db,
                &settings.services,
                command,
                &mut std::io::stdout(),
            )
            .await;
            db.close().await;
            result
        }
        Command::Dlq { settings, command } => {
            let settings = resolve(settings)?;
            let db = app::open_database(&settings).await?;
            let result = conveyor::dlq::run(&db, command, &mut std::io::stdout()).await;
            db.close().await;
            result
        }
    }
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        () = terminate => {}
    }
    shutdown.cancel();
}
