//! The world the scenarios run in, and what they do in it.
//!
//! ```text
//!  client ns            portal ns (wan)            gw-a, gw-b ns (site hq)     hq ns (resource network)
//!  fz-client            br0 198.18.0.1/24          eth0 198.18.0.11, .12        br0 172.16.0.5  :443 https
//!   fzc0 (TUN)          fz-portal :8080             eth1 172.16.0.1, .2 ──────      gitlab, jenkins, docs
//!   eth0 198.18.0.10 ── dnsmasq :53 (upstream)           10.0.5.1, .2               10.0.5.10 :5432 db, :22 ssh
//!   curl, dig                                            10.0.6.1, .2               10.0.6.10 :8080 build
//!                       wan-* ports ─────────────── eth0                         172.16.0.53 :53 dnsmasq
//!                                                  gw-c ns (site lab)                (company.com)
//!                                                   eth0 198.18.0.13          lab ns
//!                                                   eth1 192.168.50.1 ─────── eth0 192.168.50.10 :80 greeter
//!                       relay ns (wan)
//!                        eth0 198.18.0.3, coturn :3478/udp (the TURN relay)
//! ```
//!
//! `──` is a veth pair; `wan-*` are ports of the bridge in the portal's namespace, `lan-*` of
//! the bridge in hq's. The client reaches the wan only: the resource networks are behind the
//! gateways, and the DNS server for `company.com` answers only there. `ip netns exec` gives
//! each process `/etc/netns/<ns>/resolv.conf`: the client's names the upstream dnsmasq on the
//! wan (which knows `www.example.org`), the gateways' the one at hq. Servers greet or answer
//! with the address the connection came from, which is the masquerade of the gateway that
//! carried it (`db 10.0.5.2` came through gw-b).
//!
//! The edge sites (`edge-open`, `edge-easy`, `edge-hard`) have no gateway until a scenario
//! starts one ([`World::edge_gateway`]): on the wan, or behind an easy or a hard NAT router
//! ([`crate::nat`]) with no way in, its resource's greeter behind it; clients may sit behind
//! the same kinds of NAT ([`World::natted_client`]).
//!
//! Scenarios may add hosts: more clients on the wan ([`World::extra_client`]), a host on hq's
//! resource network ([`World::site_host`]), and clients that keep none of the real client's
//! manners ([`World::rogue`], a [`RogueClient`] signing in from the client's namespace).
//!
//! The policy tree is written by the scenarios ([`World::set_rules`]); the portal watches it.
//! Sockets keep the namespace they were made in, so each server socket is made on a thread
//! that entered its namespace and then served by the world's tokio runtime. Dropping the world
//! stops every process and deletes the namespaces and files. Nothing waits by sleeping: each
//! step polls for what it needs (a route, a metric, a bundle hash, a log line) within a
//! deadline.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fz_host::testing::WAIT;
use fz_host::testing::browser::{Browser, Page};
use fz_host::testing::metrics::{Metrics, http_get, scrape, wait_metrics};
use fz_host::testing::net::{greet, tcp_listener, try_greeting};
use fz_host::testing::netns::{Netns, RemoveDir, bridge, etc_netns, link, port, unique_id};
use fz_host::testing::process::Process;
use fz_proto::PortalPublicKey;

use crate::binaries::binary;
use crate::idp::{CLIENT_ID, CLIENT_SECRET, TestIdp};
pub use crate::nat::Nat;
use crate::rogue::RogueClient;
use crate::servers::{WebTls, serve_web};

pub const ACCOUNT: &str = "acme";
pub const USER: &str = "alice@acme.example";
/// The person the world's identity provider signs in (`[[accounts.oidc]]` id
/// [`IDP_PROVIDER`]): in no group of the policy but through the provider.
pub const IDP_USER: &str = "dana@acme.example";
/// The provider's id in the portal's configuration (what `idp` lines name).
pub const IDP_PROVIDER: &str = "corp";
/// Where the provider listens, in the portal's namespace: on the wan, over https.
pub const IDP_HOST: &str = "198.18.0.1";
/// A user in group `contractors`, not in `engineering`.
pub const CONTRACTOR: &str = "bob@acme.example";
pub const PORTAL_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), 8080);
/// The client's own resolver: everything that is no resource is asked here.
pub const UPSTREAM_DNS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const CLIENT_WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// The TURN relay (coturn), in a namespace of its own on the wan.
pub const RELAY: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 3)), 3478);
pub const WEB: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 5);
pub const SITE_DNS: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 53);
pub const DB: &str = "10.0.5.10:5432";
pub const SSH: &str = "10.0.5.10:22";
/// A build server inside `corp-net` (10.0.0.0/8) and outside `db` (10.0.5.0/24).
pub const BUILD: &str = "10.0.6.10:8080";
pub const LAB_WEB: &str = "192.168.50.10:80";
pub const CLIENT_TUN: &str = "fzc0";
pub const GATEWAY_TUN: &str = "fzgw0";
pub const WIREGUARD_PORT: u16 = 51820;
/// Every gateway's metrics, each in its own namespace.
pub const METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9101);
/// The stub's first sentinel: the address the client's switched resolver names.
pub const SENTINEL: &str = "100.100.111.1";

/// The tree without rules: two sites, the resources, two groups. Scenarios add the rules.
/// Every resource is declared from the start, since a client learns the account's resources
/// when it connects. Some lie inside others: `intranet` holds the three names, `corp-net`
/// holds `db`, and `egress` (`internet`) every public address.
pub const DECLARATIONS: &str = r#"site hq
site lab

resource gitlab   { address "gitlab.company.com"; site hq; ports tcp/443 }
resource jenkins  { address "jenkins.company.com"; site hq; ports tcp/443 }
resource docs     { address "docs.company.com"; site hq; ports tcp/443 }
resource intranet { address "*.company.com"; site hq; ports tcp/443 }
resource db       { address "10.0.5.0/24"; site hq; ports tcp/5432, icmp }
resource corp-net { address "10.0.0.0/8"; site hq }
resource egress   { address internet; site hq }
resource lab-web  { address "192.168.50.0/24"; site lab; ports tcp/80 }

site edge-open
site edge-easy
site edge-hard
resource edge-open-web { address "192.168.70.10"; site edge-open; ports tcp/80, tcp/9000 }
resource edge-easy-web { address "192.168.71.10"; site edge-easy; ports tcp/80, tcp/9000 }
resource edge-hard-web { address "192.168.72.10"; site edge-hard; ports tcp/80, tcp/9000 }

group engineering { members "alice@acme.example" }
group contractors { members "bob@acme.example" }
"#;

/// The commands the world needs besides the binaries under test.
const TOOLS: [&str; 6] = ["ip", "nft", "dig", "curl", "dnsmasq", "turnserver"];

/// A command the world needs that this machine lacks, if any.
pub fn missing_tool() -> Option<&'static str> {
    TOOLS
        .into_iter()
        .find(|tool| fz_host::testing::run("sh", &["-c", &format!("command -v {tool}")]).is_err())
}

/// The rule every tree of the world ends with. A tree without rules is refused (`E021`: its
/// table would deny everything), so the portal could not start on [`DECLARATIONS`] alone; this
/// one names a user no scenario signs in as, so "no rule" stays "no allow rule" for everyone
/// the scenarios follow. After the scenario's rules, so their line numbers stay as written.
pub const GUARDRAIL: &str = "deny user \"mallory@acme.example\" -> lab-web as offboarded";

