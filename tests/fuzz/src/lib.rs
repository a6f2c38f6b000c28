//! Fuzz targets for fz's trust boundaries: each a plain function of the fuzzer's bytes that
//! drives one boundary the way its driver does and checks what must hold whatever the input
//! (no panic, and each target's own oracles below). `fuzz_targets/` wraps each in libFuzzer's
//! `fuzz_target!` (feature `libfuzzer`, built by `run.sh` with coverage instrumentation);
//! `tests/replay.rs` feeds every committed corpus and regression input to the same functions
//! in an ordinary `cargo test`.
//!
//! It tests and builds nothing of the product: no target reaches into a crate's private
//! state, and the only keys are the fixed ones in [`fixtures`].
//!
//! Targets ([`TARGETS`]):
//! - `proto_decode`: bytes as each of the four control messages ([`proto`]);
//! - `grant`: bytes as a `SignedGrant`, verified and handed to a gateway core ([`grant`]);
//! - `grant_gateway`: grants with structured random contents, signed so they verify, then
//!   packets, time and portal messages, against a gateway core ([`grant`], [`sim`]);
//! - `dns_stub`: queries and the portal's answers against the client's DNS stub ([`dns`]);
//! - `packet`: the packet parser, filters, NAT and ICMP errors on raw and built packets
//!   ([`packet`]);
//! - `gateway_path`: packets through real WireGuard tunnels into and out of a gateway core
//!   holding fixed grants ([`sim`]);
//! - `fz_file`, `cedar_file`: a policy file beside fixed declarations, through the front end
//!   and `fz_compiler::check` ([`policy`]).

pub mod dns;
pub mod fixtures;
pub mod grant;
pub mod packet;
pub mod policy;
pub mod proto;
pub mod sim;

mod pick;

/// A target's entry point: the fuzzer's bytes in, a panic for a finding.
pub type Target = fn(&[u8]);

/// Every target: its name (that of its binary and of its directories under `corpus/` and
/// `regressions/`) and its entry point.
pub const TARGETS: &[(&str, Target)] = &[
    ("proto_decode", proto::proto_decode),
    ("grant", grant::grant),
    ("grant_gateway", grant::grant_gateway),
    ("dns_stub", dns::dns_stub),
    ("packet", packet::packet),
    ("gateway_path", sim::gateway_path),
    ("fz_file", policy::fz_file),
    ("cedar_file", policy::cedar_file),
];
