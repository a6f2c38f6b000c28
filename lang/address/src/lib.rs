//! Resource addresses: DNS names and patterns, IP networks, `internet`; their precedence
//! and the index that answers "which resource serves this name or IP".
//!
//! The compiler uses it to check and index a policy tree's resources; the client agent uses
//! the same index, so that a name is served by the same resource in both (the precedence of
//! LANGUAGE.md: an exact name before `?`, before `*`, before `**`; the longest prefix).
//! Nothing here reads files or knows about rules.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An IP network: address and prefix length, host bits always clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

/// Why an IP or CIDR text is not a network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    #[error("`{0}` is not a valid IP address")]
    Address(String),
    #[error("`{text}` has a prefix length above {max}")]
    Prefix { text: String, max: u8 },
    #[error("`{text}` has host bits set")]
    HostBits { text: String, network: Network },
}

impl Network {
    pub fn host(addr: IpAddr) -> Self {
        Network {
            addr,
            prefix: max_prefix(addr),
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn is_host(&self) -> bool {
        self.prefix == max_prefix(self.addr)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask_v4(u32::from(ip), self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask_v6(u128::from(ip), self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }

    /// Whether `other` lies wholly inside `self`.
    pub fn covers(&self, other: &Network) -> bool {
        self.prefix <= other.prefix && self.contains(other.addr)
    }

    /// The first address after the network, if there is one: with the network's own address,
    /// the boundaries that split the address space into regions a condition treats alike.
    pub fn next_after(&self) -> Option<IpAddr> {
        match self.addr {
            IpAddr::V4(a) => {
                let size = 1u64 << (32 - u32::from(self.prefix));
                let next = u64::from(u32::from(a)) + size;
                u32::try_from(next).ok().map(|n| IpAddr::V4(n.into()))
            }
            IpAddr::V6(a) => {
                let host_bits = 128 - u32::from(self.prefix);
                let size = 1u128.checked_shl(host_bits)?;
                u128::from(a)
                    .checked_add(size)
                    .map(|n| IpAddr::V6(n.into()))
            }
        }
    }

    /// The network with a shorter prefix that contains this one.
    pub fn widened(&self, prefix: u8) -> Network {
        let prefix = prefix.min(self.prefix);
        Network {
            addr: Network::masked(self.addr, prefix),
            prefix,
        }
    }

    /// The same address with host bits cleared.
    fn masked(addr: IpAddr, prefix: u8) -> IpAddr {
        match addr {
            IpAddr::V4(a) => IpAddr::V4(mask_v4(u32::from(a), prefix).into()),
            IpAddr::V6(a) => IpAddr::V6(mask_v6(u128::from(a), prefix).into()),
        }
    }
}

/// The ranges `internet` never serves: what is not a public address. IPv4: "this network",
/// private (RFC 1918), shared (RFC 6598, where fz's own tunnel and mapped addresses live),
/// loopback, link-local, multicast, and the reserved range up to the broadcast address.
/// IPv6: unspecified, loopback, IPv4-mapped, NAT64's well-known and local-use prefixes and
/// 6to4 (all reach IPv4 addresses, private ones included), unique local, link-local,
/// multicast.
const NOT_PUBLIC: [Network; 18] = [
    v4(0, 0, 0, 0, 8),
    v4(10, 0, 0, 0, 8),
    v4(100, 64, 0, 0, 10),
    v4(127, 0, 0, 0, 8),
    v4(169, 254, 0, 0, 16),
    v4(172, 16, 0, 0, 12),
    v4(192, 168, 0, 0, 16),
    v4(224, 0, 0, 0, 4),
    v4(240, 0, 0, 0, 4),
    v6([0, 0, 0, 0, 0, 0, 0, 0], 128),
    v6([0, 0, 0, 0, 0, 0, 0, 1], 128),
    v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96),
    v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96),
    v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
    v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16),
    v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
];

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Network {
    Network {
        addr: IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d)),
        prefix,
    }
}

const fn v6(s: [u16; 8], prefix: u8) -> Network {
    Network {
        addr: IpAddr::V6(std::net::Ipv6Addr::new(
            s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
        )),
        prefix,
    }
}

