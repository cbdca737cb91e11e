//! A node's URL as sqlx connect options, and the settings each access mode adds.

use std::time::Duration;

use routing_core::{Access, BackendError, ErrorKind, NodeConfig, PoolSettings, sql};
use sqlx::postgres::PgConnectOptions;

/// Parses the node's URL. sqlx connects to one host per pool, so a host list is refused with a
/// typed [`ErrorKind::Config`] error naming the node (not left to fail at the first connect).
pub(crate) fn parse(node: &NodeConfig) -> Result<PgConnectOptions, BackendError> {
    let multi_host = |shown: &str| {
        BackendError::new(
            ErrorKind::Config,
            format!(
                "node {:?}: {shown} names several hosts, but sqlx connects to one host per pool; \
                 list each writer candidate as its own node (NodeConfig::writer) and the router \
                 elects the read-write one",
                node.name
            ),
        )
    };
    let text = node.url.expose();
    if authority(text).contains(',') {
        return Err(multi_host(&node.url.redacted()));
    }
    let opts: PgConnectOptions = text.parse().map_err(|e: sqlx::Error| {
        BackendError::new(
            ErrorKind::Config,
            format!(
                "node {:?}: sqlx cannot use the URL {} ({}); it takes postgres:// URLs with one host",
                node.name,
                node.url.redacted(),
                source_text(&e)
            ),
        )
        .with_source(e)
    })?;
    // `?host=h1,h2` sets the host from the query string.
    if opts.get_host().contains(',') {
        return Err(multi_host(&node.url.redacted()));
    }
    Ok(opts)
}

/// Adds what the access mode needs at connect: readers and probes are read-only at the server;
/// a statement timeout (the probes') is set server-side.
pub(crate) fn for_access(
    opts: PgConnectOptions,
    access: Access,
    settings: &PoolSettings,
) -> PgConnectOptions {
    let opts = match access {
        Access::ReadWrite => opts,
        Access::ReadOnly | Access::Probe => opts.options([sql::READ_ONLY_SETTING]),
    };
    match settings.statement_timeout {
        // 0 would mean "no timeout": never round a short timeout down to it.
        Some(t) => opts.options([("statement_timeout", millis_at_least_one(t))]),
        None => opts,
    }
}

fn millis_at_least_one(d: Duration) -> u128 {
    d.as_millis().max(1)
}

/// The `user:pass@host:port,...` part of a URL (empty when there is none).
fn authority(url: &str) -> &str {
    let Some((_, rest)) = url.split_once("://") else {
        return "";
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, hosts)| hosts)
}

/// The innermost message of a configuration error (sqlx prefixes its own wording).
fn source_text(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Configuration(inner) => inner.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(url: &str) -> NodeConfig {
        NodeConfig::writer("pg-a", url)
    }

    #[test]
    fn one_host_url_parses() {
        let o = parse(&node("postgres://app:pw@127.0.0.1:5433/db?sslmode=disable")).unwrap();
        assert_eq!(o.get_host(), "127.0.0.1");
        assert_eq!(o.get_port(), 5433);
    }

    #[test]
    fn host_lists_are_config_errors_naming_the_node() {
        for url in [
            "postgres://app:s3cret@h1:5432,h2:5433/db?target_session_attrs=read-write",
            "postgres://app:s3cret@h1,h2/db",
            "postgres:///db?user=app&password=s3cret&host=h1,h2",
        ] {
            let e = parse(&node(url)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Config, "{url}");
            assert!(e.message.contains("\"pg-a\""), "{}", e.message);
            assert!(e.message.contains("several hosts"), "{}", e.message);
            assert!(!e.to_string().contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn unparsable_urls_are_config_errors_without_the_password() {
        for url in [
            "host=db user=app password=s3cret",
            "postgres://app:s3cret@db:notaport/x",
        ] {
            let e = parse(&node(url)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Config, "{url}");
            assert!(e.message.contains("\"pg-a\""), "{}", e.message);
            assert!(!e.to_string().contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn authority_skips_userinfo() {
        assert_eq!(authority("postgres://u:p,w@h/db"), "h");
        assert_eq!(authority("postgres://h1,h2"), "h1,h2");
        assert_eq!(authority("host=x"), "");
    }
}
