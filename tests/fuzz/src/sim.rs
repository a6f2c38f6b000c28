//! A gateway core among client devices, driven by the fuzzer: the `gateway_path` target, and
//! the machinery `grant_gateway` and `grant` share with it.
//!
//! The devices are real boringtun peers with the keys the grants name, so packets they send
//! reach the gateway's filter and NAT through real handshakes and data messages. The sim
//! keeps a model of what is in force, read from what the gateway tells the portal and its
//! events, and checks every packet that comes out against the grants of that model with a
//! filter of its own:
//! - a packet out of a device's tunnel reaches the site only if an installed grant of that
//!   device's key passes it (for a DNS grant: sent to a mapped address and translated to an
//!   address its name resolved to);
//! - a packet from the site reaches a device only if an installed grant of its key lets the
//!   source answer it (for a DNS grant: the reply of a translated flow);
//! - only a grant that verifies at the time, and whose filter reads, is installed; every
//!   grant the portal still holds gets an answer; an expired or revoked grant is gone, and so
//!   is its peer with the last of its grants;
//! - the gateway sends datagrams only to the address a message came from or to a device
//!   that authenticated; a damaged or replayed data message never reaches the site.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::{Result, Unstructured};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey as X25519Public, StaticSecret};
use fz_proto::{
    GatewayMessage, Grant, Identity, PortalToGateway, PublicKey, SignedGrant, UnixTime,
};
use fz_tunnel::Output;
use fz_tunnel::filter::GrantFilter;
use fz_tunnel::gateway::{Config, Event, Gateway, MAX_DATAGRAM, Resolved};
use fz_tunnel::packet::Packet;

use crate::fixtures::{self, DeviceSpec, GATEWAY_ID, GATEWAY_SECRET, START_UNIX};
use crate::{grant, packet, pick};

/// The most steps one input drives, so that an input's cost stays bounded.
const MAX_STEPS: usize = 48;
/// The most datagrams the sim keeps for replays.
const MAX_CAPTURED: usize = 64;
/// Where a stranger sends from.
const STRANGER: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 66)), 4444);

/// Real addresses names resolve to at the site, and sources of the site's packets.
const SITE: &[&str] = &[
    "172.16.0.5",
    "172.16.0.6",
    "2001:db8:5::5",
    "10.0.5.10",
    "10.0.6.1",
    "8.8.8.8",
    "8.8.4.4",
    "1.1.1.1",
    "2001:db8::53",
    "2606:4700::1111",
    "100.96.0.1",
    "127.0.0.1",
    "0.0.0.0",
    "::",
];

/// Destinations of the devices' packets: resources, mapped addresses, other devices.
const DESTINATIONS: &[&str] = &[
    "10.0.5.10",
    "10.0.5.255",
    "10.0.6.1",
    "100.96.0.1",
    "100.96.0.2",
    "fd00:2021:1111:8000::1",
    "fd00:2021:1111:8000::2",
    "172.16.0.5",
    "8.8.8.8",
    "8.8.4.4",
    "192.168.1.1",
    "2001:db8::53",
    "2606:4700::1111",
    "100.64.0.1",
    "100.64.0.2",
    "255.255.255.255",
    "::1",
];

/// The `gateway_path` target: a gateway holding [`fixtures::standard_grants`], then packets
/// from the devices and the site, replays, strangers and time.
pub fn gateway_path(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut sim = Sim::with_standard_grants();
    // Running out of input only ends the run.
    let _ = sim.run(&mut u, false);
    sim.finish();
}

/// The standard grants, signed once per process (signing is deterministic).
fn standard_grants() -> &'static [SignedGrant] {
    static SIGNED: OnceLock<Vec<SignedGrant>> = OnceLock::new();
    SIGNED.get_or_init(|| {
        fixtures::standard_grants()
            .into_iter()
            .map(|g| g.sign(fixtures::portal()))
            .collect()
    })
}

/// A client device: its spec and its WireGuard peer of the gateway.
struct Device {
    spec: DeviceSpec,
    key: PublicKey,
    tunnel: Tunn,
}

