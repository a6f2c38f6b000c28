//! A minimal browser for the sign-in pages: HTTP/1.1 over a real socket, one request per
//! connection, a cookie jar (name → value, as `Set-Cookie` says), no redirects followed (the
//! tests look at each `Location`). Enough to drive the forms as a person's browser would, to
//! forge what an attacker's would, and to follow the portal's last redirect to a client's
//! loopback listener; and, given a CA to trust, to go through an identity provider's pages
//! over https. (The sign-in is also driven through real Chromium: `tests/`.)

use std::collections::BTreeMap;
use std::net::SocketAddr;

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// One answer.
#[derive(Debug, Clone)]
pub struct Page {
    pub status: u16,
    /// Header names lowercase, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Page {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn location(&self) -> &str {
        self.header("location")
            .unwrap_or_else(|| panic!("no Location: {self:?}"))
    }

    /// The value of the hidden `csrf` field of the page's form.
    pub fn csrf(&self) -> String {
        let marker = "name=\"csrf\" value=\"";
        let start = self
            .body
            .find(marker)
            .unwrap_or_else(|| panic!("no CSRF field: {}", self.body))
            + marker.len();
        let end = start + self.body[start..].find('"').expect("a closing quote");
        self.body[start..end].to_owned()
    }
}

#[derive(Clone)]
pub struct Browser {
    pub portal: SocketAddr,
    pub cookies: BTreeMap<String, String>,
    /// Whom https servers must prove to be (an IP address certificate under this CA).
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("portal", &self.portal)
            .field("cookies", &self.cookies)
            .finish_non_exhaustive()
    }
}

impl Browser {
    pub fn new(portal: SocketAddr) -> Browser {
        Browser {
            portal,
            cookies: BTreeMap::new(),
            tls: None,
        }
    }

    /// The same, trusting the CA certificate `ca_pem` (PEM) for https URLs.
    pub fn trusting(portal: SocketAddr, ca_pem: &str) -> Browser {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots
                .add(cert.expect("a PEM certificate"))
                .expect("a CA certificate");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Browser {
            tls: Some(Arc::new(config)),
            ..Browser::new(portal)
        }
    }

    /// Gets `path` from the portal.
    pub async fn get(&mut self, path: &str) -> Page {
        let to = Target {
            address: self.portal,
            secure: false,
        };
        self.request(to, "GET", path, None).await
    }

    /// Gets an absolute `http(s)://address/path` URL, such as the `Location` the portal sends
    /// to a client's loopback listener or to an identity provider.
    pub async fn visit(&mut self, url: &str) -> Page {
        let (to, path) = Target::of(url);
        self.request(to, "GET", &path, None).await
    }

    /// Posts a form to the portal, its fields URL-encoded.
    pub async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        let url = format!("http://{}{path}", self.portal);
        self.post_to(&url, fields).await
    }

    /// Posts a form to an absolute URL.
    pub async fn post_to(&mut self, url: &str, fields: &[(&str, &str)]) -> Page {
        let body = serde_urlencoded::to_string(fields).expect("a form");
        let (to, path) = Target::of(url);
        self.request(to, "POST", &path, Some(body)).await
    }

    /// Posts a form to the portal; what went wrong when no answer came (a portal killed on
    /// purpose, in a crash test), instead of a panic.
    pub async fn try_post(&mut self, path: &str, fields: &[(&str, &str)]) -> Result<Page, String> {
        let body = serde_urlencoded::to_string(fields).expect("a form");
        let to = Target {
            address: self.portal,
            secure: false,
        };
        self.try_request(to, "POST", path, Some(body)).await
    }

    async fn request(
        &mut self,
        to: Target,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Page {
        self.try_request(to, method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn try_request(
        &mut self,
        to: Target,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<Page, String> {
        let address = to.address;
        let tcp = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| format!("{address} does not accept: {e}"))?;
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
        if !self.cookies.is_empty() {
            let jar: Vec<String> = self
                .cookies
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect();
            head.push_str(&format!("Cookie: {}\r\n", jar.join("; ")));
        }
        let body = body.unwrap_or_default();
        if method == "POST" {
            head.push_str(&format!(
                "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        let request = format!("{head}{body}");
        let raw = if to.secure {
            let config = self.tls.clone().expect("a CA to trust for https");
            let name = rustls::pki_types::ServerName::IpAddress(address.ip().into());
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .unwrap_or_else(|e| panic!("TLS with {address}: {e}"));
            exchange(&mut tls, &request).await?
        } else {
            let mut tcp = tcp;
            exchange(&mut tcp, &request).await?
        };
        let text = String::from_utf8(raw).map_err(|_| "not a UTF-8 answer")?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or("an answer without a head and a body")?;
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or("an answer without a status line")?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        for (_, cookie) in headers.iter().filter(|(n, _)| n == "set-cookie") {
            let pair = cookie.split(';').next().unwrap_or_default();
            if let Some((name, value)) = pair.split_once('=') {
                if cookie.contains("Max-Age=0") {
                    self.cookies.remove(name);
                } else {
                    self.cookies.insert(name.to_owned(), value.to_owned());
                }
            }
        }
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
        Ok(Page {
            status,
            body: if chunked {
                dechunk(body)
            } else {
                body.to_owned()
            },
            headers,
        })
    }
}

/// Where a request goes.
#[derive(Debug, Clone, Copy)]
struct Target {
    address: SocketAddr,
    secure: bool,
}

impl Target {
    /// The target and path of an `http(s)://address/path` URL.
    fn of(url: &str) -> (Target, String) {
        let (secure, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            _ => panic!("not an http(s) URL: {url}"),
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let address: SocketAddr = authority
            .parse()
            .unwrap_or_else(|_| panic!("not an address: {authority}"));
        let path = if path.is_empty() { "/" } else { path };
        (Target { address, secure }, path.to_owned())
    }
}

/// Sends `request` and reads the answer to the end (a server that closes without TLS's
/// close_notify ends it too).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &str,
) -> Result<Vec<u8>, String> {
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("the request cannot be sent: {e}"))?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(error) => return Err(format!("the answer cannot be read: {error}")),
    }
    Ok(raw)
}

/// The chunks of a chunked body, joined.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n").expect("a chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
}
