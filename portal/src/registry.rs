//! Who is connected right now and what they hold: gateways in service, client sessions, the grants in force and the grants waiting for a gateway's acknowledgement.
//!
//! Plain state, no IO and no clock: the broker (`broker`) drives it and does the talking. A
//! connection is represented by a link `L` (a channel in the portal, anything in tests) and a
//! connection number, so that a connection that was replaced (the same client connecting
//! again) cannot remove its successor when it closes.
//!
//! **Invariant:** selection only ever returns a gateway in service (connected, and so
//! heartbeating: one that misses its heartbeats is closed and gone) of the account and site
//! asked for; accounts never see each other's gateways, sessions or grants.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use fz_proto::{GatewayPeer, PathKind, PresharedKey, Resolution, SignedGrant, UnixTime};
use serde::{Deserialize, Serialize};

use crate::store::Write;

/// A connected gateway.
#[derive(Debug)]
pub struct GatewayEntry<L> {
    pub account: String,
    pub site: String,
    pub token_id: String,
    pub peer: GatewayPeer,
    pub connection: u64,
    /// The number of the cluster event that announced this connection (see
    /// [`ClientEntry::announced`]).
    pub announced: i64,
    pub link: L,
}

/// A connected client.
#[derive(Debug)]
pub struct ClientEntry<L> {
    pub session: Arc<ClientSession>,
    pub connection: u64,
    /// The number of the cluster event that announced this session to the other replicas:
    /// a session announced later, on any replica, ends this one.
    pub announced: i64,
    pub link: L,
    /// The gateway this client uses in each site, so it keeps using it.
    pub gateway_by_site: HashMap<String, String>,
}

/// What the portal knows of a connected client, fixed for the connection's life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSession {
    pub account: String,
    pub client_id: String,
    pub token_id: String,
    pub token_expires_at: UnixTime,
    pub user: String,
    pub provider: Option<String>,
    /// Groups as identity providers named them (provider, group).
    pub idp_groups: Vec<(String, String)>,
    pub source: Option<IpAddr>,
    pub country: Option<String>,
    pub peer: fz_proto::ClientPeer,
}

/// A grant in force: what it was for and who asked, so it can be decided again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveGrant {
    pub id: String,
    pub account: String,
    pub client_id: String,
    pub gateway_id: String,
    pub resource_id: String,
    /// The resource's site when the grant was made: its gateway serves that site.
    pub site: String,
    pub expires_at: UnixTime,
    /// The session it was decided for: user, groups and context (the device's verified mark
    /// is read from the store each time).
    pub session: Arc<ClientSession>,
    /// The grant as signed, to tell whether a reloaded policy still describes the resource
    /// the same way.
    pub signed: Arc<SignedGrant>,
    /// What the gateway said a DNS resource's name resolved to when it took the grant, to
    /// tell a client the grant is handed out to again (`None` for other resources, and for
    /// grants stored before the portal kept it).
    pub resolved: Option<Resolution>,
}

#[derive(Debug)]
pub struct Registry<L> {
    gateways: HashMap<String, GatewayEntry<L>>,
    clients: HashMap<String, ClientEntry<L>>,
    grants: HashMap<String, Arc<LiveGrant>>,
    /// The grants by expiry, so that finding the expired ones does not visit the others.
    expiring: BTreeSet<(UnixTime, String)>,
    /// The grants of each client (account, client id) by id, so that counting them or finding
    /// one to hand out again does not visit the others. INVARIANT: the same `Arc`s as in
    /// `grants`, so a visit of a client's grants looks none up.
    by_client: HashMap<(String, String), HashMap<String, Arc<LiveGrant>>>,
    /// Grants being made for each client (account, client id): decided, not yet in force.
    making: HashMap<(String, String), usize>,
    /// The preshared key of each client–gateway pair with grants in force or being made.
    /// INVARIANT: every grant in force between a pair carries the pair's key, so client and
    /// gateway keep one WireGuard peer (one key) for the pair however many resources it
    /// carries; a pair whose last grant ends, with none being made, gets a fresh key with its
    /// next grant.
    pairs: HashMap<(String, String), Pair>,
    next_connection: u64,
}