impl Device {
    fn new(spec: DeviceSpec, index: u32) -> Device {
        let gateway = X25519Public::from(&StaticSecret::from(GATEWAY_SECRET));
        let tunnel = Tunn::new(
            StaticSecret::from(spec.secret),
            gateway,
            Some(spec.preshared_key),
            None,
            index,
            None,
        );
        Device {
            key: spec.public_key(),
            spec,
            tunnel,
        }
    }
}

/// The gateway, its devices, and the model of what is in force.
pub(crate) struct Sim {
    gateway: Gateway,
    /// The id the portal's last `ready` gave the gateway.
    gateway_id: String,
    devices: Vec<Device>,
    restarts: u32,
    start: Instant,
    now: Instant,
    /// Every grant the portal sent, by id.
    sent: HashMap<String, SignedGrant>,
    /// Grants that verified when the portal sent them (against the gateway's id then).
    verified: HashSet<String>,
    /// Grants the gateway installed and has not removed since, by id.
    installed: HashMap<String, Grant>,
    /// Per client key and mapped address: every real address its NAT may translate it to.
    reals: HashMap<(PublicKey, IpAddr), HashSet<IpAddr>>,
    /// What each name resolved to last.
    answers: HashMap<String, Vec<IpAddr>>,
    /// Names the gateway asked to resolve, not yet answered.
    resolving: Vec<String>,
    /// Grants the portal holds that the gateway has not answered yet.
    unanswered: HashSet<String>,
    /// Datagrams the devices sent: (device, bytes).
    captured: Vec<(usize, Vec<u8>)>,
    /// Datagrams that brought a packet to the site.
    delivered: HashSet<Vec<u8>>,
    next_grant: u32,
    /// Packets that reached the site, and devices, through the gateway.
    to_site: usize,
    to_devices: usize,
}

impl Sim {
    /// A gateway the portal has said `ready` to, and its two devices.
    pub(crate) fn new() -> Sim {
        let now = Instant::now();
        let mut gateway = Gateway::new(
            Config {
                private_key: GATEWAY_SECRET,
                portal_key: fixtures::portal_key(),
                seed: 1000,
                host: Vec::new(),
            },
            now,
            START_UNIX * 1000,
        );
        gateway.handle_portal(
            PortalToGateway::Ready {
                gateway_id: GATEWAY_ID.to_owned(),
                heartbeat_interval_ms: 10_000,
                grants: Vec::new(),
            },
            now,
        );
        let devices = fixtures::devices()
            .into_iter()
            .zip(1u32..)
            .map(|(spec, index)| Device::new(spec, index))
            .collect();
        let mut sim = Sim {
            gateway,
            gateway_id: GATEWAY_ID.to_owned(),
            devices,
            restarts: 0,
            start: now,
            now,
            sent: HashMap::new(),
            verified: HashSet::new(),
            installed: HashMap::new(),
            reals: HashMap::new(),
            answers: HashMap::new(),
            resolving: Vec::new(),
            unanswered: HashSet::new(),
            captured: Vec::new(),
            delivered: HashSet::new(),
            next_grant: 0,
            to_site: 0,
            to_devices: 0,
        };
        sim.drain_events();
        sim
    }

    /// A gateway holding [`fixtures::standard_grants`].
    fn with_standard_grants() -> Sim {
        let mut sim = Sim::new();
        for signed in standard_grants() {
            // They verify (and the gateway checks that itself): the sim need not check again.
            sim.verified.insert(signed.grant.id.clone());
            sim.send_grant(signed.clone());
            if signed.grant.resource.dns.is_some() {
                sim.resolve_all();
            }
        }
        assert_eq!(
            sim.installed.len(),
            standard_grants().len(),
            "the standard grants install"
        );
        sim
    }