/// The policy file: [`DECLARATIONS`], `rules` and [`GUARDRAIL`].
fn tree_text(rules: &str) -> String {
    format!("{DECLARATIONS}\n{rules}\n{GUARDRAIL}\n")
}

/// A gateway of the world: its name, site and addresses.
#[derive(Clone, Copy, Debug)]
pub struct GatewaySpec {
    pub name: &'static str,
    pub site: &'static str,
    pub wan: Ipv4Addr,
    /// Its addresses on the resource network, the masquerade the servers see.
    pub lan: &'static [&'static str],
}

pub const GATEWAYS: [GatewaySpec; 3] = [
    GatewaySpec {
        name: "gw-a",
        site: "hq",
        wan: Ipv4Addr::new(198, 18, 0, 11),
        lan: &["172.16.0.1/24", "10.0.5.1/24", "10.0.6.1/24"],
    },
    GatewaySpec {
        name: "gw-b",
        site: "hq",
        wan: Ipv4Addr::new(198, 18, 0, 12),
        lan: &["172.16.0.2/24", "10.0.5.2/24", "10.0.6.2/24"],
    },
    GatewaySpec {
        name: "gw-c",
        site: "lab",
        wan: Ipv4Addr::new(198, 18, 0, 13),
        lan: &["192.168.50.1/24"],
    },
];

impl GatewaySpec {
    /// The gateway's address on a resource network as a server there sees it.
    pub fn lan_address(&self, network_prefix: &str) -> &'static str {
        self.lan
            .iter()
            .find(|address| address.starts_with(network_prefix))
            .and_then(|address| address.split('/').next())
            .unwrap_or_else(|| panic!("{} has no address in {network_prefix}", self.name))
    }

    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.wan), WIREGUARD_PORT)
    }
}

/// The edge sites, each with one gateway behind a NAT of its own kind
/// ([`World::edge_gateway`]) and one resource: a greeter at `192.168.{70 + index}.10:80`.
pub const EDGES: [(&str, &str, Nat); 3] = [
    ("gw-open", "edge-open", Nat::None),
    ("gw-easy", "edge-easy", Nat::Easy),
    ("gw-hard", "edge-hard", Nat::Hard),
];

/// A gateway of an edge site, the site's greeter host, and its NAT router.
#[derive(Debug)]
pub struct EdgeGateway {
    pub process: Process,
    pub name: &'static str,
    pub nat: Nat,
    /// Its resource's greeter, `address:port`.
    pub resource: String,
    /// Its resource's bulk server ([`crate::servers::pour`]).
    pub bulk: SocketAddr,
    /// Its address on the wan: its NAT router's, or its own without NAT.
    pub wan: Ipv4Addr,
    pub ns: Netns,
    pub site_host: Netns,
    pub router: Option<Netns>,
}

/// A gateway's process and namespace.
#[derive(Debug)]
pub struct Gateway {
    pub spec: GatewaySpec,
    pub process: Process,
    pub ns: Netns,
}

/// How [`World::fail_over`] takes a gateway out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outage {
    /// SIGKILL: its connections close, and the portal tells the clients.
    Crash,
    /// SIGSTOP: its connections stay open and nobody tells anyone.
    Hang,
    /// SIGKILL and started again at once, with its key and token.
    Restart,
}

/// A failover [`World::fail_over`] saw.
#[derive(Debug)]
pub struct Failover {
    /// The gateway killed, and the one that carried the connections after, as indexes of
    /// [`GATEWAYS`].
    pub dead: usize,
    pub alive: usize,
    /// From the kill to the first answer through the other gateway.
    pub took: Duration,
    pub attempts: u32,
}

/// What `curl` saw.
#[derive(Debug)]
pub struct Fetched {
    pub body: String,
    /// From the start (name resolution included) to the first byte of the answer.
    pub first_byte: Duration,
    /// Bytes per second over the transfer.
    pub speed: f64,
}

/// The portal agents connect to: the world's own, or replicas a scenario runs
/// ([`crate::replicas::Replicas`]).
#[derive(Debug, Clone)]
pub struct PortalAt {
    /// What `--portal-url` says: one URL, or several, comma-separated.
    pub urls: String,
    /// The grant-signing public key agents pin.
    pub key: String,
    /// The `portal.toml` its admin commands read.
    pub config: PathBuf,
}

/// The whole topology. Fields drop in order: the client first (it restores its resolver while
/// its namespace is there), the gateways, the portal, the DNS servers, the runtime with the
/// other servers, then the namespaces and files.
#[derive(Debug)]
pub struct World {
    pub client: Process,
    pub gateways: Vec<Gateway>,
    pub portal: Process,
    pub relay: Process,
    /// The upstream resolver on the wan, then site hq's.
    dns_servers: Vec<Process>,
    _runtime: tokio::runtime::Runtime,
    pub client_ns: Netns,
    pub portal_ns: Netns,
    pub hq_ns: Netns,
    _lab_ns: Netns,
    _relay_ns: Netns,
    _etc: Vec<RemoveDir>,
    portal_config: PathBuf,
    portal_key: String,
    /// The identity provider (oidc-provider under Node, in the portal's namespace), or why it
    /// could not start here.
    idp: Result<TestIdp, String>,
    /// The CA certificate (PEM) the provider's certificate is under.
    idp_ca: String,
    /// The secret the relay shares with the portal.
    pub relay_secret: String,
    /// Edge gateways started so far: each gets wan and inside addresses of its own, so that
    /// no NAT mapping or relay permission left by an earlier one can stand in for it.
    edges_started: std::sync::atomic::AtomicU8,
    /// What makes this world's namespace names its own.
    id: String,
    dir: tempfile::TempDir,
}

/// Another client host on the wan, for scenarios that need more clients. Fields drop in order:
/// the process, then its namespace and resolver file.
#[derive(Debug)]
pub struct ExtraClient {
    /// Its `fz-client`, once started.
    pub process: Option<Process>,
    pub ns: Netns,
    etc: RemoveDir,
    /// Names its token, key, state directory and log in the world's directory.
    pub name: String,
    /// Its client token file.
    pub token: PathBuf,
    /// The NAT router in front of it, if any.
    pub router: Option<Netns>,
    /// Whether its client runs with `--full-tunnel`.
    pub full_tunnel: bool,
    /// The portal its client connects to.
    pub portal: PortalAt,
}

impl ExtraClient {
    /// Its `fz-client`, which must have been started.
    pub fn running(&self) -> &Process {
        self.process
            .as_ref()
            .unwrap_or_else(|| panic!("{}'s client was never started", self.name))
    }
}

