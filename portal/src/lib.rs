//! The fz portal: where policy meets live connections. It loads each account's decision table
//! (`policy`), keeps accounts, tokens, devices, gateways, grants and the flow log in SQLite
//! (`store`), signs grants with its own key (`keys`), and serves HTTP and the agents'
//! WebSockets (`http`).
//!
//! It does not parse policy (`fz-compiler` does) nor define the wire format (`fz-proto`
//! does). The binary `fz-portal` (`src/bin/fz-portal`) runs the service and the admin
//! commands over this library.
//!
//! Entry points: [`config::Config`], [`http::router`] over an [`http::AppState`].

pub mod admission;
pub mod agents;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod credential;
pub mod data_dir;
pub mod geo;
pub mod http;
pub mod keys;
pub mod limits;
pub mod listener;
pub mod mail;
pub mod metrics;
pub mod policy;
pub mod random;
pub mod registry;
pub mod relay;
pub mod server;
pub mod sign_in;
pub mod store;
pub mod tls;
pub mod writer;