    /// Steps read from the fuzzer's bytes until they run out; `new_grants` lets the portal
    /// send grants of random contents.
    pub(crate) fn run(&mut self, u: &mut Unstructured<'_>, new_grants: bool) -> Result<()> {
        for _ in 0..MAX_STEPS {
            if u.is_empty() {
                break;
            }
            match u.int_in_range(0u8..=11)? {
                0 | 1 if new_grants => {
                    self.next_grant += 1;
                    let id = format!("g-{}", self.next_grant);
                    let specs: Vec<DeviceSpec> =
                        self.devices.iter().map(|d| d.spec.clone()).collect();
                    let signed = grant::arbitrary_signed(u, id, &specs, self.unix())?;
                    self.portal_grant(signed);
                }
                2 => {
                    // The portal sends a grant again, as it does when the gateway reconnects.
                    let mut ids: Vec<&String> = self.sent.keys().collect();
                    ids.sort();
                    if let Some(id) = ids.get(u.choose_index(ids.len().max(1))?) {
                        let signed = self.sent[*id].clone();
                        self.portal_grant(signed);
                    }
                }
                3 => self.revoke(u)?,
                4 => self.ready(u)?,
                5 => self.resolve(u)?,
                0 | 1 | 6 | 7 => {
                    let d = u.choose_index(self.devices.len())?;
                    let sources = self.device_sources(d);
                    let packet = packet::build(u, &sources, &pick::ips(DESTINATIONS))?;
                    self.device_sends(d, &packet);
                }
                8 => {
                    let d = u.choose_index(self.devices.len())?;
                    let mut destinations = self.device_sources(d);
                    destinations.extend(pick::ips(DESTINATIONS));
                    let packet = packet::build(u, &pick::ips(SITE), &destinations)?;
                    self.site_sends(packet);
                }
                9 => self.replay_or_stranger(u)?,
                10 => {
                    let by = if u.ratio(3u8, 4)? {
                        *u.choose(&[1u64, 250, 1000, 2000, 5000, 10_000, 60_000, 3_600_000])?
                    } else {
                        u64::from(u.arbitrary::<u32>()?)
                    };
                    self.advance(Duration::from_millis(by));
                }
                _ => {
                    // A device restarts: a fresh WireGuard state with the same keys.
                    let d = u.choose_index(self.devices.len())?;
                    self.restarts += 1;
                    let spec = self.devices[d].spec.clone();
                    self.devices[d] = Device::new(spec, self.restarts << 4 | d as u32);
                }
            }
            self.check_consistency();
        }
        Ok(())
    }

    /// The end of a run: the names still resolving are answered, and every grant the portal
    /// holds must have had its answer; then time passes until every grant with a lifetime
    /// under a month has expired (and must be gone).
    pub(crate) fn finish(&mut self) {
        self.resolve_all();
        let mut owed: Vec<&String> = self.unanswered.iter().collect();
        owed.sort();
        assert!(
            owed.is_empty(),
            "the gateway never answered the portal about {owed:?}"
        );
        self.check_consistency();
        let last = self
            .installed
            .values()
            .map(|g| g.expires_at)
            .filter(|at| *at < START_UNIX + 30 * 24 * 3600)
            .max();
        if let Some(last) = last {
            let wait = last.saturating_sub(self.unix()) + 1;
            self.advance(Duration::from_secs(wait));
            self.check_consistency();
        }
    }

    /// The portal sends a signed grant.
    pub(crate) fn portal_grant(&mut self, signed: SignedGrant) {
        let id = signed.grant.id.clone();
        let me = Identity::Gateway {
            id: self.gateway_id.clone(),
            public_key: fixtures::gateway_key(),
        };
        if signed
            .verify(&fixtures::portal_key(), &me, self.unix())
            .is_ok()
        {
            self.verified.insert(id);
        }
        self.send_grant(signed);
    }

    /// The portal sends a grant the sim knows verifies or not.
    fn send_grant(&mut self, signed: SignedGrant) {
        let id = signed.grant.id.clone();
        self.sent.insert(id.clone(), signed.clone());
        self.unanswered.insert(id);
        self.gateway.handle_portal(
            PortalToGateway::Grant {
                grant: Box::new(signed),
            },
            self.now,
        );
        self.drain_events();
    }

