//! The deep-link way back from the browser: `fz://handle_client_sign_in_callback?…`.
//!
//! The desktop opens `fz://` URLs with `fz-client handle-url %u` once `fz-client
//! install-url-handler` registered it (a `.desktop` file and `xdg-mime`). That second process
//! hands the URL to the waiting `fz-client sign-in` over a Unix socket in
//! `$XDG_RUNTIME_DIR/fz-client/` (the directory 0700, the socket 0600, and the peer must be the
//! same user), and prints the waiting process's acknowledgement: `ok`, or why it refused.
//!
//! The waiting process takes exactly one URL, as the loopback listener takes one callback.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// The deep link the portal sends a finished sign-in to.
pub use fz_proto::SIGN_IN_DEEP_LINK as DEEP_LINK;

/// The longest URL handed over.
const MAX_URL_BYTES: usize = 8 * 1024;

/// How long a handing-over process may take to send its URL or to be answered.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(10);

/// The `.desktop` file's name.
pub const DESKTOP_FILE: &str = "fz-client.desktop";

/// Why a deep link could not be waited for, handed over or registered.
#[derive(Debug, thiserror::Error)]
pub enum DeepLinkError {
    #[error("XDG_RUNTIME_DIR is not set: the deep link needs a private runtime directory")]
    NoRuntimeDir,
    #[error("`{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no `fz-client sign-in` is waiting for a deep link (nothing listens on `{}`)", .0.display())]
    NobodyWaiting(PathBuf),
    #[error("`{0}` is not a sign-in deep link (fz://handle_client_sign_in_callback?…)")]
    NotOurs(String),
    #[error("the waiting sign-in refused the link: {0}")]
    Refused(String),
    #[error("the waiting sign-in did not answer")]
    NoAnswer,
}

/// This process's user (the owner of `/proc/self`).
fn own_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// The socket's path: `$XDG_RUNTIME_DIR/fz-client/sign-in.sock`.
pub fn socket_path() -> Result<PathBuf, DeepLinkError> {
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|dir| !dir.is_empty())
        .map(|dir| PathBuf::from(dir).join("fz-client").join("sign-in.sock"))
        .ok_or(DeepLinkError::NoRuntimeDir)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DeepLinkError + '_ {
    move |source| DeepLinkError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A sign-in waiting for its deep link.
#[derive(Debug)]
pub struct Waiter {
    listener: UnixListener,
    path: PathBuf,
}

