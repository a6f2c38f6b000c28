//! `fz-client`: parse the command line into a checked config, then run the event loop until
//! SIGTERM or SIGINT; the host's resolver configuration comes back either way. With no token
//! at `--token-file` yet, it signs in first. `fz-client sign-in`, `sign-out`, `handle-url` and
//! `install-url-handler` are commands of their own, which end.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use fz_client::config::{Args, TOKEN_VARIABLE};
use fz_client::deep_link;
use fz_client::sign_in::{self, SignInArgs, SignOutArgs};
use fz_client::token_store;

/// Hands a `fz://handle_client_sign_in_callback?…` link to the waiting `fz-client sign-in`
/// (what the desktop runs for such a link once `install-url-handler` registered it).
#[derive(Debug, clap::Parser)]
#[command(name = "fz-client handle-url")]
struct HandleUrlArgs {
    url: String,
}

/// Makes this program the desktop's handler of `fz://` links: a `.desktop` entry and
/// `xdg-mime`.
#[derive(Debug, clap::Parser)]
#[command(name = "fz-client install-url-handler")]
struct InstallArgs {}

/// Takes the token out of the environment, if it is there, so that nothing this process
/// starts (a browser, `xdg-open`) inherits it.
#[allow(unsafe_code)]
fn take_token_from_environment() -> Option<String> {
    let token = std::env::var(TOKEN_VARIABLE).ok()?;
    // SAFETY: called first thing in `main`, before any thread exists (no runtime, no logging
    // yet), so nothing reads the environment while it changes.
    unsafe { std::env::remove_var(TOKEN_VARIABLE) };
    Some(token)
}

fn main() -> ExitCode {
    let token_from_environment = take_token_from_environment();
    fz_host::agent::init_logging();
    // `sign-in` and `sign-out` are commands of their own; anything else runs the client.
    let command = std::env::args_os().nth(1);
    let rest = || {
        std::env::args_os()
            .take(1)
            .chain(std::env::args_os().skip(2))
    };
    if command.as_ref().is_some_and(|c| c == "sign-in") {
        let args = SignInArgs::parse_from(rest());
        return once(|| async { sign_in::run(args, &mut std::io::stdout()).await.map(drop) });
    }
    if command.as_ref().is_some_and(|c| c == "sign-out") {
        let args = SignOutArgs::parse_from(rest());
        return once(|| async { sign_in::sign_out(args, &mut std::io::stdout()).await });
    }
    if command.as_ref().is_some_and(|c| c == "handle-url") {
        let args = HandleUrlArgs::parse_from(rest());
        return once(|| async {
            deep_link::hand_over(&args.url).await?;
            writeln!(std::io::stdout(), "ok: the sign-in took the link")
                .map_err(sign_in::SignInError::Output)
        });
    }
    if command.as_ref().is_some_and(|c| c == "install-url-handler") {
        InstallArgs::parse_from(rest());
        return once(|| async {
            deep_link::install(&mut std::io::stdout())
                .map(drop)
                .map_err(Into::into)
        });
    }
    let args = Args::parse();
    // The token: from the environment, else where sign-in keeps it (the keyring or the file),
    // else from a sign-in now.
    let token = match token_from_environment {
        Some(token) => token,
        None => match stored_token(&args) {
            Ok(Some(token)) => token,
            Ok(None) => {
                let signed_in = sign_in_first(&args);
                if signed_in != ExitCode::SUCCESS {
                    return signed_in;
                }
                match stored_token(&args) {
                    Ok(Some(token)) => token,
                    Ok(None) => {
                        tracing::error!("the sign-in stored no token");
                        return ExitCode::FAILURE;
                    }
                    Err(error) => {
                        tracing::error!("{error}");
                        return ExitCode::from(2);
                    }
                }
            }
            Err(error) => {
                tracing::error!("{error}");
                return ExitCode::from(2);
            }
        },
    };
    let config = match args.resolve(Some(token)) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::from(2);
        }
    };
    fz_host::agent::run_until_signal(|shutdown| fz_client::driver::run(config, shutdown))
}

/// The token sign-in stored for this portal and account: in the keyring (unless
/// `--token-file` names the one place to look), else in the token file; `None` when there is
/// none yet.
fn stored_token(args: &Args) -> Result<Option<String>, String> {
    let file_only = args.token_file.is_some();
    let file = args.token_file().map_err(|e| e.to_string())?;
    let name = sign_in::token_entry(&args.portal.portal_url, &args.portal.account)
        .map_err(|e| e.to_string())?;
    match token_store::load(&name, &file, file_only) {
        Ok(Some((token, place))) => {
            tracing::info!(%place, "using the token sign-in stored");
            Ok(Some(token))
        }
        Ok(None) => Ok(None),
        Err(error) => Err(error.to_string()),
    }
}

/// `fz-client sign-in` for the client's portal and account, before it starts.
fn sign_in_first(args: &Args) -> ExitCode {
    tracing::info!("no token yet: signing in first (the URL to open follows)");
    let sign_in = SignInArgs {
        // The first URL: the one whose name the token is stored under (`token_entry`).
        portal_url: args.portal.portal_url.first().cloned().unwrap_or_default(),
        account: args.portal.account.clone(),
        token_file: args.token_file.clone(),
        no_browser: false,
        timeout_secs: sign_in::DEFAULT_TIMEOUT_SECS,
        callback: sign_in::CallbackKind::Loopback,
    };
    once(|| async {
        sign_in::run(sign_in, &mut std::io::stdout())
            .await
            .map(drop)
    })
}

/// Runs one command to its end on a runtime of its own.
fn once<F, Fut>(command: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), sign_in::SignInError>>,
{
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
    match runtime.block_on(command()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}
