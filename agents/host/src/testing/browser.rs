//! A minimal browser for the sign-in pages: HTTP/1.1 over a real socket, one request per
//! connection, a cookie jar (name → value, as `Set-Cookie` says), no redirects followed (the
//! tests look at each `Location`). Enough to drive the forms as a person's browser would, to
//! forge what an attacker's would, and to follow the portal's last redirect to a client's
//! loopback listener. (The sign-in is also driven through real Chromium: `tests/`.)

use std::collections::BTreeMap;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

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

#[derive(Debug, Clone)]
pub struct Browser {
    pub portal: SocketAddr,
    pub cookies: BTreeMap<String, String>,
}

impl Browser {
    pub fn new(portal: SocketAddr) -> Browser {
        Browser {
            portal,
            cookies: BTreeMap::new(),
        }
    }

    /// Gets `path` from the portal.
    pub async fn get(&mut self, path: &str) -> Page {
        self.request(self.portal, "GET", path, None).await
    }

    /// Gets an absolute `http://address/path` URL, such as the `Location` the portal sends to
    /// a client's loopback listener.
    pub async fn visit(&mut self, url: &str) -> Page {
        let rest = url
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("not an http URL: {url}"));
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let address: SocketAddr = authority
            .parse()
            .unwrap_or_else(|_| panic!("not an address: {authority}"));
        self.request(
            address,
            "GET",
            if path.is_empty() { "/" } else { path },
            None,
        )
        .await
    }

    /// Posts a form, its fields URL-encoded.
    pub async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        let body = serde_urlencoded::to_string(fields).expect("a form");
        self.request(self.portal, "POST", path, Some(body)).await
    }

    async fn request(
        &mut self,
        to: SocketAddr,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Page {
        let mut stream = tokio::net::TcpStream::connect(to)
            .await
            .unwrap_or_else(|e| panic!("{to} does not accept: {e}"));
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n");
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
        stream
            .write_all(format!("{head}{body}").as_bytes())
            .await
            .expect("the request is sent");
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .expect("the answer is read");
        let text = String::from_utf8(raw).expect("a UTF-8 answer");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("a status line");
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
        Page {
            status,
            body: if chunked {
                dechunk(body)
            } else {
                body.to_owned()
            },
            headers,
        }
    }
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
