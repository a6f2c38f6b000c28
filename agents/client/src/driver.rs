//! The client's event loop: one task owns the tunnels' core (`fz_tunnel::client::Client`),
//! the DNS stub ([`DnsService`]), the UDP socket and the TUN device, and waits on a closed
//! set of inputs ([`Input`]). The portal link, the DNS sockets and upstream exchanges run as
//! tasks of their own and come back as inputs.
//!
//! Packets move in batches, as in the gateway's loop: one input is everything one read of the
//! socket or the device brought, the core takes each in order, and its outputs are queued and
//! written with as few system calls as the kernel allows.
//!
//! Set-up order matters for the host: the TUN device, the sentinel addresses and the DNS
//! sockets first, and only then the resolver switched to them; at exit the resolver comes
//! back first (also when the loop fails).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use fz_address::Address;
use fz_dns::Stub;
use fz_host::full_tunnel::{self, FullTunnel};
use fz_host::resolv::{self, ResolverSwitch};
use fz_host::tun::{Cidr, Tun};
use fz_link::{ClientRole, LinkEvent};
use fz_proto::{ClientMessage, PortalToClient, ResourceView};
use fz_tunnel::Output;
use fz_tunnel::client::{self, Client, Event};
use fz_tunnel::gateway::MAX_DATAGRAM;
use tokio::sync::mpsc;

use fz_host::agent::sleep_until;
use fz_host::tun::WriteBatch;
use fz_host::udp::{RecvBatch, SendQueue, Udp};

use crate::config::Config;
use crate::dns::{self, DnsQuery, DnsService};

/// Room for any datagram the core seals or opens.
const BUFFER: usize = 65_536;

/// The mapped ranges the DNS stub hands out; packets to them go through the tunnel.
const MAPPED_V4: (&str, u8) = ("100.96.0.0", 11);
const MAPPED_V6: (&str, u8) = ("fd00:2021:1111:8000::", 107);

#[derive(Debug)]
enum Input {
    /// Datagrams, in the receive batch.
    Network,
    /// Packets, in the TUN read batch.
    Tun,
    Portal(LinkEvent<PortalToClient>),
    Dns(DnsQuery),
    Timeout,
    Shutdown,
}

/// Runs the client until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let upstreams = resolv::upstreams(&config.resolv_conf, &config.resolv_backup)?;
    let stub = Stub::new(&upstreams);
    // Rules a crashed run left would send the host's traffic into a table that is gone.
    FullTunnel::clear();
    let tun = Tun::create(&config.tun, config.mtu)?;
    let (queries, mut incoming_queries) = mpsc::channel(1024);
    let mut sentinels = Vec::new();
    for sentinel in stub.sentinels() {
        for address in [IpAddr::V4(sentinel.v4), IpAddr::V6(sentinel.v6)] {
            let host = if address.is_ipv4() { 32 } else { 128 };
            tun.add_address(Cidr::new(address, host)?)?;
            dns::serve(address, SocketAddr::new(address, 53), queries.clone())
                .await
                .with_context(|| format!("cannot serve DNS on {address}"))?;
        }
        sentinels.push(IpAddr::V4(sentinel.v4));
    }
    let switch = ResolverSwitch::install(&config.resolv_conf, &config.resolv_backup, &sentinels)?;
    tracing::info!(
        upstreams = upstreams.len(),
        "the host's resolver now asks fz-client"
    );
    // DNS for names no resource matches goes through a full tunnel too: to the resolvers an
    // `internet` grant can reach (public addresses; a resolver on a private network stays
    // where it is, as the gateway could not reach it).
    let resolvers: Vec<IpAddr> = upstreams
        .iter()
        .map(SocketAddr::ip)
        .filter(|ip| fz_address::is_public(*ip))
        .collect();
    let outcome = serve(
        config,
        &tun,
        stub,
        &resolvers,
        &mut incoming_queries,
        shutdown,
    )
    .await;
    if let Err(error) = switch.restore() {
        tracing::error!(%error, "cannot restore the resolver configuration");
    }
    outcome
}

