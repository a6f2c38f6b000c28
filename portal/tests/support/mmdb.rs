//! A MaxMind DB writer for tests: networks and their records in, the bytes of a valid MaxMind DB
//! 2.0 file out (https://maxmind.github.io/MaxMind-DB/), so tests need no real GeoIP file.
//!
//! It writes what MaxMind's own writer does for an `ip_version` 6 database, minus the aliases:
//! an IPv6 search tree (records of 24, 28 or 32 bits) in which IPv4 networks sit as-is under
//! `::/96`, then the 16 zero bytes that separate the tree from the data section, then one
//! encoded value per distinct record, then `\xAB\xCD\xEFMaxMind.com` and the metadata map. It
//! does not alias `::ffff:0:0/96` or `2002::/16` to the IPv4 subtree, so readers must map
//! IPv4-mapped addresses themselves. A more specific network wins over one containing it,
//! whatever the order of insertion. Mistakes in the test's own input panic.

use std::collections::HashMap;
use std::net::IpAddr;

/// The database type written unless the test picks another.
pub const DATABASE_TYPE: &str = "fz-Test-Country";
/// The build time written into every database (fixed, so files are reproducible).
pub const BUILD_EPOCH: u64 = 1_750_000_000;

/// A value of the data section: the subset of the format's types that tests need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    String(String),
    Uint16(u16),
    Uint32(u32),
    Uint64(u64),
    Map(Vec<(String, Value)>),
    Array(Vec<Value>),
}

impl Value {
    pub fn string(text: &str) -> Value {
        Value::String(text.to_owned())
    }

    pub fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
        Value::Map(
            entries
                .into_iter()
                .map(|(key, value)| (key.to_owned(), value))
                .collect(),
        )
    }
}

/// `{"country": {"iso_code": code}}`: the record of a GeoIP2-Country database, trimmed.
pub fn country(code: &str) -> Value {
    Value::map([("country", Value::map([("iso_code", Value::string(code))]))])
}

/// A country database (24-bit records, type [`DATABASE_TYPE`]) mapping each CIDR to its
/// country code.
pub fn country_db(networks: &[(&str, &str)]) -> Vec<u8> {
    networks
        .iter()
        .fold(MmdbWriter::new(), |writer, (cidr, code)| {
            writer.insert(cidr, country(code))
        })
        .build()
}

/// A database under construction.
#[derive(Debug, Clone)]
pub struct MmdbWriter {
    record_size: u16,
    database_type: String,
    /// Network address in the IPv6 space, prefix length there, record.
    networks: Vec<(u128, u8, Value)>,
}

impl Default for MmdbWriter {
    fn default() -> Self {
        MmdbWriter {
            record_size: 24,
            database_type: DATABASE_TYPE.to_owned(),
            networks: Vec::new(),
        }
    }
}

impl MmdbWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bits per search-tree record: 24, 28 or 32.
    pub fn record_size(mut self, bits: u16) -> Self {
        assert!(
            matches!(bits, 24 | 28 | 32),
            "record size {bits} is not 24, 28 or 32"
        );
        self.record_size = bits;
        self
    }

    pub fn database_type(mut self, database_type: &str) -> Self {
        database_type.clone_into(&mut self.database_type);
        self
    }

    /// Adds `cidr` (`198.51.100.0/24`, `2001:db8::/32`; host bits must be zero) with `value`.
    /// The same network given twice keeps the later value.
    pub fn insert(mut self, cidr: &str, value: Value) -> Self {
        let (address, prefix) = parse_cidr(cidr);
        self.networks.push((address, prefix, value));
        self
    }

    /// The file's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut data = DataSection::default();
        let mut tree = Tree::default();
        // Containing networks first, so a more specific network splits their leaf and wins.
        let mut networks: Vec<_> = self.networks.iter().collect();
        networks.sort_by_key(|(_, prefix, _)| *prefix);
        for (address, prefix, value) in networks {
            tree.insert(*address, *prefix, data.add(value));
        }

        let node_count = tree.nodes.len();
        let record_value = |record: Record| -> u32 {
            let value = match record {
                Record::Node(node) => node,
                Record::Empty => node_count,
                Record::Data(index) => node_count + 16 + data.offsets[index],
            };
            assert!(
                (value as u64) < 1 << self.record_size,
                "{node_count} nodes and {} data bytes do not fit records of {} bits",
                data.bytes.len(),
                self.record_size
            );
            value as u32
        };

        let mut out = Vec::new();
        for [left, right] in &tree.nodes {
            let (left, right) = (record_value(*left), record_value(*right));
            let (l, r) = (left.to_be_bytes(), right.to_be_bytes());
            match self.record_size {
                24 => {
                    out.extend_from_slice(&l[1..]);
                    out.extend_from_slice(&r[1..]);
                }
                // The high nibble of each record shares the middle byte, left's first.
                28 => {
                    out.extend_from_slice(&l[1..]);
                    out.push((l[0] << 4) | (r[0] & 0x0F));
                    out.extend_from_slice(&r[1..]);
                }
                _ => {
                    out.extend_from_slice(&l);
                    out.extend_from_slice(&r);
                }
            }
        }
        out.extend_from_slice(&[0; 16]);
        out.extend_from_slice(&data.bytes);
        out.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
        let node_count = u32::try_from(node_count).unwrap_or(u32::MAX);
        encode(&self.metadata(node_count), &mut out);
        out
    }

    fn metadata(&self, node_count: u32) -> Value {
        Value::map([
            ("binary_format_major_version", Value::Uint16(2)),
            ("binary_format_minor_version", Value::Uint16(0)),
            ("build_epoch", Value::Uint64(BUILD_EPOCH)),
            ("database_type", Value::string(&self.database_type)),
            (
                "description",
                Value::map([("en", Value::string("fz test database"))]),
            ),
            ("ip_version", Value::Uint16(6)),
            ("languages", Value::Array(vec![Value::string("en")])),
            ("node_count", Value::Uint32(node_count)),
            ("record_size", Value::Uint16(self.record_size)),
        ])
    }
}

