//! `fz-portal`: serves the portal, and runs the admin commands against the same store.
//! Exit codes: 0 success, 1 the command failed, 2 usage or configuration errors.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use fz_portal::broker::system_clock;
use fz_portal::config::{AccountConfig, Config};
use fz_portal::data_dir::Creation;
use fz_portal::policy::PolicyEngine;
use fz_portal::server::RunningPortal;
use fz_portal::store::{
    ClientRecord, Database, Decision, FlowFilter, IdpGroup, Store, TokenKind, TokenRecord,
};
use serde::Serialize;

/// mimalloc instead of the system's malloc: under load, glibc's malloc and free took 13% of
/// the portal's CPU (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "fz-portal",
    version,
    about = "The fz portal and its admin commands"
)]
struct Cli {
    /// The configuration file; without it, the embedded defaults (loopback, `data/`, account
    /// `default` on `policies/`).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve HTTP and the agents' WebSockets.
    Serve,
    /// Make the data directory, the portal's keys and its store, unless they are there (then
    /// nothing changes), and print the public key agents pin. `serve` does the same at start;
    /// the other commands never make any of them.
    Init,
    /// Print the portal's public key, which agents pin.
    PublicKey,
    /// Create, revoke and list client and gateway tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Mark a client (device) verified for the WireGuard key it holds now, or take the mark
    /// away. A client that registers again with another key is not verified.
    Verify {
        #[arg(long)]
        account: String,
        client: String,
        /// Take the mark away.
        #[arg(long)]
        undo: bool,
    },
    /// Disable a user: every client token of theirs is revoked (the portal disconnects their
    /// devices and withdraws their grants within a second or two), and no sign-in gives them
    /// another until `--undo`.
    Disable {
        #[arg(long)]
        account: String,
        /// The user's email.
        user: String,
        /// Enable them again (tokens revoked meanwhile stay revoked).
        #[arg(long)]
        undo: bool,
    },
    /// List an account's client devices: whose they are, whether verified, when last
    /// connected, and their token's expiry. The ids are what `verify` takes.
    Clients {
        #[arg(long)]
        account: String,
        #[arg(long)]
        json: bool,
    },
    /// List an account's users (those with a client token, those the policy lists, those an
    /// identity provider put in a group) with their devices and groups, and where each group
    /// membership comes from.
    Users {
        #[arg(long)]
        account: String,
        /// Only this user (email).
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List an account's gateways with their health.
    Gateways {
        #[arg(long)]
        account: String,
        #[arg(long)]
        json: bool,
    },
    /// Query the flow log: every allow and deny, newest first.
    Flows(FlowArgs),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token; its secret is shown once.
    Create {
        #[arg(long)]
        account: String,
        /// A client token for a service account (a device that cannot sign in: a build
        /// machine, a server), named so; needs `--user`. People's devices get theirs by
        /// signing in (`fz-client sign-in`).
        #[arg(
            long,
            conflicts_with = "gateway",
            required_unless_present = "gateway",
            requires = "user"
        )]
        client: Option<String>,
        /// The user (email) a client token speaks for.
        #[arg(long, conflicts_with = "gateway")]
        user: Option<String>,
        /// The identity provider a client token's user counts as signed in with (the `provider`
        /// condition); without it, none.
        #[arg(long, requires = "client")]
        provider: Option<String>,
        /// A gateway token, for a gateway of this name; needs `--site`.
        #[arg(long, requires = "site")]
        gateway: Option<String>,
        /// The site a gateway token is bound to.
        #[arg(long)]
        site: Option<String>,
    },
    /// Revoke a token.
    Revoke {
        #[arg(long)]
        account: String,
        token: String,
    },
    /// List an account's tokens (never their secrets).
    List {
        #[arg(long)]
        account: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct FlowArgs {
    #[arg(long)]
    account: String,
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    resource: Option<String>,
    /// `allow` or `deny`.
    #[arg(long, value_parser = ["allow", "deny"])]
    decision: Option<String>,
    /// Only flows at or after this Unix time.
    #[arg(long)]
    since: Option<i64>,
    #[arg(long)]
    limit: Option<u32>,
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    // Whatever this process creates is its user's alone: the store and the files SQLite makes
    // beside it, the signing key, the data dir. The library sets the modes it can itself; this
    // covers what others create (SQLite's files) and whatever comes later.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { 2 } else { 0 });
        }
    };
    let config = match &cli.config {
        Some(path) => Config::load(path),
        None => Ok(Config::defaults()),
    };
    let config = match config {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(config).await,
        Command::Init => {
            // Keys first: a store is of no use without the token key that authenticates its
            // tokens, and the signing key is what agents will pin.
            let key =
                fz_portal::keys::load(&config.data_dir, &config.key_files, Creation::Allowed)?;
            Store::open_in(
                &config.data_dir,
                &config.database,
                &config.key_files,
                Creation::Allowed,
            )
            .await?
            .close()
            .await;
            let store = match config.database {
                Database::Sqlite => "and store",
                Database::Postgres(_) => "(its store is in PostgreSQL)",
            };
            println!(
                "{} holds the portal's keys {store}; portal key {}",
                config.data_dir.display(),
                key.public_key()
            );
            Ok(())
        }
        Command::PublicKey => {
            let key =
                fz_portal::keys::load(&config.data_dir, &config.key_files, Creation::Refused)?;
            println!("{}", key.public_key());
            Ok(())
        }
        Command::Token(command) => token(command, &config).await,
        Command::Verify {
            account,
            client,
            undo,
        } => {
            let store = open_store(&config, &account).await?;
            let record = store.set_client_verified(&account, &client, !undo).await?;
            if record.verified {
                println!(
                    "client {client} is verified while it holds key {}",
                    record.public_key
                );
            } else {
                println!("client {client} is no longer verified");
            }
            Ok(())
        }
        Command::Disable {
            account,
            user,
            undo,
        } => {
            let store = open_store(&config, &account).await?;
            if undo {
                store.enable_user(&account, &user).await?;
                println!("user {user} may sign in again");
            } else {
                let revoked = store.disable_user(&account, &user, now()).await?;
                println!(
                    "user {user} is disabled; {revoked} client token{} revoked",
                    if revoked == 1 { "" } else { "s" }
                );
            }
            Ok(())
        }
        Command::Clients { account, json } => clients(&config, &account, json).await,
        Command::Users {
            account,
            user,
            json,
        } => users(&config, &account, user.as_deref(), json).await,
        Command::Gateways { account, json } => {
            let store = open_store(&config, &account).await?;
            let gateways = store.list_gateways(&account).await?;
            if json {
                println!("{}", serde_json::to_string(&gateways)?);
            } else {
                // On a shared database, which replica holds each connection (as its log names
                // it at start).
                let shared = matches!(config.database, Database::Postgres(_));
                for g in &gateways {
                    let health = match (g.connected, &g.replica) {
                        (true, Some(replica)) if shared => format!("healthy on {replica}"),
                        (true, _) => "healthy".to_owned(),
                        (false, _) => "unhealthy".to_owned(),
                    };
                    println!(
                        "{}\t{}\tsite {}\t{health}\tlast seen {}",
                        g.id,
                        g.name,
                        g.site,
                        date(g.last_seen)
                    );
                }
            }
            Ok(())
        }
        Command::Flows(args) => {
            let store = open_store(&config, &args.account).await?;
            let decision = args.decision.as_deref().map(|d| {
                if d == "allow" {
                    Decision::Allow
                } else {
                    Decision::Deny
                }
            });
            let filter = FlowFilter {
                account: args.account,
                user: args.user,
                resource: args.resource,
                decision,
                since: args.since,
                limit: args.limit,
            };
            let flows = store.flows(&filter).await?;
            if args.json {
                println!("{}", serde_json::to_string(&flows)?);
            } else {
                for f in &flows {
                    // A DNS resource's flow names the resource and the name asked for.
                    let resource = match &f.name {
                        Some(name) => format!("{} ({name})", f.resource_id),
                        None => f.resource_id.clone(),
                    };
                    // Identical denials close together, and a grant handed out again, count
                    // on one row: say how many, until when.
                    let time = if f.count > 1 {
                        format!(
                            "{} ({} times until {})",
                            date(f.time),
                            f.count,
                            date(f.last_time)
                        )
                    } else {
                        date(f.time)
                    };
                    // How a grant's connection travels, once its gateway said.
                    let path = match (&f.path, &f.relay) {
                        (Some(path), Some(relay)) => format!("{path} via {relay}"),
                        (Some(path), None) => path.clone(),
                        (None, _) => "-".to_owned(),
                    };
                    println!(
                        "{time}\t{:?}\t{}\t{resource}\t{}\t{}\t{path}",
                        f.decision,
                        f.user,
                        f.rule_id.as_deref().unwrap_or("-"),
                        f.reason
                    );
                }
            }
            Ok(())
        }
    }
}

