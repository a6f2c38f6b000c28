//! Helpers shared by the integration tests; each test binary takes `mod support;` whole. The
//! test agents (clients and gateways speaking the portal's WebSocket protocol) are
//! `fz_host::testing::agents`, which the end-to-end harness uses too.

// Each test binary compiles every helper module but uses only some of their functions.
#[allow(dead_code)]
pub mod backends;
#[allow(dead_code)]
pub mod mail;
#[allow(dead_code)]
pub mod mmdb;
#[allow(dead_code)]
pub mod portal;