/// `cidr` as an address in the IPv6 space and a prefix length there; IPv4 goes under `::/96`.
fn parse_cidr(cidr: &str) -> (u128, u8) {
    let Some((address, prefix)) = cidr.split_once('/') else {
        panic!("`{cidr}` is not a CIDR");
    };
    let (Ok(address), Ok(prefix)) = (address.parse::<IpAddr>(), prefix.parse::<u8>()) else {
        panic!("`{cidr}` is not a CIDR");
    };
    let (address, prefix) = match address {
        IpAddr::V4(v4) => {
            assert!(prefix <= 32, "`{cidr}`: prefix longer than 32");
            (u128::from(u32::from(v4)), prefix + 96)
        }
        IpAddr::V6(v6) => {
            assert!(prefix <= 128, "`{cidr}`: prefix longer than 128");
            (u128::from(v6), prefix)
        }
    };
    // The root is a node, never a record: `::/0` has nowhere to go.
    assert!(prefix > 0, "`{cidr}` covers the whole IPv6 space");
    assert!(
        address.checked_shl(u32::from(prefix)).unwrap_or(0) == 0,
        "`{cidr}` has host bits set"
    );
    (address, prefix)
}

/// What one record of a node points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record {
    Empty,
    Node(usize),
    /// Index into `DataSection::offsets`.
    Data(usize),
}

/// A binary trie over the 128 bits of an IPv6 address; node 0 is the root.
#[derive(Debug)]
struct Tree {
    nodes: Vec<[Record; 2]>,
}

impl Default for Tree {
    fn default() -> Self {
        Tree {
            nodes: vec![[Record::Empty; 2]],
        }
    }
}

impl Tree {
    /// Points the network's record at `data`. Networks must come shortest prefix first: a
    /// later, longer one splits the leaf it lands in, copying its data to the other half.
    fn insert(&mut self, address: u128, prefix: u8, data: usize) {
        let mut node = 0;
        for depth in 0..prefix {
            let bit = usize::from((address >> (127 - depth)) & 1 == 1);
            if depth + 1 == prefix {
                self.nodes[node][bit] = Record::Data(data);
                return;
            }
            node = match self.nodes[node][bit] {
                Record::Node(child) => child,
                leaf => {
                    self.nodes.push([leaf; 2]);
                    let child = self.nodes.len() - 1;
                    self.nodes[node][bit] = Record::Node(child);
                    child
                }
            };
        }
    }
}

/// Encoded values, each distinct value once.
#[derive(Debug, Default)]
struct DataSection {
    bytes: Vec<u8>,
    /// Offset of each added value in `bytes`, by index.
    offsets: Vec<usize>,
    seen: HashMap<Vec<u8>, usize>,
}

impl DataSection {
    /// Adds `value` and returns its index.
    fn add(&mut self, value: &Value) -> usize {
        let mut encoded = Vec::new();
        encode(value, &mut encoded);
        let offset = *self.seen.entry(encoded).or_insert_with_key(|encoded| {
            let offset = self.bytes.len();
            self.bytes.extend_from_slice(encoded);
            offset
        });
        self.offsets.push(offset);
        self.offsets.len() - 1
    }
}

const TYPE_STRING: u8 = 2;
const TYPE_UINT16: u8 = 5;
const TYPE_UINT32: u8 = 6;
const TYPE_MAP: u8 = 7;
const TYPE_UINT64: u8 = 9;
const TYPE_ARRAY: u8 = 11;

fn encode(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::String(text) => {
            control(TYPE_STRING, text.len(), out);
            out.extend_from_slice(text.as_bytes());
        }
        Value::Uint16(n) => unsigned(TYPE_UINT16, u64::from(*n), out),
        Value::Uint32(n) => unsigned(TYPE_UINT32, u64::from(*n), out),
        Value::Uint64(n) => unsigned(TYPE_UINT64, *n, out),
        Value::Map(entries) => {
            control(TYPE_MAP, entries.len(), out);
            for (key, value) in entries {
                encode(&Value::String(key.clone()), out);
                encode(value, out);
            }
        }
        Value::Array(items) => {
            control(TYPE_ARRAY, items.len(), out);
            for item in items {
                encode(item, out);
            }
        }
    }
}

/// An unsigned integer in as few big-endian bytes as it needs (zero in none).
fn unsigned(type_number: u8, n: u64, out: &mut Vec<u8>) {
    let bytes = n.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    control(type_number, bytes.len() - skip, out);
    out.extend_from_slice(&bytes[skip..]);
}

/// The control byte (type in the top three bits, or 0 and an extended-type byte for types above
/// 7), then the size: below 29 in the low five bits, else 29, 30 or 31 there and one, two or
/// three bytes of size minus 29, 285 or 65,821.
fn control(type_number: u8, size: usize, out: &mut Vec<u8>) {
    let (first, extended) = if type_number <= 7 {
        (type_number << 5, None)
    } else {
        (0, Some(type_number - 7))
    };
    let (size_bits, size_bytes): (u8, &[u8]) = match size {
        0..29 => (size as u8, &[]),
        29..285 => (29, &[(size - 29) as u8]),
        285..65_821 => (30, &((size - 285) as u16).to_be_bytes()),
        65_821..16_843_036 => (31, &((size - 65_821) as u32).to_be_bytes()[1..]),
        _ => panic!("a value of size {size} does not fit the format"),
    };
    out.push(first | size_bits);
    out.extend(extended);
    out.extend_from_slice(size_bytes);
}
