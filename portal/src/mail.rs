//! Outgoing mail: the sign-in codes. Over SMTP (lettre) when the configuration names a server;
//! otherwise, the embedded default, each message is written as a file under the data dir
//! (`mail/`, 0700, each file 0600) and the portal logs where, so a portal with no mail server
//! still works and its admin can read the code.
//!
//! Written files hold live codes, so they are deleted once the code they carry has expired
//! ([`Mailer::prune`], from the sweeper).

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Tokio1Executor};

use crate::config::{SmtpConfig, SmtpSecurity};
use crate::random;

/// The folder of the data dir mail is written to when no SMTP server is configured.
pub const FOLDER: &str = "mail";

/// How long an SMTP exchange may take before the send is given up (the code can be asked for
/// again).
const SMTP_TIMEOUT: Duration = Duration::from_secs(20);

/// Where mail goes.
#[derive(Clone)]
pub enum Mailer {
    /// Files in this folder.
    Files(PathBuf),
    Smtp {
        transport: Box<AsyncSmtpTransport<Tokio1Executor>>,
        from: Mailbox,
    },
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mailer::Files(dir) => f.debug_tuple("Files").field(dir).finish(),
            Mailer::Smtp { from, .. } => f.debug_struct("Smtp").field("from", from).finish(),
        }
    }
}

/// Why a message did not go out.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("the address `{address}` cannot be mailed: {reason}")]
    Address { address: String, reason: String },
    #[error("cannot build the message: {0}")]
    Build(#[from] lettre::error::Error),
    #[error("the SMTP server refused or failed: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
    #[error("cannot write `{}`: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the SMTP password file `{}`: {source}", path.display())]
    Password {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the system random number generator failed: {0}")]
    Random(getrandom::Error),
}

/// Where a message went, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    File(PathBuf),
    Smtp,
}

impl Mailer {
    /// The mailer the configuration asks for: SMTP when it names a server, files under
    /// `data_dir` otherwise.
    pub fn new(smtp: Option<&SmtpConfig>, data_dir: &Path) -> Result<Mailer, MailError> {
        let Some(smtp) = smtp else {
            return Ok(Mailer::Files(data_dir.join(FOLDER)));
        };
        let from: Mailbox = smtp.from.parse().map_err(|e| MailError::Address {
            address: smtp.from.clone(),
            reason: format!("{e}"),
        })?;
        let tls = || TlsParameters::new(smtp.host.clone());
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host)
            .port(smtp.port)
            .timeout(Some(SMTP_TIMEOUT))
            .tls(match smtp.security {
                SmtpSecurity::StartTls => Tls::Required(tls()?),
                SmtpSecurity::Tls => Tls::Wrapper(tls()?),
                SmtpSecurity::None => Tls::None,
            });
        if let (Some(user), Some(password_file)) = (&smtp.username, &smtp.password_file) {
            let password =
                std::fs::read_to_string(password_file).map_err(|source| MailError::Password {
                    path: password_file.clone(),
                    source,
                })?;
            builder =
                builder.credentials(Credentials::new(user.clone(), password.trim().to_owned()));
        }
        Ok(Mailer::Smtp {
            transport: Box::new(builder.build()),
            from,
        })
    }

    /// Sends a plain-text message to `to`.
    pub async fn send(&self, to: &str, subject: &str, body: String) -> Result<Sent, MailError> {
        let to: Mailbox = to.parse().map_err(|e| MailError::Address {
            address: to.to_owned(),
            reason: format!("{e}"),
        })?;
        match self {
            Mailer::Smtp { transport, from } => {
                let message = message(from.clone(), to, subject, body)?;
                transport.send(message).await?;
                Ok(Sent::Smtp)
            }
            Mailer::Files(dir) => {
                let from: Mailbox =
                    "fz <fz@localhost>"
                        .parse()
                        .map_err(|e| MailError::Address {
                            address: "fz@localhost".to_owned(),
                            reason: format!("{e}"),
                        })?;
                let message = message(from, to, subject, body)?;
                let dir = dir.clone();
                // Named by the time in nanoseconds, zero-padded: sorted by name, in order sent.
                let name = format!(
                    "{:020}-{}.eml",
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_nanos(),
                    random::hex(&random::bytes::<6>().map_err(MailError::Random)?)
                );
                let bytes = message.formatted();
                let path = dir.join(name);
                let written = path.clone();
                tokio::task::spawn_blocking(move || write_private(&dir, &written, &bytes))
                    .await
                    .map_err(|e| MailError::File {
                        path: path.clone(),
                        source: std::io::Error::other(e),
                    })??;
                Ok(Sent::File(path))
            }
        }
    }

    /// Deletes written mail older than `age` (a no-op for SMTP); returns how many files.
    pub fn prune(&self, age: Duration) -> usize {
        let Mailer::Files(dir) = self else {
            return 0;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut deleted = 0;
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|modified| now.duration_since(modified).unwrap_or_default() > age);
            if old && std::fs::remove_file(entry.path()).is_ok() {
                deleted += 1;
            }
        }
        deleted
    }
}

fn message(from: Mailbox, to: Mailbox, subject: &str, body: String) -> Result<Message, MailError> {
    Ok(Message::builder()
        .from(from)
        .to(to)
        .subject(subject)
        .header(ContentType::TEXT_PLAIN)
        .body(body)?)
}

/// Writes `bytes` to a new file `path` (0600) in `dir` (made 0700 when missing).
fn write_private(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), MailError> {
    let io = |source| MailError::File {
        path: path.to_owned(),
        source,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(io(error)),
    }
    // Written under a hidden name and renamed into place, so that whoever reads the directory
    // (a developer's mail viewer, the tests) never finds a message half written.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{name}.tmp"));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| file.write_all(bytes).and_then(|()| file.sync_all()))
        .and_then(|()| std::fs::rename(&temporary, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written.map_err(io)
}