/// Whether `ip` is a public address: one `internet` may serve.
pub fn is_public(ip: IpAddr) -> bool {
    !NOT_PUBLIC.iter().any(|n| n.contains(ip))
}

impl Network {
    /// Whether the network holds no public address at all, so that `internet` could never
    /// reach into it and a grant for `internet` need not carve it out.
    pub fn is_wholly_non_public(&self) -> bool {
        NOT_PUBLIC.iter().any(|n| n.covers(self))
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask_v4(bits: u32, prefix: u8) -> u32 {
    bits & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_v6(bits: u128, prefix: u8) -> u128 {
    bits & u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Network {
    type Err = NetworkError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| NetworkError::Address(addr_text.to_owned()))?;
        let max = max_prefix(addr);
        let Some(prefix_text) = prefix_text else {
            return Ok(Network::host(addr));
        };
        let prefix = prefix_text
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max && prefix_text.chars().all(|c| c.is_ascii_digit()))
            .ok_or_else(|| NetworkError::Prefix {
                text: text.to_owned(),
                max,
            })?;
        let network = Network {
            addr: Network::masked(addr, prefix),
            prefix,
        };
        if network.addr != addr {
            return Err(NetworkError::HostBits {
                text: text.to_owned(),
                network,
            });
        }
        Ok(network)
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_host() {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

impl Serialize for Network {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How general a name pattern is. Lower serves first: an exact name before `?`, before `*`,
/// before `**`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PatternKind {
    Exact,
    Character,
    Label,
    Labels,
}

/// A DNS name or pattern, lowercase, without a trailing dot; labels stored right to left.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NamePattern {
    text: String,
    /// Labels from the top-level domain down.
    labels: Vec<String>,
    kind: PatternKind,
}

/// Why a quoted address is not a valid DNS name or pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("`{name}` is not a valid DNS name: {reason}")]
    Invalid { name: String, reason: &'static str },
    #[error("`{name}` has a wildcard where none may stand: {reason}")]
    Wildcard { name: String, reason: &'static str },
}

impl NamePattern {
    pub fn parse(text: &str) -> Result<Self, NameError> {
        let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
        let invalid = |reason| NameError::Invalid {
            name: text.to_owned(),
            reason,
        };
        let wildcard = |reason| NameError::Wildcard {
            name: text.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("it is empty"));
        }
        if name.len() > 253 {
            return Err(invalid("it is longer than 253 characters"));
        }
        let labels: Vec<&str> = name.split('.').collect();
        if labels.len() < 2 {
            return Err(invalid(
                "it needs at least two labels, such as `host.example`",
            ));
        }
        let mut kind = PatternKind::Exact;
        let last = labels.len() - 1;
        for (i, label) in labels.iter().enumerate() {
            match *label {
                "" => return Err(invalid("it has an empty label")),
                "**" if i == 0 => kind = kind.max(PatternKind::Labels),
                "**" => return Err(wildcard("`**` may only stand as the first label")),
                "*" if i == last => return Err(wildcard("the last label must be written out")),
                "*" => kind = kind.max(PatternKind::Label),
                _ if label.contains('*') => {
                    return Err(wildcard(
                        "`*` must be a whole label; use `?` for one character",
                    ));
                }
                _ if label.contains('?') && i == last => {
                    return Err(wildcard("the last label must be written out"));
                }
                _ => {
                    if label.len() > 63 {
                        return Err(invalid("a label is longer than 63 characters"));
                    }
                    if label.starts_with('-') || label.ends_with('-') {
                        return Err(invalid("a label starts or ends with `-`"));
                    }
                    if !label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '?'))
                    {
                        return Err(invalid("labels hold only letters, digits, `-` and `_`"));
                    }
                    if label.contains('?') {
                        kind = kind.max(PatternKind::Character);
                    }
                }
            }
        }
        if labels
            .get(last)
            .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()))
        {
            return Err(invalid(
                "its last label is all digits (an IP address has four numbers up to 255)",
            ));
        }
        Ok(NamePattern {
            labels: labels.iter().rev().map(|l| (*l).to_owned()).collect(),
            text: name,
            kind,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn kind(&self) -> PatternKind {
        self.kind
    }

    /// Precedence key: lower serves first. Same kind: more labels, then more written-out
    /// characters, then fewer `*` labels, is more specific; where all of that ties
    /// (`*.a.corp` and `a.*.corp`), the pattern whose text sorts first (byte order) serves.
    ///
    /// INVARIANT: a pattern that lies inside another ranks before it (the property test in
    /// `tests/precedence.rs`), so the narrower resource serves its names. The text makes the
    /// order total over distinct patterns, and it is the pattern's own: whoever holds the
    /// addresses (the compiler, the portal, a client that knows no resource ids) ranks them
    /// alike.
    fn rank(&self) -> (PatternKind, Reverse<usize>, Reverse<usize>, usize, &str) {
        let literal = self
            .labels
            .iter()
            .map(|l| l.chars().filter(|c| !matches!(c, '*' | '?')).count())
            .sum();
        let stars = self.labels.iter().filter(|l| *l == "*").count();
        (
            self.kind,
            Reverse(self.labels.len()),
            Reverse(literal),
            stars,
            self.text.as_str(),
        )
    }

    /// Whether every name this pattern matches is matched by `other` too.
    pub fn lies_inside(&self, other: &NamePattern) -> bool {
        inside_labels(&self.labels, &other.labels)
    }

    /// Labels from the top-level domain down to, not including, the first wildcard: the key
    /// under which the index files this pattern.
    fn literal_suffix(&self) -> &[String] {
        let n = self
            .labels
            .iter()
            .take_while(|l| !l.contains(['*', '?']))
            .count();
        self.labels.get(..n).unwrap_or(&[])
    }

    /// Whether the (lowercase, dot-free-at-end) name matches.
    pub fn matches(&self, name: &str) -> bool {
        let labels: Vec<&str> = name.rsplit('.').collect();
        match_labels(&self.labels, &labels)
    }

    /// Whether some name matches both patterns.
    pub fn overlaps(&self, other: &NamePattern) -> bool {
        overlap_labels(&self.labels, &other.labels)
    }
}

/// Pattern labels (top down) against name labels (top down).
fn match_labels(pattern: &[String], name: &[&str]) -> bool {
    match (pattern.split_first(), name.split_first()) {
        (None, None) => true,
        // `**` is always the last label top down: it takes what is left, even nothing.
        (Some((p, _)), _) if p == "**" => true,
        (Some((p, prest)), Some((n, nrest))) => label_matches(p, n) && match_labels(prest, nrest),
        _ => false,
    }
}

fn label_matches(pattern: &str, label: &str) -> bool {
    if pattern == "*" {
        return !label.is_empty();
    }
    pattern.len() == label.len()
        && pattern
            .chars()
            .zip(label.chars())
            .all(|(p, l)| p == '?' || p == l)
}

fn overlap_labels(a: &[String], b: &[String]) -> bool {
    match (a.split_first(), b.split_first()) {
        (None, None) => true,
        (Some((x, _)), _) | (_, Some((x, _))) if x == "**" => true,
        (Some((x, arest)), Some((y, brest))) => {
            labels_overlap(x, y) && overlap_labels(arest, brest)
        }
        _ => false,
    }
}

fn labels_overlap(a: &str, b: &str) -> bool {
    if a == "*" || b == "*" {
        return true;
    }
    a.len() == b.len()
        && a.chars()
            .zip(b.chars())
            .all(|(x, y)| x == '?' || y == '?' || x == y)
}

/// Whether every name pattern labels `inner` (top down) match is matched by `outer`.
fn inside_labels(inner: &[String], outer: &[String]) -> bool {
    match (inner.split_first(), outer.split_first()) {
        (None, None) => true,
        // `**` takes whatever is left, even nothing: everything below is inside it.
        (_, Some((o, _))) if o == "**" => true,
        // Only a `**` holds what an inner `**` matches (any depth).
        (Some((i, _)), _) if i == "**" => false,
        (Some((i, irest)), Some((o, orest))) => label_inside(i, o) && inside_labels(irest, orest),
        _ => false,
    }
}

/// Whether every label `inner` matches, `outer` matches too.
fn label_inside(inner: &str, outer: &str) -> bool {
    if outer == "*" {
        return true;
    }
    inner != "*"
        && inner.len() == outer.len()
        && inner
            .chars()
            .zip(outer.chars())
            .all(|(i, o)| o == '?' || i == o)
}

/// A resource's address, validated.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    Internet,
    Name(NamePattern),
    Network(Network),
}

impl Address {
    /// Parses the text between the quotes of `address "..."`.
    pub fn parse_quoted(text: &str) -> Result<Address, AddressError> {
        let looks_like_ip = text.contains(':')
            || text.contains('/')
            || text
                .split('.')
                .next_back()
                .is_some_and(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_digit()));
        if looks_like_ip {
            return text
                .parse()
                .map(Address::Network)
                .map_err(AddressError::Network);
        }
        NamePattern::parse(text)
            .map(Address::Name)
            .map_err(AddressError::Name)
    }

