//! A client that speaks fz's protocol but keeps none of the real client's manners: what an
//! attacker holding a user's token (or the user, with their own software) could do. It signs in
//! with a real client token and a WireGuard key of its own (a
//! [`TestClient`](fz_host::testing::agents::TestClient) on the portal's WebSocket), asks for any
//! resource with any name, verifies the signed grant, and drives its own boringtun tunnel to
//! the granted gateway over a UDP socket in the client's namespace, sending IP packets built by
//! hand ([`fz_host::testing::packet`]) and reading what comes back. What it reaches is what the
//! portal and the gateway let through, not what the real client would have routed.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey as X25519Public, StaticSecret};
use fz_host::testing::WAIT;
use fz_host::testing::agents::TestClient;
use fz_host::testing::netns::Netns;
use fz_proto::{DnsMapping, PortalPublicKey, PortalToClient, PublicKey, SignedGrant};

/// The largest datagram the tunnel carries here.
const DATAGRAM: usize = 2048;

pub struct RogueClient {
    /// Drives the portal connection while the client waits for an answer; the connection is
    /// left alone in between (the portal expects nothing of a client meanwhile).
    runtime: tokio::runtime::Runtime,
    control: TestClient,
    secret: StaticSecret,
    socket: UdpSocket,
    tunnel: Option<Tunnel>,
}

/// The WireGuard session with one gateway.
struct Tunnel {
    tunn: Tunn,
    gateway: SocketAddr,
    gateway_key: PublicKey,
    preshared_key: [u8; 32],
}

impl std::fmt::Debug for RogueClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RogueClient")
            .field("client_id", &self.client_id())
            .field("gateway", &self.tunnel.as_ref().map(|t| t.gateway))
            .finish_non_exhaustive()
    }
}

impl RogueClient {
    /// Signs in from `ns` to the portal at `portal` with the client token in the file `token`
    /// and the WireGuard key `secret`, and waits for `ready`.
    pub fn sign_in(
        ns: &Netns,
        portal: SocketAddr,
        pinned: PortalPublicKey,
        account: &str,
        token: &Path,
        secret: StaticSecret,
    ) -> RogueClient {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let token = std::fs::read_to_string(token).unwrap();
        let public_key = PublicKey(X25519Public::from(&secret).to_bytes());
        // Sockets belong to the namespace they are made in: both are made inside `ns`.
        let (control, socket) = ns.run(|| {
            let control = runtime
                .block_on(TestClient::connect(
                    portal,
                    pinned,
                    account,
                    token.trim(),
                    public_key,
                ))
                .unwrap_or_else(|(status, why)| panic!("the portal refused us: {status} {why}"));
            (
                control,
                UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap(),
            )
        });
        RogueClient {
            runtime,
            control,
            secret,
            socket,
            tunnel: None,
        }
    }

    /// The id the portal gave this device (one per token).
    pub fn client_id(&self) -> &str {
        &self.control.ready.client_id
    }

    /// The relays the portal sent after `ready`, with the credentials it minted for this
    /// device.
    pub fn relays(&mut self) -> Vec<fz_proto::Relay> {
        loop {
            match self.runtime.block_on(self.control.next()) {
                Some(PortalToClient::Relays { relays }) => return relays,
                Some(_) => continue,
                None => panic!("the portal closed the connection before sending relays"),
            }
        }
    }

    /// The tunnel address the portal gave this device: the source of its packets.
    pub fn tunnel_ipv4(&self) -> Ipv4Addr {
        self.control.ready.tunnel_ipv4
    }

    /// Asks for `resource` (with `dns`, for a DNS resource): the grant, verified as a client
    /// verifies it, or the portal's reason for refusing.
    pub fn request(
        &mut self,
        resource: &str,
        dns: Option<DnsMapping>,
    ) -> Result<SignedGrant, String> {
        match self.runtime.block_on(self.control.request(resource, dns)) {
            PortalToClient::Granted { grant, .. } => {
                self.control
                    .verify(&grant)
                    .unwrap_or_else(|error| panic!("a grant that does not verify: {error}"));
                Ok(*grant)
            }
            PortalToClient::Rejected { reason, .. } => Err(reason),
            other => panic!("the portal answered {other:?}"),
        }
    }

