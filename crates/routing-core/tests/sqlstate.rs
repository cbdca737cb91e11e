//! `check` keeps the SQLSTATE a backend reports for application query errors.

use routing_core::{
    Backend, BackendError, Error, ErrorKind, NodeConfig, PoolSpec, RequestContext, Router, sql,
};

/// One primary that answers the router's own queries; application errors carry a code.
#[derive(Debug, Clone, Copy)]
struct Primary;

#[derive(Debug, thiserror::Error)]
#[error("server said {0}")]
struct CodedError(&'static str);

impl Backend for Primary {
    type Pool = ();
    type Pooled = Box<()>;
    type Connection = ();
    type QueryError = CodedError;

    fn build_pool(&self, _: PoolSpec) -> Result<(), BackendError> {
        Ok(())
    }

    async fn checkout(_: &()) -> Result<Box<()>, BackendError> {
        Ok(Box::new(()))
    }

    async fn query_text<'a>(
        _: &'a mut Box<()>,
        q: &'a str,
    ) -> Result<Option<String>, BackendError> {
        Ok(Some(
            match q {
                sql::PROBE => "false 0/100 - - 00000001 42",
                sql::WRITER_CHECK => "false",
                _ => "0/100",
            }
            .to_string(),
        ))
    }

    async fn execute<'a>(_: &'a mut Box<()>, _: &'a str) -> Result<u64, BackendError> {
        Ok(0)
    }

    async fn execute_batch<'a>(_: &'a mut Box<()>, _: &'a str) -> Result<(), BackendError> {
        Ok(())
    }

    fn discard(_: &mut Box<()>) {}

    fn classify(e: &CodedError) -> ErrorKind {
        if e.0 == "25006" {
            ErrorKind::ReadOnly
        } else {
            ErrorKind::Query
        }
    }

    fn sqlstate(e: &CodedError) -> Option<String> {
        Some(e.0.to_string())
    }
}

#[tokio::test]
async fn check_keeps_the_backends_sqlstate() {
    let r = Router::builder(Primary)
        .node(NodeConfig::writer("p", "postgres://p/x"))
        .build()
        .await
        .expect("router");
    let w = r.write().await.expect("write");
    match w.check::<()>(Err(CodedError("23505"))) {
        Err(Error::Backend { node, source }) => {
            assert_eq!(node, "p");
            assert_eq!(source.kind, ErrorKind::Query);
            assert_eq!(source.sqlstate.as_deref(), Some("23505"));
        }
        other => panic!("{other:?}"),
    }
    drop(w);
    let c = r
        .read_with(&RequestContext::new().force_primary(true))
        .await
        .expect("read");
    assert!(matches!(
        c.check::<()>(Err(CodedError("25006"))),
        Err(Error::MisroutedWrite { .. })
    ));
}
