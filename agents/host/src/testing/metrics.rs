//! The gateway's Prometheus metrics, read over plain HTTP.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::netns::Netns;
use super::{WAIT, wait_for_or};

/// One scrape of `/metrics`: series (with labels, as written) → value.
#[derive(Clone, Debug)]
pub struct Metrics(Vec<(String, u64)>);

impl Metrics {
    /// The series' value; fails when there is no such series.
    pub fn value(&self, series: &str) -> u64 {
        self.0
            .iter()
            .find(|(name, _)| name == series)
            .map(|(_, value)| *value)
            .unwrap_or_else(|| panic!("no `{series}` in the metrics: {:#?}", self.0))
    }

    /// `fz_gateway_dropped_packets_total` for `reason`.
    pub fn dropped(&self, reason: &str) -> u64 {
        self.value(&format!(
            "fz_gateway_dropped_packets_total{{reason=\"{reason}\"}}"
        ))
    }

    /// The series of a Prometheus text exposition (comments and lines without a whole-number
    /// value left out).
    pub fn parse(text: &str) -> Metrics {
        let series = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .filter_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect();
        Metrics(series)
    }
}

/// `GET /metrics` from `address`; run inside the gateway's namespace.
pub fn scrape(address: SocketAddr) -> std::io::Result<Metrics> {
    Ok(Metrics::parse(&http_get(address, "/metrics")?))
}

/// Waits until the metrics the gateway in `ns` serves at `address` satisfy `holds` and returns
/// them, failing after `patience` with the metrics last read. Between tries `alive(what)` runs,
/// as in [`super::wait_for`]. The gateway publishes its metrics about once a second.
pub fn wait_metrics(
    ns: &Netns,
    address: SocketAddr,
    what: &str,
    patience: Duration,
    alive: impl FnMut(&str),
    holds: impl Fn(&Metrics) -> bool,
) -> Metrics {
    let mut last = None;
    let found = wait_for_or(what, patience, alive, || {
        let metrics = ns.run(|| scrape(address)).ok()?;
        let found = holds(&metrics).then(|| metrics.clone());
        last = Some(metrics);
        found
    });
    found.unwrap_or_else(|| {
        panic!("waited {patience:?} for {what}; the metrics last said\n{last:#?}")
    })
}

/// `GET path` over plain HTTP/1.1; the body of a 200. Run inside a namespace.
pub fn http_get(to: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&to, WAIT)?;
    stream.set_read_timeout(Some(WAIT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {response:?}")))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("not 200: {head}")));
    }
    Ok(body.to_owned())
}