impl World {
    /// Builds the world and waits until it is up: portal healthy, every gateway connected, the
    /// client's resolver switched and its routes in. Fails with the reason when this machine
    /// cannot make it (no network namespaces in this container, say).
    pub fn new() -> Result<World, String> {
        let id = unique_id();
        let ns = |name: &str| Netns::add(format!("fze-{id}-{name}"));
        let client_ns =
            ns("client").map_err(|error| format!("cannot make a network namespace: {error}"))?;
        let portal_ns = ns("portal")?;
        let hq_ns = ns("hq")?;
        let lab_ns = ns("lab")?;
        let relay_ns = ns("relay")?;
        let gateway_ns: Vec<Netns> = GATEWAYS
            .iter()
            .map(|spec| ns(spec.name))
            .collect::<Result<_, _>>()?;

        // The wan: a bridge in the portal's namespace, which holds the portal's address.
        bridge(&portal_ns, &["198.18.0.1/24"]);
        port(
            &portal_ns,
            "wan-c",
            &client_ns,
            "eth0",
            &format!("{CLIENT_WAN}/24"),
        );
        client_ns
            .ip(&["route", "add", "default", "via", "198.18.0.1"])
            .unwrap();
        port(
            &portal_ns,
            "wan-relay",
            &relay_ns,
            "eth0",
            &format!("{}/24", RELAY.ip()),
        );
        relay_ns
            .ip(&["route", "add", "default", "via", "198.18.0.1"])
            .unwrap();
        // hq's resource network: a bridge holding the servers' addresses.
        bridge(
            &hq_ns,
            &[
                "172.16.0.5/24",
                "172.16.0.53/24",
                "10.0.5.10/24",
                "10.0.6.10/24",
            ],
        );
        for (index, (spec, ns)) in GATEWAYS.iter().zip(&gateway_ns).enumerate() {
            port(
                &portal_ns,
                &format!("wan-{index}"),
                ns,
                "eth0",
                &format!("{}/24", spec.wan),
            );
            if spec.site == "hq" {
                port(&hq_ns, &format!("lan-{index}"), ns, "eth1", spec.lan[0]);
                for address in &spec.lan[1..] {
                    ns.ip(&["address", "add", address, "dev", "eth1"]).unwrap();
                }
            } else {
                link(ns, "eth1", spec.lan[0], &lab_ns, "eth0", "192.168.50.10/24");
            }
        }

        let mut etc = vec![etc_netns(
            &client_ns,
            &format!("nameserver {UPSTREAM_DNS}\noptions timeout:2\n"),
        )];
        for ns in &gateway_ns {
            etc.push(etc_netns(ns, &format!("nameserver {SITE_DNS}\n")));
        }

        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let tls = WebTls::generate();
        std::fs::write(dir.path().join("web.pem"), &tls.certificate_pem).unwrap();
        start_servers(&runtime, &hq_ns, &lab_ns, tls);
        let dns_servers = vec![
            dnsmasq(
                &portal_ns,
                dir.path(),
                "upstream",
                UPSTREAM_DNS,
                "example.org",
                &[("www.example.org", Ipv4Addr::new(192, 0, 2, 80))],
            ),
            dnsmasq(
                &hq_ns,
                dir.path(),
                "company",
                SITE_DNS,
                "company.com",
                &[
                    ("gitlab.company.com", WEB),
                    ("jenkins.company.com", WEB),
                    ("docs.company.com", WEB),
                    ("wiki.company.com", WEB),
                ],
            ),
        ];

        std::fs::create_dir(dir.path().join("tree")).unwrap();
        std::fs::write(dir.path().join("tree/policy.fz"), tree_text("")).unwrap();
        // The identity provider, on the wan over https under a CA of the world's own; the
        // portal knows it when it could start (a scenario that needs it fails with the reason
        // when it could not).
        let (idp_ca, idp_cert, idp_key) = idp_certificate();
        let redirect =
            format!("http://{PORTAL_LISTEN}/{ACCOUNT}/sign-in/oidc/{IDP_PROVIDER}/callback");
        let idp = portal_ns.run(|| {
            TestIdp::start_on(
                IDP_HOST,
                Some((&idp_cert, &idp_key)),
                &redirect,
                &idp_users(&["SRE"]),
            )
        });
        let provider = match &idp {
            Ok(idp) => {
                std::fs::write(dir.path().join("idp-ca.pem"), &idp_ca).unwrap();
                let secret = dir.path().join("idp-secret");
                std::fs::write(&secret, CLIENT_SECRET).unwrap();
                std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
                format!(
                    "\n[[accounts.oidc]]\nid = \"{IDP_PROVIDER}\"\nissuer = \"{}\"\n\
                     client_id = \"{CLIENT_ID}\"\nclient_secret_file = \"{}\"\n\
                     ca_file = \"{}\"\nscopes = [\"openid\", \"email\", \"groups\"]\n\
                     groups_claim = \"groups\"\n",
                    idp.issuer,
                    dir.path().join("idp-secret").display(),
                    dir.path().join("idp-ca.pem").display(),
                )
            }
            Err(_) => String::new(),
        };
        let relay_secret = format!("relay-secret-{id}");
        let relay = crate::relay::start_coturn(&relay_ns, dir.path(), RELAY, &relay_secret);
        let relay_secret_file = dir.path().join("relay-secret");
        std::fs::write(&relay_secret_file, &relay_secret).unwrap();
        std::fs::set_permissions(&relay_secret_file, std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let portal_config = dir.path().join("portal.toml");
        std::fs::write(
            &portal_config,
            format!(
                "listen = \"{PORTAL_LISTEN}\"\nallow_plain_http = true\ndata_dir = \"{}\"\n\n\
                 [[relays]]\naddress = \"{RELAY}\"\nsecret_file = \"{}\"\n\n\
                 [[accounts]]\nslug = \"{ACCOUNT}\"\npolicy = \"{}\"\n{provider}",
                dir.path().join("portal-data").display(),
                relay_secret_file.display(),
                dir.path().join("tree").display(),
            ),
        )
        .unwrap();
        let portal = start_portal(&portal_ns, &portal_config, dir.path());
        let portal_key = admin(&portal_ns, &portal_config, &["public-key"])
            .trim()
            .to_owned();

        let mut gateways = Vec::new();
        for (spec, ns) in GATEWAYS.into_iter().zip(gateway_ns) {
            let created = admin(
                &portal_ns,
                &portal_config,
                &[
                    "token",
                    "create",
                    "--account",
                    ACCOUNT,
                    "--gateway",
                    spec.name,
                    "--site",
                    spec.site,
                ],
            );
            secret_file(dir.path(), &format!("{}.token", spec.name), &created);
            let at = PortalAt {
                urls: format!("ws://{PORTAL_LISTEN}"),
                key: portal_key.clone(),
                config: portal_config.clone(),
            };
            let process = start_gateway(&spec, &ns, dir.path(), &at);
            gateways.push(Gateway { spec, process, ns });
        }
        let client_token = client_token(&portal_ns, &portal_config, dir.path(), "laptop", USER);
        let at = PortalAt {
            urls: format!("ws://{PORTAL_LISTEN}"),
            key: portal_key.clone(),
            config: portal_config.clone(),
        };
        let client = start_client(&client_ns, dir.path(), "client", &client_token, &at, &[]);
        let world = World {
            client,
            gateways,
            portal,
            relay,
            dns_servers,
            _runtime: runtime,
            client_ns,
            portal_ns,
            hq_ns,
            _lab_ns: lab_ns,
            _relay_ns: relay_ns,
            _etc: etc,
            portal_config,
            portal_key,
            idp,
            idp_ca,
            relay_secret,
            edges_started: std::sync::atomic::AtomicU8::new(0),
            id,
            dir,
        };
        for index in 0..world.gateways.len() {
            world.wait_metrics(index, "the portal connection", |m| {
                m.value("fz_gateway_portal_connected") == 1
            });
        }
        world.wait_for("the client's resolver switch and routes", WAIT, |world| {
            client_is_up(&world.client_ns, world._etc[0].path()).then_some(())
        });
        Ok(world)
    }

    /// `count` more client hosts (`laptop-<n>`, 198.18.0.100 and up), each with a token of
    /// its own for the same user, once each is up.
    pub fn extra_clients(&self, count: u8) -> Vec<ExtraClient> {
        (0..count)
            .map(|n| self.extra_client(&format!("laptop-{n}"), 100 + n))
            .collect()
    }

    /// One more client host, `name`: a namespace on the wan at 198.18.0.`host` running
    /// `fz-client` with a token of its own (device `name`, the same user), once it is up.
    pub fn extra_client(&self, name: &str, host: u8) -> ExtraClient {
        self.extra_client_of(name, host, &self.portal_at())
    }

    /// [`World::extra_client`], its client connecting to `portal` with a token `portal` made.
    pub fn extra_client_of(&self, name: &str, host: u8, portal: &PortalAt) -> ExtraClient {
        let mut extra = self.extra_host(name, host);
        extra.token = client_token(&self.portal_ns, &portal.config, self.dir.path(), name, USER);
        extra.portal = portal.clone();
        self.start_again(&mut extra);
        extra
    }

    /// One more client host, `name`, at 198.18.0.`host` on the wan, with nothing running yet:
    /// its `token` is where a sign-in there is to put one ([`World::sign_in_at_provider`]),
    /// and [`World::start_again`] starts its client.
    pub fn extra_host(&self, name: &str, host: u8) -> ExtraClient {
        let ns = Netns::add(format!("fze-{}-{name}", self.id)).unwrap();
        port(
            &self.portal_ns,
            &format!("wan-{name}"),
            &ns,
            "eth0",
            &format!("198.18.0.{host}/24"),
        );
        ns.ip(&["route", "add", "default", "via", "198.18.0.1"])
            .unwrap();
        let etc = etc_netns(&ns, &format!("nameserver {UPSTREAM_DNS}\n"));
        ExtraClient {
            process: None,
            ns,
            etc,
            name: name.to_owned(),
            token: self.dir.path().join(format!("{name}.token")),
            router: None,
            full_tunnel: false,
            portal: self.portal_at(),
        }
    }

    /// One more client host, `name`, behind `nat` (a router at 198.18.0.`40 + index` on the
    /// wan, the host at 172.21.`index`.2 inside), running `fz-client` with a token of its own,
    /// once it is up.
    pub fn natted_client(&self, name: &str, nat: Nat, index: u8) -> ExtraClient {
        let mut extra = self.natted_host(name, nat, index);
        self.start_again(&mut extra);
        extra
    }

    /// The host of [`World::natted_client`], with its token but nothing running yet.
    pub fn natted_host(&self, name: &str, nat: Nat, index: u8) -> ExtraClient {
        let (router, ns) = crate::nat::host_behind(
            &self.portal_ns,
            &self.id,
            name,
            nat,
            Ipv4Addr::new(198, 18, 0, 40 + index),
            &format!("172.21.{index}"),
            self.dir.path(),
        );
        let etc = etc_netns(&ns, &format!("nameserver {UPSTREAM_DNS}\n"));
        ExtraClient {
            process: None,
            ns,
            etc,
            name: name.to_owned(),
            token: self.client_token(name, USER),
            router,
            full_tunnel: false,
            portal: self.portal_at(),
        }
    }

    /// Serves `<name> <the peer's address>` on `address` (a TCP listener made in `ns`).
    pub fn greeter(&self, ns: &Netns, address: &str, name: &'static str) {
        let listener = ns.run(|| tcp_listener(address.parse::<SocketAddr>().unwrap()));
        let _guard = self._runtime.enter();
        self._runtime.spawn(greet(listener, name));
    }

    /// A gateway `name` (its own key and token; [`EDGES`] names the usual ones) of edge site
    /// `EDGES[index]`, behind its NAT (a router at 198.18.0.`30 + n` on the wan, the gateway
    /// at 172.20.`n`.2 inside, listening there, with no way in from the wan; `n` counts the
    /// edge gateways started), once it is connected to the portal. Its resource's greeter
    /// answers behind it, with `name`.
    pub fn edge_gateway(&self, index: u8, name: &'static str) -> EdgeGateway {
        self.edge_gateway_of(index, name, &self.portal_at())
    }

    /// [`World::edge_gateway`], connecting to `portal` with a token `portal` made.
    pub fn edge_gateway_of(&self, index: u8, name: &'static str, portal: &PortalAt) -> EdgeGateway {
        let (_, site, nat) = EDGES[usize::from(index)];
        let n = self
            .edges_started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let wan = Ipv4Addr::new(198, 18, 0, 30 + n);
        let (router, ns) = crate::nat::host_behind(
            &self.portal_ns,
            &self.id,
            name,
            nat,
            wan,
            &format!("172.20.{n}"),
            self.dir.path(),
        );
        let listen = match router {
            None => SocketAddr::new(IpAddr::V4(wan), WIREGUARD_PORT),
            Some(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::new(172, 20, n, 2)), WIREGUARD_PORT),
        };
        let site_host = Netns::add(format!("fze-{}-{site}", self.id)).unwrap();
        let address = edge_resource(usize::from(index));
        let lan = address.octets()[2];
        link(
            &ns,
            "eth1",
            &format!("192.168.{lan}.1/24"),
            &site_host,
            "eth0",
            &format!("{address}/24"),
        );
        let resource = format!("{address}:80");
        let bulk = SocketAddr::new(IpAddr::V4(address), crate::servers::POUR_PORT);
        let (listener, bulk_listener) = site_host.run(|| {
            (
                tcp_listener(resource.parse::<SocketAddr>().unwrap()),
                tcp_listener(bulk),
            )
        });
        {
            let _guard = self._runtime.enter();
            self._runtime.spawn(greet(listener, name));
            self._runtime.spawn(crate::servers::pour(bulk_listener));
        }
        let created = admin(
            &self.portal_ns,
            &portal.config,
            &[
                "token",
                "create",
                "--account",
                ACCOUNT,
                "--gateway",
                name,
                "--site",
                site,
            ],
        );
        secret_file(self.dir.path(), &format!("{name}.token"), &created);
        let process = start_gateway_at(name, &ns, self.dir.path(), portal, listen);
        wait_metrics(
            &ns,
            METRICS,
            &format!("{name}'s portal connection"),
            WAIT,
            |what| process.assert_running(what),
            |m| m.value("fz_gateway_portal_connected") == 1,
        );
        EdgeGateway {
            process,
            name,
            nat,
            resource,
            bulk,
            wan,
            ns,
            site_host,
            router,
        }
    }

