//! # routing-sqlx
//!
//! The [sqlx](https://docs.rs/sqlx) backend for [`routing_core`]: one pool of
//! [`sqlx::PgConnection`]s per node and access mode, and nothing else. Every routing decision (writer election, replica choice,
//! read-your-writes, failover, bans) lives in `routing-core`; this crate only teaches it how to
//! pool, check out and query a sqlx connection. One dependency is enough: the core's types,
//! [`sqlx`] itself, and aliases such as [`Router`] are re-exported here.
//!
//! ```no_run
//! use routing_sqlx::{NodeConfig, Router, RequestContext, SqlxBackend, UserKey};
//! use routing_sqlx::sqlx;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let router: Router = Router::builder(SqlxBackend::new())
//!     // sqlx connects to one host per pool: list every writer candidate as its own node and
//!     // the router elects the one that is not in recovery.
//!     .node(NodeConfig::writer("pg-a", "postgres://app:secret@10.0.0.1/shop"))
//!     .node(NodeConfig::writer("pg-b", "postgres://app:secret@10.0.0.2/shop"))
//!     .node(NodeConfig::replica("pg-c", "postgres://app:secret@10.0.0.3/shop").region("eu"))
//!     .build()
//!     .await?;
//!
//! let ctx = RequestContext::new().user(UserKey::new("user-42"));
//!
//! // A write: always the primary. `finish` records the commit LSN for read-your-writes.
//! let mut w = router.write_with(&ctx).await?;
//! let done = sqlx::query("UPDATE carts SET n = n + 1 WHERE user_id = $1")
//!     .bind(42_i64)
//!     .execute(&mut *w)
//!     .await;
//! w.check(done)?;
//! let receipt = w.finish().await?;
//! println!("committed at {}", receipt.lsn);
//!
//! // A read: a replica that has replayed the user's write (or the primary, read-only).
//! let mut r = router.read_with(&ctx).await?;
//! let n = sqlx::query_scalar::<_, i64>("SELECT n FROM carts WHERE user_id = $1")
//!     .bind(42_i64)
//!     .fetch_one(&mut *r)
//!     .await;
//! // A write here would fail at the server; `check` names it `Error::MisroutedWrite`.
//! let n = r.check(n)?;
//! # let _ = n;
//! # Ok(())
//! # }
//! ```
//!
//! A transaction without a raw `BEGIN`: committed when the closure returns `Ok` (and only then
//! are the user's mark and token issued), rolled back on `Err` or when the request is cancelled.
//!
//! ```no_run
//! use routing_sqlx::{Error, RequestContext, Router, sqlx};
//!
//! #[derive(Debug)]
//! enum AppError {
//!     Routing(Error),
//!     Db(sqlx::Error),
//! }
//! impl From<Error> for AppError {
//!     fn from(e: Error) -> Self {
//!         AppError::Routing(e)
//!     }
//! }
//! impl From<sqlx::Error> for AppError {
//!     fn from(e: sqlx::Error) -> Self {
//!         AppError::Db(e)
//!     }
//! }
//!
//! # async fn demo(router: Router) -> Result<(), AppError> {
//! let ctx = RequestContext::new().user("user-42");
//! let (order_id, receipt) = router
//!     .transaction(&ctx, |conn| {
//!         Box::pin(async move {
//!             let id: i64 =
//!                 sqlx::query_scalar("INSERT INTO orders (user_id) VALUES (42) RETURNING id")
//!                     .fetch_one(&mut *conn)
//!                     .await?;
//!             sqlx::query("DELETE FROM carts WHERE user_id = 42")
//!                 .execute(&mut *conn)
//!                 .await?;
//!             Ok::<_, AppError>(id)
//!         })
//!     })
//!     .await?;
//! println!("order {order_id}, token for the client: {:?}", receipt.token);
//! # Ok(())
//! # }
//! ```
//!
//! ## What the pools do
//!
//! The pools are [bb8](https://docs.rs/bb8) pools of sqlx connections, not sqlx's `PgPool`: that
//! one pings every connection as it comes back (a round trip and a spawned task per request,
//! which the router's reset below already does and proves) and cannot stamp a connection with
//! the topology it was made under. A guard dereferences to [`sqlx::PgConnection`], so
//! `&mut *guard` is an executor as with a `PgPool`.
//!
//! - **Reader and probe sessions are read-only at the server**: `default_transaction_read_only`
//!   is sent in the startup packet (so `RESET ALL` restores it), verified when the session
//!   connects, so a write through a read guard fails with SQLSTATE 25006, which
//!   [`ReadConn::check`] turns into [`Error::MisroutedWrite`]. Probe sessions also carry the
//!   probe's `statement_timeout`. The session default does not stop `BEGIN READ WRITE` on the
//!   primary: give read sessions a role that may only read with [`NodeConfig::reader_url`].
//! - **A returned session is reset before reuse** (by routing-core's session guard: any open
//!   transaction rolled back, role and settings restored, read-only re-asserted), or closed. A
//!   `sqlx::Transaction` leaked with `mem::forget` makes sqlx believe a transaction is still open,
//!   so such a session is closed rather than reset; so is one whose router statement (a probe, a
//!   commit position) was cancelled halfway or lost its connection.
//! - **Writer sessions are verified at connect**: a node in recovery is refused, and every
//!   checkout waiting on that pool fails at once with [`ErrorKind::NotWriter`] (any connect
//!   failure is handed to the waiting checkouts the same way) instead of waiting out the
//!   pool timeout.
//! - **At checkout** a session made under an older topology generation (each is stamped when it
//!   is made) is closed without a round trip; with `pre_ping`, writer sessions are re-checked,
//!   and read sessions that sat idle (or since trouble the router saw) too.
//! - `max_lifetime`, `idle_timeout`, `max_size` and `connect_timeout` come from
//!   [`PoolSettings`]; pools connect lazily, so nodes may be down at startup, and a refused
//!   connect is not retried inside the pool (the router bans the node and goes elsewhere).
//!
//! ## Limits of sqlx, and what this crate does about them
//!
//! - sqlx takes one host per URL: a multi-host URL (`postgres://h1,h2/db`) is refused with an
//!   [`ErrorKind::Config`] error naming the node. Give each writer candidate as its own node;
//!   the router's writer election then gives sqlx users the multi-host failover sqlx lacks.
//! - `target_session_attrs` is ignored by sqlx (with a warning); the writer check above does its
//!   job on every connection instead.
//! - sqlx has no `pg_lsn` type: the core reads LSNs as text and parses them into [`Lsn`].
//! - Only URLs are accepted (`postgres://...`), not `key=value` conninfo strings.

mod backend;
mod db_error;
mod errors;
mod options;

pub use backend::{NodePool, PooledConn, SqlxBackend};
pub use db_error::DbError;
pub use errors::{backend_error, classify, sqlstate};

pub use routing_core;
pub use routing_core::*;
pub use sqlx;

/// The router over sqlx pools.
pub type Router = routing_core::Router<SqlxBackend>;
/// Builds a [`Router`]: `Router::builder(SqlxBackend::new())`.
pub type RouterBuilder = routing_core::RouterBuilder<SqlxBackend>;
/// A read session; dereferences to [`sqlx::PgConnection`].
pub type ReadConn = routing_core::ReadConn<SqlxBackend>;
/// A write session on the primary; dereferences to [`sqlx::PgConnection`].
pub type WriteConn = routing_core::WriteConn<SqlxBackend>;
