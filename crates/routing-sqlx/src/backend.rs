//! [`SqlxBackend`]: one [`PgPool`] per node and access mode.

use std::sync::Arc;

use routing_core::{Access, Backend, BackendError, Epoch, ErrorKind, NodeConfig, PoolSpec};
use sqlx::pool::{PoolConnection, PoolConnectionMetadata};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Postgres, Row};
use tokio::sync::watch;

use crate::errors::{backend_error, backend_error_at};
use crate::options;

type Configure = dyn Fn(&NodeConfig, Access, PgConnectOptions) -> PgConnectOptions + Send + Sync;

/// The sqlx adapter: builds one lazily connecting [`PgPool`] per node and [`Access`] mode.
#[derive(Clone, Default)]
pub struct SqlxBackend {
    configure: Option<Arc<Configure>>,
}

impl std::fmt::Debug for SqlxBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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

/// One node's pool for one [`Access`] mode.
#[derive(Debug)]
pub struct NodePool {
    pool: PgPool,
    node: Arc<str>,
    access: Access,
    /// Bumped each time a writer connection is refused because its node is in recovery, so a
    /// waiting checkout fails at once instead of retrying until the pool's timeout.
    refusals: Arc<watch::Sender<u64>>,
}

impl NodePool {
    /// The sqlx pool (for metrics such as `size()` and `num_idle()`).
    pub fn pg_pool(&self) -> &PgPool {
        &self.pool
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// What the pool's sessions are for.
    pub fn access(&self) -> Access {
        self.access
    }

    async fn acquire(&self) -> Result<PoolConnection<Postgres>, BackendError> {
        let mut not_writer_seen = self.refusals.subscribe();
        let acquired = tokio::select! {
            biased;
            acquired = self.pool.acquire() => acquired,
            // Only writer pools ever send: their connect check found the node in recovery.
            _ = not_writer_seen.changed() => return Err(not_writer(&self.node)),
            // A node refusing connections (which sqlx would retry until the timeout) is
            // routing-core's check, the same for every backend.
        };
        acquired.map_err(|e| match e {
            sqlx::Error::PoolTimedOut => {
                let waited = self.pool.options().get_acquire_timeout();
                if self.is_exhausted() {
                    BackendError::new(
                        ErrorKind::PoolBusy,
                        format!(
                            "no free {:?} session to {} within {waited:?}: all {} in use",
                            self.access,
                            self.node,
                            self.pool.size()
                        ),
                    )
                } else {
                    BackendError::new(
                        ErrorKind::Timeout,
                        format!(
                            "could not connect a {:?} session to {} within {waited:?}",
                            self.access, self.node
                        ),
                    )
                }
                .with_source(e)
            }
            other => backend_error_at(&format!("{} ({:?})", self.node, self.access), other),
        })
    }
}

impl NodePool {
    /// Was a timed-out wait one for a free session rather than for a connect? The pool is at its
    /// size limit (idle sessions are not looked at: one released just as the wait ran out does
    /// not make it a connect failure). sqlx counts connects in flight in `size()`, so a checkout
    /// queued behind other checkouts' hanging connects can look exhausted too; the checkouts
    /// that ran those connects time out as [`ErrorKind::Timeout`], and the monitor's probe
    /// (its own pool) judges the node either way.
    fn is_exhausted(&self) -> bool {
        self.pool.size() >= self.pool.options().get_max_connections()
    }
}

fn not_writer(node: &str) -> BackendError {
    BackendError::new(
        ErrorKind::NotWriter,
        format!(
            "node {node} is not the elected writer (in recovery, or a server on another \
             timeline or cluster): it takes no writes"
        ),
    )
}

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

/// Runs the access's check query; the inner result is routing-core's verdict on the answer
/// (`Err(NotWriter)` for a writer session on a node in recovery).
async fn session_check(
    conn: &mut PgConnection,
    access: Access,
    epoch: &Epoch,
) -> Result<Result<(), (ErrorKind, String)>, sqlx::Error> {
    let row = sqlx::raw_sql(access.check_sql()).fetch_one(conn).await?;
    let answer = row.try_get::<Option<String>, _>("v")?;
    Ok(access
        .judge_check(answer.as_deref(), epoch)
        .map_err(|kind| (kind, access.check_failure(answer.as_deref()))))
}

impl Backend for SqlxBackend {
    type Pool = NodePool;
    type Pooled = PoolConnection<Postgres>;
    type Connection = PgConnection;
    type QueryError = sqlx::Error;

    fn build_pool(&self, spec: PoolSpec) -> Result<NodePool, BackendError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(BackendError::new(
                ErrorKind::Config,
                "sqlx pools must be built inside a tokio runtime",
            ));
        }
        let (node, access, settings, epoch) = (spec.node, spec.access, spec.settings, spec.epoch);
        let mut opts = options::parse(&node)?;
        if let Some(f) = &self.configure {
            opts = f(&node, access, opts);
        }
        let opts = options::for_access(opts, access, &settings);
        let refusals = Arc::new(watch::Sender::new(0u64));
        let connect_epoch = epoch.clone();