/// A client–gateway pair's key, with its grants in force and the grants being made with it
/// (reserved, not yet acknowledged by the gateway). A client that asks for several resources
/// at once (after a failover, say) has several grants in the making for one pair: they must
/// all carry the same key, or each would replace the peer's key on both sides, in whatever
/// order each side happens to take them.
#[derive(Debug)]
struct Pair {
    key: PresharedKey,
    in_force: usize,
    reserved: usize,
    /// How the pair's datagrams travel, as the gateway last said.
    path: Option<ConnectionPath>,
}

/// How a client–gateway pair's datagrams travel: directly, or through the relay at `relay`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionPath {
    pub kind: PathKind,
    pub relay: Option<IpAddr>,
}

impl<L> Default for Registry<L> {
    fn default() -> Self {
        Registry {
            gateways: HashMap::new(),
            clients: HashMap::new(),
            grants: HashMap::new(),
            expiring: BTreeSet::new(),
            by_client: HashMap::new(),
            making: HashMap::new(),
            pairs: HashMap::new(),
            next_connection: 0,
        }
    }
}

impl<L> Registry<L> {
    /// A fresh connection number.
    pub fn connection(&mut self) -> u64 {
        self.next_connection += 1;
        self.next_connection
    }

    // ---- gateways ----

    /// Adds (or replaces) a connected gateway; returns the link of the connection it
    /// replaced, which the caller closes.
    pub fn gateway_connected(&mut self, entry: GatewayEntry<L>) -> Option<L> {
        self.gateways
            .insert(entry.peer.id.clone(), entry)
            .map(|old| old.link)
    }

    /// Removes a gateway if `connection` is still its connection.
    pub fn gateway_gone(&mut self, gateway_id: &str, connection: u64) -> bool {
        let current = self
            .gateways
            .get(gateway_id)
            .is_some_and(|g| g.connection == connection);
        if current {
            self.gateways.remove(gateway_id);
        }
        current
    }

    pub fn gateway(&self, gateway_id: &str) -> Option<&GatewayEntry<L>> {
        self.gateways.get(gateway_id)
    }

    /// A gateway of the account's site, not in `exclude`: the one the client already uses
    /// there if it is still connected, else one picked by `pick` (given the number of
    /// candidates, it returns an index; the portal picks at random).
    pub fn select_gateway(
        &self,
        account: &str,
        site: &str,
        client_id: &str,
        exclude: &HashSet<String>,
        pick: impl FnOnce(usize) -> usize,
    ) -> Option<&GatewayEntry<L>> {
        let usable = |g: &&GatewayEntry<L>| {
            g.account == account && g.site == site && !exclude.contains(&g.peer.id)
        };
        let sticky = self
            .clients
            .get(client_id)
            .filter(|c| c.session.account == account)
            .and_then(|c| c.gateway_by_site.get(site))
            .and_then(|id| self.gateways.get(id))
            .filter(usable);
        if sticky.is_some() {
            return sticky;
        }
        let mut candidates: Vec<&GatewayEntry<L>> = self.gateways.values().filter(usable).collect();
        // Hash map order is arbitrary; sorting makes `pick` the only source of choice.
        candidates.sort_by(|a, b| a.peer.id.cmp(&b.peer.id));
        if candidates.is_empty() {
            return None;
        }
        let index = pick(candidates.len()).min(candidates.len() - 1);
        candidates.get(index).copied()
    }

    // ---- clients ----

    /// Adds (or replaces) a client session; returns the link of the connection it replaced.
    pub fn client_connected(&mut self, entry: ClientEntry<L>) -> Option<L> {
        self.clients
            .insert(entry.session.client_id.clone(), entry)
            .map(|old| old.link)
    }

    /// Removes a client session if `connection` is still its connection.
    pub fn client_gone(&mut self, client_id: &str, connection: u64) -> bool {
        let current = self
            .clients
            .get(client_id)
            .is_some_and(|c| c.connection == connection);
        if current {
            self.clients.remove(client_id);
        }
        current
    }

    pub fn client(&self, client_id: &str) -> Option<&ClientEntry<L>> {
        self.clients.get(client_id)
    }

