//! Helpers shared by the integration tests; each test binary takes `mod support;` whole.

// Each test binary compiles every helper module but uses only some of their functions.
#[allow(dead_code)]
pub mod agent;
#[allow(dead_code)]
pub mod mmdb;
#[allow(dead_code)]
pub mod portal;
