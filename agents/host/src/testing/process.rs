//! The agents' (and the portal's) binaries as the tests' child processes.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::WAIT;
use super::netns::Netns;

/// A binary started with `ip netns exec` (which execs it: the child is the binary). Dropping
/// it stops it (SIGTERM, then SIGKILL) and, when the test is failing, prints its log.
#[derive(Debug)]
pub struct Process {
    what: String,
    child: Mutex<Option<Child>>,
    log: PathBuf,
}

impl Process {
    /// Starts `program args…` in `ns` with `RUST_LOG=rust_log`, its output to the file `log`;
    /// `what` names it in messages ("the portal"). The agents' `FZ_*` settings are not passed
    /// on: the arguments say everything.
    pub fn start(
        what: &str,
        ns: &Netns,
        program: &Path,
        args: &[&str],
        rust_log: &str,
        log: PathBuf,
    ) -> Process {
        let output = File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(program)
            .args(args)
            .env("RUST_LOG", rust_log)
            .env_remove("FZ_PORTAL_URL")
            .env_remove("FZ_ACCOUNT")
            .env_remove("FZ_PORTAL_KEY")
            .env_remove("FZ_GATEWAY_TOKEN")
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .spawn()
            .unwrap();
        Process {
            what: what.to_owned(),
            child: Mutex::new(Some(child)),
            log,
        }
    }

    /// What the process has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails, with the log, if the process exited (unless the test stopped it).
    pub fn assert_running(&self, waiting_for: &str) {
        let mut child = self.child.lock().unwrap();
        let Some(running) = child.as_mut() else {
            return;
        };
        if let Some(status) = running.try_wait().unwrap() {
            panic!(
                "{} exited ({status}) while the test waited for {waiting_for}; its log:\n{}",
                self.what,
                self.log_text()
            );
        }
    }

    /// SIGTERM, and the exit status once it has exited.
    pub fn terminate(&self) -> ExitStatus {
        let mut child = self.take();
        stop(&mut child, WAIT).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} did not exit within {WAIT:?} of SIGTERM", self.what)
        })
    }

    /// SIGSTOP, as a hang would leave it: running, and silent. Dropping it ends it.
    pub fn freeze(&self) {
        let child = self.child.lock().unwrap();
        let child = child
            .as_ref()
            .unwrap_or_else(|| panic!("{} was stopped already", self.what));
        signal(child, Signal::SIGSTOP);
    }

    /// SIGKILL, as a crash would end it.
    pub fn kill(&self) {
        let mut child = self.take();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn take(&self) -> Child {
        self.child
            .lock()
            .unwrap()
            .take()
            .unwrap_or_else(|| panic!("{} was stopped already", self.what))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let child = self.child.get_mut().map(Option::take).unwrap_or(None);
        if let Some(mut child) = child
            && stop(&mut child, Duration::from_secs(5)).is_none()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            // Past libtest's capture: the logs are what explain a failure.
            let _ = writeln!(
                std::io::stderr(),
                "---- {}'s log ----\n{}----",
                self.what,
                self.log_text()
            );
        }
    }
}

/// Sends SIGTERM (and SIGCONT, for a frozen process) and waits up to `patience` for the exit.
pub fn stop(child: &mut Child, patience: Duration) -> Option<ExitStatus> {
    signal(child, Signal::SIGTERM);
    signal(child, Signal::SIGCONT);
    wait_exit(child, patience)
}

/// Sends `signal` to `child`, if it is still there to get it.
fn signal(child: &Child, signal: Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let _ = nix::sys::signal::kill(pid, signal);
}

/// The exit status, if the child exits within `patience`.
pub fn wait_exit(child: &mut Child, patience: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