    /// Connected clients and gateways whose token is one of `tokens`.
    pub fn links_of_tokens<'a>(&'a self, tokens: &'a HashSet<String>) -> Vec<&'a L> {
        let clients = self
            .clients
            .values()
            .filter(|c| tokens.contains(&c.session.token_id))
            .map(|c| &c.link);
        let gateways = self
            .gateways
            .values()
            .filter(|g| tokens.contains(&g.token_id))
            .map(|g| &g.link);
        clients.chain(gateways).collect()
    }

    /// Every connection's link.
    pub fn links(&self) -> Vec<&L> {
        let clients = self.clients.values().map(|c| &c.link);
        clients
            .chain(self.gateways.values().map(|g| &g.link))
            .collect()
    }

    /// Every connected client's id and link.
    pub fn client_links(&self) -> impl Iterator<Item = (&str, &L)> {
        self.clients.iter().map(|(id, c)| (id.as_str(), &c.link))
    }

    /// Every connected gateway's id and link.
    pub fn gateway_links(&self) -> impl Iterator<Item = (&str, &L)> {
        self.gateways.iter().map(|(id, g)| (id.as_str(), &g.link))
    }

    /// Connected clients whose session `select` picks.
    pub fn clients_where(&self, mut select: impl FnMut(&ClientSession) -> bool) -> Vec<&L> {
        self.clients
            .values()
            .filter(|c| select(&c.session))
            .map(|c| &c.link)
            .collect()
    }

    /// Connected clients whose token expired at `now`.
    pub fn clients_expired(&self, now: UnixTime) -> Vec<&L> {
        self.clients
            .values()
            .filter(|c| c.session.token_expires_at <= now)
            .map(|c| &c.link)
            .collect()
    }

    // ---- grants ----

    /// Puts a grant in force, and remembers the gateway as the client's one for the site.
    pub fn grant_added(&mut self, grant: LiveGrant) {
        if let Some(client) = self.clients.get_mut(&grant.client_id) {
            client
                .gateway_by_site
                .insert(grant.site.clone(), grant.gateway_id.clone());
        }
        self.expiring.insert((grant.expires_at, grant.id.clone()));
        self.pairs
            .entry((grant.client_id.clone(), grant.gateway_id.clone()))
            .or_insert_with(|| Pair {
                key: grant.signed.grant.preshared_key.clone(),
                in_force: 0,
                reserved: 0,
                path: None,
            })
            .in_force += 1;
        let grant = Arc::new(grant);
        self.by_client
            .entry((grant.account.clone(), grant.client_id.clone()))
            .or_default()
            .insert(grant.id.clone(), grant.clone());
        if let Some(old) = self.grants.insert(grant.id.clone(), grant) {
            self.pair_released(&old);
        }
    }

    /// The preshared key that grants between the client and the gateway carry, if any is in
    /// force.
    pub fn pair_key(&self, client_id: &str, gateway_id: &str) -> Option<PresharedKey> {
        self.pairs
            .get(&(client_id.to_owned(), gateway_id.to_owned()))
            .map(|pair| pair.key.clone())
    }

    /// How the pair's datagrams travel, once its gateway said.
    pub fn pair_path(&self, client_id: &str, gateway_id: &str) -> Option<ConnectionPath> {
        self.pairs
            .get(&(client_id.to_owned(), gateway_id.to_owned()))?
            .path
    }

    /// The gateway says how the pair's datagrams travel now: the grants in force between the
    /// pair of `account` (id and issue time), whose flows record it, if the path changed;
    /// none if it did not, or if the pair has no grant.
    pub fn set_pair_path(
        &mut self,
        account: &str,
        client_id: &str,
        gateway_id: &str,
        path: ConnectionPath,
    ) -> Vec<String> {
        let Some(pair) = self
            .pairs
            .get_mut(&(client_id.to_owned(), gateway_id.to_owned()))
        else {
            return Vec::new();
        };
        if pair.path == Some(path) {
            return Vec::new();
        }
        pair.path = Some(path);
        self.by_client
            .get(&(account.to_owned(), client_id.to_owned()))
            .into_iter()
            .flat_map(HashMap::values)
            .filter(|grant| grant.gateway_id == gateway_id)
            .map(|grant| grant.id.clone())
            .collect()
    }

