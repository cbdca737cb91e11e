//! A [`Discovery`] source reading Patroni's REST API (`GET /cluster`), with the `patroni`
//! feature.
//!
//! Every Patroni agent answers `/cluster` with the whole cluster as its DCS shows it: each
//! member's name, host, port, role, state, lag and tags. [`PatroniDiscovery`] asks the
//! endpoints it was given in turn until one answers, and turns each member into a
//! [`NodeConfig`] from a [`PatroniTemplate`] (the roles and passwords to log in with, the
//! database). A member tagged `noloadbalance` is added with [`NodeConfig::no_reads`]: it may
//! become the writer but never serves reads. Patroni's roles only set the role hint (its
//! leader as a writer candidate); which node is the writer is decided by the router's probes.
//!
//! The HTTP client is a minimal HTTP/1.1 `GET` over plain TCP (Patroni's REST API is HTTP by
//! default); endpoints behind TLS (`restapi.certfile`) are not supported yet.

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::discovery::{Discovery, DiscoveryError, Member};
use crate::{ConnString, NodeConfig};

/// The largest `/cluster` answer read (a cluster of hundreds of members fits easily).
const MAX_BODY: usize = 4 << 20;

/// How the router logs in to a discovered member: `postgres://user:password@host:port/dbname`,
/// with optional read-only and monitoring roles (see [`NodeConfig::reader_url`],
/// [`NodeConfig::monitor_url`]) and extra connection parameters. Passwords never appear in its
/// `Debug` output, nor in any log or error.
#[derive(Clone)]
pub struct PatroniTemplate {
    user: String,
    password: String,
    dbname: String,
    reader: Option<(String, String)>,
    monitor: Option<(String, String)>,
    params: Vec<(String, String)>,
}

impl std::fmt::Debug for PatroniTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatroniTemplate")
            .field("user", &self.user)
            .field("password", &"***")
            .field("dbname", &self.dbname)
            .field("reader", &self.reader.as_ref().map(|(u, _)| u))
            .field("monitor", &self.monitor.as_ref().map(|(u, _)| u))
            .field("params", &self.params)
            .finish()
    }
}

impl PatroniTemplate {
    /// Writes (and, without [`PatroniTemplate::reader`], reads and probes) log in as `user`.
    pub fn new(
        user: impl Into<String>,
        password: impl Into<String>,
        dbname: impl Into<String>,
    ) -> Self {
        PatroniTemplate {
            user: user.into(),
            password: password.into(),
            dbname: dbname.into(),
            reader: None,
            monitor: None,
            params: Vec::new(),
        }
    }

    /// Reads log in as this role (one that may only read).
    pub fn reader(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.reader = Some((user.into(), password.into()));
        self
    }

    /// Probes log in as this role (a `pg_monitor` member).
    pub fn monitor(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.monitor = Some((user.into(), password.into()));
        self
    }

    /// Adds a connection parameter (`sslmode=require`, `connect_timeout=2`, ...).
    pub fn param(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.push((key.into(), value.into()));
        self
    }

    fn url(&self, (user, password): (&str, &str), host: &str, port: u16) -> ConnString {
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let mut url = format!(
            "postgres://{}:{}@{host}:{port}/{}",
            encode(user),
            encode(password),
            encode(&self.dbname)
        );
        for (i, (k, v)) in self.params.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&encode(k));
            url.push('=');
            url.push_str(&encode(v));
        }
        ConnString::from(url)
    }

    /// The node for member `name` at `host:port`.
    pub fn node(&self, name: &str, host: &str, port: u16, leader: bool) -> NodeConfig {
        let url = self.url((&self.user, &self.password), host, port);
        let mut node = if leader {
            NodeConfig::writer(name, url)
        } else {
            NodeConfig::replica(name, url)
        };
        if let Some((u, p)) = &self.reader {
            node = node.reader_url(self.url((u, p), host, port));
        }
        if let Some((u, p)) = &self.monitor {
            node = node.monitor_url(self.url((u, p), host, port));
        }
        node
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A Patroni REST endpoint, `host:port` (or `http://host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    host: String,
    port: u16,
}

impl Endpoint {
    fn parse(text: &str) -> Result<Self, DiscoveryError> {
        let bad = |why: &str| DiscoveryError::Invalid(format!("endpoint {text:?}: {why}"));
        if text.starts_with("https://") {
            return Err(bad("HTTPS is not supported"));
        }
        let rest = text.strip_prefix("http://").unwrap_or(text);
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| bad("expected host:port"))?;
        let port = port.parse().map_err(|_| bad("bad port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        Ok(Endpoint {
            host: host.to_string(),
            port,
        })
    }
}

/// Discovers members from Patroni's `GET /cluster`.
#[derive(Debug, Clone)]
pub struct PatroniDiscovery {
    endpoints: Vec<Endpoint>,
    template: PatroniTemplate,
    request_timeout: Duration,
}

impl PatroniDiscovery {
    /// Asks these REST endpoints (`host:port` or `http://host:port`, any Patroni agent of the
    /// cluster), in order, until one answers. Fails with [`DiscoveryError::Invalid`] for an
    /// endpoint that cannot be parsed, an HTTPS one, or none at all.
    pub fn new<I, S>(endpoints: I, template: PatroniTemplate) -> Result<Self, DiscoveryError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let endpoints = endpoints
            .into_iter()
            .map(|e| Endpoint::parse(e.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(DiscoveryError::Invalid("no Patroni endpoint given".into()));
        }
        Ok(PatroniDiscovery {
            endpoints,
            template,
            request_timeout: Duration::from_millis(300),
        })
    }

    /// Bound on one endpoint's answer (default 300 ms); the discoverer's timeout bounds the
    /// whole poll.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    async fn ask(&self, e: &Endpoint) -> Result<Vec<Member>, DiscoveryError> {
        let body = tokio::time::timeout(self.request_timeout, get(e, "/cluster"))
            .await
            .map_err(|_| DiscoveryError::Timeout(self.request_timeout))??;
        parse_cluster(&body, &self.template)
    }
}

