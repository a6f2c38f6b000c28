//! Mapped addresses: each name of a DNS resource gets 4 IPv4 addresses from 100.96.0.0/11 and
//! 4 IPv6 addresses from fd00:2021:1111:8000::/107, handed out in order.
//!
//! INVARIANT: a name keeps its addresses for the life of the client, and an address is never
//! handed to another name: the gateway's NAT translates a mapped address to what *that* name
//! resolves to, so an address that changed hands would carry one resource's traffic to
//! another.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Addresses of each family per name.
pub const PER_FAMILY: u32 = 4;

const V4_BASE: u32 = u32::from_be_bytes([100, 96, 0, 0]);
const V6_BASE: u128 = 0xfd00_2021_1111_8000_0000_0000_0000_0000;
/// Both ranges hold 2^21 addresses; the first is left out (a network address in IPv4).
const RANGE: u32 = 1 << 21;

/// A name's mapped addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapped {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

impl Mapped {
    /// All of them, IPv4 first, as a grant request names them.
    pub fn all(&self) -> Vec<IpAddr> {
        self.v4
            .iter()
            .copied()
            .map(IpAddr::V4)
            .chain(self.v6.iter().copied().map(IpAddr::V6))
            .collect()
    }
}

#[derive(Debug, Default)]
pub struct Allocator {
    /// How many names have addresses; name `n` has offsets `1 + 4n ..= 4 + 4n`.
    names: u32,
    by_name: HashMap<String, Mapped>,
    by_address: HashMap<IpAddr, String>,
}

impl Allocator {
    /// The name's addresses, handed out now if it has none; `None` when the ranges are used
    /// up (half a million names).
    pub fn for_name(&mut self, name: &str) -> Option<&Mapped> {
        if !self.by_name.contains_key(name) {
            let first = 1 + self.names.checked_mul(PER_FAMILY)?;
            if first + PER_FAMILY > RANGE {
                return None;
            }
            let offsets = first..first + PER_FAMILY;
            let mapped = Mapped {
                v4: offsets
                    .clone()
                    .map(|o| Ipv4Addr::from(V4_BASE + o))
                    .collect(),
                v6: offsets
                    .map(|o| Ipv6Addr::from(V6_BASE + u128::from(o)))
                    .collect(),
            };
            for address in mapped.all() {
                self.by_address.insert(address, name.to_owned());
            }
            self.by_name.insert(name.to_owned(), mapped);
            self.names += 1;
        }
        self.by_name.get(name)
    }

    /// The name a mapped address stands for.
    pub fn name_of(&self, address: IpAddr) -> Option<&str> {
        self.by_address.get(&address).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_their_addresses_and_never_share_them() {
        let mut allocator = Allocator::default();
        let gitlab = allocator.for_name("gitlab.company.com").unwrap().clone();
        assert_eq!(
            gitlab.all(),
            [
                "100.96.0.1",
                "100.96.0.2",
                "100.96.0.3",
                "100.96.0.4",
                "fd00:2021:1111:8000::1",
                "fd00:2021:1111:8000::2",
                "fd00:2021:1111:8000::3",
                "fd00:2021:1111:8000::4",
            ]
            .map(|ip| ip.parse::<IpAddr>().unwrap())
        );
        let jenkins = allocator.for_name("jenkins.company.com").unwrap().clone();
        assert_eq!(jenkins.v4[0], Ipv4Addr::new(100, 96, 0, 5));
        assert_eq!(allocator.for_name("gitlab.company.com"), Some(&gitlab));
        for address in gitlab.all() {
            assert!(fz_proto::is_mapped_address(address));
            assert_eq!(allocator.name_of(address), Some("gitlab.company.com"));
        }
        assert_eq!(allocator.name_of("100.96.0.99".parse().unwrap()), None);
    }

    #[test]
    fn the_ranges_run_out_instead_of_wrapping() {
        let mut allocator = Allocator {
            names: RANGE / PER_FAMILY - 1,
            ..Allocator::default()
        };
        // The last whole block would end at offset 2^21, which is outside the range.
        assert_eq!(allocator.for_name("one-too-many.example"), None);
        allocator.names -= 1;
        let last = allocator.for_name("last.example").unwrap().clone();
        assert_eq!(last.v4[3], Ipv4Addr::new(100, 127, 255, 252));
        assert!(last.all().into_iter().all(fz_proto::is_mapped_address));
    }
}