    /// Answers every name the gateway asked for with the standard real addresses.
    fn resolve_all(&mut self) {
        while let Some(name) = self.resolving.pop() {
            let real = pick::ips(&fixtures::STANDARD_REAL);
            self.answers.insert(name.clone(), real.clone());
            self.gateway.handle_resolved(
                &name,
                Resolved::Addresses {
                    addresses: real,
                    ttl: Duration::from_secs(60),
                },
                self.now,
            );
            self.drain_events();
        }
    }

    fn resolve(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        if self.resolving.is_empty() {
            return Ok(());
        }
        let name = self.resolving.remove(u.choose_index(self.resolving.len())?);
        let answer = match u.int_in_range(0u8..=5)? {
            0 => Resolved::NoSuchName,
            1 => Resolved::Failed("timed out".to_owned()),
            _ => {
                let count = u.int_in_range(0..=4)?;
                let site = pick::ips(SITE);
                let real = (0..count)
                    .map(|_| pick::address(u, &site))
                    .collect::<Result<Vec<_>>>()?;
                // From an answer gone at once to one that outlives the run.
                let ttl = Duration::from_secs(u.choose(&[0, 1, 30, 3600])?.to_owned());
                Resolved::Addresses {
                    addresses: real,
                    ttl,
                }
            }
        };
        let real = match &answer {
            Resolved::Addresses { addresses, .. } => addresses.clone(),
            _ => Vec::new(),
        };
        self.answers.insert(name.clone(), real);
        self.gateway.handle_resolved(&name, answer, self.now);
        self.drain_events();
        Ok(())
    }

    fn revoke(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let mut ids: Vec<String> = self.sent.keys().cloned().collect();
        ids.sort();
        let id = match ids.get(u.choose_index(ids.len().max(1))?) {
            Some(id) => id.clone(),
            None => pick::text(u, &[])?,
        };
        self.unanswered.remove(&id);
        self.gateway.handle_portal(
            PortalToGateway::Revoke {
                grant_id: id.clone(),
            },
            self.now,
        );
        self.drain_events();
        assert!(
            !self.installed.contains_key(&id),
            "grant `{id}` is still installed after its revocation"
        );
        Ok(())
    }

    /// The portal's `ready` after a reconnection, holding some of the grants sent.
    fn ready(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let mut ids: Vec<String> = self.sent.keys().cloned().collect();
        ids.sort();
        let mut held = Vec::new();
        for id in ids {
            if u.ratio(3u8, 4)? {
                held.push(id);
            }
        }
        if u.ratio(1u8, 16)? {
            // Another id: every grant after this is addressed to someone else.
            self.gateway_id = "gw-2".to_owned();
        }
        self.unanswered.retain(|id| held.contains(id));
        self.gateway.handle_portal(
            PortalToGateway::Ready {
                gateway_id: self.gateway_id.clone(),
                heartbeat_interval_ms: 10_000,
                grants: held.clone(),
            },
            self.now,
        );
        self.drain_events();
        for id in self.installed.keys() {
            assert!(
                held.contains(id),
                "grant `{id}` outlived a `ready` without it"
            );
        }
        Ok(())
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.gateway.handle_timeout(self.now);
        self.drain_events();
        let unix = self.unix();
        for (id, grant) in &self.installed {
            assert!(
                grant.expires_at > unix,
                "grant `{id}` expired at {} and is still in force at {unix}",
                grant.expires_at
            );
        }
        let mut to_devices = Vec::new();
        self.collect_transmits(&mut to_devices);
        self.deliver(to_devices);
    }

    /// The wall clock as the gateway reads it.
    fn unix(&self) -> UnixTime {
        let elapsed =
            u64::try_from(self.now.duration_since(self.start).as_millis()).unwrap_or(u64::MAX);
        START_UNIX.saturating_mul(1000).saturating_add(elapsed) / 1000
    }

    /// The addresses a device's packets come from: its own, mostly; the other's, to spoof.
    fn device_sources(&self, d: usize) -> Vec<IpAddr> {
        let own = &self.devices[d].spec;
        let mut sources = vec![own.v4.into(), own.v6.into(), own.v4.into(), own.v6.into()];
        for other in &self.devices {
            sources.extend([IpAddr::from(other.spec.v4), IpAddr::from(other.spec.v6)]);
        }
        sources
    }

