//! `fz-client`: parse the command line into a checked config, then run the event loop until
//! SIGTERM or SIGINT; the host's resolver configuration comes back either way. `fz-client
//! sign-in` gets the device its token through the browser instead, and exits.

use std::process::ExitCode;

use clap::Parser as _;
use fz_client::config::Args;
use fz_client::sign_in::{self, SignInArgs};

fn main() -> ExitCode {
    fz_host::agent::init_logging();
    let mut args = std::env::args_os();
    if std::env::args_os().nth(1).is_some_and(|a| a == "sign-in") {
        let program = args.next();
        args.next();
        return sign_in_main(SignInArgs::parse_from(program.into_iter().chain(args)));
    }
    let config = match Args::parse().resolve() {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::from(2);
        }
    };
    fz_host::agent::run_until_signal(|shutdown| fz_client::driver::run(config, shutdown))
}

fn sign_in_main(args: SignInArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sign_in::run(args, &mut std::io::stdout())) {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}
