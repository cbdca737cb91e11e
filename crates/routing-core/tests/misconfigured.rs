//! A router whose nodes refuse it for good (wrong password, bad configuration) says so at once,
//! naming the node, instead of waiting out the write deadline with a generic "no primary".

use std::time::{Duration, Instant};

use routing_core::{
    Backend, BackendError, Consistency, Error, ErrorKind, NodeConfig, PoolSpec, RequestContext,
    Router, RouterConfig,
};

/// Every node refuses connections with the same error kind.
#[derive(Debug, Clone, Copy)]
struct Refusing(ErrorKind);

#[derive(Debug)]
struct Pool(ErrorKind, String);

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Backend for Refusing {
    type Pool = Pool;
    type Pooled = Box<()>;
    type Connection = ();
    type QueryError = Never;

    fn build_pool(&self, spec: PoolSpec) -> Result<Pool, BackendError> {
        Ok(Pool(self.0, spec.node.name))
    }

    async fn checkout(pool: &Pool) -> Result<Box<()>, BackendError> {
        Err(BackendError::new(
            pool.0,
            format!("{}: refused for postgres://app:hunter2@db/x", pool.1),
        ))
    }

    async fn query_text<'a>(
        _: &'a mut Box<()>,
        _: &'a str,
    ) -> Result<Option<String>, BackendError> {
        unreachable!("no session is ever handed out")
    }

    async fn execute<'a>(_: &'a mut Box<()>, _: &'a str) -> Result<u64, BackendError> {
        unreachable!("no session is ever handed out")
    }

    async fn execute_batch<'a>(_: &'a mut Box<()>, _: &'a str) -> Result<(), BackendError> {
        unreachable!("no session is ever handed out")
    }

    fn discard(_: &mut Box<()>) {}

    fn classify(_: &Never) -> ErrorKind {
        ErrorKind::Query
    }
}

async fn router(kind: ErrorKind) -> Router<Refusing> {
    Router::builder(Refusing(kind))
        .node(NodeConfig::replica("r1", "postgres://app:hunter2@r1/x"))
        .node(NodeConfig::writer("w0", "postgres://app:hunter2@w0/x"))
        .config(RouterConfig {
            probe_interval: Duration::from_millis(20),
            probe_timeout: Duration::from_millis(200),
            write_deadline: Duration::from_secs(3),
            ..RouterConfig::default()
        })
        .build()
        .await
        .expect("router")
}

#[tokio::test]
async fn auth_and_config_failures_fail_fast_naming_the_writer_candidate() {
    for kind in [ErrorKind::Auth, ErrorKind::Config] {
        let r = router(kind).await;
        let started = Instant::now();
        let err = r.write().await.expect_err("no node accepts");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "waited {:?}",
            started.elapsed()
        );
        match &err {
            Error::Backend { node, source } => {
                assert_eq!(node, "w0", "the writer candidate is named");
                assert_eq!(source.kind, kind);
            }
            other => panic!("expected Error::Backend, got {other:?}"),
        }
        let text = format!("{err} {err:?}");
        assert!(!text.contains("hunter2"), "{text}");
        let read = r
            .read_with(&RequestContext::new().consistency(Consistency::Eventual))
            .await
            .expect_err("no node accepts reads either");
        assert!(
            matches!(&read, Error::Backend { node, source } if node == "w0" && source.kind == kind),
            "{read:?}"
        );
        let snap = r.snapshot();
        assert!(snap.nodes.iter().all(|n| n.last_error_kind == Some(kind)));
    }
}

#[tokio::test]
async fn unreachable_nodes_still_wait_for_the_deadline_and_name_the_nodes_on_reads() {
    let r = router(ErrorKind::Connection).await;
    let started = Instant::now();
    let err = r.write().await.expect_err("no primary");
    assert!(matches!(err, Error::NoPrimary { .. }), "{err:?}");
    assert!(started.elapsed() >= Duration::from_secs(3));
    let err = r
        .read_with(&RequestContext::new().consistency(Consistency::Eventual))
        .await
        .expect_err("no reader");
    let text = err.to_string();
    assert!(
        matches!(err, Error::NoReader { .. }) && text.contains("w0") && text.contains("r1"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}
