//! A real PostgreSQL server for tests: Debian's `postgresql` (`initdb`, `postgres`), one per
//! test process, in a temporary directory on a free loopback port, with a fresh database for
//! each caller ([`Postgres::database`]).
//!
//! It is started at first use and stops when the test process ends, however it ends: a small
//! shell watches a pipe only this process holds, and when the pipe closes (the process exited,
//! or was killed) it stops the server and deletes its directory. [`server_with_tls`] starts
//! one more, speaking TLS, which stops the same way or when dropped. Run as root, the server runs
//! as the `postgres` user, since PostgreSQL refuses to run as root. Its log is
//! `$TMPDIR/fz-postgres-<pid>-<name>/server.log` while it runs.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use super::{WAIT, wait_for_or};

/// The test process's server.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    port: u16,
    /// Whose these binaries run as (root's tests: the `postgres` user).
    user: Option<(u32, u32)>,
    /// The watcher shell, and the pipe to its standard input: the pipe closes when this
    /// process ends, and the watcher then stops the server.
    watcher: Mutex<(Child, ChildStdin)>,
    databases: AtomicU32,
}

/// The server of this test process, started at first use. `Err` says why there is none here:
/// PostgreSQL is not installed (`.ci/run` installs it as root), or root has no `postgres`
/// user to run it as.
pub fn server() -> Result<&'static Postgres, String> {
    static SERVER: OnceLock<Result<Postgres, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| start("shared", None))
        .as_ref()
        .map_err(Clone::clone)
}

/// A server of its own that speaks TLS (`ssl = on`) with this certificate chain and private
/// key (PEM), for tests of the portal's encrypted connections; it stops when dropped, or when
/// the process ends.
pub fn server_with_tls(name: &str, cert_pem: &str, key_pem: &str) -> Result<Postgres, String> {
    start(name, Some((cert_pem, key_pem)))
}

impl Postgres {
    /// A new, empty database on the server, as the URL to connect to it.
    pub fn database(&self) -> String {
        let name = format!("fz_{}", self.databases.fetch_add(1, Ordering::Relaxed));
        let port = self.port.to_string();
        let output = self
            .command("createdb")
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", &name])
            .output()
            .unwrap_or_else(|error| panic!("cannot run createdb: {error}"));
        assert!(
            output.status.success(),
            "createdb {name} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        self.url(&name)
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Whether the server is still running: false once it exited on its own (its log is in
    /// the test's output then).
    fn running(&self) -> bool {
        let mut watcher = self.watcher.lock().unwrap_or_else(|e| e.into_inner());
        matches!(watcher.0.try_wait(), Ok(None))
    }

    /// `program` of the server's binaries, run as the server's user.
    fn command(&self, program: &str) -> Command {
        command(&self.bin, program, self.user)
    }
}

fn command(bin: &Path, program: &str, user: Option<(u32, u32)>) -> Command {
    let mut command = Command::new(bin.join(program));
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
    }
    command
}

/// Starts a server in `$TMPDIR/fz-postgres-<pid>-<name>`, with TLS when given its certificate
/// chain and key.
fn start(name: &str, tls: Option<(&str, &str)>) -> Result<Postgres, String> {
    let bin = binaries()?;
    let user = if super::not_root().is_none() {
        Some(postgres_user()?)
    } else {
        None
    };
    let dir = std::env::temp_dir().join(format!("fz-postgres-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .map_err(|e| format!("cannot give {} to postgres: {e}", dir.display()))?;
    }
    let data = dir.join("data");
    let initdb = command(&bin, "initdb", user)
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        .output()
        .map_err(|e| format!("cannot run initdb: {e}"))?;
    if !initdb.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        ));
    }
    let mut settings = Vec::new();
    if let Some((cert, key)) = tls {
        for (file, pem) in [("server.crt", cert), ("server.key", key)] {
            let path = dir.join(file);
            std::fs::write(&path, pem).map_err(|e| format!("cannot write {file}: {e}"))?;
            // PostgreSQL refuses a key others may read, or one not its user's.
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(|e| format!("cannot restrict {file}: {e}"))?;
            if let Some((uid, gid)) = user {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .map_err(|e| format!("cannot give {file} to postgres: {e}"))?;
            }
            settings.push(format!(
                "ssl_{}_file={}",
                if file == "server.crt" { "cert" } else { "key" },
                path.display()
            ));
        }
        settings.push("ssl=on".to_owned());
    }
    let port = free_port()?;
    // The watcher: starts the server, waits for its own standard input to close, then stops
    // the server (fast shutdown) and deletes the directory.
    let script = r#"
        bin=$1 dir=$2 port=$3
        shift 3
        for setting in "$@"; do set -- "$@" -c "$setting"; shift; done
        "$bin/postgres" -D "$dir/data" -p "$port" -c listen_addresses=127.0.0.1 \
            -c unix_socket_directories="$dir" -c max_connections=300 "$@" \
            </dev/null 2>"$dir/server.log" &
        server=$!
        cat >/dev/null
        kill -INT "$server"
        wait "$server"
        rm -rf "$dir"
    "#;
    let mut watcher = command(Path::new("/bin"), "sh", user)
        .args(["-c", script, "fz-postgres"])
        .arg(&bin)
        .arg(&dir)
        .arg(port.to_string())
        .args(&settings)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the server: {e}"))?;
    let Some(pipe) = watcher.stdin.take() else {
        return Err("the watcher has no standard input".to_owned());
    };
    let server = Postgres {
        bin,
        port,
        user,
        watcher: Mutex::new((watcher, pipe)),
        databases: AtomicU32::new(0),
    };
    let ready = wait_for_or(
        "PostgreSQL to accept connections",
        WAIT,
        |_| {},
        || {
            if !server.running() {
                let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
                return Some(Err(format!("the server exited at start: {log}")));
            }
            let status = server
                .command("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                .status()
                .ok()?;
            status.success().then_some(Ok(()))
        },
    );
    match ready {
        Some(Ok(())) => Ok(server),
        Some(Err(why)) => Err(why),
        None => Err(format!(
            "PostgreSQL did not accept connections within {WAIT:?}"
        )),
    }
}

/// The directory of the server's binaries: where `initdb` on the PATH is, else the newest of
/// Debian's `/usr/lib/postgresql/<version>/bin`.
fn binaries() -> Result<PathBuf, String> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("initdb"))
            .find(|initdb| initdb.is_file())
    });
    if let Some(initdb) = on_path {
        let initdb = std::fs::canonicalize(&initdb).unwrap_or(initdb);
        if let Some(dir) = initdb.parent() {
            return Ok(dir.to_owned());
        }
    }
    let versions = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| "PostgreSQL is not installed (no initdb, no /usr/lib/postgresql)")?;
    versions
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
        .ok_or_else(|| "PostgreSQL is not installed (no initdb in /usr/lib/postgresql)".to_owned())
}

/// The `postgres` user's uid and gid, from `/etc/passwd`.
fn postgres_user() -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| format!("cannot read /etc/passwd: {e}"))?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            match fields.as_slice() {
                ["postgres", _, uid, gid, ..] => Some((uid.parse().ok()?, gid.parse().ok()?)),
                _ => None,
            }
        })
        .ok_or_else(|| "root, and no `postgres` user to run PostgreSQL as".to_owned())
}

/// A loopback TCP port nothing listens on now.
fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot find a free port: {e}"))?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}
