//! The event loop: one task that owns the core ([`fz_tunnel::gateway::Gateway`]), the UDP
//! socket and the TUN device, and waits on a closed set of inputs ([`Input`]). After every
//! input it drains the core's outputs in the core's order: datagrams, then events, then the
//! next timeout.
//!
//! Packets move in batches: one input is everything one read of the socket or the device
//! brought (many datagrams, or the packets of one segment the kernel left whole), the core
//! takes them one by one in that order, and what it gives back is queued and written with as
//! few system calls as the kernel allows (UDP GSO runs, coalesced TUN writes). The core decides
//! every packet as before; batching only changes how many cross the kernel boundary at once,
//! and never their order.
//!
//! The portal link and name resolution run as tasks of their own and come back as inputs,
//! so neither can hold up packets.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use fz_proto::{GatewayMessage, PortalToGateway};
use fz_tunnel::Output;
use fz_tunnel::gateway::{self, Event, Gateway, Resolved};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use fz_host::agent::sleep_until;

use crate::metrics::{self, Snapshot};
use fz_host::firewall::{self, Masquerade};
use fz_host::resolve::{LOOKUP_BUDGET, LookupFailure, Resolver};
use fz_host::tun::{Tun, WriteBatch};
use fz_host::udp::{RecvBatch, SendQueue, Udp};
use fz_link::{GatewayRole, LinkEvent};

// The resolver gives up on a name before the core stops waiting for it, so a slow name ends
// with the resolver's own reason, and the core's deadline is only the bound that holds anyway.
const _: () = assert!(LOOKUP_BUDGET.as_millis() < gateway::RESOLVE_DEADLINE.as_millis());

/// Room for any datagram the core seals or opens; it drops what it cannot carry.
const BUFFER: usize = 65_536;

/// What the event loop waits for.
#[derive(Debug)]
enum Input {
    /// Datagrams, in the receive batch.
    Network,
    /// Packets, in the TUN read batch.
    Tun,
    Portal(LinkEvent<PortalToGateway>),
    Resolved(String, Resolved),
    Timeout,
    PublishMetrics,
    Shutdown,
}

/// Runs the gateway until `shutdown` completes; everything it installed on the host is
/// removed on the way out, also when it fails.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let tun = Tun::create(&config.tun, config.mtu)?;
    tun.add_client_routes()?;
    firewall::enable_forwarding()?;
    let masquerade = Masquerade::install(tun.name())?;
    let outcome = serve(config, &tun, shutdown).await;
    if let Err(error) = masquerade.remove() {
        tracing::warn!(%error, "could not remove the masquerade");
    }
    outcome
}