    /// Starts an extra client that was stopped again, with its token and key, and waits until
    /// it is up.
    pub fn start_again(&self, extra: &mut ExtraClient) {
        let options: &[&str] = if extra.full_tunnel {
            &["--full-tunnel"]
        } else {
            &[]
        };
        let process = extra.process.insert(start_client(
            &extra.ns,
            self.dir.path(),
            &extra.name,
            &extra.token,
            &extra.portal,
            options,
        ));
        fz_host::testing::wait_for(
            &format!("{}'s resolver switch and routes", extra.name),
            WAIT,
            |what| process.assert_running(what),
            || {
                // The client says `ready` once its routes are in (and the harness reads its
                // id from that line).
                (client_is_up(&extra.ns, extra.etc.path())
                    && process.log_text().contains("the portal says ready"))
                .then_some(())
            },
        );
    }

    /// The identity provider, or why the world has none.
    pub fn idp(&self) -> Result<&TestIdp, String> {
        self.idp.as_ref().map_err(Clone::clone)
    }

    /// Makes the provider put [`IDP_USER`] in `groups` from their next sign-in.
    pub fn set_idp_groups(&self, groups: &[&str]) -> Result<(), String> {
        self.idp()?.set_users(&idp_users(groups));
        Ok(())
    }

    /// `fz-client sign-in` on `host` as a person does it at the provider: the client draws
    /// its nonce and listens on the host's loopback, a browser on the host (the minimal one of
    /// `fz_host::testing::browser`, over https to the provider) opens the URL the client
    /// printed, takes the provider's button, logs in as [`IDP_USER`] and follows the redirects
    /// back to the client, which writes `host.token`.
    pub fn sign_in_at_provider(&self, host: &ExtraClient) -> Result<(), String> {
        self.idp()?;
        let program = binary("fz-client");
        let token = host.token.clone();
        let mut child = host.ns.run(|| {
            std::process::Command::new(&program)
                .arg("sign-in")
                .args(["--portal-url", &format!("ws://{PORTAL_LISTEN}")])
                .args(["--account", ACCOUNT, "--no-browser", "--timeout-secs", "60"])
                .arg("--token-file")
                .arg(&token)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot run fz-client sign-in: {e}"))
        })?;
        let mut stdout = std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let url = loop {
            let mut line = String::new();
            let read =
                std::io::BufRead::read_line(&mut stdout, &mut line).map_err(|e| e.to_string())?;
            if read == 0 {
                return Err("fz-client sign-in printed no URL".to_owned());
            }
            if line.trim().starts_with("http://") {
                break line.trim().to_owned();
            }
        };
        let ca = self.idp_ca.clone();
        let browsed = host.ns.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?
                .block_on(browse_provider_sign_in(&ca, &url))
        });
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        browsed?;
        if !out.status.success() {
            return Err(format!(
                "fz-client sign-in failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// A new client token for device `device` of `user`, in a file (mode 0600) of the
    /// world's directory.
    pub fn client_token(&self, device: &str, user: &str) -> PathBuf {
        client_token(
            &self.portal_ns,
            &self.portal_config,
            self.dir.path(),
            device,
            user,
        )
    }

    /// A client that signs in from the client's namespace with the token in `token` and the
    /// WireGuard key `secret`, and then does as a scenario says (see [`RogueClient`]).
    pub fn rogue(&self, token: &Path, secret: boringtun::x25519::StaticSecret) -> RogueClient {
        RogueClient::sign_in(
            &self.client_ns,
            PORTAL_LISTEN,
            self.portal_public_key(),
            ACCOUNT,
            token,
            secret,
        )
    }

    /// A host on hq's resource network (a namespace on its bridge, port `lan-<name>`) with
    /// `address` (a CIDR), and nothing else: no route beyond its network.
    pub fn site_host(&self, name: &str, address: &str) -> Netns {
        let ns = Netns::add(format!("fze-{}-{name}", self.id)).unwrap();
        port(&self.hq_ns, &format!("lan-{name}"), &ns, "eth0", address);
        ns
    }

    /// What the upstream resolver on the wan logged: each query with the address it came from.
    pub fn upstream_dns_log(&self) -> String {
        self.dns_servers
            .first()
            .map(Process::log_text)
            .unwrap_or_default()
    }

    // ---- the policy ----

    /// Writes the tree as [`DECLARATIONS`], `rules` and [`GUARDRAIL`] (at once, by a rename, as `git` would)
    /// and waits until the portal has loaded it.
    pub fn set_rules(&self, rules: &str) {
        let text = tree_text(rules);
        let path = self.dir.path().join("tree/policy.fz");
        if std::fs::read_to_string(&path).unwrap() == text {
            return;
        }
        let hash = self.bundle_hash();
        let next = self.dir.path().join("policy.fz.next");
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, &path).unwrap();
        self.wait_for("the portal to load the new policy", WAIT, |world| {
            (world.bundle_hash() != hash).then_some(())
        });
    }

    /// The policy tree the portal serves.
    pub fn tree(&self) -> PathBuf {
        self.dir.path().join("tree")
    }

    /// The account's bundle hash, from `/healthz`.
    pub fn bundle_hash(&self) -> String {
        let body = self
            .portal_ns
            .run(|| http_get(PORTAL_LISTEN, "/healthz"))
            .unwrap_or_else(|error| panic!("no /healthz: {error}"));
        let health: serde_json::Value = serde_json::from_str(&body).unwrap();
        health["accounts"][0]["bundle_hash"]
            .as_str()
            .unwrap_or_else(|| panic!("no bundle hash in {health}"))
            .to_owned()
    }

    // ---- the client's view ----

    /// `dig +short <args>` in the client's namespace, through its (switched) resolver.
    pub fn dig(&self, args: &[&str]) -> Vec<String> {
        let mut all = vec!["+short", "+time=5", "+tries=1"];
        all.extend_from_slice(args);
        let answer = self
            .client_ns
            .exec("dig", &all)
            .unwrap_or_else(|error| panic!("dig {args:?} failed: {error}"));
        answer.lines().map(str::to_owned).collect()
    }

    /// `curl https://<name><path>` from the client's namespace, trusting the web server's
    /// certificate; `extra` goes before the URL (`--resolve`, say).
    pub fn curl(&self, name: &str, path: &str, extra: &[&str]) -> Result<Fetched, String> {
        let certificate = self.dir.path().join("web.pem");
        let url = format!("https://{name}{path}");
        let mut args = vec![
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            certificate.to_str().unwrap(),
            "-w",
            "\n%{time_starttransfer} %{speed_download}",
        ];
        args.extend_from_slice(extra);
        args.push(&url);
        let output = self.client_ns.exec("curl", &args)?;
        let (body, figures) = output.rsplit_once('\n').unwrap_or(("", &output));
        let mut figures = figures.split_whitespace().map(str::parse::<f64>);
        let (Some(Ok(first_byte)), Some(Ok(speed))) = (figures.next(), figures.next()) else {
            return Err(format!("no figures from curl: {output:?}"));
        };
        Ok(Fetched {
            body: body.trim_end().to_owned(),
            first_byte: Duration::from_secs_f64(first_byte),
            speed,
        })
    }

    /// The client's tunnel address (IPv4), as its TUN device holds it.
    pub fn client_tunnel_ipv4(&self) -> Ipv4Addr {
        let listed = self
            .client_ns
            .ip(&["-4", "-o", "address", "show", "dev", CLIENT_TUN])
            .unwrap();
        listed
            .split_whitespace()
            .filter_map(|word| word.split('/').next()?.parse::<Ipv4Addr>().ok())
            // The tunnel ranges are 100.64.0.0/11; the sentinels are elsewhere in 100.64/10.
            .find(|address| {
                u32::from(*address) >> 21 == u32::from(Ipv4Addr::new(100, 64, 0, 0)) >> 21
            })
            .unwrap_or_else(|| panic!("no tunnel address on {CLIENT_TUN}: {listed}"))
    }

    /// Connects from the client to `to` and reads the server's greeting line.
    pub fn greeting(&self, to: &str) -> String {
        fz_host::testing::net::greeting(&self.client_ns, to)
    }

    /// Checks that a connection from the client to `to` does not come up.
    pub fn cannot_connect(&self, to: &str) {
        fz_host::testing::net::cannot_connect(&self.client_ns, to);
    }

    /// Which gateway carried a connection, from the server's view of its source address.
    pub fn gateway_by_lan(&self, address: &str) -> usize {
        GATEWAYS
            .iter()
            .position(|spec| {
                spec.lan
                    .iter()
                    .any(|lan| lan.split('/').next() == Some(address))
            })
            .unwrap_or_else(|| panic!("{address} is no gateway's address"))
    }

    // ---- the portal ----

    /// The world's own portal, as agents connect to it.
    pub fn portal_at(&self) -> PortalAt {
        PortalAt {
            urls: format!("ws://{PORTAL_LISTEN}"),
            key: self.portal_key.clone(),
            config: self.portal_config.clone(),
        }
    }

    /// A directory of the world's own, for what a scenario keeps (deleted with the world).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `fz-portal <args> --config …` in the portal's namespace; its standard output.
    pub fn admin(&self, args: &[&str]) -> String {
        admin(&self.portal_ns, &self.portal_config, args)
    }

    /// The key the portal signs grants with, which agents pin.
    pub fn portal_public_key(&self) -> PortalPublicKey {
        self.portal_key
            .parse()
            .unwrap_or_else(|error| panic!("the portal's key {:?}: {error}", self.portal_key))
    }

    /// The account's flow records, newest first.
    pub fn flows(&self) -> Vec<serde_json::Value> {
        let listed = self.admin(&["flows", "--account", ACCOUNT, "--json"]);
        serde_json::from_str(&listed).unwrap_or_else(|error| panic!("{error}: {listed}"))
    }

    /// The id of the newest flow record (0 when there is none): later records have greater
    /// ids, see [`World::wait_flow`].
    pub fn last_flow(&self) -> i64 {
        self.flows()
            .first()
            .and_then(|flow| flow["id"].as_i64())
            .unwrap_or(0)
    }

    /// The newest flow record newer than `after` that `holds` takes, if there is one.
    pub fn flow_after(
        &self,
        after: i64,
        holds: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        self.flows()
            .into_iter()
            .take_while(|flow| flow["id"].as_i64().is_some_and(|id| id > after))
            .find(|flow| holds(flow))
    }

    /// Waits for a flow record newer than `after` that `holds` takes.
    pub fn wait_flow(
        &self,
        what: &str,
        after: i64,
        holds: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_for(what, WAIT, |world| world.flow_after(after, &holds))
    }

    /// Whether the portal has each gateway connected, in the order of [`GATEWAYS`].
    pub fn gateways_connected(&self) -> Vec<bool> {
        let listed = self.admin(&["gateways", "--account", ACCOUNT, "--json"]);
        let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
        GATEWAYS
            .iter()
            .map(|spec| {
                let entry = listed
                    .as_array()
                    .and_then(|all| all.iter().find(|g| g["name"] == spec.name))
                    .unwrap_or_else(|| panic!("the portal lists no {}: {listed}", spec.name));
                entry["connected"]
                    .as_bool()
                    .unwrap_or_else(|| panic!("no `connected` in {entry}"))
            })
            .collect()
    }

    /// Stops the portal with SIGTERM.
    pub fn stop_portal(&self) {
        let status = self.portal.terminate();
        assert!(status.success(), "the portal exited with {status}");
    }

    /// Starts the portal again on the same store and tree, and waits for every gateway.
    pub fn restart_portal(&mut self) {
        self.portal = start_portal(&self.portal_ns, &self.portal_config, self.dir.path());
        for index in 0..self.gateways.len() {
            self.wait_metrics(index, "the portal connection again", |m| {
                m.value("fz_gateway_portal_connected") == 1
            });
        }
    }

    // ---- the gateways ----

    pub fn metrics(&self, gateway: usize) -> Metrics {
        self.gateways[gateway]
            .ns
            .run(|| scrape(METRICS))
            .unwrap_or_else(|error| {
                panic!(
                    "cannot read {}'s metrics: {error}",
                    self.gateways[gateway].spec.name
                )
            })
    }

    /// Waits until a gateway's metrics satisfy `holds`.
    pub fn wait_metrics(
        &self,
        gateway: usize,
        what: &str,
        holds: impl Fn(&Metrics) -> bool,
    ) -> Metrics {
        let gw = &self.gateways[gateway];
        wait_metrics(
            &gw.ns,
            METRICS,
            &format!("{what} at {}", gw.spec.name),
            WAIT,
            |what| self.assert_running(what),
            holds,
        )
    }

    /// The WireGuard public key a gateway runs with (from its key file).
    pub fn gateway_public_key(&self, gateway: usize) -> boringtun::x25519::PublicKey {
        let name = self.gateways[gateway].spec.name;
        let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.key"))).unwrap();
        let text = text.trim();
        let mut key = [0u8; 32];
        for (byte, pair) in key.iter_mut().zip(text.as_bytes().chunks(2)) {
            *byte = u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap();
        }
        boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(key))
    }

    /// Takes the gateway of hq that carries the client's connections to `to` (a greeter
    /// behind hq's gateways) out as `outage` says, and connects again and again until `to`
    /// answers: through the other gateway after a crash or a hang, through either after a
    /// restart (the gateway is back by then); fails if that takes longer than `limit`. A hung
    /// gateway is started again afterwards.
    pub fn fail_over(&mut self, to: &str, limit: Duration, outage: Outage) -> Failover {
        let greeting = self.greeting(to);
        let address = greeting.split_whitespace().nth(1).unwrap_or_default();
        let dead = self.gateway_by_lan(address);
        let other = 1 - dead;
        let killed = Instant::now();
        match outage {
            Outage::Crash => self.kill_gateway(dead),
            Outage::Hang => self.gateways[dead].process.freeze(),
            Outage::Restart => {
                self.kill_gateway(dead);
                self.restart_gateway(dead);
            }
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            if let Ok(line) = self
                .client_ns
                .run(|| try_greeting(to, Duration::from_millis(500)))
            {
                let took = killed.elapsed();
                let through = line.split_whitespace().nth(1).unwrap_or_default();
                let alive = self.gateway_by_lan(through);
                assert!(
                    alive == other || outage == Outage::Restart,
                    "{to} answered through the {outage:?} gateway {}: {line:?}",
                    GATEWAYS[dead].name
                );
                if outage == Outage::Hang {
                    // The hung one holds its TUN device until it is gone.
                    self.gateways[dead].process.terminate();
                    self.restart_gateway(dead);
                }
                return Failover {
                    dead,
                    alive,
                    took,
                    attempts,
                };
            }
            self.client.assert_running("the failover");
            assert!(
                killed.elapsed() < limit,
                "{to} did not answer again within {limit:?} ({attempts} attempts)"
            );
        }
    }

    /// Stops the relay (coturn) and starts it again: it forgets every allocation,
    /// permission and channel, and answers what it no longer knows with errors or not at all.
    pub fn restart_relay(&mut self) {
        self.relay.kill();
        self.relay =
            crate::relay::start_coturn(&self._relay_ns, self.dir.path(), RELAY, &self.relay_secret);
    }

    /// Kills a gateway as a crash would (SIGKILL).
    pub fn kill_gateway(&self, gateway: usize) {
        self.gateways[gateway].process.kill();
    }

    /// Starts a stopped gateway again with its key and token, and waits for its portal link.
    pub fn restart_gateway(&mut self, gateway: usize) {
        let portal = self.portal_at();
        let gw = &mut self.gateways[gateway];
        gw.process = start_gateway(&gw.spec, &gw.ns, self.dir.path(), &portal);
        self.wait_metrics(gateway, "the portal connection after a restart", |m| {
            m.value("fz_gateway_portal_connected") == 1
        });
    }

    // ---- waiting and failing ----

    /// Fails at once, with its log, if any process the world needs has exited.
    pub fn assert_running(&self, waiting_for: &str) {
        self.client.assert_running(waiting_for);
        for gateway in &self.gateways {
            gateway.process.assert_running(waiting_for);
        }
        self.portal.assert_running(waiting_for);
    }

    /// Waits until `probe` gives something, failing at the deadline or as soon as a process
    /// exits.
    pub fn wait_for<T>(
        &self,
        what: &str,
        patience: Duration,
        mut probe: impl FnMut(&World) -> Option<T>,
    ) -> T {
        fz_host::testing::wait_for(
            what,
            patience,
            |what| self.assert_running(what),
            || probe(self),
        )
    }

    /// [`World::wait_for`] that gives up with `None` instead of failing.
    pub fn wait_for_or<T>(
        &self,
        what: &str,
        patience: Duration,
        mut probe: impl FnMut(&World) -> Option<T>,
    ) -> Option<T> {
        fz_host::testing::wait_for_or(
            what,
            patience,
            |what| self.assert_running(what),
            || probe(self),
        )
    }

    /// The last lines of every process's log, for a failed scenario.
    pub fn logs(&self, lines: usize) -> String {
        let tail = |what: &str, process: &Process| {
            let text = process.log_text();
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            format!(
                "---- {what} (last {lines} lines) ----\n{}\n",
                all[start..].join("\n")
            )
        };
        let mut text = tail("fz-client", &self.client);
        for gateway in &self.gateways {
            text += &tail(gateway.spec.name, &gateway.process);
            // What it counted: drops by reason, peers, grants, handshakes.
            if let Ok(metrics) = gateway.ns.run(|| http_get(METRICS, "/metrics")) {
                let counted: Vec<&str> = metrics
                    .lines()
                    .filter(|line| !line.starts_with('#') && !line.ends_with(" 0"))
                    .collect();
                text += &format!("{}'s metrics: {}\n", gateway.spec.name, counted.join("; "));
            }
        }
        text + &tail("fz-portal", &self.portal)
    }

    /// Copies every process's whole log into `to` (made if missing), for a failed scenario.
    pub fn keep_logs(&self, to: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(self.dir.path())? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "log")
                && let Some(name) = path.file_name()
            {
                std::fs::copy(&path, to.join(name))?;
            }
        }
        Ok(())
    }

    /// Seconds since `since`, for the report.
    pub fn seconds(since: Instant) -> f64 {
        since.elapsed().as_secs_f64()
    }
}

