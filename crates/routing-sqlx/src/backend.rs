//! [`SqlxBackend`]: one bb8 pool of sqlx [`PgConnection`]s per node and access mode.
//!
//! Not sqlx's own `PgPool`: it pings every connection as it comes back (a round trip and a task
//! per request), which the router's reset already does and proves (see ARCHITECTURE.md, "The
//! hot path"), and it cannot stamp a connection with the topology generation it was made under.

use std::fmt;
use std::sync::Arc;

use routing_core::pool::{Driver, PooledSession, StampedPool};
use routing_core::{Access, Backend, BackendError, Epoch, ErrorKind, NodeConfig, PoolSpec};
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};

use crate::errors::{backend_error, backend_error_at};
use crate::options;

type Configure = dyn Fn(&NodeConfig, Access, PgConnectOptions) -> PgConnectOptions + Send + Sync;

/// The sqlx adapter: builds one lazily connecting pool per node and [`Access`] mode.
#[derive(Clone, Default)]
pub struct SqlxBackend {
    configure: Option<Arc<Configure>>,
}

impl fmt::Debug for SqlxBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlxBackend")
            .field("configure", &self.configure.is_some())
            .finish()
    }
}

impl SqlxBackend {
    /// A backend with sqlx's defaults for everything the node URL does not say.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adjusts every pool's connect options (TLS files, statement cache, application name...)
    /// after they are parsed from the node's URL and before the router's settings (read-only
    /// sessions, statement timeout) are added, which therefore cannot be undone here.
    pub fn configure(
        mut self,
        f: impl Fn(&NodeConfig, Access, PgConnectOptions) -> PgConnectOptions + Send + Sync + 'static,
    ) -> Self {
        self.configure = Some(Arc::new(f));
        self
    }
}

/// One node's pool for one [`Access`] mode (routing-core's [`StampedPool`] over sqlx).
pub type NodePool = StampedPool<SqlxDriver>;

/// How routing-core's pool connects and checks sqlx sessions.
pub struct SqlxDriver {
    opts: PgConnectOptions,
    access: Access,
    epoch: Epoch,
    /// `pg-1 (ReadOnly)`: the prefix of the driver's error messages.
    label: String,
}

impl fmt::Debug for SqlxDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlxDriver")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl Driver for SqlxDriver {
    type Conn = PgConnection;

    async fn connect(&self) -> Result<PgConnection, BackendError> {
        PgConnection::connect_with(&self.opts)
            .await
            .map_err(|e| backend_error_at(&self.label, e))
    }

    async fn check<'a>(&'a self, conn: &'a mut PgConnection) -> Result<(), BackendError> {
        session_check(&self.label, self.access, &self.epoch, conn).await
    }

    /// A `sqlx::Transaction` leaked with `mem::forget` leaves sqlx counting it open.
    fn has_broken(&self, conn: &mut PgConnection) -> bool {
        conn.is_in_transaction()
    }
}

/// A session checked out of a [`NodePool`]; dereferences to [`PgConnection`] and goes back to
/// its pool when dropped.
pub type PooledConn = PooledSession<SqlxDriver>;

/// One of the router's constant queries that run on request paths.
fn is_router_statement(text: &str) -> bool {
    [
        routing_core::sql::COMMIT_LSN,
        routing_core::sql::REPLAY_LSN,
        routing_core::sql::READ_ONLY_CHECK,
        routing_core::sql::WRITER_CHECK,
        routing_core::sql::PING,
    ]
    .contains(&text)
}

/// Runs `sql` (one text column named `v`) and returns the first row's value. The router's own
/// statements run as prepared statements sqlx caches: one round trip without parsing and
/// planning the text again each time. Any other SQL stays a simple query (caching arbitrary
/// texts would churn the statement cache).
async fn text_query(conn: &mut PgConnection, sql: &str) -> Result<Option<String>, sqlx::Error> {
    let row = if is_router_statement(sql) {
        sqlx::query(AssertSqlSafe(sql)).fetch_optional(conn).await
    } else {
        sqlx::raw_sql(AssertSqlSafe(sql)).fetch_optional(conn).await
    }?;
    match row {
        Some(row) => row.try_get::<Option<String>, _>("v"),
        None => Ok(None),
    }
}