    /// Whether some name or IP is served by both addresses. `internet` overlaps nothing: it
    /// is by definition what no other resource matches.
    pub fn overlaps(&self, other: &Address) -> bool {
        match (self, other) {
            (Address::Name(a), Address::Name(b)) => a.overlaps(b),
            (Address::Network(a), Address::Network(b)) => a.covers(b) || b.covers(a),
            _ => false,
        }
    }

    /// Of two overlapping addresses, whether `self` serves the shared names or IPs. For two
    /// distinct overlapping addresses exactly one wins over the other: patterns are ranked
    /// by [`NamePattern`]'s total precedence, and of two overlapping networks one holds the
    /// other, so the longer prefix wins.
    pub fn wins_over(&self, other: &Address) -> bool {
        match (self, other) {
            (Address::Name(a), Address::Name(b)) => a.rank() < b.rank(),
            (Address::Network(a), Address::Network(b)) => a.prefix > b.prefix,
            _ => false,
        }
    }

    /// Whether `self` lies inside `other`: every name or IP `self` matches, `other` matches
    /// too, and they are not the same address (an IP or CIDR inside a wider CIDR, a name or
    /// pattern inside a wider pattern). Nothing lies inside `internet`, which is by
    /// definition what no other resource matches, and `internet` lies inside nothing.
    ///
    /// INVARIANT: an address that lies inside another wins over it, so the inner resource
    /// serves its addresses (a property test holds [`Address::wins_over`] to this).
    pub fn lies_inside(&self, other: &Address) -> bool {
        self != other
            && match (self, other) {
                (Address::Name(a), Address::Name(b)) => a.lies_inside(b),
                (Address::Network(a), Address::Network(b)) => b.covers(a),
                _ => false,
            }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error(transparent)]
    Network(NetworkError),
    #[error(transparent)]
    Name(NameError),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Internet => f.write_str("internet"),
            Address::Name(n) => f.write_str(n.as_str()),
            Address::Network(n) => n.fmt(f),
        }
    }
}