impl Waiter {
    /// Listens on the socket (its directory made 0700, the socket 0600). A socket left by a
    /// sign-in that died is replaced; one that answers means another sign-in waits, and is
    /// refused.
    pub async fn bind() -> Result<Waiter, DeepLinkError> {
        let path = socket_path()?;
        let dir = path.parent().unwrap_or(Path::new("/"));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        if path.exists() {
            if UnixStream::connect(&path).await.is_ok() {
                return Err(DeepLinkError::Io {
                    path,
                    source: std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "another fz-client sign-in is waiting already",
                    ),
                });
            }
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        let listener = UnixListener::bind(&path).map_err(io(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io(&path))?;
        Ok(Waiter { listener, path })
    }

    /// Waits for a handed-over deep link of this user and gives `judge` its query; `judge`'s
    /// verdict goes back to the handing-over process (`ok`, or the refusal). Returns the
    /// verdict of the first link that was ours at all.
    pub async fn take<T, E: std::fmt::Display>(
        &self,
        judge: impl Fn(&str) -> Result<T, E>,
    ) -> Result<T, E> {
        loop {
            let Ok((stream, _)) = self.listener.accept().await else {
                continue;
            };
            // Only this user's processes may hand a link over (the socket's mode says so too).
            let same_user = stream
                .peer_cred()
                .is_ok_and(|cred| Some(cred.uid()) == own_uid());
            if !same_user {
                continue;
            }
            let mut stream = BufReader::new(stream);
            let mut line = String::new();
            let read = tokio::time::timeout(
                HAND_OVER_TIMEOUT,
                (&mut stream)
                    .take(MAX_URL_BYTES as u64)
                    .read_line(&mut line),
            )
            .await;
            if !matches!(read, Ok(Ok(n)) if n > 0) {
                continue;
            }
            let Some(query) = line.trim().strip_prefix(&format!("{DEEP_LINK}?")) else {
                let _ = stream
                    .get_mut()
                    .write_all(b"refused: not a sign-in deep link\n")
                    .await;
                continue;
            };
            let verdict = judge(query);
            let answer = match &verdict {
                Ok(_) => "ok\n".to_owned(),
                Err(error) => format!("refused: {error}\n"),
            };
            let _ = stream.get_mut().write_all(answer.as_bytes()).await;
            return verdict;
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `fz-client handle-url URL`: hands a deep link to the waiting sign-in and returns its
/// acknowledgement.
pub async fn hand_over(url: &str) -> Result<(), DeepLinkError> {
    if !url.starts_with(&format!("{DEEP_LINK}?")) || url.len() > MAX_URL_BYTES {
        return Err(DeepLinkError::NotOurs(url.chars().take(80).collect()));
    }
    let path = socket_path()?;
    let mut stream = UnixStream::connect(&path)
        .await
        .map_err(|_| DeepLinkError::NobodyWaiting(path.clone()))?;
    stream
        .write_all(format!("{url}\n").as_bytes())
        .await
        .map_err(io(&path))?;
    let mut answer = String::new();
    let read = tokio::time::timeout(
        HAND_OVER_TIMEOUT,
        BufReader::new(stream).read_line(&mut answer),
    )
    .await;
    match (read, answer.trim()) {
        (Ok(Ok(_)), "ok") => Ok(()),
        (Ok(Ok(_)), refused) if refused.starts_with("refused: ") => Err(DeepLinkError::Refused(
            refused.trim_start_matches("refused: ").to_owned(),
        )),
        _ => Err(DeepLinkError::NoAnswer),
    }
}

/// The `.desktop` entry that makes this program the desktop's handler of `fz://` links.
pub fn desktop_entry(program: &Path) -> String {
    format!(
        "[Desktop Entry]\nType=Application\nName=fz client\n\
         Comment=Finishes fz sign-ins started with fz-client sign-in\n\
         Exec=\"{}\" handle-url %u\nTerminal=false\nNoDisplay=true\n\
         MimeType=x-scheme-handler/fz;\n",
        program.display()
    )
}

/// `fz-client install-url-handler`: writes the `.desktop` entry to
/// `$XDG_DATA_HOME/applications` (or `~/.local/share/applications`) and asks `xdg-mime` to
/// make it the handler of `fz://`; says what it did on `out`.
pub fn install(out: &mut impl Write) -> Result<PathBuf, DeepLinkError> {
    let applications = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .ok_or(DeepLinkError::NoRuntimeDir)?
        .join("applications");
    std::fs::create_dir_all(&applications).map_err(io(&applications))?;
    let program = std::env::current_exe().map_err(io(Path::new("/proc/self/exe")))?;
    let path = applications.join(DESKTOP_FILE);
    std::fs::write(&path, desktop_entry(&program)).map_err(io(&path))?;
    let say = |out: &mut dyn Write, text: String| {
        writeln!(out, "{text}").map_err(io(Path::new("<stdout>")))
    };
    say(out, format!("Wrote {}.", path.display()))?;
    let registered = std::process::Command::new("xdg-mime")
        .args(["default", DESKTOP_FILE, "x-scheme-handler/fz"])
        .status();
    match registered {
        Ok(status) if status.success() => say(
            out,
            "fz:// links now open with fz-client (xdg-mime default fz-client.desktop \
             x-scheme-handler/fz)."
                .to_owned(),
        )?,
        _ => say(
            out,
            "xdg-mime is not here or failed: register the handler with your desktop's own \
             tool, or run `xdg-mime default fz-client.desktop x-scheme-handler/fz` where it is."
                .to_owned(),
        )?,
    }
    Ok(path)
}
