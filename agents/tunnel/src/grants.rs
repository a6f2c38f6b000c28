//! One client's grants at the gateway, filed by where they let packets go, so that deciding a
//! packet costs a few hash lookups however many grants the client holds.
//!
//! A DNS grant is filed under each of its mapped addresses; an IP or CIDR grant under its
//! network, in one map keyed by network (prefix lengths in use are listed per family, as
//! `fz_address::AddressIndex` does it); an `internet` grant in a list of its own. Grants with
//! the same filter (the same resource asked for again through the same gateway) share one
//! entry that counts its holders, so the list under one key has one entry per distinct filter:
//! its length follows the policy (how many resources, with how many port filters and
//! carve-outs, open that address), never the number of grants.
//!
//! A packet's candidates are the entries under its destination (a reply's source): the mapped
//! address's, those of each prefix length in use for its family, and the `internet` ones; each
//! is checked with its [`GrantFilter`], as the linear walk over every grant did. A filter
//! passes only what lies in the networks it opens, so every grant that could pass a packet is a
//! candidate and the decision is the walk's. So is the drop reason: a grant that does not open
//! the destination could only have said [`Drop::DestinationNotGranted`] (or
//! [`Drop::NotFromClient`], for a packet from another source), so the most telling reason is
//! that or the candidates' most telling one.
//!
//! INVARIANT: every grant of a client names the same tunnel addresses (the gateway refuses one
//! that does not), so "from the client" means the same for every grant.

use std::collections::HashMap;
use std::net::IpAddr;

use foldhash::fast::RandomState;
use fz_address::Network;

use crate::filter::{Drop, GrantFilter, Opens};
use crate::packet::Packet;

/// An index into [`ClientGrants::entries`].
type Slot = usize;

/// How a packet passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pass {
    /// Through an IP, CIDR or `internet` grant: it goes on as it is.
    Direct,
    /// Through a DNS grant: the NAT translates the mapped address.
    Mapped,
}

/// One distinct filter and the grants that hold it.
#[derive(Debug)]
struct Entry {
    filter: GrantFilter,
    /// A DNS grant's name (and its mapped addresses are what the filter opens).
    name: Option<String>,
    holders: usize,
}

/// A client's grants, filed by destination. See the module's documentation.
#[derive(Debug, Default)]
pub(crate) struct ClientGrants {
    by_id: HashMap<String, Slot, RandomState>,
    entries: Vec<Option<Entry>>,
    free: Vec<Slot>,
    /// DNS entries by mapped address.
    mapped: HashMap<IpAddr, Vec<Slot>, RandomState>,
    /// IP and CIDR entries by network.
    networks: HashMap<Network, Vec<Slot>, RandomState>,
    /// Prefix lengths with networks filed, longest first, with how many networks each.
    prefixes_v4: Vec<(u8, usize)>,
    prefixes_v6: Vec<(u8, usize)>,
    internet: Vec<Slot>,
}

impl ClientGrants {
    pub(crate) fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The name a mapped address stands for in one of the client's DNS grants.
    pub(crate) fn name_of(&self, mapped: IpAddr) -> Option<&str> {
        self.mapped
            .get(&mapped)?
            .iter()
            .find_map(|slot| self.entry(*slot)?.name.as_deref())
    }