async fn token(command: TokenCommand, config: &Config) -> anyhow::Result<()> {
    let now = now();
    match command {
        TokenCommand::Create {
            account,
            client,
            user,
            provider,
            gateway,
            site,
        } => {
            let settings = account_config(config, &account)?;
            let store = open_store(config, &account).await?;
            let (kind, name) = match (client, gateway, site) {
                (Some(name), None, _) => {
                    let typed = user.context("a client token needs `--user EMAIL`")?;
                    // Stored as sign-in stores it (trimmed, lowercase), so that decisions and
                    // `disable` find the same user.
                    let user = fz_portal::sign_in::email_address(&typed).with_context(|| {
                        format!(
                            "`--user {typed}` is not an email address such as `ci@acme.example`"
                        )
                    })?;
                    (TokenKind::Client { user, provider }, name)
                }
                (None, Some(name), Some(site)) => {
                    // A gateway token is bound to a site the account's policy declares.
                    let policy = PolicyEngine::open(&settings.policy)?;
                    if !policy
                        .current()
                        .table
                        .table()
                        .sites
                        .iter()
                        .any(|s| s.id == site)
                    {
                        bail!("account `{account}` has no site `{site}` in its policy");
                    }
                    (TokenKind::Gateway { site }, name)
                }
                _ => bail!("give `--client NAME`, or `--gateway NAME --site SITE`"),
            };
            let lifetime = i64::try_from(settings.token_lifetime_secs).unwrap_or(i64::MAX);
            // Stored inactive, shown, then activated: a command killed or failing before the
            // secret is out leaves a token nobody can use (listed `inactive`), never a live
            // one nobody holds, and no secret is shown for a token the store does not have.
            let token = store
                .create_inactive_token(&account, kind, &name, now.saturating_add(lifetime), now)
                .await?;
            let mut out = std::io::stdout().lock();
            let shown = writeln!(out, "token {}\nsecret {}", token.id, token.secret)
                .and_then(|()| out.flush());
            drop(out);
            if let Err(error) = shown {
                bail!(
                    "cannot print the secret ({error}); token {} stays inactive and nobody can use it",
                    token.id
                );
            }
            store
                .activate_token(&account, &token.id, now)
                .await
                .with_context(|| {
                    format!(
                        "token {} stays inactive and nobody can use it; revoke it and create another",
                        token.id
                    )
                })?;
            eprintln!("the secret is shown once; the portal keeps only its hash");
            Ok(())
        }
        TokenCommand::Revoke { account, token } => {
            let store = open_store(config, &account).await?;
            store.revoke_token(&account, &token, now).await?;
            println!("token {token} revoked");
            Ok(())
        }
        TokenCommand::List { account, json } => {
            let store = open_store(config, &account).await?;
            let tokens = store.list_tokens(&account).await?;
            if json {
                println!("{}", serde_json::to_string(&tokens)?);
            } else {
                for t in &tokens {
                    let state = token_state(t, now);
                    let kind = match &t.kind {
                        TokenKind::Client { user, provider } => format!(
                            "{} of {user}{}",
                            if t.signed_in {
                                "client"
                            } else {
                                "service account client"
                            },
                            provider
                                .as_deref()
                                .map(|p| format!(" via {p}"))
                                .unwrap_or_default()
                        ),
                        TokenKind::Gateway { site } => format!("gateway in site {site}"),
                    };
                    println!(
                        "{}\t{}\t{kind}\t{state}\texpires {}",
                        t.id,
                        t.name,
                        date(t.expires_at)
                    );
                }
            }
            Ok(())
        }
    }
}