    /// Uses `grant`'s gateway from now on: a new WireGuard session with it, unless the one
    /// there is with the same gateway and preshared key.
    pub fn connect(&mut self, grant: &SignedGrant) {
        let grant = &grant.grant;
        let gateway = *grant
            .gateway
            .endpoints
            .first()
            .unwrap_or_else(|| panic!("the grant names no endpoint of {}", grant.gateway.id));
        if self.tunnel.as_ref().is_some_and(|t| {
            t.gateway == gateway
                && t.gateway_key == grant.gateway.public_key
                && t.preshared_key == grant.preshared_key.0
        }) {
            return;
        }
        let tunn = Tunn::new(
            self.secret.clone(),
            X25519Public::from(grant.gateway.public_key.0),
            Some(grant.preshared_key.0),
            None,
            1,
            None,
        );
        self.tunnel = Some(Tunnel {
            tunn,
            gateway,
            gateway_key: grant.gateway.public_key,
            preshared_key: grant.preshared_key.0,
        });
    }

    /// Sends one IP packet through the tunnel (the first one starts the handshake and waits
    /// in boringtun until it is done).
    pub fn send(&mut self, packet: &[u8]) {
        let tunnel = self.tunnel.as_mut().expect("connect to a gateway first");
        let mut sealed = vec![0u8; DATAGRAM];
        match tunnel.tunn.encapsulate(packet, &mut sealed) {
            TunnResult::WriteToNetwork(datagram) => {
                self.socket.send_to(datagram, tunnel.gateway).unwrap();
            }
            TunnResult::Done => {}
            other => panic!("boringtun could not seal the packet: {other:?}"),
        }
    }

    /// Reads what the gateway sends until a packet out of the tunnel satisfies `pick` (within
    /// [`WAIT`]): what `pick` made of it, and every packet that came out before it. Handshake
    /// answers, and the packets that waited for the handshake, go out on the way.
    pub fn receive_until<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&[u8]) -> Option<T>,
    ) -> (T, Vec<Vec<u8>>) {
        let tunnel = self.tunnel.as_mut().expect("connect to a gateway first");
        let deadline = Instant::now() + WAIT;
        let (mut datagram, mut opened) = (vec![0u8; DATAGRAM], vec![0u8; DATAGRAM]);
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "waited {WAIT:?} for {what}; {} other packets came: {before:?}",
                before.len()
            );
            // A bounded read, so that WireGuard's timers (handshake retries) run between.
            let patience = left.min(Duration::from_millis(100));
            self.socket.set_read_timeout(Some(patience)).unwrap();
            let mut out = Vec::new();
            if let Ok((length, from)) = self.socket.recv_from(&mut datagram) {
                match tunnel
                    .tunn
                    .decapsulate(Some(from.ip()), &datagram[..length], &mut opened)
                {
                    TunnResult::WriteToNetwork(bytes) => {
                        out.push(bytes.to_vec());
                        while let TunnResult::WriteToNetwork(bytes) =
                            tunnel.tunn.decapsulate(None, &[], &mut opened)
                        {
                            out.push(bytes.to_vec());
                        }
                    }
                    TunnResult::WriteToTunnelV4(packet, _)
                    | TunnResult::WriteToTunnelV6(packet, _) => {
                        if let Some(found) = pick(packet) {
                            return (found, before);
                        }
                        before.push(packet.to_vec());
                    }
                    TunnResult::Done | TunnResult::Err(_) => {}
                }
            }
            if let TunnResult::WriteToNetwork(bytes) = tunnel.tunn.update_timers(&mut opened) {
                out.push(bytes.to_vec());
            }
            for bytes in out {
                self.socket.send_to(&bytes, tunnel.gateway).unwrap();
            }
        }
    }
}
