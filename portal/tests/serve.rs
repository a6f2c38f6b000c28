//! The portal as an operator runs it: the `fz-portal` binary with a configuration file, its
//! admin commands, `serve` answering `/healthz`, and a restart that keeps the store.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

const POLICY: &str = r#"
site hq
resource gitlab { address "gitlab.acme.example"; site hq; ports tcp/443 }
group engineering { members "alice@acme.example" }
allow engineering -> gitlab as eng-git
"#;

/// A portal home: a policy tree and a configuration file listening on a free loopback port.
/// A portal's home (config and policy) after `fz-portal init`, as an operator sets one up.
fn home() -> tempfile::TempDir {
    let home = uninitialised_home();
    let init = portal(home.path(), &["init"]);
    assert!(init.status.success(), "{init:?}");
    home
}

/// A portal's home before anything made its data directory.
fn uninitialised_home() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/access.fz"), POLICY).unwrap();
    std::fs::write(
        dir.path().join("portal.toml"),
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n[[accounts]]\nslug = \"acme\"\npolicy = \"policies\"\n\n[[accounts]]\nslug = \"other\"\npolicy = \"policies\"\n",
    )
    .unwrap();
    dir
}

/// The portal binary with the configuration of `home`, started with the umask most systems
/// give (022), so that only the portal's own care keeps its files private.
fn command(home: &Path) -> Command {
    command_with(&home.join("portal.toml"))
}

/// [`command`] with the configuration file `config`.
fn command_with(config: &Path) -> Command {
    let mut command = Command::new("sh");
    command
        .args(["-c", "umask 022 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_fz-portal"))
        .arg("--config")
        .arg(config);
    command
}