/// What a token is good for at `now`.
fn token_state(token: &TokenRecord, now: i64) -> &'static str {
    if token.revoked_at.is_some() {
        "revoked"
    } else if token.activated_at.is_none() {
        // `token create` did not finish: its secret may never have been shown.
        "inactive"
    } else if token.expires_at <= now {
        "expired"
    } else {
        "active"
    }
}

/// A client device as `fz-portal clients --json` shows it.
#[derive(Debug, Serialize)]
struct ClientView<'a> {
    #[serde(flatten)]
    client: &'a ClientRecord,
    user: Option<&'a str>,
    provider: Option<&'a str>,
    /// Its token was made by an admin (`token create`), not at the user's sign-in.
    service_account: bool,
    token_expires_at: Option<i64>,
    token_state: &'static str,
}

async fn clients(config: &Config, account: &str, json: bool) -> anyhow::Result<()> {
    let now = now();
    let store = open_store(config, account).await?;
    let tokens = store.list_tokens(account).await?;
    let clients = store.list_clients(account).await?;
    let views: Vec<ClientView<'_>> = clients
        .iter()
        .map(|client| {
            let token = tokens.iter().find(|t| t.id == client.token_id);
            let (user, provider) = match token.map(|t| &t.kind) {
                Some(TokenKind::Client { user, provider }) => {
                    (Some(user.as_str()), provider.as_deref())
                }
                _ => (None, None),
            };
            ClientView {
                client,
                user,
                provider,
                service_account: token.is_some_and(|t| !t.signed_in),
                token_expires_at: token.map(|t| t.expires_at),
                token_state: token.map_or("gone", |t| token_state(t, now)),
            }
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string(&views)?);
        return Ok(());
    }
    for view in &views {
        let client = view.client;
        let mark = match (&client.verified_key, client.verified) {
            (_, true) => "verified",
            (Some(_), false) => "marked verified for a key it no longer holds",
            (None, false) => "not verified",
        };
        let user = match (view.user, view.provider) {
            (Some(user), Some(provider)) => format!("{user} via {provider}"),
            (Some(user), None) => user.to_owned(),
            (None, _) => "-".to_owned(),
        };
        let user = if view.service_account {
            format!("{user} (service account)")
        } else {
            user
        };
        let connected = client.last_connected_at.map_or_else(
            || "never connected".to_owned(),
            |t| format!("last connected {}", date(t)),
        );
        let token = match view.token_expires_at {
            Some(expires) => format!("token {} until {}", view.token_state, date(expires)),
            None => "token gone".to_owned(),
        };
        println!(
            "{}\t{}\t{user}\t{mark}\t{connected}\t{token}",
            client.id, client.name
        );
    }
    Ok(())
}