#[async_trait::async_trait]
impl Discovery for PatroniDiscovery {
    fn name(&self) -> &str {
        "patroni"
    }

    async fn members(&self) -> Result<Vec<Member>, DiscoveryError> {
        let mut errors = Vec::new();
        for e in &self.endpoints {
            match self.ask(e).await {
                Ok(members) => return Ok(members),
                Err(err) => errors.push(format!("{}:{}: {err}", e.host, e.port)),
            }
        }
        Err(DiscoveryError::Unavailable(errors.join("; ")))
    }
}

/// One `/cluster` member, as Patroni 2.x/3.x write it.
#[derive(Debug, serde::Deserialize)]
struct RawMember {
    name: String,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    /// Bytes, or `"unknown"`.
    #[serde(default)]
    lag: Option<serde_json::Value>,
    #[serde(default)]
    tags: HashMap<String, serde_json::Value>,
}

#[derive(Debug, serde::Deserialize)]
struct RawCluster {
    members: Vec<RawMember>,
}

fn tag(tags: &HashMap<String, serde_json::Value>, name: &str) -> bool {
    match tags.get(name) {
        Some(serde_json::Value::Bool(b)) => *b,
        Some(serde_json::Value::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

/// Turns a `/cluster` body into members; a member without host or port (not started yet) is
/// left out.
fn parse_cluster(body: &str, template: &PatroniTemplate) -> Result<Vec<Member>, DiscoveryError> {
    let raw: RawCluster =
        serde_json::from_str(body).map_err(|e| DiscoveryError::Invalid(e.to_string()))?;
    let mut out = Vec::with_capacity(raw.members.len());
    for m in raw.members {
        let (Some(host), Some(port)) = (m.host.as_deref(), m.port) else {
            tracing::debug!(member = %m.name, "patroni member without host or port: skipped");
            continue;
        };
        if m.name.is_empty() {
            continue;
        }
        let leader = m.role.as_deref() == Some("leader") && !tag(&m.tags, "nofailover");
        let mut node = template.node(&m.name, host, port, leader);
        if tag(&m.tags, "noloadbalance") {
            node = node.no_reads();
        }
        let mut member = Member::new(node);
        member.role = m.role;
        member.state = m.state;
        member.lag_bytes = m.lag.as_ref().and_then(serde_json::Value::as_u64);
        out.push(member);
    }
    Ok(out)
}

/// `GET path` over HTTP/1.1 with `Connection: close`; the body of a 200 answer.
async fn get(e: &Endpoint, path: &str) -> Result<String, DiscoveryError> {
    let unavailable = |why: String| DiscoveryError::Unavailable(why);
    let mut stream = tokio::net::TcpStream::connect((e.host.as_str(), e.port))
        .await
        .map_err(|err| unavailable(err.to_string()))?;
    let host = if e.host.contains(':') {
        format!("[{}]:{}", e.host, e.port)
    } else {
        format!("{}:{}", e.host, e.port)
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|err| unavailable(err.to_string()))?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_BODY as u64 + 64 * 1024)
        .read_to_end(&mut raw)
        .await
        .map_err(|err| unavailable(err.to_string()))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| DiscoveryError::Invalid("no end of HTTP headers".into()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| DiscoveryError::Invalid("bad HTTP status line".into()))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<usize>().ok();
            }
        }
    }
    if chunked {
        body = dechunk(&body)?;
    } else if let Some(n) = length {
        body.truncate(n);
    }
    if status != 200 {
        return Err(unavailable(format!("HTTP {status} for {path}")));
    }
    String::from_utf8(body).map_err(|_| DiscoveryError::Invalid("body is not UTF-8".into()))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, DiscoveryError> {
    let bad = || DiscoveryError::Invalid("bad chunked encoding".into());
    let mut out = Vec::new();
    loop {
        let end = data.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
        let size_text = std::str::from_utf8(&data[..end]).map_err(|_| bad())?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad())?;
        data = &data[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size || out.len() + size > MAX_BODY {
            return Err(bad());
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).ok_or_else(bad)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = r#"{"members": [
        {"name": "pg0", "role": "leader", "state": "running", "api_url": "http://127.0.0.1:8008/patroni",
         "host": "127.0.0.1", "port": 5432, "timeline": 2},
        {"name": "pg1", "role": "sync_standby", "state": "streaming", "host": "127.0.0.1",
         "port": 5433, "timeline": 2, "lag": 0, "tags": {"nofailover": true}},
        {"name": "pg2", "role": "replica", "state": "running", "host": "::1", "port": 5434,
         "lag": "unknown", "tags": {"noloadbalance": true}},
        {"name": "pg3", "role": "replica", "state": "starting"}
    ], "scope": "demo"}"#;

    #[test]
    fn members_become_nodes_from_the_template() {
        let t = PatroniTemplate::new("app", "p@ss:w/rd", "shop")
            .reader("reader", "r")
            .param("connect_timeout", "2");
        let m = parse_cluster(CLUSTER, &t).unwrap();
        assert_eq!(m.len(), 3, "a member without host or port is left out");
        assert_eq!(m[0].node.name, "pg0");
        assert_eq!(
            m[0].node.url.expose(),
            "postgres://app:p%40ss%3Aw%2Frd@127.0.0.1:5432/shop?connect_timeout=2"
        );
        assert_eq!(m[0].node.role, crate::RoleHint::WriterCandidate);
        assert_eq!(
            m[0].node.reader_url.as_ref().unwrap().expose(),
            "postgres://reader:r@127.0.0.1:5432/shop?connect_timeout=2"
        );
        assert_eq!(m[1].node.role, crate::RoleHint::Replica);
        assert_eq!(m[1].lag_bytes, Some(0));
        assert!(m[1].node.reads);
        assert!(!m[2].node.reads, "noloadbalance: no reads");
        assert!(m[2].node.url.expose().contains("@[::1]:5434/"));
        assert_eq!(m[2].lag_bytes, None);
        assert!(!format!("{t:?}").contains("p@ss"));
        assert!(!format!("{:?}", m[0].node).contains("p%40ss"));
    }

    #[test]
    fn bad_answers_and_endpoints_are_typed_errors() {
        let t = PatroniTemplate::new("a", "b", "c");
        assert!(matches!(
            parse_cluster("not json", &t),
            Err(DiscoveryError::Invalid(_))
        ));
        assert!(matches!(
            parse_cluster("{}", &t),
            Err(DiscoveryError::Invalid(_))
        ));
        for bad in ["https://h:8008", "h", "h:x", ":8008"] {
            assert!(
                PatroniDiscovery::new([bad], t.clone()).is_err(),
                "{bad} accepted"
            );
        }
        assert!(PatroniDiscovery::new(Vec::<String>::new(), t.clone()).is_err());
        let ok = PatroniDiscovery::new(["http://127.0.0.1:8008/", "[::1]:8009"], t).unwrap();
        assert_eq!(ok.endpoints[1].host, "::1");
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        assert_eq!(
            dechunk(b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\n\r\n").unwrap(),
            b"Wikipedia"
        );
        assert!(dechunk(b"zz\r\n").is_err());
        assert!(dechunk(b"9\r\nshort\r\n").is_err());
    }

    #[tokio::test]
    async fn an_endpoint_that_refuses_is_unavailable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let d = PatroniDiscovery::new(
            [format!("127.0.0.1:{port}")],
            PatroniTemplate::new("a", "b", "c"),
        )
        .unwrap();
        assert!(matches!(
            d.members().await,
            Err(DiscoveryError::Unavailable(_))
        ));
    }
}