fn portal(home: &Path, args: &[&str]) -> Output {
    command(home).args(args).output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// Starts `serve` and returns the process and the address it printed.
fn serve(home: &Path) -> (Child, String) {
    serve_with_logs(home, Stdio::null())
}

/// Starts `serve` with its log (stderr) going to `logs`.
fn serve_with_logs(home: &Path, logs: Stdio) -> (Child, String) {
    serve_command(command(home), logs)
}

/// Starts `portal` (a [`command`]) as `serve`, with its log going to `logs`.
fn serve_command(mut portal: Command, logs: Stdio) -> (Child, String) {
    let mut child = portal
        .arg("serve")
        .stdout(Stdio::piped())
        .stderr(logs)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect(&line)
        .to_owned();
    (child, address)
}

fn get(address: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn serves_healthz_with_each_accounts_policy() {
    let home = home();
    let (mut child, address) = serve(home.path());
    let response = get(&address, "/healthz");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let body: serde_json::Value =
        serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["accounts"][0]["slug"], "acme");
    assert!(
        body["accounts"][0]["bundle_hash"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
}

#[test]
fn tokens_survive_a_restart_and_stay_in_their_account() {
    let home = home();
    let created = portal(
        home.path(),
        &[
            "token",
            "create",
            "--account",
            "acme",
            "--client",
            "laptop",
            "--user",
            "Alice@acme.example",
        ],
    );
    assert!(created.status.success(), "{created:?}");
    let id = stdout(&created)
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("token ")
        .to_owned();
    let secret = stdout(&created)
        .lines()
        .nth(1)
        .unwrap()
        .trim_start_matches("secret ")
        .to_owned();
    assert!(secret.starts_with("fz1.client.acme.tok_"), "{secret}");

    // A portal run in between (opening, migrating, closing the store) loses nothing.
    let (mut child, _) = serve(home.path());
    child.kill().unwrap();
    child.wait().unwrap();

    let listed: serde_json::Value = serde_json::from_str(&stdout(&portal(
        home.path(),
        &["token", "list", "--account", "acme", "--json"],
    )))
    .unwrap();
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["name"], "laptop");
    assert_eq!(listed[0]["kind"], "client");
    assert_eq!(listed[0]["user"], "alice@acme.example");
    let other = stdout(&portal(
        home.path(),
        &["token", "list", "--account", "other", "--json"],
    ));
    assert_eq!(other.trim(), "[]");
    let database = std::fs::read(home.path().join("data/portal.sqlite3")).unwrap();
    assert!(
        !database
            .windows(secret.len())
            .any(|w| w == secret.as_bytes()),
        "the secret is stored"
    );

    // Revoking needs the right account.
    assert!(
        !portal(home.path(), &["token", "revoke", "--account", "other", &id])
            .status
            .success()
    );
    assert!(
        portal(home.path(), &["token", "revoke", "--account", "acme", &id])
            .status
            .success()
    );
    let listed: serde_json::Value = serde_json::from_str(&stdout(&portal(
        home.path(),
        &["token", "list", "--account", "acme", "--json"],
    )))
    .unwrap();
    assert!(listed[0]["revoked_at"].is_i64(), "{listed}");
}

#[test]
fn gateway_tokens_are_bound_to_a_declared_site() {
    let home = home();
    let good = portal(
        home.path(),
        &[
            "token",
            "create",
            "--account",
            "acme",
            "--gateway",
            "gw-1",
            "--site",
            "hq",
        ],
    );
    assert!(good.status.success(), "{good:?}");
    let bad = portal(
        home.path(),
        &[
            "token",
            "create",
            "--account",
            "acme",
            "--gateway",
            "gw-2",
            "--site",
            "mars",
        ],
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no site `mars`"));
    let listed: serde_json::Value = serde_json::from_str(&stdout(&portal(
        home.path(),
        &["token", "list", "--account", "acme", "--json"],
    )))
    .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["site"], "hq");
}

#[test]
fn configuration_and_usage_errors_exit_2() {
    let home = home();
    std::fs::write(
        home.path().join("bad.toml"),
        "listen = \"0.0.0.0:80\"\n[[accounts]]\nslug = \"a\"\npolicy = \"p\"\n",
    )
    .unwrap();
    let cases: [(&[&str], &str); 3] = [
        (&["--config", "bad.toml", "serve"], "beyond loopback"),
        (&["--config", "missing.toml", "serve"], "cannot read"),
        (
            &[
                "--config",
                "portal.toml",
                "token",
                "create",
                "--account",
                "acme",
            ],
            "required",
        ),
    ];
    for (args, expected) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_fz-portal"))
            .args(args)
            .current_dir(home.path())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(expected),
            "{args:?}: {output:?}"
        );
    }
    let unknown = portal(home.path(), &["token", "list", "--account", "nope"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no account `nope`"));
}

#[test]
fn sighup_reloads_every_account_and_sigterm_stops_cleanly() {
    let home = home();
    let (mut child, _) = serve_with_logs(home.path(), Stdio::piped());
    let mut logs = BufReader::new(child.stderr.take().unwrap()).lines();
    let signal = |name: &str| {
        let sent = Command::new("kill")
            .args([name, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    // `serve` returned once the portal said it listens: it handles SIGHUP from then on.
    signal("-HUP");
    let reloaded: Vec<String> = logs
        .by_ref()
        .map(Result::unwrap)
        .filter(|line| line.contains("policy reloaded on request"))
        .take(2)
        .collect();
    assert!(
        reloaded.iter().any(|l| l.contains("account=acme")),
        "{reloaded:?}"
    );
    assert!(
        reloaded.iter().any(|l| l.contains("account=other")),
        "{reloaded:?}"
    );
    signal("-TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// A file's permission bits.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The data dir is 0700 and everything in it 0600; returns the names of what is in it.
fn assert_private(home: &Path, after: &str) -> Vec<String> {
    let data = home.join("data");
    assert_eq!(mode(&data), 0o700, "the data dir after {after}");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&data).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        assert_eq!(mode(&entry.path()), 0o600, "{name} after {after}");
        names.push(name);
    }
    names.sort();
    names
}

#[test]
fn every_command_keeps_the_data_dir_and_its_files_to_the_portals_user() {
    let home = home();
    let public_key = portal(home.path(), &["public-key"]);
    assert!(public_key.status.success(), "{public_key:?}");
    // SQLite's `-wal` and `-shm` may still be there if its last connection closed late.
    let names = assert_private(home.path(), "init, public-key");
    for name in ["portal-signing.key", "portal.sqlite3", "token.key"] {
        assert!(names.contains(&name.to_owned()), "{names:?}");
    }
    let client = &[
        "token",
        "create",
        "--account",
        "acme",
        "--client",
        "laptop",
        "--user",
        "a@acme.example",
    ];
    let created = portal(home.path(), client);
    assert!(created.status.success(), "{created:?}");
    let token = stdout(&created)
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("token ")
        .to_owned();
    let commands: [&[&str]; 9] = [
        &[
            "token",
            "create",
            "--account",
            "acme",
            "--gateway",
            "gw",
            "--site",
            "hq",
        ],
        &["token", "list", "--account", "acme"],
        &["token", "revoke", "--account", "acme", &token],
        // No such client: the command fails, but only after it opened the store.
        &["verify", "--account", "acme", "cli_none"],
        &["gateways", "--account", "acme"],
        &["flows", "--account", "acme"],
        &["clients", "--account", "acme"],
        &["users", "--account", "acme"],
        &["public-key"],
    ];
    for args in commands {
        let output = portal(home.path(), args);
        assert!(
            output.status.code().is_some_and(|code| code <= 1),
            "{args:?}: {output:?}"
        );
        let names = assert_private(home.path(), &args.join(" "));
        assert!(names.contains(&"portal.sqlite3".to_owned()), "{names:?}");
    }
    // While serving, SQLite's log and shared memory are there too, as private.
    let (mut child, _) = serve(home.path());
    let names = assert_private(home.path(), "serve");
    for name in ["portal.sqlite3-wal", "portal.sqlite3-shm"] {
        assert!(names.contains(&name.to_owned()), "{names:?}");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_private(home.path(), "serve, killed");
}

#[test]
fn a_data_dir_or_file_open_to_others_is_refused_by_every_command_with_the_fix() {
    let home = home();
    let created = portal(
        home.path(),
        &[
            "token",
            "create",
            "--account",
            "acme",
            "--gateway",
            "gw",
            "--site",
            "hq",
        ],
    );
    assert!(created.status.success(), "{created:?}");
    assert!(portal(home.path(), &["public-key"]).status.success());
    let data = home.path().join("data");
    let commands: [&[&str]; 10] = [
        &["public-key"],
        &[
            "token",
            "create",
            "--account",
            "acme",
            "--gateway",
            "gw",
            "--site",
            "hq",
        ],
        &["token", "list", "--account", "acme"],
        &["token", "revoke", "--account", "acme", "tok_x"],
        &["verify", "--account", "acme", "cli_x"],
        &["gateways", "--account", "acme"],
        &["flows", "--account", "acme"],
        &["clients", "--account", "acme"],
        &["users", "--account", "acme"],
        &["serve"],
    ];
    // (what, how open, its private mode, the chmod the message asks for)
    let cases = [
        (data.clone(), 0o755, 0o700, "chmod 700"),
        (data.clone(), 0o701, 0o700, "chmod 700"),
        (data.join("portal.sqlite3"), 0o644, 0o600, "chmod 600"),
        (data.join("portal-signing.key"), 0o640, 0o600, "chmod 600"),
    ];
    for (path, open, private, chmod) in cases {
        set_mode(&path, open);
        for args in commands {
            // `serve` would print where it listens if it started: nothing is read but the end.
            let mut child = command(home.path())
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut out = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            if out.contains("listening") {
                child.kill().unwrap();
            }
            let output = child.wait_with_output().unwrap();
            let error = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(1), "{args:?}: {out}{error}");
            let shown = path.display();
            for needed in [
                format!("`{shown}`"),
                format!("mode {open:04o}"),
                format!("`{chmod} {shown}`"),
            ] {
                assert!(
                    error.contains(&needed),
                    "{args:?}: {needed} missing from {error}"
                );
            }
        }
        set_mode(&path, private);
    }
    assert!(
        portal(home.path(), &["token", "list", "--account", "acme"])
            .status
            .success()
    );
}

#[test]
fn a_token_works_only_once_its_secret_is_printed() {
    let home = home();
    let create = [
        "token",
        "create",
        "--account",
        "acme",
        "--gateway",
        "gw",
        "--site",
        "hq",
    ];
    // Nobody reads what it prints: the secret never reaches anyone.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let unread = command(home.path())
        .args(create)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(unread.status.code(), Some(1), "{unread:?}");
    assert!(
        String::from_utf8_lossy(&unread.stderr).contains("stays inactive and nobody can use it"),
        "{unread:?}"
    );
    let printed = portal(home.path(), &create);
    assert!(printed.status.success(), "{printed:?}");
    let secret = stdout(&printed)
        .lines()
        .nth(1)
        .unwrap()
        .trim_start_matches("secret ")
        .to_owned();
    assert!(secret.starts_with("fz1.gateway.acme.tok_"), "{secret}");

    // The first is listed as inactive, the second as active.
    let listed = stdout(&portal(
        home.path(),
        &["token", "list", "--account", "acme"],
    ));
    let states: Vec<&str> = listed
        .lines()
        .map(|line| line.split('\t').nth(3).unwrap())
        .collect();
    assert_eq!(states, ["inactive", "active"], "{listed}");
    let json: serde_json::Value = serde_json::from_str(&stdout(&portal(
        home.path(),
        &["token", "list", "--account", "acme", "--json"],
    )))
    .unwrap();
    assert!(json[0]["activated_at"].is_null(), "{json}");
    assert!(json[1]["activated_at"].is_i64(), "{json}");
}

/// The token id `token create` printed on its first line.
fn created_token(output: &Output) -> String {
    assert!(output.status.success(), "{output:?}");
    stdout(output)
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("token ")
        .to_owned()
}

#[test]
fn clients_and_users_say_whose_devices_they_are_and_where_each_membership_comes_from() {
    let home = home();
    std::fs::write(
        home.path().join("policies/access.fz"),
        format!("{POLICY}group sre {{ idp okta \"SRE\" }}\nallow sre -> gitlab as sre-git\n"),
    )
    .unwrap();
    let laptop = created_token(&portal(
        home.path(),
        &[
            "token",
            "create",
            "--account",
            "acme",
            "--client",
            "laptop",
            "--user",
            "Alice@acme.example",
            "--provider",
            "okta",
        ],
    ));
    created_token(&portal(
        home.path(),
        &[
            "token",
            "create",
            "--account",
            "acme",
            "--client",
            "phone",
            "--user",
            "bob@acme.example",
        ],
    ));
    // Alice's laptop connects once; Bob's IdP says he is in "SRE" and "Finance".
    let connected_at = 1_780_000_000;
    let client_id = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = fz_portal::store::Store::open(
            &home.path().join("data"),
            fz_portal::data_dir::Creation::Refused,
        )
        .await
        .unwrap();
        let key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
        let client = store
            .register_client("acme", &laptop, key, connected_at)
            .await
            .unwrap();
        store
            .set_memberships(
                "acme",
                "bob@acme.example",
                "okta",
                &["SRE".to_owned(), "Finance".to_owned()],
            )
            .await
            .unwrap();
        store.close().await;
        client.id
    });

    let verified = portal(home.path(), &["verify", "--account", "acme", &client_id]);
    assert!(verified.status.success(), "{verified:?}");
    let listed = stdout(&portal(home.path(), &["clients", "--account", "acme"]));
    let lines: Vec<Vec<&str>> = listed.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(
        lines.len(),
        1,
        "only a device that connected is a client: {listed}"
    );
    assert_eq!(
        lines[0][1..],
        [
            "laptop",
            "alice@acme.example via okta (service account)",
            "verified",
            "last connected 2026-05-28 20:26:40 UTC",
            lines[0][5],
        ],
        "{listed}"
    );
    assert_eq!(lines[0][0], client_id);
    assert!(lines[0][5].starts_with("token active until 20"), "{listed}");
    let json: serde_json::Value = serde_json::from_str(&stdout(&portal(
        home.path(),
        &["clients", "--account", "acme", "--json"],
    )))
    .unwrap();
    assert_eq!(json[0]["last_connected_at"], connected_at, "{json}");
    assert_eq!(json[0]["token_state"], "active", "{json}");

    let users = stdout(&portal(home.path(), &["users", "--account", "acme"]));
    assert_eq!(
        users,
        "alice@acme.example\t1 device (signed in via okta)\n\
         \x20   group engineering\tlisted in the policy\n\
         bob@acme.example\t1 device\n\
         \x20   group sre\tokta group \"SRE\"\n\
         \x20   (okta group \"Finance\": no group of the policy takes it in)\n",
    );
    let bob: serde_json::Value = serde_json::from_str(&stdout(&portal(
        home.path(),
        &[
            "users",
            "--account",
            "acme",
            "--user",
            "BOB@acme.example",
            "--json",
        ],
    )))
    .unwrap();
    assert_eq!(bob.as_array().unwrap().len(), 1, "{bob}");
    assert_eq!(
        bob[0]["groups"][0]["source"]["idp"],
        serde_json::json!({"provider": "okta", "group": "SRE"}),
        "{bob}"
    );
    let nobody = portal(
        home.path(),
        &["users", "--account", "acme", "--user", "eve@acme.example"],
    );
    assert_eq!(nobody.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&nobody.stderr).contains("knows no user `eve@acme.example`"),
        "{nobody:?}"
    );

    // Disabled, a user's tokens are revoked, and `users` says since when; `--undo` enables.
    let disabled = portal(
        home.path(),
        &["disable", "--account", "acme", "bob@acme.example"],
    );
    assert!(disabled.status.success(), "{disabled:?}");
    assert_eq!(
        stdout(&disabled),
        "user bob@acme.example is disabled; 1 client token revoked\n"
    );
    let bob = stdout(&portal(
        home.path(),
        &["users", "--account", "acme", "--user", "bob@acme.example"],
    ));
    assert!(
        bob.starts_with("bob@acme.example\t1 device\tdisabled since 20"),
        "{bob}"
    );
    let enabled = portal(
        home.path(),
        &["disable", "--account", "acme", "bob@acme.example", "--undo"],
    );
    assert_eq!(
        stdout(&enabled),
        "user bob@acme.example may sign in again\n"
    );
    let unknown = portal(
        home.path(),
        &["disable", "--account", "acme", "eve@acme.example"],
    );
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("user not found"),
        "{unknown:?}"
    );
}

/// Only `init` and `serve` make the data directory, keys and store: `public-key` and the admin
/// commands, run with a mistyped `data_dir` or before the portal was set up, say so and make
/// nothing (a key nobody pins, a store nobody serves).
#[test]
fn admin_commands_make_no_key_or_store_of_their_own() {
    let home = uninitialised_home();
    let commands: [&[&str]; 4] = [
        &["public-key"],
        &[
            "token",
            "create",
            "--account",
            "acme",
            "--gateway",
            "gw",
            "--site",
            "hq",
        ],
        &["token", "list", "--account", "acme"],
        &["flows", "--account", "acme"],
    ];
    for args in commands {
        let output = portal(home.path(), args);
        assert!(!output.status.success(), "{args:?}: {output:?}");
        let error = String::from_utf8_lossy(&output.stderr);
        assert!(
            error.contains("does not exist: `fz-portal init` (or `fz-portal serve`) makes the portal's data directory, keys and store"),
            "{args:?}: {error}"
        );
        assert!(
            !home.path().join("data").exists(),
            "{args:?} made the data directory"
        );
    }
    // A data directory without its store (made by hand, or another program's) is no better.
    std::fs::create_dir(home.path().join("data")).unwrap();
    std::fs::set_permissions(
        home.path().join("data"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let listed = portal(home.path(), &["token", "list", "--account", "acme"]);
    assert!(!listed.status.success(), "{listed:?}");
    assert_eq!(
        std::fs::read_dir(home.path().join("data")).unwrap().count(),
        0
    );

    // `init` makes them, once: a second run keeps the key agents pin.
    let first = portal(home.path(), &["init"]);
    assert!(first.status.success(), "{first:?}");
    let key = portal(home.path(), &["public-key"]);
    assert!(
        stdout(&first).contains(stdout(&key).trim()),
        "{first:?} {key:?}"
    );
    let again = portal(home.path(), &["init"]);
    assert_eq!(stdout(&again), stdout(&first));
}

#[test]
fn a_service_account_token_needs_an_email_address() {
    let home = home();
    for bad in [
        "ci",
        "ci@",
        "@acme.example",
        "c i@acme.example",
        "ci@acme.example, x@y.z",
    ] {
        let output = portal(
            home.path(),
            &[
                "token",
                "create",
                "--account",
                "acme",
                "--client",
                "build",
                "--user",
                bad,
            ],
        );
        assert!(!output.status.success(), "{bad}: {output:?}");
        let error = String::from_utf8_lossy(&output.stderr);
        assert!(error.contains("is not an email address"), "{bad}: {error}");
    }
    let listed = portal(
        home.path(),
        &["token", "list", "--account", "acme", "--json"],
    );
    assert_eq!(stdout(&listed).trim(), "[]");
    // Stored as sign-in stores an address: trimmed and in lower case.
    let created = portal(
        home.path(),
        &[
            "token",
            "create",
            "--account",
            "acme",
            "--client",
            "build",
            "--user",
            " CI@Acme.Example ",
        ],
    );
    assert!(created.status.success(), "{created:?}");
    let listed = portal(
        home.path(),
        &["token", "list", "--account", "acme", "--json"],
    );
    assert!(
        stdout(&listed).contains("\"ci@acme.example\""),
        "{listed:?}"
    );
}

/// The example configuration of one replica among several is one the portal accepts.
#[test]
fn the_example_replica_configuration_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/replica.toml");
    let config = fz_portal::config::Config::load(&example).unwrap();
    assert!(matches!(
        config.database,
        fz_portal::store::Database::Postgres(_)
    ));
    assert_eq!(
        config.key_files.signing.as_deref(),
        Some(Path::new("/etc/fz/keys/portal-signing.key"))
    );
    assert_eq!(config.drain_period, std::time::Duration::from_secs(30));
}

/// The example configuration docs/deploy.md installs is one the portal accepts.
#[test]
fn the_example_configuration_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/portal.toml");
    let config = fz_portal::config::Config::load(&example).unwrap();
    assert_eq!(config.data_dir, Path::new("/var/lib/fz-portal"));
    assert_eq!(config.accounts.len(), 1);
    assert_eq!(config.accounts[0].oidc.len(), 1);
    assert_eq!(config.relays.len(), 1);
    assert!(config.tls.is_some() && config.smtp.is_some());
    assert_eq!(
        config.metrics_listen,
        Some("127.0.0.1:9100".parse().unwrap())
    );
}

#[test]
fn on_postgres_init_makes_the_store_there_and_every_command_and_serve_use_it() {
    const TEST: &str =
        "serve::on_postgres_init_makes_the_store_there_and_every_command_and_serve_use_it";
    let server = match fz_host::testing::postgres::server() {
        Ok(server) => server,
        Err(why) => return fz_host::testing::skip_needing(TEST, "PostgreSQL", &why),
    };
    let home = uninitialised_home();
    let config = home.path().join("portal.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let url = server.database();
    std::fs::write(&config, format!("database_url = \"{url}\"\n{text}")).unwrap();

    let init = portal(home.path(), &["init"]);
    assert!(init.status.success(), "{init:?}");
    assert!(
        stdout(&init).contains("holds the portal's keys (its store is in PostgreSQL)"),
        "{init:?}"
    );
    let created = portal(
        home.path(),
        &[
            "token",
            "create",
            "--account",
            "acme",
            "--client",
            "ci",
            "--user",
            "ci@acme.example",
        ],
    );
    assert!(created.status.success(), "{created:?}");
    assert!(!home.path().join("data/portal.sqlite3").exists());

    // A second replica on the one database, with a data dir of its own and the keys the
    // first made: both serve side by side, healthy, signing with the one key.
    let replica = home.path().join("replica.toml");
    std::fs::write(
        &replica,
        format!(
            "data_dir = \"replica-data\"\nsigning_key_file = \"data/portal-signing.key\"\n\
             token_key_file = \"data/token.key\"\ndatabase_url = \"{url}\"\n\
             {}",
            text.replace("data_dir = \"data\"\n", "")
        ),
    )
    .unwrap();
    let key = |portal: &mut Command| stdout(&portal.arg("public-key").output().unwrap());
    assert_eq!(
        key(&mut command(home.path())),
        key(&mut command_with(&replica))
    );
    let (mut first, first_address) = serve(home.path());
    let (mut second, second_address) = serve_command(command_with(&replica), Stdio::null());
    let health = [
        get(&first_address, "/healthz"),
        get(&second_address, "/healthz"),
    ];
    for child in [&mut first, &mut second] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    for response in health {
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("\"status\":\"ok\""), "{response}");
    }
    let listed: serde_json::Value = serde_json::from_str(&stdout(&portal(
        home.path(),
        &["token", "list", "--account", "acme", "--json"],
    )))
    .unwrap();
    assert_eq!(listed[0]["user"], "ci@acme.example", "{listed}");
    assert!(!home.path().join("replica-data/portal-signing.key").exists());
    assert!(!home.path().join("replica-data/token.key").exists());
}
