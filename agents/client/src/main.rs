//! `fz-client`: parse the command line into a checked config, then run the event loop until
//! SIGTERM or SIGINT; the host's resolver configuration comes back either way.

use std::process::ExitCode;

use clap::Parser as _;
use fz_client::config::Args;

fn main() -> ExitCode {
    fz_host::agent::init_logging();
    let config = match Args::parse().resolve() {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::from(2);
        }
    };
    fz_host::agent::run_until_signal(|shutdown| fz_client::driver::run(config, shutdown))
}
