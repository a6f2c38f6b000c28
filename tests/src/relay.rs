//! The world's TURN relay: coturn (Debian's `coturn` package) in a namespace of its own on the
//! wan, sharing a secret with the portal (`use-auth-secret`), and a TURN client that asks it
//! for an allocation with given credentials, to see whether it takes them.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use fz_host::testing::WAIT;
use fz_host::testing::netns::Netns;
use fz_host::testing::process::Process;
use turn_client_proto::api::{TurnClientApi, TurnConfig, TurnEvent, TurnPollRet};
use turn_client_proto::stun::agent::Transmit;
use turn_client_proto::types::TurnCredentials;
use turn_client_proto::types::stun::TransportType;
use turn_client_proto::udp::TurnClientUdp;

/// The realm coturn names in its challenges.
const REALM: &str = "fz.test";

/// Starts coturn in `ns` on `listen` (UDP only, relaying from the same address) with `secret`
/// as its `static-auth-secret`, and waits until it hands out an allocation.
pub fn start_coturn(ns: &Netns, dir: &Path, listen: SocketAddr, secret: &str) -> Process {
    let config = dir.join("turnserver.conf");
    std::fs::write(
        &config,
        format!(
            "listening-ip={ip}\nrelay-ip={ip}\nlistening-port={port}\n\
             use-auth-secret\nstatic-auth-secret={secret}\nrealm={REALM}\n\
             fingerprint\nno-tcp\nno-tls\nno-dtls\nno-cli\nno-tcp-relay\n\
             no-multicast-peers\nno-software-attribute\n\
             userdb={db}\npidfile={pid}\nlog-file=stdout\nsimple-log\n",
            ip = listen.ip(),
            port = listen.port(),
            db = dir.join("turndb").display(),
            pid = dir.join("turnserver.pid").display(),
        ),
    )
    .unwrap();
    let process = Process::start(
        "coturn",
        ns,
        Path::new("turnserver"),
        &["-c", config.to_str().unwrap()],
        "",
        dir.join("coturn.log"),
    );
    let (username, password) = credentials(secret, "world-probe", unix_now() + 600);
    fz_host::testing::wait_for(
        "coturn to hand out an allocation",
        WAIT,
        |what| process.assert_running(what),
        || {
            ns.run(|| allocate(listen, &username, &password, Duration::from_millis(500)))
                .ok()
        },
    );
    process
}

/// TURN REST credentials for `agent` until `expires_at`, as the portal mints them: the test's
/// own minting, for credentials the portal would never give (expired ones).
pub fn credentials(secret: &str, agent: &str, expires_at: u64) -> (String, String) {
    let username = format!("{expires_at}:{agent}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
    let password = base64::engine::general_purpose::STANDARD
        .encode(ring::hmac::sign(&key, username.as_bytes()));
    (username, password)
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Asks the relay at `relay` for a UDP allocation with these credentials, from the calling
/// thread's namespace, and deletes it again once made. The relayed address, or why not:
/// refused (the relay answered, and said no) or no answer within `patience`.
pub fn allocate(
    relay: SocketAddr,
    username: &str,
    password: &str,
    patience: Duration,
) -> Result<SocketAddr, String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let mut client = TurnClientUdp::allocate(
        local,
        relay,
        TurnConfig::new(TurnCredentials::new(username, password)),
    );
    let started = Instant::now();
    let now = || turn_client_proto::stun::Instant::from_nanos(started.elapsed().as_nanos() as i64);
    let mut buffer = [0u8; 2048];
    // The first 401 is the relay's challenge (realm and nonce), answered with the credentials;
    // a second one refuses them. The client would go on trying; this is where we stop.
    let mut unauthorized = 0;
    loop {
        while let Some(transmit) = client.poll_transmit(now()) {
            socket
                .send_to(transmit.data.as_ref(), transmit.to)
                .map_err(|e| e.to_string())?;
        }
        while let Some(event) = client.poll_event() {
            match event {
                TurnEvent::AllocationCreated(_, relayed) => {
                    let _ = client.delete(now());
                    while let Some(transmit) = client.poll_transmit(now()) {
                        let _ = socket.send_to(transmit.data.as_ref(), transmit.to);
                    }
                    return Ok(relayed);
                }
                TurnEvent::AllocationCreateFailed(_) => {
                    return Err("refused: the relay did not take the credentials".to_owned());
                }
                _ => {}
            }
        }
        let wait = match client.poll(now()) {
            TurnPollRet::WaitUntil(at) => at.saturating_duration_since(now()),
            TurnPollRet::Closed => {
                return Err("refused: the relay did not take the credentials".to_owned());
            }
            _ => Duration::from_millis(50),
        };
        let left = patience.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(format!("no answer from the relay within {patience:?}"));
        }
        socket
            .set_read_timeout(Some(wait.clamp(Duration::from_millis(1), left)))
            .map_err(|e| e.to_string())?;
        if let Ok((length, from)) = socket.recv_from(&mut buffer) {
            if is_unauthorized(&buffer[..length]) {
                unauthorized += 1;
                if unauthorized == 2 {
                    return Err("refused: 401 Unauthorized".to_owned());
                }
            }
            let _ = client.recv(
                Transmit {
                    data: &buffer[..length],
                    transport: TransportType::Udp,
                    from,
                    to: local,
                },
                now(),
            );
        }
    }
}

/// A STUN error response with code 401.
fn is_unauthorized(datagram: &[u8]) -> bool {
    use turn_client_proto::types::stun::attribute::ErrorCode;
    use turn_client_proto::types::stun::message::{Message, MessageClass};
    Message::from_bytes(datagram).is_ok_and(|message| {
        message.has_class(MessageClass::Error)
            && message
                .attribute::<ErrorCode>()
                .is_ok_and(|error| error.code() == ErrorCode::UNAUTHORIZED)
    })
}