    /// Files a grant (a DNS grant with its name). A grant id already filed is left as it is.
    pub(crate) fn insert(&mut self, id: &str, filter: GrantFilter, name: Option<String>) {
        if self.by_id.contains_key(id) {
            return;
        }
        let dns = name.is_some();
        // The same filter filed already: one more holder. Any entry with this filter is filed
        // under the first key of this one, so looking there finds it.
        let first = match filter.opens() {
            Opens::Internet => Some(&self.internet),
            Opens::Networks(networks) => networks.first().and_then(|n| {
                if dns {
                    self.mapped.get(&n.addr())
                } else {
                    self.networks.get(n)
                }
            }),
        };
        let shared = first.into_iter().flatten().copied().find(|slot| {
            self.entry(*slot)
                .is_some_and(|e| e.filter == filter && e.name == name)
        });
        if let Some(slot) = shared {
            if let Some(Some(entry)) = self.entries.get_mut(slot) {
                entry.holders += 1;
            }
            self.by_id.insert(id.to_owned(), slot);
            return;
        }
        let slot = self.free.pop().unwrap_or(self.entries.len());
        match filter.opens() {
            Opens::Internet => self.internet.push(slot),
            Opens::Networks(networks) => {
                for network in networks {
                    if dns {
                        self.mapped.entry(network.addr()).or_default().push(slot);
                    } else {
                        let filed = self.networks.entry(*network).or_default();
                        filed.push(slot);
                        if filed.len() == 1 {
                            prefix_added(self.prefixes_mut(network.addr()), network.prefix());
                        }
                    }
                }
            }
        }
        let entry = Entry {
            filter,
            name,
            holders: 1,
        };
        match self.entries.get_mut(slot) {
            Some(free) => *free = Some(entry),
            None => self.entries.push(Some(entry)),
        }
        self.by_id.insert(id.to_owned(), slot);
    }

    /// Takes a grant out. `None` if it was not filed; else the mapped addresses that no grant
    /// of the client maps any more (their NAT entries can go).
    pub(crate) fn remove(&mut self, id: &str) -> Option<Vec<IpAddr>> {
        let slot = self.by_id.remove(id)?;
        let Some(Some(entry)) = self.entries.get_mut(slot) else {
            return Some(Vec::new());
        };
        entry.holders = entry.holders.saturating_sub(1);
        if entry.holders > 0 {
            return Some(Vec::new());
        }
        let Some(Some(entry)) = self.entries.get_mut(slot).map(Option::take) else {
            return Some(Vec::new());
        };
        self.free.push(slot);
        let mut unmapped = Vec::new();
        match entry.filter.opens() {
            Opens::Internet => self.internet.retain(|s| *s != slot),
            Opens::Networks(networks) => {
                for network in networks {
                    if entry.name.is_some() {
                        let address = network.addr();
                        if unfile(&mut self.mapped, &address, slot) {
                            unmapped.push(address);
                        }
                    } else if unfile(&mut self.networks, network, slot) {
                        prefix_removed(self.prefixes_mut(network.addr()), network.prefix());
                    }
                }
            }
        }
        Some(unmapped)
    }

    /// Whether a packet from the client's tunnel may go on, and how; else the most telling
    /// reason of the grants that could have passed it. `from_client`: its source is one of
    /// the client's tunnel addresses.
    pub(crate) fn check(&self, packet: &Packet, from_client: bool) -> Result<Pass, Drop> {
        if !from_client {
            return Err(Drop::NotFromClient);
        }
        let mut reason = Drop::DestinationNotGranted;
        for entry in self.candidates(packet.destination) {
            match entry.filter.check(packet) {
                Ok(()) if entry.name.is_some() => return Ok(Pass::Mapped),
                Ok(()) => return Ok(Pass::Direct),
                Err(drop) => reason = reason.max(drop),
            }
        }
        Err(reason)
    }

    /// Whether a packet from the site may go back to the client: `translated`, a reply of one
    /// of its NAT flows (the mapped address written back), needs a DNS grant; any other
    /// packet an IP, CIDR or `internet` grant that covers its source.
    pub(crate) fn check_reply(&self, packet: &Packet, translated: bool) -> bool {
        self.candidates(packet.source)
            .filter(|e| e.name.is_some() == translated)
            .any(|e| e.filter.check_reply(packet))
    }