/// Runs `sql` as a simple query (one or several statements).
async fn execute(
    conn: &mut PgConnection,
    sql: &str,
) -> Result<sqlx::postgres::PgQueryResult, BackendError> {
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(conn)
        .await
        .map_err(backend_error)
}

/// Runs the access's check query and applies routing-core's verdict (a writer session on a node
/// in recovery is refused with `NotWriter`, a reader session that is not read-only with `Config`).
async fn session_check(
    label: &str,
    access: Access,
    epoch: &Epoch,
    conn: &mut PgConnection,
) -> Result<(), BackendError> {
    let answer = text_query(conn, access.check_sql())
        .await
        .map_err(|e| backend_error_at(label, e))?;
    access
        .judge_check(answer.as_deref(), epoch)
        .map_err(|kind| {
            let why = access.check_failure(answer.as_deref());
            BackendError::new(kind, format!("{label}: {why}"))
        })
}

impl Backend for SqlxBackend {
    type Pool = NodePool;
    type Pooled = PooledConn;
    type Connection = PgConnection;
    type QueryError = sqlx::Error;

    fn build_pool(&self, spec: PoolSpec) -> Result<NodePool, BackendError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(BackendError::new(
                ErrorKind::Config,
                "sqlx pools must be built inside a tokio runtime",
            ));
        }
        let (node, access) = (&spec.node, spec.access);
        let mut opts = options::parse(node)?;
        if let Some(f) = &self.configure {
            opts = f(node, access, opts);
        }
        let opts = options::for_access(opts, access, &spec.settings);
        let label = format!("{} ({access:?})", node.name);
        let driver = SqlxDriver {
            opts,
            access,
            epoch: spec.epoch.clone(),
            label: label.clone(),
        };
        Ok(StampedPool::new(spec, label, driver))
    }

    async fn checkout(pool: &NodePool) -> Result<PooledConn, BackendError> {
        pool.checkout().await
    }

    async fn query_text<'a>(
        pooled: &'a mut PooledConn,
        sql: &'a str,
    ) -> Result<Option<String>, BackendError> {
        pooled
            .run(async |conn, _| text_query(conn, sql).await.map_err(backend_error))
            .await
    }

    async fn execute<'a>(pooled: &'a mut PooledConn, sql: &'a str) -> Result<u64, BackendError> {
        pooled
            .run(async |conn, _| execute(conn, sql).await)
            .await
            .map(|done| done.rows_affected())
    }

    async fn execute_batch<'a>(
        pooled: &'a mut PooledConn,
        sql: &'a str,
    ) -> Result<(), BackendError> {
        pooled
            .run(async |conn, _| execute(conn, sql).await)
            .await
            .map(drop)
    }

    fn hold_standby(pool: &NodePool) {
        pool.hold_standby();
    }

    async fn admit_standby(pool: &NodePool) -> bool {
        pool.admit_standby().await
    }

    fn release_standby(pool: &NodePool) {
        pool.release_standby();
    }

    fn discard(pooled: &mut PooledConn) {
        pooled.discard();
    }

    /// A `sqlx::Transaction` leaked without being dropped leaves sqlx counting it open; a
    /// server-side ROLLBACK would not tell sqlx, whose next `begin()` would then only open a
    /// savepoint.
    fn reusable(pooled: &mut PooledConn) -> bool {
        !pooled.is_in_transaction()
    }

    fn classify(err: &sqlx::Error) -> ErrorKind {
        crate::errors::classify(err)
    }

    fn pool_state(pool: &NodePool) -> Option<routing_core::PoolState> {
        Some(pool.pool_state())
    }

    fn sqlstate(err: &sqlx::Error) -> Option<String> {
        crate::errors::sqlstate(err)
    }

    /// One round trip: `raw_sql` sends both statements as one simple-protocol query.
    async fn commit_returning_lsn(
        pooled: &mut PooledConn,
    ) -> Result<Option<routing_core::Lsn>, BackendError> {
        routing_core::parse_lsn(Self::query_text(pooled, routing_core::sql::COMMIT_THEN_LSN).await?)
    }
}