        let mut pool = PgPoolOptions::new()
            .max_connections(settings.max_size)
            .min_connections(0)
            .acquire_timeout(settings.connect_timeout)
            .max_lifetime(settings.max_lifetime)
            .idle_timeout(settings.idle_timeout)
            // `before_acquire` checks an idle session; sqlx's own ping would be a second round
            // trip (and one on every checkout).
            .test_before_acquire(false)
            .before_acquire(move |conn, meta: PoolConnectionMetadata| {
                let epoch = epoch.clone();
                Box::pin(async move {
                    // sqlx cannot stamp a connection, but knows its age: one older than the last
                    // topology change is closed, never handed out.
                    if !epoch.admits_age(meta.age) {
                        return Ok(false);
                    }
                    // sqlx enforces these only on release and in a reaper task that runs once
                    // per period, so an idle connection can outlive them by up to a period.
                    if settings.is_expired(meta.age, meta.idle_for) {
                        return Ok(false);
                    }
                    // A recently used read session came back through a reset that succeeded
                    // (or untouched): known good, no round trip. Writer sessions and idle ones
                    // are checked.
                    if !epoch.needs_check(&settings, access, meta.idle_for) {
                        return Ok(true);
                    }
                    Ok(session_check(conn, access, &epoch).await?.is_ok())
                })
            });
        if access.checks_at_connect() {
            let refusals = refusals.clone();
            let name: Arc<str> = Arc::from(node.name.as_str());
            pool = pool.after_connect(move |conn, _meta| {
                let refusals = refusals.clone();
                let name = name.clone();
                let epoch = connect_epoch.clone();
                Box::pin(async move {
                    match session_check(conn, access, &epoch).await? {
                        Ok(()) => Ok(()),
                        Err((ErrorKind::NotWriter, why)) => {
                            refusals.send_modify(|n| *n = n.wrapping_add(1));
                            Err(sqlx::Error::Protocol(format!("node {name}: {why}")))
                        }
                        Err((_, why)) => Err(sqlx::Error::Configuration(
                            format!("node {name}: {why}").into(),
                        )),
                    }
                })
            });
        }
        Ok(NodePool {
            pool: pool.connect_lazy_with(opts),
            node: Arc::from(node.name.as_str()),
            access,
            refusals,
        })
    }

    async fn checkout(pool: &NodePool) -> Result<PoolConnection<Postgres>, BackendError> {
        pool.acquire().await
    }

    async fn query_text<'a>(
        pooled: &'a mut PoolConnection<Postgres>,
        sql: &'a str,
    ) -> Result<Option<String>, BackendError> {
        // The router's own statements (the commit and replay positions on request paths) run
        // as prepared statements sqlx caches: one round trip without parsing and planning the
        // text again each time. Any other SQL stays a simple query (caching arbitrary texts
        // would churn the statement cache).
        let row = if is_router_statement(sql) {
            sqlx::query(AssertSqlSafe(sql))
                .fetch_optional(&mut **pooled)
                .await
        } else {
            sqlx::raw_sql(AssertSqlSafe(sql))
                .fetch_optional(&mut **pooled)
                .await
        }
        .map_err(backend_error)?;
        match row {
            Some(row) => row.try_get::<Option<String>, _>("v").map_err(backend_error),
            None => Ok(None),
        }
    }

    async fn execute<'a>(
        pooled: &'a mut PoolConnection<Postgres>,
        sql: &'a str,
    ) -> Result<u64, BackendError> {
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut **pooled)
            .await
            .map(|done| done.rows_affected())
            .map_err(backend_error)
    }

    async fn execute_batch<'a>(
        pooled: &'a mut PoolConnection<Postgres>,
        sql: &'a str,
    ) -> Result<(), BackendError> {
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut **pooled)
            .await
            .map(drop)
            .map_err(backend_error)
    }

    fn discard(pooled: &mut PoolConnection<Postgres>) {
        pooled.close_on_drop();
    }

    /// A `sqlx::Transaction` leaked without being dropped leaves sqlx counting it open; a
    /// server-side ROLLBACK would not tell sqlx, whose next `begin()` would then only open a
    /// savepoint.
    fn reusable(pooled: &mut PoolConnection<Postgres>) -> bool {
        !pooled.is_in_transaction()
    }

    fn classify(err: &sqlx::Error) -> ErrorKind {
        crate::errors::classify(err)
    }

    fn pool_state(pool: &NodePool) -> Option<routing_core::PoolState> {
        Some(routing_core::PoolState {
            connections: pool.pool.size(),
            idle: u32::try_from(pool.pool.num_idle()).unwrap_or(u32::MAX),
        })
    }

    fn sqlstate(err: &sqlx::Error) -> Option<String> {
        crate::errors::sqlstate(err)
    }

    /// One round trip: `raw_sql` sends both statements as one simple-protocol query.
    async fn commit_returning_lsn(
        pooled: &mut PoolConnection<Postgres>,
    ) -> Result<Option<routing_core::Lsn>, BackendError> {
        routing_core::parse_lsn(Self::query_text(pooled, routing_core::sql::COMMIT_THEN_LSN).await?)
    }
}