    /// The entries that may pass a packet to (or a reply from) `ip`: DNS entries first, then
    /// networks from the longest prefix, then `internet`.
    fn candidates(&self, ip: IpAddr) -> impl Iterator<Item = &Entry> {
        let prefixes = match ip {
            IpAddr::V4(_) => &self.prefixes_v4,
            IpAddr::V6(_) => &self.prefixes_v6,
        };
        let host = Network::host(ip);
        let mapped = self.mapped.get(&ip).into_iter().flatten();
        let networks = prefixes
            .iter()
            .filter_map(move |(prefix, _)| self.networks.get(&host.widened(*prefix)))
            .flatten();
        mapped
            .chain(networks)
            .chain(&self.internet)
            .filter_map(|slot| self.entry(*slot))
    }

    fn entry(&self, slot: Slot) -> Option<&Entry> {
        self.entries.get(slot)?.as_ref()
    }

    fn prefixes_mut(&mut self, ip: IpAddr) -> &mut Vec<(u8, usize)> {
        match ip {
            IpAddr::V4(_) => &mut self.prefixes_v4,
            IpAddr::V6(_) => &mut self.prefixes_v6,
        }
    }
}

/// Takes `slot` out of the list under `key`; true if the list is gone with it.
fn unfile<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Vec<Slot>, RandomState>,
    key: &K,
    slot: Slot,
) -> bool {
    let Some(slots) = map.get_mut(key) else {
        return false;
    };
    slots.retain(|s| *s != slot);
    if slots.is_empty() {
        map.remove(key);
        return true;
    }
    false
}

fn prefix_added(prefixes: &mut Vec<(u8, usize)>, prefix: u8) {
    match prefixes.iter_mut().find(|(p, _)| *p == prefix) {
        Some((_, count)) => *count += 1,
        None => {
            prefixes.push((prefix, 1));
            prefixes.sort_by_key(|(p, _)| std::cmp::Reverse(*p));
        }
    }
}