    // ---- the packet path ----

    /// A device puts a packet into its tunnel.
    fn device_sends(&mut self, d: usize, packet: &[u8]) {
        let mut out = vec![0u8; packet.len() + 256];
        let datagram = match self.devices[d].tunnel.encapsulate(packet, &mut out) {
            TunnResult::WriteToNetwork(bytes) => bytes.to_vec(),
            _ => return,
        };
        self.exchange(vec![(d, datagram)]);
    }

    /// Datagrams between devices and the gateway until neither has more to say.
    fn exchange(&mut self, mut to_gateway: Vec<(usize, Vec<u8>)>) {
        for _ in 0..16 {
            if to_gateway.is_empty() {
                return;
            }
            let mut to_devices = Vec::new();
            for (d, datagram) in to_gateway.drain(..) {
                if self.captured.len() < MAX_CAPTURED {
                    self.captured.push((d, datagram.clone()));
                }
                let from = self.devices[d].spec.address;
                self.gateway_takes(Some(d), from, &datagram, &mut to_devices);
            }
            self.collect_transmits(&mut to_devices);
            to_gateway = self.devices_take(to_devices);
        }
    }

    fn deliver(&mut self, to_devices: Vec<(SocketAddr, Vec<u8>)>) {
        let to_gateway = self.devices_take(to_devices);
        self.exchange(to_gateway);
    }

    /// A datagram to the gateway's WireGuard port, from device `d` (or a stranger).
    fn gateway_takes(
        &mut self,
        d: Option<usize>,
        from: SocketAddr,
        datagram: &[u8],
        to_devices: &mut Vec<(SocketAddr, Vec<u8>)>,
    ) -> bool {
        let mut buffer = vec![0u8; MAX_DATAGRAM];
        match self
            .gateway
            .handle_network(from, datagram, &mut buffer, self.now)
        {
            Some(Output::Tun(packet)) => {
                let packet = packet.to_vec();
                let Some(d) = d else {
                    panic!("a stranger's datagram reached the site: {packet:02x?}");
                };
                assert!(
                    self.delivered.insert(datagram.to_vec()),
                    "a replayed data message reached the site again"
                );
                self.check_from_device(d, &packet);
                self.to_site += 1;
                true
            }
            Some(Output::Network(to, bytes)) => {
                assert_eq!(to, from, "the gateway answered somewhere else");
                to_devices.push((to, bytes.to_vec()));
                false
            }
            None => false,
        }
    }

    /// Datagrams the gateway sends on its own: queued packets, keepalives, retries.
    fn collect_transmits(&mut self, to_devices: &mut Vec<(SocketAddr, Vec<u8>)>) {
        while let Some(transmit) = self.gateway.poll_transmit() {
            to_devices.push((transmit.destination, transmit.payload));
        }
    }

    /// Each device takes what was sent to it; what they answer.
    fn devices_take(&mut self, datagrams: Vec<(SocketAddr, Vec<u8>)>) -> Vec<(usize, Vec<u8>)> {
        let mut answers = Vec::new();
        for (to, datagram) in datagrams {
            let Some(d) = self.devices.iter().position(|d| d.spec.address == to) else {
                // A stranger's handshake or cookie answered where it came from.
                assert_eq!(
                    to, STRANGER,
                    "the gateway sent a datagram to {to}, where no device is"
                );
                continue;
            };
            answers.extend(self.device_receives(d, &datagram, None));
        }
        answers
    }