impl Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// An address as the bundle and the portal write it: `internet`, or what `address "..."`
/// holds.
impl FromStr for Address {
    type Err = AddressError;
    fn from_str(text: &str) -> Result<Address, AddressError> {
        if text == "internet" {
            return Ok(Address::Internet);
        }
        Address::parse_quoted(text)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Every pair of overlapping addresses, as `(winner, loser)` positions in `addresses`:
/// each pair once, sorted. `internet` overlaps nothing. The cost grows with the pairs that
/// share a literal suffix or a network, not with the square of the addresses.
pub fn overlapping_pairs(addresses: &[&Address]) -> Vec<(usize, usize)> {
    let mut pairs = std::collections::BTreeSet::new();
    let mut push = |a: usize, b: usize| {
        let (Some(x), Some(y)) = (addresses.get(a), addresses.get(b)) else {
            return;
        };
        if a != b && x.overlaps(y) {
            pairs.insert(if x.wins_over(y) { (a, b) } else { (b, a) });
        }
    };

    // Names: a name both patterns match ends in both literal suffixes, so one suffix is a
    // suffix of the other; walk each pattern's suffixes and compare with the patterns filed
    // under each.
    let mut by_suffix: HashMap<&[String], Vec<usize>> = HashMap::new();
    let mut names: Vec<(usize, &[String])> = Vec::new();
    for (i, address) in addresses.iter().enumerate() {
        let Address::Name(pattern) = address else {
            continue;
        };
        let literal = pattern.literal_suffix();
        by_suffix.entry(literal).or_default().push(i);
        names.push((i, literal));
    }
    for (i, literal) in &names {
        for n in 0..=literal.len() {
            for j in by_suffix
                .get(literal.get(..n).unwrap_or(&[]))
                .into_iter()
                .flatten()
            {
                push(*i, *j);
            }
        }
    }

    // Networks: look each one up under every shorter prefix.
    let mut by_network: HashMap<Network, usize> = HashMap::new();
    for (i, address) in addresses.iter().enumerate() {
        if let Address::Network(n) = address {
            by_network.insert(*n, i);
        }
    }
    for (network, i) in &by_network {
        for prefix in 0..network.prefix() {
            if let Some(j) = by_network.get(&network.widened(prefix)) {
                push(*i, *j);
            }
        }
    }
    pairs.into_iter().collect()
}

/// Answers which resource serves a name or an IP, most specific first. Lookups cost a few
/// hash probes per label or prefix length, however many resources there are.
#[derive(Debug, Default)]
pub struct AddressIndex<Id> {
    exact: HashMap<String, Id>,
    /// Wildcard patterns filed under their literal suffix (labels joined top down).
    patterns: HashMap<String, Vec<(NamePattern, Id)>>,
    /// Networks by prefix length, longest first.
    networks: Vec<(u8, HashMap<IpAddr, Id>)>,
    internet: Option<Id>,
}

impl<Id: Copy + Ord> AddressIndex<Id> {
    pub fn new<'a>(addresses: impl IntoIterator<Item = (&'a Address, Id)>) -> Self {
        let mut index = AddressIndex {
            exact: HashMap::new(),
            patterns: HashMap::new(),
            networks: Vec::new(),
            internet: None,
        };
        let mut by_prefix: HashMap<u8, HashMap<IpAddr, Id>> = HashMap::new();
        for (address, id) in addresses {
            match address {
                Address::Internet => {
                    index.internet = Some(index.internet.map_or(id, |i: Id| i.min(id)))
                }
                Address::Name(p) if p.kind == PatternKind::Exact => {
                    index
                        .exact
                        .entry(p.text.clone())
                        .and_modify(|i| *i = (*i).min(id))
                        .or_insert(id);
                }
                Address::Name(p) => {
                    let key: Vec<&str> = p
                        .literal_suffix()
                        .iter()
                        .rev()
                        .map(String::as_str)
                        .collect();
                    index
                        .patterns
                        .entry(key.join("."))
                        .or_default()
                        .push((p.clone(), id));
                }
                Address::Network(n) => {
                    by_prefix
                        .entry(n.prefix)
                        .or_default()
                        .entry(n.addr)
                        .and_modify(|i| *i = (*i).min(id))
                        .or_insert(id);
                }
            }
        }
        for candidates in index.patterns.values_mut() {
            candidates.sort_by(|(a, ida), (b, idb)| a.rank().cmp(&b.rank()).then(ida.cmp(idb)));
        }
        index.networks = by_prefix.into_iter().collect();
        index.networks.sort_by_key(|(prefix, _)| Reverse(*prefix));
        index
    }