    /// The key a grant being made for the pair carries: the pair's, or `fresh` when the pair
    /// has none. Holds the key for the pair until [`Registry::release_reservation`], which
    /// the maker of the grant calls once the grant is in force or has failed.
    pub fn reserve_pair_key(
        &mut self,
        client_id: &str,
        gateway_id: &str,
        fresh: PresharedKey,
    ) -> PresharedKey {
        let pair = self
            .pairs
            .entry((client_id.to_owned(), gateway_id.to_owned()))
            .or_insert(Pair {
                key: fresh,
                in_force: 0,
                reserved: 0,
                path: None,
            });
        pair.reserved += 1;
        pair.key.clone()
    }

    /// Ends a reservation of [`Registry::reserve_pair_key`].
    pub fn release_reservation(&mut self, client_id: &str, gateway_id: &str) {
        let pair = (client_id.to_owned(), gateway_id.to_owned());
        if let Some(entry) = self.pairs.get_mut(&pair) {
            entry.reserved = entry.reserved.saturating_sub(1);
            if entry.in_force == 0 && entry.reserved == 0 {
                self.pairs.remove(&pair);
            }
        }
    }

    fn pair_released(&mut self, grant: &LiveGrant) {
        let pair = (grant.client_id.clone(), grant.gateway_id.clone());
        if let Some(entry) = self.pairs.get_mut(&pair) {
            entry.in_force = entry.in_force.saturating_sub(1);
            if entry.in_force == 0 && entry.reserved == 0 {
                self.pairs.remove(&pair);
            }
        }
    }

    /// Ids of the grants expired at `now` (a grant expires at its `expires_at`).
    pub fn expired(&self, now: UnixTime) -> Vec<String> {
        self.expiring
            .range(..(now.saturating_add(1), String::new()))
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// The grants in force, to decide them again without holding the registry.
    /// Puts `grant` in place of the grant in force with its id (a session's groups changed,
    /// the grant stays); nothing when no grant has that id.
    pub fn reassign(&mut self, grant: LiveGrant) {
        if let Some(held) = self.grants.get_mut(&grant.id) {
            let grant = Arc::new(grant);
            if let Some(of_client) = self
                .by_client
                .get_mut(&(grant.account.clone(), grant.client_id.clone()))
            {
                of_client.insert(grant.id.clone(), grant.clone());
            }
            *held = grant;
        }
    }

    pub fn grants(&self) -> Vec<Arc<LiveGrant>> {
        self.grants.values().cloned().collect()
    }

    pub fn grant_count(&self) -> usize {
        self.grants.len()
    }

    /// Takes grants out of force, and returns them.
    pub fn withdraw(&mut self, ids: &[String]) -> Vec<Arc<LiveGrant>> {
        let withdrawn: Vec<Arc<LiveGrant>> =
            ids.iter().filter_map(|id| self.grants.remove(id)).collect();
        for grant in &withdrawn {
            self.expiring.remove(&(grant.expires_at, grant.id.clone()));
            let client = (grant.account.clone(), grant.client_id.clone());
            if let Some(ids) = self.by_client.get_mut(&client) {
                ids.remove(&grant.id);
                if ids.is_empty() {
                    self.by_client.remove(&client);
                }
            }
            self.pair_released(grant);
        }
        withdrawn
    }

    /// How many grants a client of `account` holds in force or has being made.
    pub fn grants_of_client(&self, account: &str, client_id: &str) -> usize {
        let client = (account.to_owned(), client_id.to_owned());
        let in_force = self.by_client.get(&client).map_or(0, HashMap::len);
        in_force + self.making.get(&client).copied().unwrap_or(0)
    }

    /// A grant of the client that `select` picks, visiting the client's grants only.
    pub fn grant_of_client(
        &self,
        account: &str,
        client_id: &str,
        mut select: impl FnMut(&LiveGrant) -> bool,
    ) -> Option<Arc<LiveGrant>> {
        self.client_grants(account, client_id)
            .find(|g| select(g))
            .cloned()
    }

    /// The grants in force of a client of `account`, found through its index (not a visit of
    /// every grant: a hello asks this, and thousands of hellos come at once after a replica
    /// is lost).
    pub fn client_grants(
        &self,
        account: &str,
        client_id: &str,
    ) -> impl Iterator<Item = &Arc<LiveGrant>> {
        let client = (account.to_owned(), client_id.to_owned());
        self.by_client
            .get(&client)
            .into_iter()
            .flat_map(HashMap::values)
    }

    /// Counts a grant being made for the client, if it holds (in force and being made) fewer
    /// than `limit`; false if it does not. The maker calls [`Registry::grant_made`] once the
    /// grant is in force or has failed.
    pub fn making_grant(&mut self, account: &str, client_id: &str, limit: usize) -> bool {
        if self.grants_of_client(account, client_id) >= limit {
            return false;
        }
        *self
            .making
            .entry((account.to_owned(), client_id.to_owned()))
            .or_default() += 1;
        true
    }

    /// Ends a count of [`Registry::making_grant`].
    pub fn grant_made(&mut self, account: &str, client_id: &str) {
        let client = (account.to_owned(), client_id.to_owned());
        if let Some(n) = self.making.get_mut(&client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.making.remove(&client);
            }
        }
    }

