//! What an fz agent changes on, and asks of, its Linux host: TUN devices with their addresses
//! and routes ([`tun::Tun`]), the gateway's nftables masquerade and IP forwarding
//! ([`firewall::Masquerade`], [`firewall::enable_forwarding`]), the client's full tunnel for
//! an `internet` grant ([`full_tunnel::FullTunnel`]), and the host's own DNS
//! resolver ([`resolve::Resolver`]), the client's switch of that resolver to its DNS stub
//! ([`resolv::ResolverSwitch`]), and the secrets an agent keeps in files ([`secrets`]). Its
//! sockets read and write in batches: [`udp`] for the WireGuard socket's bulk transfers,
//! [`datagrams`] for small datagrams to many peers (the DNS front).
//! Both agents' drivers build on it, and on what their binaries share ([`agent`]).
//!
//! No protocol logic lives here: no WireGuard, no grants, no packet filter. It needs
//! `CAP_NET_ADMIN` and drives Linux's TUN driver, iproute2 (`ip`) and nftables (`nft`).
//!
//! Every platform failure is a [`PlatformError`] that names what failed and, for a command,
//! its standard error. Name lookups fail with [`resolve::LookupFailure`] instead, because "no
//! such name" is an answer an agent acts on, not a fault of the host.
//!
//! With the `testing` feature, [`testing`] holds what tests that need root share.

pub mod agent;
pub mod datagrams;
pub mod firewall;
pub mod full_tunnel;
pub mod resolv;
pub mod resolve;
pub mod secrets;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tun;
pub mod udp;

use std::io::Write as _;
use std::process::{Command, ExitStatus, Stdio};

/// What went wrong while setting up or driving the host's networking.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("`{program}` is not installed or not on PATH; install {package}")]
    ToolMissing {
        program: &'static str,
        package: &'static str,
    },
    #[error("could not run `{command}`: {error}")]
    Spawn {
        command: String,
        error: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("invalid interface name `{name}`: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid prefix length {len} for `{address}`")]
    InvalidPrefix { address: std::net::IpAddr, len: u8 },
    #[error("could not create TUN device `{name}`: {error}")]
    TunCreate { name: String, error: std::io::Error },
    #[error("could not {op} TUN device `{name}`: {error}")]
    TunIo {
        name: String,
        op: &'static str,
        error: std::io::Error,
    },
    #[error("could not enable forwarding in `{path}`: {error}")]
    Forwarding {
        path: &'static str,
        error: std::io::Error,
    },
    #[error("could not write `{path}`: {error}")]
    Sysctl {
        path: &'static str,
        error: std::io::Error,
    },
    #[error("could not read the system resolver configuration (`/etc/resolv.conf`): {0}")]
    ResolverConfig(String),
}

/// The address of this host's interface that packets to `remote` leave from (the kernel's
/// routing decision, read off a UDP socket connected to it: nothing is sent). An agent's
/// WireGuard socket is reachable there from `remote`'s side: ICE's host candidate.
pub fn local_address_toward(remote: std::net::SocketAddr) -> std::io::Result<std::net::IpAddr> {
    let unspecified: std::net::SocketAddr = if remote.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(unspecified)?;
    socket.connect(remote)?;
    Ok(socket.local_addr()?.ip())
}

/// Runs `program args…`, feeding it `stdin` if given, and fails with its standard error when it
/// exits non-zero.
///
/// This blocks the calling thread for as long as the command runs. That is fine for what uses
/// it (set-up at start, tear-down at exit, which must also work from `Drop`), never on the
/// packet path.
pub(crate) fn run_tool(
    program: &'static str,
    package: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<(), PlatformError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let spawned = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(source) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(PlatformError::ToolMissing { program, package });
        }
        Err(source) => {
            return Err(PlatformError::Spawn {
                command,
                error: source,
            });
        }
    };
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // The pipe is dropped (closed) at the end of this block, which is what ends the
        // input for `nft -f -`. A write error means the child already exited; its status
        // and stderr below say why, so they win over the broken pipe.
        let _ = pipe.write_all(input.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|source| PlatformError::Spawn {
            command: command.clone(),
            error: source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(PlatformError::CommandFailed {
        command,
        status: output.status,
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_says_what_to_install() {
        let Err(error) = run_tool("fz-no-such-program", "the fz-nothing package", &[], None) else {
            panic!("a program that does not exist ran");
        };
        assert_eq!(
            error.to_string(),
            "`fz-no-such-program` is not installed or not on PATH; install the fz-nothing package"
        );
    }

    #[test]
    fn a_failing_command_is_named_with_its_stderr() {
        let Err(error) = run_tool("sh", "a shell", &["-c", "echo oops >&2; exit 3"], None) else {
            panic!("a failing command succeeded");
        };
        assert_eq!(
            error.to_string(),
            "`sh -c echo oops >&2; exit 3` failed (exit status: 3): oops"
        );
    }

    #[test]
    fn stdin_reaches_the_command() {
        run_tool(
            "sh",
            "a shell",
            &["-c", "read line; test \"$line\" = hello"],
            Some("hello\n"),
        )
        .unwrap();
    }
}