/// A user as `fz-portal users` shows them.
#[derive(Debug, Default, Serialize)]
struct UserView {
    email: String,
    /// Client devices (one per client token) and the providers their tokens name.
    devices: usize,
    providers: BTreeSet<String>,
    /// The policy's groups the user is in now, each with where the membership comes from.
    groups: Vec<Membership>,
    /// Groups an identity provider put the user in that no group of the policy takes in.
    unbound_idp_groups: Vec<IdpGroup>,
    /// When an admin disabled the user (`fz-portal disable`); `None`: enabled.
    disabled_at: Option<i64>,
}

#[derive(Debug, Serialize)]
struct Membership {
    group: String,
    /// `policy` (listed in the group), or the identity provider's group that brings it.
    source: MembershipSource,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum MembershipSource {
    Policy,
    Idp(IdpGroup),
}

async fn users(
    config: &Config,
    account: &str,
    only: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let settings = account_config(config, account)?;
    let store = open_store(config, account).await?;
    let policy = PolicyEngine::open(&settings.policy)?;
    let loaded = policy.current();
    let table = loaded.table.table();
    let mut users: BTreeMap<String, UserView> = BTreeMap::new();
    for token in store.list_tokens(account).await? {
        if let TokenKind::Client {
            user: email,
            provider,
        } = &token.kind
        {
            let view = user_entry(&mut users, email);
            view.devices += 1;
            view.providers.extend(provider.clone());
        }
    }
    for group in &table.groups {
        for email in &group.members {
            user_entry(&mut users, email).groups.push(Membership {
                group: group.id.clone(),
                source: MembershipSource::Policy,
            });
        }
    }
    for (email, disabled_at) in store.disabled_users(account).await? {
        user_entry(&mut users, &email).disabled_at = Some(disabled_at);
    }
    for (email, idp_group) in store.all_memberships(account).await? {
        let bound: Vec<&str> = table
            .groups
            .iter()
            .filter(|g| {
                g.idp
                    .iter()
                    .any(|b| b.provider == idp_group.provider && b.group == idp_group.group)
            })
            .map(|g| g.id.as_str())
            .collect();
        let view = user_entry(&mut users, &email);
        if bound.is_empty() {
            view.unbound_idp_groups.push(idp_group);
            continue;
        }
        for group in bound {
            view.groups.push(Membership {
                group: group.to_owned(),
                source: MembershipSource::Idp(idp_group.clone()),
            });
        }
    }
    let views: Vec<UserView> = users
        .into_values()
        .filter(|u| only.is_none_or(|email| u.email.eq_ignore_ascii_case(email)))
        .collect();
    if let Some(email) = only
        && views.is_empty()
    {
        bail!("account `{account}` knows no user `{email}`");
    }
    if json {
        println!("{}", serde_json::to_string(&views)?);
        return Ok(());
    }
    for view in &views {
        let providers = if view.providers.is_empty() {
            String::new()
        } else {
            let names: Vec<&str> = view.providers.iter().map(String::as_str).collect();
            format!(" (signed in via {})", names.join(", "))
        };
        let plural = if view.devices == 1 { "" } else { "s" };
        let disabled = view
            .disabled_at
            .map(|at| format!("\tdisabled since {}", date(at)))
            .unwrap_or_default();
        println!(
            "{}\t{} device{plural}{providers}{disabled}",
            view.email, view.devices
        );
        for membership in &view.groups {
            let source = match &membership.source {
                MembershipSource::Policy => "listed in the policy".to_owned(),
                MembershipSource::Idp(g) => format!("{} group \"{}\"", g.provider, g.group),
            };
            println!("    group {}\t{source}", membership.group);
        }
        for g in &view.unbound_idp_groups {
            println!(
                "    ({} group \"{}\": no group of the policy takes it in)",
                g.provider, g.group
            );
        }
    }
    Ok(())
}

/// The user of this email (in any case), added if new.
fn user_entry<'a>(users: &'a mut BTreeMap<String, UserView>, email: &str) -> &'a mut UserView {
    let email = email.to_lowercase();
    users.entry(email.clone()).or_insert_with(|| UserView {
        email,
        ..UserView::default()
    })
}