    /// Ids of the grants `select` picks.
    pub fn grants_where(&self, mut select: impl FnMut(&LiveGrant) -> bool) -> Vec<String> {
        self.grants
            .values()
            .filter(|g| select(g))
            .map(|g| g.id.clone())
            .collect()
    }
}

/// The store writes that withdraw grants.
pub fn deletions(withdrawn: &[Arc<LiveGrant>]) -> Vec<Write> {
    withdrawn
        .iter()
        .map(|grant| Write::DeleteGrant {
            account: grant.account.clone(),
            grant_id: grant.id.clone(),
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fz_proto::PublicKey;

    fn gateway(id: &str, account: &str, site: &str, connection: u64) -> GatewayEntry<&'static str> {
        GatewayEntry {
            account: account.into(),
            site: site.into(),
            token_id: format!("tok-{id}"),
            peer: GatewayPeer {
                id: id.into(),
                public_key: PublicKey([0; 32]),
                endpoints: Vec::new(),
            },
            connection,
            announced: 0,
            link: "gw",
        }
    }

    pub(crate) fn session(account: &str, client: &str) -> Arc<ClientSession> {
        Arc::new(ClientSession {
            account: account.into(),
            client_id: client.into(),
            token_id: format!("tok-{client}"),
            token_expires_at: 100,
            user: "alice@acme.example".into(),
            provider: None,
            idp_groups: Vec::new(),
            source: None,
            country: None,
            peer: fz_proto::ClientPeer {
                id: client.into(),
                public_key: PublicKey([1; 32]),
                tunnel_ipv4: [100, 64, 0, 1].into(),
                tunnel_ipv6: std::net::Ipv6Addr::LOCALHOST,
                endpoints: Vec::new(),
            },
        })
    }

    fn select(
        r: &Registry<&'static str>,
        account: &str,
        site: &str,
        client: &str,
        exclude: &[&str],
        index: usize,
    ) -> Option<String> {
        let exclude = exclude.iter().map(|s| (*s).to_owned()).collect();
        r.select_gateway(account, site, client, &exclude, |_| index)
            .map(|g| g.peer.id.clone())
    }

    #[test]
    fn selection_takes_only_connected_gateways_of_the_account_and_site() {
        let mut r = Registry::default();
        r.gateway_connected(gateway("gw-a", "acme", "hq", 1));
        r.gateway_connected(gateway("gw-b", "acme", "hq", 2));
        r.gateway_connected(gateway("gw-c", "acme", "lab", 3));
        r.gateway_connected(gateway("gw-d", "globex", "hq", 4));
        assert!(r.gateway_gone("gw-b", 2));
        for index in 0..4 {
            assert_eq!(
                select(&r, "acme", "hq", "c", &[], index).as_deref(),
                Some("gw-a")
            );
        }
        assert_eq!(select(&r, "acme", "hq", "c", &["gw-a"], 0), None);
        assert_eq!(select(&r, "globex", "lab", "c", &[], 0), None);
        assert!(
            !r.gateway_gone("gw-a", 9),
            "an older connection removes nothing"
        );
        assert!(r.gateway_gone("gw-a", 1));
        assert_eq!(select(&r, "acme", "hq", "c", &[], 0), None);
    }

    #[test]
    fn a_client_keeps_its_gateway_while_it_is_connected() {
        let mut r = Registry::default();
        for (i, id) in ["gw-1", "gw-2", "gw-3"].iter().enumerate() {
            r.gateway_connected(gateway(id, "acme", "hq", i as u64));
        }
        assert_eq!(
            select(&r, "acme", "hq", "c", &[], 2).as_deref(),
            Some("gw-3")
        );
        r.client_connected(ClientEntry {
            session: session("acme", "c"),
            connection: 9,
            announced: 0,
            link: "c",
            gateway_by_site: HashMap::from([("hq".to_owned(), "gw-2".to_owned())]),
        });
        for index in 0..3 {
            assert_eq!(
                select(&r, "acme", "hq", "c", &[], index).as_deref(),
                Some("gw-2")
            );
        }
        assert_eq!(
            select(&r, "acme", "hq", "c", &["gw-2"], 0).as_deref(),
            Some("gw-1")
        );
        r.gateway_gone("gw-2", 1);
        assert_eq!(
            select(&r, "acme", "hq", "c", &[], 2).as_deref(),
            Some("gw-3")
        );
        // Another account's client with the same id gets no stickiness across accounts.
        assert_eq!(select(&r, "globex", "hq", "c", &[], 0), None);
    }

    #[test]
    fn expired_grants_are_found_by_their_expiry_and_leave_with_them() {
        let mut r: Registry<&'static str> = Registry::default();
        for (id, expires_at) in [("g-10", 10), ("g-20", 20), ("g-20b", 20), ("g-30", 30)] {
            r.grant_added(LiveGrant {
                id: id.into(),
                account: "acme".into(),
                client_id: "c".into(),
                gateway_id: "gw".into(),
                resource_id: "db".into(),
                site: "hq".into(),
                expires_at,
                session: session("acme", "c"),
                signed: Arc::new(signed(id, expires_at)),
                resolved: None,
            });
        }
        assert!(r.expired(9).is_empty());
        assert_eq!(r.expired(10), ["g-10"]);
        assert_eq!(r.expired(25), ["g-10", "g-20", "g-20b"]);
        assert_eq!(r.withdraw(&["g-20".to_owned()]).len(), 1);
        assert_eq!(r.expired(u64::MAX), ["g-10", "g-20b", "g-30"]);
        assert_eq!(r.grant_count(), 3);
        // The pair's preshared key lives as long as one of its grants does.
        assert_eq!(r.pair_key("c", "gw"), Some(PresharedKey([0; 32])));
        assert_eq!(r.pair_key("c", "gw-2"), None);
        r.withdraw(&["g-10".to_owned(), "g-20b".to_owned()]);
        assert!(r.pair_key("c", "gw").is_some());
        r.withdraw(&["g-30".to_owned()]);
        assert_eq!(r.pair_key("c", "gw"), None);
    }

    #[test]
    fn a_client_s_grants_are_counted_with_those_being_made() {
        let mut r: Registry<&'static str> = Registry::default();
        assert!(r.making_grant("acme", "c", 2));
        assert!(r.making_grant("acme", "c", 2));
        assert!(
            !r.making_grant("acme", "c", 2),
            "two in the making fill a limit of two"
        );
        // Another account's client of the same id counts apart.
        assert!(r.making_grant("globex", "c", 2));
        r.grant_added(LiveGrant {
            id: "g-1".into(),
            account: "acme".into(),
            client_id: "c".into(),
            gateway_id: "gw".into(),
            resource_id: "db".into(),
            site: "hq".into(),
            expires_at: 100,
            session: session("acme", "c"),
            signed: Arc::new(signed("g-1", 100)),
            resolved: None,
        });
        r.grant_made("acme", "c");
        r.grant_made("acme", "c");
        assert_eq!(r.grants_of_client("acme", "c"), 1);
        assert!(
            r.grant_of_client("acme", "c", |g| g.resource_id == "db")
                .is_some()
        );
        assert!(r.grant_of_client("globex", "c", |_| true).is_none());
        // A grant put in place of another (its session lost a group) is the one the client's
        // grants show, not the one it replaced.
        let held = r.grant_of_client("acme", "c", |_| true).unwrap();
        let mut fewer_groups = (*held.session).clone();
        fewer_groups.user = "bob@acme.example".into();
        r.reassign(LiveGrant {
            session: Arc::new(fewer_groups),
            ..(*held).clone()
        });
        let shown = r.grant_of_client("acme", "c", |_| true).unwrap();
        assert_eq!(shown.session.user, "bob@acme.example");
        assert_eq!(r.grants_of_client("acme", "c"), 1);
        assert!(r.making_grant("acme", "c", 2));
        assert!(!r.making_grant("acme", "c", 2));
        r.grant_made("acme", "c");
        r.withdraw(&["g-1".to_owned()]);
        assert_eq!(r.grants_of_client("acme", "c"), 0);
        assert!(r.grant_of_client("acme", "c", |_| true).is_none());
    }

    #[test]
    fn grants_made_at_once_for_a_pair_share_its_key() {
        let mut r: Registry<&'static str> = Registry::default();
        // Two requests decided together, before either grant is in force.
        let first = r.reserve_pair_key("c", "gw", PresharedKey([1; 32]));
        let second = r.reserve_pair_key("c", "gw", PresharedKey([2; 32]));
        assert_eq!(first, PresharedKey([1; 32]));
        assert_eq!(second, first, "a second key for a pair in the making");
        // One fails (the gateway refused it): the other still holds the key.
        r.release_reservation("c", "gw");
        assert_eq!(r.pair_key("c", "gw"), Some(first.clone()));
        // The other gets in force, then its reservation ends: the grant holds the key.
        let mut live = signed("g-1", 100);
        live.grant.preshared_key = first.clone();
        r.grant_added(LiveGrant {
            id: "g-1".into(),
            account: "acme".into(),
            client_id: "c".into(),
            gateway_id: "gw".into(),
            resource_id: "db".into(),
            site: "hq".into(),
            expires_at: 100,
            session: session("acme", "c"),
            signed: Arc::new(live),
            resolved: None,
        });
        r.release_reservation("c", "gw");
        assert_eq!(r.pair_key("c", "gw"), Some(first));
        r.withdraw(&["g-1".to_owned()]);
        assert_eq!(
            r.pair_key("c", "gw"),
            None,
            "a pair with nothing left keeps no key"
        );
    }

    pub(crate) fn signed(id: &str, expires_at: UnixTime) -> SignedGrant {
        fz_proto::Grant {
            id: id.into(),
            account: "acme".into(),
            client: session("acme", "c").peer.clone(),
            gateway: GatewayPeer {
                id: "gw".into(),
                public_key: PublicKey([0; 32]),
                endpoints: Vec::new(),
            },
            preshared_key: PresharedKey([0; 32]),
            resource: fz_proto::GrantedResource {
                id: "db".into(),
                address: "10.0.5.0/24".into(),
                filter: None,
                except: Vec::new(),
                dns: None,
            },
            rule: "r".into(),
            bundle_hash: "h".into(),
            issued_at: 0,
            expires_at,
        }
        .sign(&fz_proto::PortalSigningKey::from_seed([1; 32]))
    }

    #[test]
    fn a_replaced_connection_does_not_remove_its_successor() {
        let mut r: Registry<&'static str> = Registry::default();
        assert_eq!(r.gateway_connected(gateway("gw", "acme", "hq", 1)), None);
        assert_eq!(
            r.gateway_connected(gateway("gw", "acme", "hq", 2)),
            Some("gw")
        );
        assert!(!r.gateway_gone("gw", 1));
        assert!(r.gateway("gw").is_some());
        assert!(r.gateway_gone("gw", 2));
        assert!(r.gateway("gw").is_none());
    }
}