    /// Device `d` opens a datagram from the gateway; `original` is the site's packet it
    /// carries, when known. What the device sends back.
    fn device_receives(
        &mut self,
        d: usize,
        datagram: &[u8],
        original: Option<&[u8]>,
    ) -> Vec<(usize, Vec<u8>)> {
        let mut buffer = vec![0u8; MAX_DATAGRAM + 256];
        let mut answers = Vec::new();
        match self.devices[d]
            .tunnel
            .decapsulate(None, datagram, &mut buffer)
        {
            TunnResult::WriteToNetwork(bytes) => {
                answers.push((d, bytes.to_vec()));
                loop {
                    let mut more = vec![0u8; MAX_DATAGRAM + 256];
                    match self.devices[d].tunnel.decapsulate(None, &[], &mut more) {
                        TunnResult::WriteToNetwork(bytes) => answers.push((d, bytes.to_vec())),
                        _ => break,
                    }
                }
            }
            TunnResult::WriteToTunnelV4(packet, _) | TunnResult::WriteToTunnelV6(packet, _) => {
                let packet = packet.to_vec();
                self.check_to_device(d, &packet, original);
                self.to_devices += 1;
            }
            TunnResult::Done | TunnResult::Err(_) => {}
        }
        answers
    }

    /// A packet from the site to the gateway's TUN device.
    fn site_sends(&mut self, original: Vec<u8>) {
        let mut packet = original.clone();
        let mut buffer = vec![0u8; MAX_DATAGRAM];
        let sealed = match self.gateway.handle_tun(&mut packet, &mut buffer, self.now) {
            Some(Output::Network(to, datagram)) => Some((to, datagram.to_vec())),
            Some(Output::Tun(_)) => panic!("a packet from the site went back to the site"),
            None => None,
        };
        if let Some((to, datagram)) = sealed {
            let Some(d) = self.devices.iter().position(|d| d.spec.address == to) else {
                panic!("a packet from the site went to {to}, where no device is");
            };
            let answers = self.device_receives(d, &datagram, Some(&original));
            self.exchange(answers);
        }
        let mut to_devices = Vec::new();
        self.collect_transmits(&mut to_devices);
        self.deliver(to_devices);
    }

    /// A captured datagram again, perhaps damaged; or a stranger's bytes.
    fn replay_or_stranger(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let mut to_devices = Vec::new();
        if !self.captured.is_empty() && u.ratio(3u8, 4)? {
            let (d, original) = self.captured[u.choose_index(self.captured.len())?].clone();
            let mut datagram = original.clone();
            for _ in 0..u.int_in_range(0..=3)? {
                let at = u.choose_index(datagram.len().max(1))?;
                let mask: u8 = u.arbitrary()?;
                if let Some(byte) = datagram.get_mut(at) {
                    *byte ^= mask;
                }
            }
            let from = self.devices[d].spec.address;
            let reached = self.gateway_takes(Some(d), from, &datagram, &mut to_devices);
            assert!(
                !reached || datagram == original,
                "a damaged data message reached the site"
            );
        } else {
            let length = u.int_in_range(0..=200)?;
            let mut datagram = u.bytes(length.min(u.len()))?.to_vec();
            if let Some(first) = datagram.first_mut() {
                // Mostly a WireGuard message type, so the gatekeeper reads further.
                *first = *u.choose(&[1u8, 2, 3, 4, *first])?;
            }
            self.gateway_takes(None, STRANGER, &datagram, &mut to_devices);
        }
        self.collect_transmits(&mut to_devices);
        self.deliver(to_devices);
        Ok(())
    }

    // ---- the model ----

    fn drain_events(&mut self) {
        while let Some(event) = self.gateway.poll_event() {
            match event {
                Event::ToPortal(GatewayMessage::Ack { grant_id, .. }) => {
                    assert!(
                        self.installed.contains_key(&grant_id),
                        "the gateway acknowledged grant `{grant_id}`, which it has not installed"
                    );
                    self.unanswered.remove(&grant_id);
                }
                Event::ToPortal(GatewayMessage::Refused { grant_id, .. }) => {
                    assert!(
                        self.sent.contains_key(&grant_id),
                        "the gateway refused grant `{grant_id}`, which was never sent"
                    );
                    self.unanswered.remove(&grant_id);
                }
                Event::ToPortal(other) => {
                    panic!("the gateway core told the portal {other:?}")
                }
                Event::Installed { grant_id, .. } => self.installed(grant_id),
                Event::Removed { grant_id, why } => {
                    assert!(
                        self.installed.remove(&grant_id).is_some(),
                        "grant `{grant_id}` was removed ({why:?}) but was not installed"
                    );
                }
                Event::Resolve { name } => self.resolving.push(name),
                Event::Refused { .. }
                | Event::PortalError { .. }
                | Event::BadCandidate { .. }
                | Event::Path { .. } => {}
            }
        }
    }

