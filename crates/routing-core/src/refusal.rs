//! One policy for every backend: a node that refuses connections fails a checkout at once.
//!
//! Pools differ here: sqlx's `PgPool` retries a refused connect until the pool's timeout (it
//! assumes a server still starting up), bb8 hides connect errors from the waiting checkout
//! (both adapters hand them over themselves, but an adapter need not). Either way a request to
//! a dead replica could wait out `connect_timeout`. So a checkout still waiting after
//! a moment asks the node directly, with a plain TCP connect, whether it refuses connections (at
//! most once per [`CHECK_EVERY`] per node, shared by all of the node's pools).

use std::future::Future;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::{BackendError, ErrorKind, NodeConfig};

/// A checkout still waiting after this long checks whether the node refuses connections.
const CHECK_AFTER: Duration = Duration::from_millis(20);
/// How long one check of a node counts, so a busy pool does not open a socket per checkout.
const CHECK_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub(crate) struct RefusalCheck {
    node: String,
    /// Where the node listens over TCP; `None` (Unix socket, several hosts, a form we do not
    /// parse) disables the check.
    addr: Option<(String, u16)>,
    /// When the node was last seen refusing (`true`) or accepting TCP connections.
    seen: Mutex<Option<(Instant, bool)>>,
}

impl RefusalCheck {
    pub(crate) fn for_node(node: &NodeConfig) -> Self {
        RefusalCheck {
            node: node.name.clone(),
            addr: tcp_address(node.url.expose()),
            seen: Mutex::new(None),
        }
    }

    /// Runs `checkout`, failing with [`ErrorKind::Connection`] as soon as the node is seen
    /// refusing connections while it waits.
    pub(crate) async fn checkout<T>(
        &self,
        checkout: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        if self.addr.is_none() {
            return checkout.await;
        }
        tokio::select! {
            biased;
            done = checkout => done,
            refused = self.refusing() => Err(refused),
        }
    }

    /// Resolves only if the node refuses TCP connections.
    async fn refusing(&self) -> BackendError {
        tokio::time::sleep(CHECK_AFTER).await;
        loop {
            if let Some(e) = self.check().await {
                return e;
            }
            tokio::time::sleep(CHECK_EVERY).await;
        }
    }

    async fn check(&self) -> Option<BackendError> {
        let (host, port) = self.addr.as_ref()?;
        let cached = *self.seen.lock();
        let refused = match cached {
            Some((at, refused)) if at.elapsed() < CHECK_EVERY => refused,
            _ => {
                let refused = matches!(
                    tokio::net::TcpStream::connect((host.as_str(), *port)).await,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
                );
                *self.seen.lock() = Some((Instant::now(), refused));
                refused
            }
        };
        refused.then(|| {
            BackendError::new(
                ErrorKind::Connection,
                format!("node {} refuses connections on {host}:{port}", self.node),
            )
        })
    }
}

/// The one TCP address of a `postgres://` URL or a `key=value` conninfo string, if it has
/// exactly one host that is not a Unix socket directory.
fn tcp_address(conn: &str) -> Option<(String, u16)> {
    let (host, port) = match conn.split_once("://") {
        Some((_, rest)) => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let authority = &rest[..end];
            let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            if rest[end..].contains("host=") || hosts.contains(',') {
                return None;
            }
            match hosts.strip_prefix('[') {
                // [::1]:5432
                Some(v6) => {
                    let (h, after) = v6.split_once(']')?;
                    (h.to_string(), after.strip_prefix(':').map(str::to_string))
                }
                None => match hosts.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p.to_string())),
                    None => (hosts.to_string(), None),
                },
            }
        }
        None => {
            let value = |key: &str| {
                conn.split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| k.trim() == key)
                    .map(|(_, v)| v.trim_matches('\'').to_string())
            };
            (value("host").unwrap_or_default(), value("port"))
        }
    };
    if host.is_empty() || host.starts_with('/') || host.contains(',') {
        return None;
    }
    let port = match port.filter(|p| !p.is_empty()) {
        Some(p) => p.parse().ok()?,
        None => 5432,
    };
    Some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_one_tcp_address() {
        let cases = [
            ("postgres://u:p@db:6432/x", Some(("db", 6432))),
            ("postgres://u:p@db/x?sslmode=disable", Some(("db", 5432))),
            (
                "postgres://u:p%40q@127.0.0.1:5433/x",
                Some(("127.0.0.1", 5433)),
            ),
            ("postgresql://[::1]:5434/x", Some(("::1", 5434))),
            ("host=db port=5435 user=u", Some(("db", 5435))),
            ("postgres://u@h1:1,h2:2/x", None),
            ("postgres:///x?host=/run/postgresql", None),
            ("host=/var/run/postgresql user=u", None),
            ("postgres://u@db:notaport/x", None),
        ];
        for (conn, want) in cases {
            assert_eq!(
                tcp_address(conn),
                want.map(|(h, p)| (h.to_string(), p)),
                "{conn}"
            );
        }
    }

    #[tokio::test]
    async fn a_refusing_node_fails_a_waiting_checkout_at_once() {
        // A port nothing listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let node = NodeConfig::replica("dead", format!("postgres://u@127.0.0.1:{port}/x"));
        let check = RefusalCheck::for_node(&node);
        let started = Instant::now();
        let never = std::future::pending::<Result<(), BackendError>>();
        let e = check.checkout(never).await.expect_err("refused");
        assert_eq!(e.kind, ErrorKind::Connection);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // A listening node is left to the pool.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let node = NodeConfig::replica("up", format!("postgres://u@127.0.0.1:{port}/x"));
        let check = RefusalCheck::for_node(&node);
        let slow = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, BackendError>(7)
        };
        assert_eq!(check.checkout(slow).await.expect("waited"), 7);
    }
}