async fn serve(
    mut config: Config,
    tun: &Tun,
    stub: Stub,
    resolvers: &[IpAddr],
    queries: &mut mpsc::Receiver<DnsQuery>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let udp = Udp::bind(config.listen).with_context(|| format!("cannot bind {}", config.listen))?; // The client's own traffic never enters its full tunnel: the WireGuard socket and the
    // portal link carry the mark its routing rules let through.
    udp.mark().context("cannot mark the WireGuard socket")?;
    config.portal.socket_mark = Some(full_tunnel::MARK);

    let mut seed = [0u8; 4];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let host = host_candidates(&config.portal, udp.local_addr()?.port()).await;
    let mut core = Client::new(
        client::Config {
            private_key: config.private_key,
            portal_key: config.portal_key,
            seed: u32::from_le_bytes(seed),
            host: host.clone(),
            full_tunnel: config.full_tunnel,
        },
        Instant::now(),
        unix_ms,
    );
    let mut service = DnsService::new(stub);
    let hello = ClientMessage::Hello {
        public_key: core.public_key(),
        endpoints: host,
    };
    let (to_portal, mut from_portal) = fz_link::spawn::<ClientRole>(config.portal, hello)?;
    tracing::info!(public_key = %core.public_key(), tun = tun.name(), "client up");
    let mut datagrams = RecvBatch::default();
    let mut packets = tun.read_batch();
    let mut sealed = vec![0u8; MAX_DATAGRAM.max(BUFFER)];
    let mut to_network = SendQueue::default();
    let mut to_tun = WriteBatch::default();
    // The tunnel addresses `ready` gave, and the full tunnel while an `internet` grant holds.
    let mut tunnel_addresses = None;
    let mut full: Option<FullTunnel> = None;
    tokio::pin!(shutdown);

    loop {
        let now = Instant::now();
        let deadline = [core.poll_timeout(now), service.stub().poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        let input = tokio::select! {
            received = udp.recv(&mut datagrams) => match received {
                Ok(()) => Input::Network,
                Err(error) => {
                    tracing::debug!(%error, "UDP receive failed");
                    continue;
                }
            },
            read = tun.recv(&mut packets) => {
                read.context("the TUN device failed")?;
                Input::Tun
            }
            event = from_portal.recv() => match event {
                Some(event) => Input::Portal(event),
                None => anyhow::bail!("the portal link stopped"),
            },
            Some(query) = queries.recv() => Input::Dns(query),
            () = sleep_until(deadline) => Input::Timeout,
            () = &mut shutdown => Input::Shutdown,
        };
        let now = Instant::now();
        match input {
            Input::Network => {
                for (from, datagram) in datagrams.datagrams() {
                    match core.handle_network(from, datagram, &mut sealed, now) {
                        Some(Output::Tun(packet)) => {
                            to_tun.push(packet);
                            if to_tun.is_full() {
                                tun.send(&mut to_tun)
                                    .await
                                    .context("the TUN device failed")?;
                            }
                        }
                        Some(Output::Network(to, bytes)) => to_network.push(to, &bytes),
                        None => {}
                    }
                }
            }
            Input::Tun => {
                for packet in packets.packets_mut() {
                    if let Some(Output::Network(to, bytes)) =
                        core.handle_tun(packet, &mut sealed, now)
                    {
                        to_network.push(to, &bytes);
                    }
                }
            }
            Input::Portal(LinkEvent::Message(message)) => {
                if let PortalToClient::Ready(ready) = &message {
                    let addresses = (ready.tunnel_ipv4.into(), ready.tunnel_ipv6.into());
                    set_up_tunnel(tun, addresses.0, addresses.1, &ready.resources)?;
                    tunnel_addresses = Some(addresses);
                    // Said once the routes are in: a connection opened before then would
                    // leave from another interface's address, which no gateway accepts.
                    tracing::info!(client = %ready.client_id, "the portal says ready");
                    let unreadable = service.stub_mut().set_resources(ready.resources.clone());
                    for address in unreadable {
                        tracing::warn!(%address, "a resource address this client cannot read");
                    }
                }
                core.handle_portal(message, now);
            }
            Input::Portal(LinkEvent::Down(reason)) => {
                tracing::warn!(%reason, "portal away; tunnels that are up keep working");
            }
            Input::Portal(LinkEvent::Refused(reason)) => anyhow::bail!("{reason}"),
            Input::Dns(query) => service.handle_queries(query, queries, now),
            Input::Timeout => {
                core.handle_timeout(now);
                service.stub_mut().handle_timeout(now);
            }
            Input::Shutdown => {
                tracing::info!("shutting down");
                return Ok(());
            }
        }
        while let Some(transmit) = core.poll_transmit() {
            to_network.push(transmit.destination, &transmit.payload);
        }
        while let Some(packet) = core.poll_tun() {
            to_tun.push(&packet);
        }
        // A refused datagram or packet is logged and the rest go; only a device that is gone
        // stops the client.
        udp.send(&mut to_network).await;
        tun.send(&mut to_tun)
            .await
            .context("the TUN device failed")?;
        while let Some(event) = core.poll_event() {
            match event {
                Event::FullTunnel { on: true } if full.is_none() => {
                    let Some((v4, v6)) = tunnel_addresses else {
                        continue;
                    };
                    match FullTunnel::install(tun, v4, v6, resolvers) {
                        Ok(installed) => full = Some(installed),
                        // The host keeps its own routes: nothing leaks, the internet is only
                        // not reached through the gateway.
                        Err(error) => {
                            tracing::error!(%error, "cannot route everything into the tunnel")
                        }
                    }
                }
                Event::FullTunnel { on: false } => {
                    if let Some(installed) = full.take() {
                        installed.remove();
                    }
                }
                event => act(event, &to_portal, &mut service, now),
            }
        }
        while let Some(event) = service.poll_event() {
            match event {
                fz_dns::Event::RequestAccess { resource, dns } => {
                    let _ = to_portal.send(ClientMessage::RequestAccess {
                        resource,
                        dns: Some(dns),
                        avoid: core.avoiding(),
                    });
                }
                fz_dns::Event::Denied { name, reason } => {
                    tracing::info!("a name was refused by policy; it gets an empty answer");
                    tracing::debug!(%name, %reason, "why the name was refused");
                }
                fz_dns::Event::Answer { .. } => {}
            }
        }
    }
}

/// The tunnel addresses from `ready`, and routes for the resources' networks and the mapped
/// ranges, all sending from the tunnel addresses.
fn set_up_tunnel(
    tun: &Tun,
    v4: IpAddr,
    v6: IpAddr,
    resources: &[ResourceView],
) -> anyhow::Result<()> {
    tun.add_address(Cidr::new(v4, 32)?)?;
    tun.add_address(Cidr::new(v6, 128)?)?;
    let mapped = [MAPPED_V4, MAPPED_V6]
        .into_iter()
        .filter_map(|(address, prefix)| Some((address.parse::<IpAddr>().ok()?, prefix)));
    let networks = resources
        .iter()
        .filter_map(|r| match r.address.parse::<Address>() {
            Ok(Address::Network(network)) => Some((network.addr(), network.prefix())),
            _ => None,
        });
    for (address, prefix) in mapped.chain(networks) {
        let source = if address.is_ipv4() { v4 } else { v6 };
        tun.add_route_from(Cidr::new(address, prefix)?, source)?;
    }
    Ok(())
}

/// Carries out one of the tunnels' events.
fn act(
    event: Event,
    to_portal: &mpsc::UnboundedSender<ClientMessage>,
    service: &mut DnsService,
    now: Instant,
) {
    match event {
        Event::ToPortal(message) => {
            // While the portal is away this goes nowhere; the packet or query asks again.
            let _ = to_portal.send(message);
        }
        Event::Granted {
            grant_id,
            resource,
            dns,
        } => {
            tracing::info!(grant = %grant_id, %resource, "access granted");
            if let Some((name, resolution)) = dns {
                service.stub_mut().handle_granted(&name, resolution);
            }
        }
        Event::Rejected { resource, reason } => {
            tracing::info!(%resource, "access refused");
            tracing::debug!(%resource, %reason, "why access was refused");
            service.stub_mut().handle_rejected(&resource, &reason, now);
        }
        Event::Ended {
            grant_id,
            name,
            why,
        } => {
            tracing::info!(grant = %grant_id, %why, "grant ended");
            if let Some(name) = name {
                service.stub_mut().handle_revoked(&name);
            }
        }
        Event::Refused { grant_id, reason } => {
            tracing::warn!(grant = %grant_id, %reason, "a grant failed verification and was dropped");
        }
        Event::GatewayLost { gateway_id } => {
            tracing::warn!(gateway = %gateway_id, "gateway silent; asking for another");
        }
        // Carried out by the loop, which holds the routes.
        Event::FullTunnel { .. } => {}
        Event::Path {
            gateway_id,
            path,
            relay,
        } => match relay {
            Some(relay) => {
                tracing::info!(gateway = %gateway_id, remote = %path.remote(), %relay, "path: relayed");
            }
            None => tracing::info!(gateway = %gateway_id, remote = %path.remote(), "path: direct"),
        },
    }
}

/// The WireGuard socket's address on the interface toward the portal: the host candidate
/// gateways may reach it at (none when the portal's name does not resolve now; relays and
/// the gateways' own candidates still find a way then).
async fn host_candidates(portal: &fz_link::PortalConfig, port: u16) -> Vec<SocketAddr> {
    let Ok((host, portal_port)) = fz_link::portal_host(portal) else {
        return Vec::new();
    };
    let Ok(mut resolved) = tokio::net::lookup_host((host.as_str(), portal_port)).await else {
        tracing::warn!(%host, "cannot resolve the portal's name for a host candidate");
        return Vec::new();
    };
    resolved
        .next()
        .and_then(|portal| fz_host::local_address_toward(portal).ok())
        .map(|ip| SocketAddr::new(ip, port))
        .into_iter()
        .collect()
}
