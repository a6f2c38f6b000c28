//! Named network namespaces and what links them: veth pairs, bridges, and the `/etc/netns`
//! files `ip netns exec` gives a process.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::ip;

/// `<pid>-<n>`, different at each call and in each process: names made with it (namespaces,
/// `/etc/netns` directories) are a test's own.
pub fn unique_id() -> String {
    static IDS: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        IDS.fetch_add(1, Ordering::SeqCst)
    )
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Adds the namespace and sets its loopback up; the error is `ip`'s when it cannot.
    pub fn add(name: String) -> Result<Netns, String> {
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]).unwrap();
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `body` on a thread inside the namespace: sockets and devices it makes, and
    /// commands it starts, belong to the namespace.
    pub fn run<T: Send>(&self, body: impl FnOnce() -> T + Send) -> T {
        let path = PathBuf::from("/run/netns").join(&self.name);
        std::thread::scope(|scope| {
            let thread = scope.spawn(|| {
                let ns = File::open(&path).unwrap();
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                body()
            });
            match thread.join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// `ip -n <ns> args…`
    pub fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// `ip netns exec <ns> program args…` (with the namespace's `/etc/netns` files).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let mut all = vec![program];
        all.extend_from_slice(args);
        self.exec_program(&all)
    }

    /// [`Netns::exec`] with the program and its arguments in one slice.
    pub fn exec_program(&self, program_and_args: &[&str]) -> Result<String, String> {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(program_and_args);
        ip(&all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A directory, removed with all it holds on drop.
#[derive(Debug)]
pub struct RemoveDir(PathBuf);

impl RemoveDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `/etc/netns/<ns>/resolv.conf`, which `ip netns exec` mounts over `/etc/resolv.conf`; the
/// directory `/etc/netns/<ns>` is removed when the guard drops.
pub fn etc_netns(ns: &Netns, resolv_conf: &str) -> RemoveDir {
    let etc = PathBuf::from("/etc/netns").join(&ns.name);
    std::fs::create_dir_all(&etc).unwrap();
    let guard = RemoveDir(etc);
    std::fs::write(guard.path().join("resolv.conf"), resolv_conf).unwrap();
    guard
}

/// A veth pair: `a_name` in `a` with `a_address`, `b_name` in `b` with `b_address`, both up.
pub fn link(a: &Netns, a_name: &str, a_address: &str, b: &Netns, b_name: &str, b_address: &str) {
    a.ip(&[
        "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", &b.name,
    ])
    .unwrap();
    for (ns, name, address) in [(a, a_name, a_address), (b, b_name, b_address)] {
        ns.ip(&["address", "add", address, "dev", name]).unwrap();
        ns.ip(&["link", "set", name, "up"]).unwrap();
    }
}

/// A bridge `br0` in `ns`, up, with `addresses`. Its MAC address is set, so it stays the same
/// when ports come and go (a bridge otherwise takes its ports' lowest, and hosts that cached
/// the old one in ARP lose their traffic to it for many seconds).
pub fn bridge(ns: &Netns, addresses: &[&str]) {
    ns.ip(&[
        "link",
        "add",
        "br0",
        "address",
        "02:00:00:00:0f:01",
        "type",
        "bridge",
    ])
    .unwrap();
    for address in addresses {
        ns.ip(&["address", "add", address, "dev", "br0"]).unwrap();
    }
    ns.ip(&["link", "set", "br0", "up"]).unwrap();
}

/// A veth pair from `bridge_ns`'s `br0` (port `port_name`) to `ns` (`name`, with `address`).
pub fn port(bridge_ns: &Netns, port_name: &str, ns: &Netns, name: &str, address: &str) {
    bridge_ns
        .ip(&[
            "link", "add", port_name, "type", "veth", "peer", "name", name, "netns", &ns.name,
        ])
        .unwrap();
    bridge_ns
        .ip(&["link", "set", port_name, "master", "br0", "up"])
        .unwrap();
    ns.ip(&["address", "add", address, "dev", name]).unwrap();
    ns.ip(&["link", "set", name, "up"]).unwrap();
}
