//! A portal process on loopback, outside any network namespace: `fz-portal serve` in a home of
//! its own (configuration, one policy tree, the data dir), for the tests of sign-in that need
//! the real binaries but no root. Stopped when dropped.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::binaries::binary;

/// The policy the portal serves: one site, one resource, alice in its group.
pub const POLICY: &str = r#"
site hq
resource gitlab { address "gitlab.acme.example"; site hq; ports tcp/443 }
group engineering { members "alice@acme.example" }
allow engineering -> gitlab as eng-git
"#;

#[derive(Debug)]
pub struct LocalPortal {
    child: Child,
    pub home: tempfile::TempDir,
    pub address: SocketAddr,
}

impl LocalPortal {
    /// Starts a portal serving account `acme` on [`POLICY`], with `extra` configuration lines.
    pub fn start(extra: &str) -> LocalPortal {
        LocalPortal::start_with(POLICY, "127.0.0.1:0", extra, "", &[])
    }

    /// Starts a portal listening on `listen`, serving account `acme` on `policy`, with `extra`
    /// top-level configuration lines and `account` lines for the account (its `[[...oidc]]`
    /// tables, say); files those name are read from the home, which `files` fills first.
    pub fn start_with(
        policy: &str,
        listen: &str,
        extra: &str,
        account: &str,
        files: &[(&str, &str)],
    ) -> LocalPortal {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join("policies")).unwrap();
        std::fs::write(home.path().join("policies/access.fz"), policy).unwrap();
        for (name, contents) in files {
            std::fs::write(home.path().join(name), contents).unwrap();
        }
        std::fs::write(
            home.path().join("portal.toml"),
            format!(
                "listen = \"{listen}\"\ndata_dir = \"data\"\n{extra}\n\
                 [[accounts]]\nslug = \"acme\"\npolicy = \"policies\"\n{account}\n"
            ),
        )
        .unwrap();
        let mut child = Command::new(binary("fz-portal"))
            .args(["--config", "portal.toml", "serve"])
            .current_dir(home.path())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(home.path().join("portal.log")).unwrap())
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
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .parse()
            .unwrap();
        LocalPortal {
            child,
            home,
            address,
        }
    }

    /// An admin command's standard output.
    pub fn admin(&self, args: &[&str]) -> String {
        let out = Command::new(binary("fz-portal"))
            .args(["--config", "portal.toml"])
            .args(args)
            .current_dir(self.home.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn pinned(&self) -> fz_proto::PortalPublicKey {
        self.admin(&["public-key"]).trim().parse().unwrap()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.home.path().join("data")
    }

    /// The code in the newest mail the portal wrote to its mail folder, waiting (polling,
    /// with a deadline) until there are `count` mails.
    pub async fn mailed_code(&self, count: usize) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mails = mails(&self.data_dir().join("mail"));
            if mails.len() >= count
                && let Some(code) = mails.last().and_then(|mail| code_in(mail))
            {
                return code;
            }
            assert!(tokio::time::Instant::now() < deadline, "no mail came");
            // A poll interval, not a synchronisation: the portal mails on its own task.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for LocalPortal {
    /// Stops the portal; when a test is failing, shows what the portal logged, which the
    /// failure alone may not explain.
    #[allow(clippy::print_stderr)] // into the failing test's captured output, on purpose
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.home.path().join("portal.log"));
            eprintln!("--- the portal's log ---\n{}", log.unwrap_or_default());
        }
    }
}

/// The mails in `folder`, oldest first (their names sort in the order sent).
fn mails(folder: &Path) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    // A message being written has a hidden name until it is whole.
    files.retain(|f| f.extension().is_some_and(|e| e == "eml"));
    files.sort();
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .collect()
}

/// The sign-in code in a mail: the line that is `XXXX-XXXX`.
pub fn code_in(mail: &str) -> Option<String> {
    mail.lines()
        .map(str::trim)
        .find(|l| l.len() == 9 && l.as_bytes()[4] == b'-')
        .map(str::to_owned)
}
