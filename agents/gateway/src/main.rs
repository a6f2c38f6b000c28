//! `fz-gateway`: parse the command line into a checked config, then run the event loop until
//! SIGTERM or SIGINT.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser as _;
use fz_gateway::config::Args;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    let token = std::env::var("FZ_GATEWAY_TOKEN").ok();
    let config = match args.resolve(token) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::from(2);
        }
    };
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
        // The handlers go in before anything is set up on the host, so that a signal during
        // start-up still ends in the loop's clean exit instead of the default action, which
        // would leave the masquerade table behind.
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
        fz_gateway::driver::run(config, shutdown).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}
