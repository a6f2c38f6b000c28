//! `fz-gateway`: parse the command line into a checked config, then run the event loop until
//! SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser as _;
use fz_gateway::config::Args;

fn main() -> ExitCode {
    fz_host::agent::init_logging();
    let token = std::env::var("FZ_GATEWAY_TOKEN").ok();
    let config = match Args::parse().resolve(token) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::from(2);
        }
    };
    fz_host::agent::run_until_signal(|shutdown| fz_gateway::driver::run(config, shutdown))
}