fn prefix_removed(prefixes: &mut Vec<(u8, usize)>, prefix: u8) {
    if let Some((_, count)) = prefixes.iter_mut().find(|(p, _)| *p == prefix) {
        *count = count.saturating_sub(1);
    }
    prefixes.retain(|(_, count)| *count > 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::build::{ip, ports};
    use fz_proto::{ClientPeer, DnsMapping, GatewayPeer, Grant, GrantedResource, PresharedKey};

    const CLIENT: &str = "100.64.0.2";

    fn filter(address: &str, ports: &[&str], except: &[&str], mapped: &[&str]) -> GrantFilter {
        let dns = (!mapped.is_empty()).then(|| DnsMapping {
            name: address.to_owned(),
            mapped: mapped.iter().map(|m| m.parse().unwrap()).collect(),
        });
        GrantFilter::new(&Grant {
            id: "g".into(),
            account: "acme".into(),
            client: ClientPeer {
                id: "c".into(),
                public_key: fz_proto::PublicKey([1; 32]),
                tunnel_ipv4: CLIENT.parse().unwrap(),
                tunnel_ipv6: "fd00:2021:1111::2".parse().unwrap(),
                endpoints: vec![],
            },
            gateway: GatewayPeer {
                id: "gw".into(),
                public_key: fz_proto::PublicKey([2; 32]),
                endpoints: vec![],
            },
            preshared_key: PresharedKey([3; 32]),
            resource: GrantedResource {
                id: "r".into(),
                address: address.into(),
                filter: (!ports.is_empty()).then(|| ports.iter().map(|p| (*p).into()).collect()),
                except: except.iter().map(|e| (*e).into()).collect(),
                dns,
            },
            rule: "r".into(),
            bundle_hash: "h".into(),
            issued_at: 0,
            expires_at: 1,
        })
        .unwrap()
    }

    fn tcp(destination: &str, port: u16) -> Vec<u8> {
        ip(
            CLIENT.parse().unwrap(),
            destination.parse().unwrap(),
            6,
            &ports(40000, port),
        )
    }

    fn check(grants: &ClientGrants, bytes: &[u8]) -> Result<Pass, Drop> {
        grants.check(&Packet::parse(bytes).unwrap(), true)
    }

    #[test]
    fn packets_meet_only_the_grants_filed_under_their_destination() {
        let mut grants = ClientGrants::default();
        grants.insert(
            "wide",
            filter("10.0.0.0/8", &[], &["10.0.5.0/24"], &[]),
            None,
        );
        grants.insert("db", filter("10.0.5.0/24", &["tcp/5432"], &[], &[]), None);
        grants.insert(
            "gitlab",
            filter("gitlab.acme.example", &["tcp/443"], &[], &["100.96.0.1"]),
            Some("gitlab.acme.example".into()),
        );
        grants.insert("egress", filter("internet", &["tcp/443"], &[], &[]), None);
        let cases = [
            (tcp("10.1.2.3", 22), Ok(Pass::Direct)),
            (tcp("10.0.5.9", 5432), Ok(Pass::Direct)),
            // Carved out of the wide grant, and the narrow one's port is another.
            (tcp("10.0.5.9", 22), Err(Drop::PortNotGranted)),
            (tcp("100.96.0.1", 443), Ok(Pass::Mapped)),
            (tcp("100.96.0.1", 80), Err(Drop::PortNotGranted)),
            (tcp("100.96.0.2", 443), Err(Drop::DestinationNotGranted)),
            (tcp("8.8.8.8", 443), Ok(Pass::Direct)),
            (tcp("8.8.8.8", 80), Err(Drop::PortNotGranted)),
            (tcp("192.168.1.1", 443), Err(Drop::DestinationNotGranted)),
        ];
        for (bytes, expected) in cases {
            assert_eq!(check(&grants, &bytes), expected, "{bytes:?}");
        }
        assert_eq!(
            grants.check(&Packet::parse(&tcp("10.1.2.3", 22)).unwrap(), false),
            Err(Drop::NotFromClient)
        );
        assert_eq!(
            grants.name_of("100.96.0.1".parse().unwrap()),
            Some("gitlab.acme.example")
        );
    }

    #[test]
    fn grants_with_one_filter_share_an_entry_until_the_last_goes() {
        let mut grants = ClientGrants::default();
        let gitlab = || {
            filter(
                "gitlab.acme.example",
                &[],
                &[],
                &["100.96.0.1", "100.96.0.2"],
            )
        };
        let name = || Some("gitlab.acme.example".to_owned());
        for id in ["a", "b", "c"] {
            grants.insert(id, gitlab(), name());
        }
        for id in 0..1000 {
            grants.insert(
                &format!("host-{id}"),
                filter("10.0.0.1", &[], &[], &[]),
                None,
            );
        }
        assert_eq!(grants.entries.iter().flatten().count(), 2);
        assert_eq!(grants.prefixes_v4, [(32, 1)]);
        assert_eq!(grants.remove("a"), Some(vec![]));
        assert_eq!(grants.remove("a"), None);
        assert_eq!(grants.remove("b"), Some(vec![]));
        assert_eq!(check(&grants, &tcp("100.96.0.2", 1)), Ok(Pass::Mapped));
        let mut unmapped = grants.remove("c").unwrap();
        unmapped.sort();
        assert_eq!(
            unmapped,
            [
                "100.96.0.1".parse::<IpAddr>().unwrap(),
                "100.96.0.2".parse().unwrap()
            ]
        );
        assert_eq!(
            check(&grants, &tcp("100.96.0.2", 1)),
            Err(Drop::DestinationNotGranted)
        );
        for id in 0..1000 {
            grants.remove(&format!("host-{id}"));
        }
        assert!(grants.is_empty());
        assert!(grants.prefixes_v4.is_empty() && grants.networks.is_empty());
        // Freed slots are used again.
        grants.insert("d", filter("10.0.0.0/16", &[], &[], &[]), None);
        assert_eq!(grants.entries.len(), 2);
    }
}
