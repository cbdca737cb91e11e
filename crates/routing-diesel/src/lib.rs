//! # routing-diesel
//!
//! Primary/replica routing for [diesel-async](diesel_async): writes go to the primary, reads to a
//! replica that is fresh enough for the request, failover is followed without a restart. All
//! routing lives in [`routing_core`]; this crate is its [`Backend`] for [`AsyncPgConnection`]
//! with one [`bb8`] pool per node, and re-exports everything an application needs, so this one
//! dependency is enough (`routing_diesel::diesel`, `routing_diesel::diesel_async`, ...).
//!
//! What the pools guarantee:
//! - reader sessions, including the primary's read-fallback sessions, are read-only at the
//!   server (`SET default_transaction_read_only = on` in diesel-async's `custom_setup`), so a write
//!   sent through a read connection fails with SQLSTATE 25006, which
//!   [`ReadConn::check`](routing_core::ReadConn::check) turns into [`Error::MisroutedWrite`];
//! - writer sessions are checked (`pg_is_in_recovery()`) when made and, with
//!   [`PoolSettings::pre_ping`], at every checkout: a demoted node is refused with
//!   [`ErrorKind::NotWriter`];
//! - sessions made under an older topology generation are never handed out again (after a
//!   failover every pool reconnects), and `max_lifetime` / `idle_timeout` recycle the rest;
//! - connect errors are typed ([`ErrorKind::Auth`], [`ErrorKind::Config`],
//!   [`ErrorKind::Connection`]), name the node, and never contain the password;
//! - writer URLs may list several hosts with `target_session_attrs=read-write`
//!   (tokio-postgres picks the writable host when it connects).
//!
//! TLS is not supported yet: sessions connect with `NoTls`.
//!
//! ## Example
//!
//! ```no_run
//! use std::time::Duration;
//! use routing_diesel::diesel::{self, QueryableByName};
//! use routing_diesel::diesel_async::RunQueryDsl;
//! use routing_diesel::{
//!     Consistency, NodeConfig, RequestContext, Router, RouterConfig, TokenCodec, TokenKey,
//! };
//!
//! #[derive(QueryableByName)]
//! struct Title {
//!     #[diesel(sql_type = diesel::sql_types::Text)]
//!     title: String,
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let router: Router = routing_diesel::builder()
//!     .node(NodeConfig::writer("pg-0", "postgres://app:secret@10.0.0.10/app"))
//!     .node(NodeConfig::replica("pg-1", "postgres://app:secret@10.0.0.11/app").region("eu"))
//!     .node(NodeConfig::replica("pg-2", "postgres://app:secret@10.0.0.12/app").region("us"))
//!     .config(RouterConfig {
//!         default_consistency: Consistency::ReadYourWrites,
//!         probe_interval: Duration::from_millis(200),
//!         ..RouterConfig::default()
//!     })
//!     .tokens(TokenCodec::new(TokenKey::new(1, "a-32-byte-secret-from-your-vault!")?))
//!     .build()
//!     .await?;
//!
//! // A write: run it, commit it, then `finish` records the commit LSN as the user's mark and
//! // signs a causal token for the client (e.g. the `X-Read-After` response header).
//! let ctx = RequestContext::new().user("user-42");
//! let mut w = router.write_with(&ctx).await?;
//! let done = diesel::sql_query("INSERT INTO posts (title) VALUES ('hello')")
//!     .execute(&mut *w)
//!     .await;
//! w.check(done)?;
//! let receipt = w.finish().await?;
//!
//! // A read for the same user: a replica that has replayed that commit, or the primary.
//! let mut r = router.read_with(&ctx).await?;
//! let rows = diesel::sql_query("SELECT title FROM posts").load::<Title>(&mut *r).await;
//! let titles = r.check(rows)?;
//! println!("{} posts from {}", titles.len(), r.node_name());
//!
//! // Another client that only carries the token reads causally.
//! let token = router.verify_token(receipt.token.as_deref().unwrap_or_default())?;
//! let ctx = RequestContext::new().consistency(Consistency::Causal).token(token);
//! let mut r = router.read_with(&ctx).await?;
//! let rows = diesel::sql_query("SELECT title FROM posts").load::<Title>(&mut *r).await;
//! r.check(rows)?;
//! # Ok(())
//! # }
//! ```

mod backend;
mod db_error;
mod error;
mod lsn;

pub use backend::{DieselBackend, DieselPool, PooledConn};
pub use db_error::DbError;
pub use error::classify;
pub use lsn::{commit_lsn, from_pg_lsn, replay_lsn, to_pg_lsn};

pub use bb8;
pub use diesel;
pub use diesel_async;
pub use diesel_async::AsyncPgConnection;
pub use routing_core;
pub use routing_core::*;

/// The router over diesel-async connections.
pub type Router = routing_core::Router<DieselBackend>;
/// Builds a [`Router`]; start with [`builder`].
pub type RouterBuilder = routing_core::RouterBuilder<DieselBackend>;
/// A read session (a replica, or the primary read-only); dereferences to [`AsyncPgConnection`].
pub type ReadConn = routing_core::ReadConn<DieselBackend>;
/// A write session on the primary; dereferences to [`AsyncPgConnection`].
pub type WriteConn = routing_core::WriteConn<DieselBackend>;

/// A [`RouterBuilder`] over a [`DieselBackend`].
pub fn builder() -> RouterBuilder {
    Router::builder(DieselBackend::new())
}