    /// The gateway installed a grant: it must be one the portal sent, that verifies now,
    /// and whose filter reads.
    fn installed(&mut self, grant_id: String) {
        let Some(signed) = self.sent.get(&grant_id) else {
            panic!("the gateway installed grant `{grant_id}`, which was never sent");
        };
        // The gateway verified it when it came; a DNS grant is installed later, when its
        // name resolved, and must not have expired meanwhile.
        assert!(
            self.verified.contains(&grant_id),
            "grant `{grant_id}` was installed though it never verified"
        );
        let unix = self.unix();
        assert!(
            signed.grant.expires_at > unix,
            "grant `{grant_id}` was installed at {unix}, after it expired"
        );
        let grant = signed.grant.clone();
        if let Err(error) = GrantFilter::new(&grant) {
            panic!("grant `{grant_id}` was installed though its filter does not read: {error}");
        }
        if let Some(dns) = &grant.resource.dns {
            // Answers are kept under the name as the gateway asks for it (lower case, no final
            // dot), which a grant's name need not be written in.
            let real = self
                .answers
                .get(&fz_tunnel::resolution::key(&dns.name))
                .cloned()
                .unwrap_or_default();
            for mapped in &dns.mapped {
                self.reals
                    .entry((grant.client.public_key, *mapped))
                    .or_default()
                    .extend(real.iter().copied());
            }
        }
        let before = self.installed.insert(grant_id.clone(), grant);
        assert!(
            before.is_none(),
            "grant `{grant_id}` was installed twice without being removed"
        );
    }

    /// What the gateway says is in force is what the model holds: the same grants, and one
    /// peer per client key among them.
    fn check_consistency(&self) {
        let mut ids: Vec<String> = self.installed.keys().cloned().collect();
        ids.sort();
        assert_eq!(self.gateway.grants(), ids, "the grants in force");
        let keys: HashSet<PublicKey> = self
            .installed
            .values()
            .map(|g| g.client.public_key)
            .collect();
        assert_eq!(
            self.gateway.peer_count(),
            keys.len(),
            "one peer per client key with grants in force"
        );
        if self.installed.is_empty() {
            assert_eq!(self.gateway.nat_flows(), 0, "NAT flows without grants");
        }
    }

    /// A packet came out of device `d`'s tunnel on the site's side.
    fn check_from_device(&self, d: usize, packet: &[u8]) {
        let Ok(parsed) = Packet::parse(packet) else {
            panic!("the gateway wrote a packet it cannot read to its TUN: {packet:02x?}");
        };
        let key = self.devices[d].key;
        let admitted = self
            .installed
            .values()
            .filter(|g| g.client.public_key == key)
            .any(|g| self.admits(g, &parsed));
        assert!(
            admitted,
            "{parsed:?} from {} reached the site, and no grant in force admits it: {:#?}",
            self.devices[d].spec.id,
            self.installed.values().collect::<Vec<_>>()
        );
    }

    /// Whether `grant` lets this packet (as it leaves for the site) through.
    fn admits(&self, grant: &Grant, packet: &Packet) -> bool {
        let Ok(filter) = GrantFilter::new(grant) else {
            return false;
        };
        let Some(dns) = &grant.resource.dns else {
            return filter.check(packet).is_ok();
        };
        // Translated: sent to a mapped address, now going to what its name resolved to.
        dns.mapped.iter().any(|mapped| {
            let sent = Packet {
                destination: *mapped,
                ..*packet
            };
            self.reals
                .get(&(grant.client.public_key, *mapped))
                .is_some_and(|real| real.contains(&packet.destination))
                && filter.check(&sent).is_ok()
        })
    }