    /// The resource that serves a DNS name (any case, with or without a trailing dot).
    pub fn lookup_name(&self, name: &str) -> Option<Id> {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if let Some(id) = self.exact.get(&name) {
            return Some(*id);
        }
        let labels: Vec<&str> = name.rsplit('.').collect();
        let mut best: Option<(&NamePattern, Id)> = None;
        // Every suffix of the name, from the bare top-level domain to the whole name.
        for i in 0..labels.len() {
            let key: String = labels
                .get(..=i)
                .unwrap_or(&[])
                .iter()
                .rev()
                .copied()
                .collect::<Vec<_>>()
                .join(".");
            let Some(candidates) = self.patterns.get(&key) else {
                continue;
            };
            if let Some((pattern, id)) = candidates
                .iter()
                .find(|(p, _)| match_labels(&p.labels, &labels))
                && best.is_none_or(|(b, bid)| (pattern.rank(), *id) < (b.rank(), bid))
            {
                best = Some((pattern, *id));
            }
        }
        best.map(|(_, id)| id)
    }

    /// The resource that serves an IP: the longest prefix, else `internet` for a public
    /// address ([`is_public`]).
    pub fn lookup_ip(&self, ip: IpAddr) -> Option<Id> {
        self.networks
            .iter()
            .filter(|(prefix, _)| *prefix <= max_prefix(ip))
            .find_map(|(prefix, nets)| nets.get(&Network::masked(ip, *prefix)).copied())
            .or_else(|| self.internet.filter(|_| is_public(ip)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> NamePattern {
        NamePattern::parse(text).unwrap()
    }

    #[test]
    fn name_patterns_match_as_the_language_says() {
        let cases = [
            ("gitlab.company.com", "gitlab.company.com", true),
            ("gitlab.company.com", "GitLab.Company.com", false), // lookups lowercase first
            ("*.wiki.company.com", "a.wiki.company.com", true),
            ("*.wiki.company.com", "wiki.company.com", false),
            ("*.wiki.company.com", "a.b.wiki.company.com", false),
            ("**.wiki.company.com", "wiki.company.com", true),
            ("**.wiki.company.com", "a.b.wiki.company.com", true),
            ("**.wiki.company.com", "awiki.company.com", false),
            ("app?.company.com", "app1.company.com", true),
            ("app?.company.com", "app.company.com", false),
            ("app?.company.com", "app12.company.com", false),
        ];
        for (pattern, input, expected) in cases {
            assert_eq!(
                name(pattern).matches(input),
                expected,
                "{pattern} ~ {input}"
            );
        }
    }

    #[test]
    fn bad_names_and_wildcards_are_refused() {
        for bad in [
            "",
            "localhost",
            "a..b",
            "-a.com",
            "a_b!.com",
            "a.*",
            "a.**.com",
            "a*b.com",
            "x.c?m",
        ] {
            assert!(NamePattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn networks_parse_and_refuse_host_bits() {
        assert_eq!(
            "10.0.5.0/24".parse::<Network>().unwrap().to_string(),
            "10.0.5.0/24"
        );
        assert_eq!(
            "fd00:1::/64".parse::<Network>().unwrap().to_string(),
            "fd00:1::/64"
        );
        assert!(matches!(
            "10.0.5.1/24".parse::<Network>(),
            Err(NetworkError::HostBits { .. })
        ));
        assert!(matches!(
            "10.0.5.0/33".parse::<Network>(),
            Err(NetworkError::Prefix { .. })
        ));
        assert!(matches!(
            "10.0.0.256".parse::<Network>(),
            Err(NetworkError::Address(_))
        ));
        assert_eq!(
            "10.0.0.0/8".parse::<Network>().unwrap().next_after(),
            Some("11.0.0.0".parse().unwrap())
        );
        assert_eq!("0.0.0.0/0".parse::<Network>().unwrap().next_after(), None);
    }

    #[test]
    fn the_most_specific_resource_serves() {
        let addresses: Vec<Address> = [
            "gitlab.company.com",
            "**.company.com",
            "*.company.com",
            "app?.company.com",
            "**.wiki.company.com",
            "10.0.0.0/8",
            "10.0.5.0/24",
            "10.0.5.7",
        ]
        .iter()
        .map(|t| Address::parse_quoted(t).unwrap())
        .chain([Address::Internet])
        .collect();
        let index = AddressIndex::new(addresses.iter().zip(0u32..));
        let cases: [(&str, Option<u32>); 8] = [
            ("gitlab.company.com.", Some(0)),
            ("app1.company.com", Some(3)),
            ("other.company.com", Some(2)),
            ("a.b.company.com", Some(1)),
            ("x.wiki.company.com", Some(4)),
            ("wiki.company.com", Some(2)),
            ("company.com", Some(1)),
            ("example.org", None),
        ];
        for (input, expected) in cases {
            assert_eq!(index.lookup_name(input), expected, "{input}");
        }
        let ips: [(&str, u32); 4] = [
            ("10.0.5.7", 7),
            ("10.0.5.8", 6),
            ("10.1.0.1", 5),
            ("192.0.2.1", 8),
        ];
        for (input, expected) in ips {
            assert_eq!(
                index.lookup_ip(input.parse().unwrap()),
                Some(expected),
                "{input}"
            );
        }
        // `internet` serves public addresses only.
        for private in [
            "192.168.1.1",
            "172.16.0.5",
            "100.96.0.1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert_eq!(index.lookup_ip(private.parse().unwrap()), None, "{private}");
        }
    }

    #[test]
    fn ties_between_patterns_go_one_way() {
        // Byte order: `*` and `?` sort before letters and digits.
        for (a, b) in [
            ("*.a.corp", "a.*.corp"),
            ("?b.x", "b?.x"),
            ("?a.b.x", "a?.b.x"),
        ] {
            let (a, b) = (Address::Name(name(a)), Address::Name(name(b)));
            assert!(a.wins_over(&b), "{a} over {b}");
            assert!(!b.wins_over(&a), "{b} not over {a}");
        }
    }

    #[test]
    fn what_lies_inside_what() {
        let inside = [
            ("db.corp.example", "*.corp.example"),
            ("db.corp.example", "**.corp.example"),
            ("*.corp.example", "**.corp.example"),
            ("corp.example", "**.corp.example"),
            ("**.a.corp.example", "**.corp.example"),
            ("app1.corp.example", "app?.corp.example"),
            ("app?.corp.example", "*.corp.example"),
            ("10.0.5.0/24", "10.0.0.0/8"),
            ("10.0.5.10", "10.0.5.0/24"),
            ("fd00:1::5", "fd00:1::/64"),
        ];
        for (inner, outer) in inside {
            let (inner, outer) = (
                Address::parse_quoted(inner).unwrap(),
                Address::parse_quoted(outer).unwrap(),
            );
            assert!(inner.lies_inside(&outer), "{inner} inside {outer}");
            assert!(!outer.lies_inside(&inner), "{outer} not inside {inner}");
            assert!(inner.wins_over(&outer), "{inner} serves before {outer}");
        }
        let apart = [
            ("*.corp.example", "*.corp.example"),
            ("a.b.corp.example", "*.corp.example"),
            ("**.corp.example", "*.corp.example"),
            ("app?.corp.example", "app1.corp.example"),
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.0.5.0/24", "fd00::/8"),
        ];
        for (a, b) in apart {
            let (a, b) = (
                Address::parse_quoted(a).unwrap(),
                Address::parse_quoted(b).unwrap(),
            );
            assert!(!a.lies_inside(&b), "{a} not inside {b}");
        }
        let host = Address::parse_quoted("203.0.113.5").unwrap();
        assert!(!host.lies_inside(&Address::Internet));
        assert!(!Address::Internet.lies_inside(&host));
    }

    #[test]
    fn public_addresses() {
        for public in [
            "8.8.8.8",
            "192.0.2.1",
            "203.0.113.5",
            "2001:db8::1",
            "2606:4700::1111",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
        for not_public in [
            "0.1.2.3",
            "10.0.5.9",
            "100.64.0.2",
            "127.0.0.1",
            "169.254.1.1",
            "172.31.255.255",
            "192.168.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:8.8.8.8",
            "64:ff9b::a00:1",
            "64:ff9b:1::a00:1",
            "2002:a00:1::1",
            "fd00::1",
            "fe80::1",
            "ff02::1",
        ] {
            assert!(!is_public(not_public.parse().unwrap()), "{not_public}");
        }
        let private: Network = "10.0.0.0/8".parse().unwrap();
        assert!(private.is_wholly_non_public());
        let wide: Network = "96.0.0.0/3".parse().unwrap();
        assert!(!wide.is_wholly_non_public());
    }

    #[test]
    fn overlap_is_decided_on_labels() {
        let overlapping = [
            ("*.wiki.company.com", "**.company.com"),
            ("app?.company.com", "*.company.com"),
            ("app?.company.com", "apps.company.com"),
            ("a.*.com", "*.b.com"),
        ];
        for (a, b) in overlapping {
            assert!(name(a).overlaps(&name(b)), "{a} {b}");
            assert!(name(b).overlaps(&name(a)), "{b} {a}");
        }
        let disjoint = [
            ("*.wiki.company.com", "wiki.company.com"),
            ("app?.company.com", "app12.company.com"),
        ];
        for (a, b) in disjoint {
            assert!(!name(a).overlaps(&name(b)), "{a} {b}");
        }
    }
}