// ---- the identity provider ----

/// A CA of the world's own and the provider's certificate under it, for [`IDP_HOST`]: (CA
/// certificate, certificate, key), PEM.
fn idp_certificate() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fz e2e identity provider CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![IDP_HOST.to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// The provider's one person, [`IDP_USER`], in `groups`.
fn idp_users(groups: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "dana": { "email": IDP_USER, "email_verified": true, "groups": groups },
    })
}

/// A browser's part of a sign-in at the provider, from the URL `fz-client sign-in` printed to
/// the client's loopback listener saying it is done.
async fn browse_provider_sign_in(ca: &str, url: &str) -> Result<(), String> {
    let mut browser = Browser::trusting(PORTAL_LISTEN, ca);
    let expect_redirect = |page: &Page, step: &str| -> Result<String, String> {
        match (page.status, page.header("location")) {
            (302 | 303, Some(location)) => Ok(location.to_owned()),
            _ => Err(format!("{step}: {} {}", page.status, page.body)),
        }
    };
    let started = browser.visit(url).await;
    expect_redirect(&started, "the sign-in link")?;
    let methods = browser.get(&format!("/{ACCOUNT}")).await;
    let marker = format!("href=\"/{ACCOUNT}/sign-in/oidc/{IDP_PROVIDER}?csrf=");
    let start = methods
        .body
        .find(&marker)
        .ok_or_else(|| format!("no provider button: {}", methods.body))?
        + "href=\"".len();
    let end = start + methods.body[start..].find('"').unwrap_or(0);
    let button = browser.get(&methods.body[start..end]).await;
    let mut location = expect_redirect(&button, "the provider's button")?;
    // The provider: its authorization endpoint sends to its login page, the login back to
    // the endpoint, which sends to the portal.
    let origin = location
        .find("/auth")
        .map(|i| location[..i].to_owned())
        .ok_or_else(|| format!("not the provider: {location}"))?;
    for _ in 0..6 {
        if !location.starts_with(&origin) {
            break;
        }
        let page = browser.visit(&location).await;
        if page.status == 200 && page.body.contains("name=\"login\"") {
            let action = page
                .body
                .split("action=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .ok_or("a login form without an action")?
                .replace("&amp;", "&");
            let target = if action.starts_with("http") {
                action
            } else {
                format!("{origin}{action}")
            };
            let answer = browser
                .post_to(
                    &target,
                    &[("prompt", "login"), ("login", "dana"), ("password", "any")],
                )
                .await;
            location = expect_redirect(&answer, "the provider's login")?;
        } else {
            location = expect_redirect(&page, "the provider")?;
        }
        // The provider's redirects within itself are relative.
        if location.starts_with('/') {
            location = format!("{origin}{location}");
        }
    }
    // The portal checks the provider's answer and sends to the client's listener.
    let portal_answer = browser.visit(&location).await;
    let to_client = expect_redirect(&portal_answer, "the portal's callback")?;
    let done = browser.visit(&to_client).await;
    if done.status != 200 {
        return Err(format!(
            "the client's listener: {} {}",
            done.status, done.body
        ));
    }
    Ok(())
}

// ---- the processes ----

fn start_portal(ns: &Netns, config: &Path, dir: &Path) -> Process {
    let portal = Process::start(
        "fz-portal",
        ns,
        &binary("fz-portal"),
        &["serve", "--config", config.to_str().unwrap()],
        "info",
        dir.join("portal.log"),
    );
    fz_host::testing::wait_for(
        "the portal's /healthz",
        WAIT,
        |what| portal.assert_running(what),
        || ns.run(|| http_get(PORTAL_LISTEN, "/healthz")).ok(),
    );
    portal
}

fn start_gateway(spec: &GatewaySpec, ns: &Netns, dir: &Path, portal: &PortalAt) -> Process {
    start_gateway_at(spec.name, ns, dir, portal, spec.endpoint())
}

/// `fz-gateway` `name` in `ns`, its WireGuard socket on `listen` (which is also the address it
/// tells clients of: its host candidate).
fn start_gateway_at(
    name: &str,
    ns: &Netns,
    dir: &Path,
    portal: &PortalAt,
    listen: SocketAddr,
) -> Process {
    let token = dir.join(format!("{name}.token"));
    let key = dir.join(format!("{name}.key"));
    Process::start(
        name,
        ns,
        &binary("fz-gateway"),
        &[
            "--portal-url",
            &portal.urls,
            "--account",
            ACCOUNT,
            "--token-file",
            token.to_str().unwrap(),
            "--portal-key",
            &portal.key,
            "--listen",
            &listen.to_string(),
            "--tun",
            GATEWAY_TUN,
            "--key-file",
            key.to_str().unwrap(),
            "--metrics",
            &METRICS.to_string(),
        ],
        "info,fz_gateway=debug,fz_host=debug,boringtun=debug,fz_traversal=debug",
        dir.join(format!("{name}.log")),
    )
}

/// Whether the client in `ns` is up: the resolver (`etc/resolv.conf`) asks its sentinel, and
/// the routes of the account's resources lead into its TUN device.
/// The address of edge site `EDGES[index]`'s resource (its greeter), on the site's network
/// 192.168.`70 + index`.0/24 (the declarations say the same).
fn edge_resource(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 70 + index as u8, 10)
}