    /// Device `d` received a packet from the site; `original` is the packet as the site
    /// sent it, when known.
    fn check_to_device(&self, d: usize, packet: &[u8], original: Option<&[u8]>) {
        let Ok(parsed) = Packet::parse(packet) else {
            panic!("a device received a packet it cannot read: {packet:02x?}");
        };
        let key = self.devices[d].key;
        let answered = self
            .installed
            .values()
            .filter(|g| g.client.public_key == key)
            .any(|g| {
                let Ok(filter) = GrantFilter::new(g) else {
                    return false;
                };
                if !filter.check_reply(&parsed) {
                    return false;
                }
                match (&g.resource.dns, original) {
                    (None, Some(original)) => as_ip_says(original) == packet,
                    (Some(_), Some(original)) => Packet::parse(original).is_ok_and(|o| {
                        self.reals
                            .get(&(key, parsed.source))
                            .is_some_and(|real| real.contains(&o.source))
                    }),
                    (_, None) => true,
                }
            });
        assert!(
            answered,
            "{parsed:?} reached {} from the site, and no grant in force lets its source answer: {:#?}",
            self.devices[d].spec.id,
            self.installed.values().collect::<Vec<_>>()
        );
    }
}

/// The sim itself: what a granted device sends reaches the site and the answers come back,
/// so the targets' oracles are not vacuous.
/// A packet as its IP header says it is: bytes past the total length (IPv4) or the payload
/// length (IPv6) are not part of it, and WireGuard, which carries packets padded, delivers
/// them without those.
fn as_ip_says(packet: &[u8]) -> &[u8] {
    let length = match packet.first().map(|b| b >> 4) {
        Some(4) => packet
            .get(2..4)
            .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]]))),
        Some(6) => packet
            .get(4..6)
            .map(|l| 40 + usize::from(u16::from_be_bytes([l[0], l[1]]))),
        _ => None,
    };
    length.and_then(|n| packet.get(..n)).unwrap_or(packet)
}

#[cfg(test)]
mod tests {
    use fz_tunnel::packet::build;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        pick::ips(&[text])[0]
    }

    #[test]
    fn granted_traffic_flows_both_ways_and_the_rest_is_dropped() {
        let mut sim = Sim::with_standard_grants();
        let client: IpAddr = sim.devices[0].spec.v4.into();
        let to_db = build::ip(client, ip("10.0.5.10"), 6, &build::ports(40000, 5432));
        sim.device_sends(0, &to_db);
        assert_eq!(sim.to_site, 1, "a granted packet reaches the site");
        let reply = build::ip(ip("10.0.5.10"), client, 6, &build::ports(5432, 40000));
        sim.site_sends(reply);
        assert_eq!(sim.to_devices, 1, "its reply reaches the device");

        // The DNS resource: translated on the way out, and back.
        let to_gitlab = build::ip(client, ip("100.96.0.1"), 6, &build::ports(40001, 443));
        sim.device_sends(0, &to_gitlab);
        assert_eq!(sim.to_site, 2);
        for real in ["172.16.0.5", "172.16.0.6"] {
            let reply = build::ip(ip(real), client, 6, &build::ports(443, 40001));
            sim.site_sends(reply);
        }
        assert_eq!(
            sim.to_devices, 2,
            "the reply of the translated flow, and only it"
        );

        // A port the grant does not name, and another device's resource.
        let to_ssh = build::ip(client, ip("10.0.5.10"), 6, &build::ports(40000, 22));
        sim.device_sends(0, &to_ssh);
        let to_web = build::ip(client, ip("8.8.8.8"), 6, &build::ports(40000, 443));
        sim.device_sends(0, &to_web);
        assert_eq!(sim.to_site, 2);
        sim.finish();
    }

    #[test]
    fn revoked_and_expired_grants_are_gone() {
        let mut sim = Sim::with_standard_grants();
        sim.gateway.handle_portal(
            PortalToGateway::Revoke {
                grant_id: "g-db".to_owned(),
            },
            sim.now,
        );
        sim.drain_events();
        assert!(!sim.installed.contains_key("g-db"));
        sim.finish();
        assert!(sim.installed.is_empty());
        assert_eq!(sim.gateway.peer_count(), 0);
    }
}