async fn serve(
    config: Config,
    tun: &Tun,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let udp =
        Udp::bind(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
    let resolver = Resolver::from_system_conf()?;
    let mut seed = [0u8; 4];
    getrandom::fill(&mut seed).context("no randomness for peer indices")?;
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut core = Gateway::new(
        gateway::Config {
            private_key: config.private_key,
            portal_key: config.portal_key,
            seed: u32::from_le_bytes(seed),
            host: config.endpoints.clone(),
        },
        Instant::now(),
        unix_ms,
    );
    tracing::info!(
        public_key = %core.public_key(),
        listen = %config.listen,
        tun = tun.name(),
        "gateway up"
    );
    let hello = GatewayMessage::Hello {
        public_key: core.public_key(),
        endpoints: config.endpoints.clone(),
    };
    let (to_portal, mut from_portal) = fz_link::spawn::<GatewayRole>(config.portal.clone(), hello)?;
    let (snapshots, watching) = watch::channel(Snapshot::default());
    if let Some(address) = config.metrics {
        metrics::serve(address, watching)
            .await
            .with_context(|| format!("cannot serve metrics on {address}"))?;
    }
    let (resolved_tx, mut resolved_rx) = mpsc::unbounded_channel();
    let mut publish = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut portal_connected = false;
    let mut datagrams = RecvBatch::default();
    let mut packets = tun.read_batch();
    let mut sealed = vec![0u8; BUFFER];
    let mut to_network = SendQueue::default();
    let mut to_tun = WriteBatch::default();
    tokio::pin!(shutdown);

    loop {
        let deadline = core.poll_timeout(Instant::now());
        let input = tokio::select! {
            received = udp.recv(&mut datagrams) => match received {
                Ok(()) => Input::Network,
                Err(error) => {
                    // An ICMP error for an earlier send surfaces here; it is not fatal.
                    tracing::debug!(%error, "UDP receive failed");
                    continue;
                }
            },
            // A read error means the device is gone (deleted, or the driver failed): nothing
            // more can be forwarded, so the gateway stops and says why.
            read = tun.recv(&mut packets) => {
                read.context("the TUN device failed")?;
                Input::Tun
            }
            event = from_portal.recv() => match event {
                Some(event) => Input::Portal(event),
                None => anyhow::bail!("the portal link stopped"),
            },
            Some((name, answer)) = resolved_rx.recv() => Input::Resolved(name, answer),
            () = sleep_until(deadline) => Input::Timeout,
            _ = publish.tick() => Input::PublishMetrics,
            () = &mut shutdown => Input::Shutdown,
        };
        let now = Instant::now();
        // Anything but a packet may change grants, peers or the portal's state: metrics show
        // it at once rather than at the next second.
        let control = !matches!(input, Input::Network | Input::Tun);
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
                    match core.handle_tun(packet, &mut sealed, now) {
                        Some(Output::Network(to, bytes)) => to_network.push(to, &bytes),
                        Some(Output::Tun(_)) | None => {}
                    }
                }
            }
            Input::Portal(LinkEvent::Message(message)) => {
                if matches!(message, PortalToGateway::Ready { .. }) {
                    portal_connected = true;
                    tracing::info!("the portal says ready");
                }
                core.handle_portal(message, now);
            }
            Input::Portal(LinkEvent::Down(reason)) => {
                portal_connected = false;
                tracing::warn!(%reason, "portal away; tunnels keep forwarding until their grants expire");
            }
            Input::Portal(LinkEvent::Refused(reason)) => {
                anyhow::bail!("{reason}");
            }
            Input::Resolved(name, answer) => core.handle_resolved(&name, answer, now),
            Input::Timeout => core.handle_timeout(now),
            Input::PublishMetrics => {}
            Input::Shutdown => {
                tracing::info!("shutting down");
                return Ok(());
            }
        }
        while let Some(transmit) = core.poll_transmit() {
            to_network.push(transmit.destination, &transmit.payload);
        }
        // The kernel may refuse a datagram or a packet (no buffer, no route); the rest still
        // go, so one refusal never stops the gateway. Only a device that is gone does.
        udp.send(&mut to_network).await;
        tun.send(&mut to_tun)
            .await
            .context("the TUN device failed")?;
        while let Some(event) = core.poll_event() {
            act(event, &to_portal, &resolver, &resolved_tx);
        }
        if control {
            snapshots.send_replace(Snapshot::of(&core, portal_connected));
        }
    }
}

/// Carries out one of the core's events.
fn act(
    event: Event,
    to_portal: &mpsc::UnboundedSender<GatewayMessage>,
    resolver: &Resolver,
    resolved: &mpsc::UnboundedSender<(String, Resolved)>,
) {
    match event {
        Event::ToPortal(message) => {
            // While the portal is away this goes nowhere; it sends grants again on return.
            let _ = to_portal.send(message);
        }
        Event::Resolve { name } => {
            // The core bounds how many of these run at once and stops waiting at its
            // deadline; the resolver's own budget (`fz_host::resolve::LOOKUP_BUDGET`) ends the
            // task before that.
            let resolver = resolver.clone();
            let resolved = resolved.clone();
            tokio::spawn(async move {
                let answer = match resolver.resolve(&name).await {
                    Ok(found) => Resolved::Addresses {
                        addresses: found.ips,
                        ttl: found.ttl,
                    },
                    Err(LookupFailure::NoSuchName) => Resolved::NoSuchName,
                    Err(LookupFailure::Failed(error)) => Resolved::Failed(error),
                };
                let _ = resolved.send((name, answer));
            });
        }
        Event::Installed {
            grant_id,
            client_id,
            resource_id,
        } => {
            tracing::info!(grant = %grant_id, client = %client_id, resource = %resource_id, "grant in force")
        }
        Event::Refused { grant_id, reason } => {
            // The reason may quote a name or an address; the portal's flow log has it too.
            tracing::warn!(grant = %grant_id, "grant refused; the portal was told why");
            tracing::debug!(grant = %grant_id, %reason, "why the grant was refused");
        }
        Event::Removed { grant_id, why } => {
            tracing::info!(grant = %grant_id, why = why.as_str(), "grant removed");
        }
        Event::PortalError { message } => tracing::warn!(%message, "the portal reported an error"),
        Event::BadCandidate { client_id, error } => {
            tracing::debug!(client = %client_id, %error, "a client's ICE candidate does not read");
        }
        Event::Path {
            client_id,
            path,
            relay,
        } => match relay {
            Some(relay) => {
                tracing::info!(client = %client_id, remote = %path.remote(), %relay, "path: relayed");
            }
            None => tracing::info!(client = %client_id, remote = %path.remote(), "path: direct"),
        },
    }
}