fn client_is_up(ns: &Netns, etc: &Path) -> bool {
    let resolv = std::fs::read_to_string(etc.join("resolv.conf")).unwrap_or_default();
    let routes = ns
        .ip(&["-4", "route", "show", "dev", CLIENT_TUN])
        .unwrap_or_default();
    // The edge sites' resources too: a connection opened before its route is in leaves from
    // eth0's address and keeps it, and the gateway drops all it sends.
    let edges =
        (0..EDGES.len()).all(|index| routes.contains(&format!("{} ", edge_resource(index))));
    resolv.contains(SENTINEL)
        && routes.contains("10.0.5.0/24")
        && routes.contains("100.96.0.0/11")
        && edges
}

/// `fz-client` in `ns` with `options` added; `name` names its key, state directory and log in
/// `dir`.
fn start_client(
    ns: &Netns,
    dir: &Path,
    name: &str,
    token: &Path,
    portal: &PortalAt,
    options: &[&str],
) -> Process {
    let key = dir.join(format!("{name}.key"));
    let state = dir.join(format!("{name}-state"));
    let mut args = vec![
        "--portal-url",
        &portal.urls,
        "--account",
        ACCOUNT,
        "--token-file",
        token.to_str().unwrap(),
        "--portal-key",
        &portal.key,
        "--tun",
        CLIENT_TUN,
        "--key-file",
        key.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--resolv-conf",
        "/etc/resolv.conf",
    ];
    args.extend_from_slice(options);
    Process::start(
        &format!("fz-client ({name})"),
        ns,
        &binary("fz-client"),
        &args,
        "info,fz_client=debug,fz_dns=debug,fz_host=debug,boringtun=debug,fz_traversal=debug",
        dir.join(format!("{name}.log")),
    )
}

