//! A minimal HTTP/1.1 client for the web examples and tests (one request per connection), so
//! they need no HTTP client dependency. Not for production use.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// A response: status, headers (names lowercase) and body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The node that served the request (`x-served-by`), or `-`.
    pub fn served_by(&self) -> &str {
        self.header(crate::web_service::SERVED_BY).unwrap_or("-")
    }

    /// The causal token the response carries (`X-Read-After`).
    pub fn token(&self) -> Option<&str> {
        self.header(pg_routing::axum::TOKEN_HEADER)
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A request to a server.
#[derive(Debug, Clone)]
pub struct Client {
    server: SocketAddr,
    /// The local address to connect from (`127.0.0.2` plays a client that is not the trusted
    /// proxy at `127.0.0.1`; all of `127.0.0.0/8` is loopback on Linux).
    from: Option<IpAddr>,
}

impl Client {
    /// A client of `server`.
    pub fn new(server: SocketAddr) -> Self {
        Client { server, from: None }
    }

    /// Connects from local address `ip`.
    pub fn from_ip(mut self, ip: IpAddr) -> Self {
        self.from = Some(ip);
        self
    }

    /// Sends one request; `body`, if any, as JSON.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> std::io::Result<Reply> {
        let socket = if self.server.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = self.from {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let mut stream = socket.connect(self.server).await?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n",
            self.server
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() {
            head.push_str("content-type: application/json\r\n");
        }
        head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse(&raw)
    }
}

fn parse(raw: &[u8]) -> std::io::Result<Reply> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let body = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        unchunk(body)
    } else {
        body.to_vec()
    };
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Decodes a chunked body (`size CRLF data CRLF ... 0 CRLF CRLF`).
fn unchunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&rest[..eol]).unwrap_or_default();
        let size = size.split(';').next().unwrap_or_default().trim();
        let Ok(n) = usize::from_str_radix(size, 16) else {
            break;
        };
        let data = &rest[eol + 2..];
        if n == 0 || data.len() < n {
            break;
        }
        out.extend_from_slice(&data[..n]);
        rest = data[n..].strip_prefix(b"\r\n").unwrap_or(&data[n..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain =
            parse(b"HTTP/1.1 201 Created\r\nX-Served-By: pg0\r\ncontent-length: 2\r\n\r\n{}")
                .expect("plain");
        assert_eq!(
            (plain.status, plain.served_by(), plain.body.as_str()),
            (201, "pg0", "{}")
        );
        let chunked = parse(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nab\xc3\r\n2\r\n\xa9d\r\n0\r\n\r\n",
        )
        .expect("chunked");
        assert_eq!(chunked.body, "ab\u{e9}d");
    }
}
