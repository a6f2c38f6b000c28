//! What both agents' binaries and event loops share: logging to standard error, a runtime
//! that runs the loop until SIGTERM or SIGINT, and a deadline that may be none.

use std::future::Future;
use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::Instant;

use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// The TURN and STUN crates trace every call they make at `info` (each poll with its return
/// value, many times a second): quiet unless `RUST_LOG` names them.
const QUIET: &str = "turn_client_proto=warn,stun_proto=warn,turn_types=warn,stun_types=warn";

/// Logs to standard error at `RUST_LOG` (default `info`), with colour only on a terminal.
pub fn init_logging() {
    let asked = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    // A directive the user gives for one of these crates comes later and wins.
    let filter = EnvFilter::try_new(format!("{QUIET},{asked}"))
        .unwrap_or_else(|_| EnvFilter::new(format!("{QUIET},info")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Runs `event_loop(shutdown)` on a single-threaded runtime; `shutdown` completes on SIGTERM
/// or SIGINT. Exits 0 when the loop ends cleanly, 1 when it fails (its error logged).
pub fn run_until_signal<F, L>(event_loop: L) -> ExitCode
where
    L: FnOnce(std::pin::Pin<Box<dyn Future<Output = ()>>>) -> F,
    F: Future<Output = anyhow::Result<()>>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        // The handlers go in before the loop sets anything up on the host, so that a signal
        // during start-up still ends in the loop's clean exit instead of the default action,
        // which would leave what it installed behind.
        let (mut term, mut int) = (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        );
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        event_loop(Box::pin(shutdown)).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Sleeps until `deadline`, or forever when there is none.
pub async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await,
        None => std::future::pending().await,
    }
}