/// dnsmasq answering for `domain` on `listen`: the `hosts` it knows, NXDOMAIN for every other
/// name in `domain`, and nothing else (no upstream, no hosts file).
fn dnsmasq(
    ns: &Netns,
    dir: &Path,
    name: &str,
    listen: Ipv4Addr,
    domain: &str,
    hosts: &[(&str, Ipv4Addr)],
) -> Process {
    let mut args = vec![
        "--keep-in-foreground".to_owned(),
        "--conf-file=/dev/null".to_owned(),
        "--no-resolv".to_owned(),
        "--no-hosts".to_owned(),
        "--bind-interfaces".to_owned(),
        format!("--listen-address={listen}"),
        "--user=root".to_owned(),
        format!(
            "--pid-file={}",
            dir.join(format!("dnsmasq-{name}.pid")).display()
        ),
        "--log-facility=-".to_owned(),
        "--log-queries".to_owned(),
        format!("--local=/{domain}/"),
    ];
    for (host, address) in hosts {
        args.push(format!("--host-record={host},{address}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let process = Process::start(
        &format!("dnsmasq ({domain})"),
        ns,
        Path::new("dnsmasq"),
        &args,
        "",
        dir.join(format!("dnsmasq-{name}.log")),
    );
    fz_host::testing::wait_for(
        &format!("dnsmasq ({domain}) to listen"),
        WAIT,
        |what| process.assert_running(what),
        || {
            ns.exec(
                "dig",
                &[
                    "+short",
                    "+time=1",
                    "+tries=1",
                    &format!("@{listen}"),
                    hosts[0].0,
                ],
            )
            .ok()
            .filter(|answer| !answer.trim().is_empty())
        },
    );
    process
}

/// `fz-portal <args> --config <config>` in `ns`; its standard output.
pub fn admin(ns: &Netns, config: &Path, args: &[&str]) -> String {
    let portal = binary("fz-portal");
    let mut all = vec![portal.to_str().unwrap()];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", config.to_str().unwrap()]);
    ns.exec_program(&all)
        .unwrap_or_else(|error| panic!("fz-portal {args:?} failed: {error}"))
}

/// `fz-portal token create --client <device> --user <user>`, its secret written to
/// `dir/<device>.token`.
fn client_token(ns: &Netns, config: &Path, dir: &Path, device: &str, user: &str) -> PathBuf {
    let created = create_client_token(ns, config, device, user);
    secret_file(dir, &format!("{device}.token"), &created)
}

/// `fz-portal token create` of a client token for `device` of `user`; what it printed.
pub fn create_client_token(ns: &Netns, config: &Path, device: &str, user: &str) -> String {
    admin(
        ns,
        config,
        &[
            "token",
            "create",
            "--account",
            ACCOUNT,
            "--client",
            device,
            "--user",
            user,
        ],
    )
}

/// The secret `fz-portal token create` printed (its `secret …` line).
pub fn secret_of(created: &str) -> &str {
    created
        .lines()
        .find_map(|line| line.strip_prefix("secret "))
        .unwrap_or_else(|| panic!("no secret in {created:?}"))
}

/// Writes the secret that `fz-portal token create` printed into `dir/name`, mode 0600.
pub fn secret_file(dir: &Path, name: &str, created: &str) -> PathBuf {
    let secret = secret_of(created);
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

// ---- the servers ----

/// At hq: the web server, db, ssh and the build server; at lab: its web greeter.
fn start_servers(runtime: &tokio::runtime::Runtime, hq: &Netns, lab: &Netns, tls: WebTls) {
    let (web, db, ssh, build) = hq.run(|| {
        (
            tcp_listener(SocketAddr::new(IpAddr::V4(WEB), 443)),
            tcp_listener(DB),
            tcp_listener(SSH),
            tcp_listener(BUILD),
        )
    });
    let lab_web = lab.run(|| tcp_listener(LAB_WEB));
    let _guard = runtime.enter();
    runtime.spawn(serve_web(web, tls));
    runtime.spawn(greet(db, "db"));
    runtime.spawn(greet(ssh, "ssh"));
    runtime.spawn(greet(build, "build"));
    runtime.spawn(greet(lab_web, "lab"));
}