/// A Unix time as a date for people: `2026-12-06 01:55:02 UTC`.
fn date(unix_seconds: i64) -> String {
    chrono::DateTime::from_timestamp(unix_seconds, 0).map_or_else(
        || format!("{unix_seconds} (Unix seconds)"),
        |time| time.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

fn account_config<'a>(config: &'a Config, account: &str) -> anyhow::Result<&'a AccountConfig> {
    config
        .account(account)
        .with_context(|| format!("no account `{account}` in the configuration"))
}

/// The store, for an account the configuration names.
async fn open_store(config: &Config, account: &str) -> anyhow::Result<Store> {
    account_config(config, account)?;
    let store = Store::open_in(
        &config.data_dir,
        &config.database,
        &config.key_files,
        Creation::Refused,
    )
    .await?;
    store.ensure_account(account).await?;
    Ok(store)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Logs go to stderr; stdout carries only the line that says where the portal listens.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Every connection is a descriptor, and systemd starts services with a soft limit of 1,024.
    // The connection caps are sized from the limit this leaves.
    match fz_portal::listener::raise_open_files_limit() {
        Ok((before, after, hard)) if before < after => tracing::info!(
            soft = before,
            hard,
            now = after,
            "open files limit raised to the hard limit"
        ),
        Ok((soft, _, hard)) => tracing::info!(soft, hard, "open files limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open files limit"),
    }
    let portal = RunningPortal::start(&config, system_clock()).await?;
    println!(
        "fz-portal listening on {}://{} (portal key {})",
        RunningPortal::scheme(&config),
        portal.address,
        portal.public_key
    );
    shutdown().await;
    portal.stop().await
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
