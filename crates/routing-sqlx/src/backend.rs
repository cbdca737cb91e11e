//! [`SqlxBackend`]: one bb8 pool of sqlx [`PgConnection`]s per node and access mode.
//!
//! Not sqlx's own `PgPool`: it pings every connection as it comes back (a round trip and a task
//! per request), which the router's reset already does and proves (see ARCHITECTURE.md, "The
//! hot path"), and it cannot stamp a connection with the topology generation it was made under.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bb8::ManageConnection;
use routing_core::PoolSettings;
use routing_core::{Access, Backend, BackendError, Epoch, ErrorKind, NodeConfig, PoolSpec};
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};
use tokio::sync::watch;

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

/// One node's pool for one [`Access`] mode.
pub struct NodePool {
    pool: bb8::Pool<Manager>,
    shared: Arc<Shared>,
}

impl fmt::Debug for NodePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.pool.state();
        f.debug_struct("NodePool")
            .field("node", &self.shared.node)
            .field("access", &self.shared.access)
            .field("connections", &state.connections)
            .field("idle", &state.idle_connections)
            .finish()
    }
}

impl NodePool {
    /// The node's name.
    pub fn node(&self) -> &str {
        &self.shared.node
    }

    /// What the pool's sessions are for.
    pub fn access(&self) -> Access {
        self.shared.access
    }

    /// bb8's view: open and idle connections.
    pub fn state(&self) -> bb8::State {
        self.pool.state()
    }
}

/// A session checked out of a [`NodePool`]; dereferences to [`PgConnection`] and goes back to
/// its pool when dropped.
pub struct PooledConn {
    inner: bb8::PooledConnection<'static, Manager>,
}

impl PooledConn {
    /// The topology generation this session was made under.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// How long ago the session was opened.
    pub fn age(&self) -> Duration {
        self.inner.born.elapsed()
    }

    /// Runs one of the adapter's own statements. Dropped before it finished (a timeout, a
    /// cancelled request), or failed at the transport, the session is discarded when it
    /// returns: sqlx would otherwise hand the next holder a connection with an answer still on
    /// the way, or a dead one (sqlx tells neither, and the monitor's probes return sessions
    /// without a reset).
    async fn run<T>(
        &mut self,
        op: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let c = &mut *self.inner;
        c.suspect = true;
        let out = op(&mut c.conn).await;
        c.suspect = matches!(&out, Err(e) if crate::errors::classify(e) == ErrorKind::Connection);
        out
    }
}

impl Deref for PooledConn {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.inner.conn
    }
}

impl DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.inner.conn
    }
}

impl fmt::Debug for PooledConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledConn")
            .field("generation", &self.inner.generation)
            .field("age", &self.inner.born.elapsed())
            .finish_non_exhaustive()
    }
}

/// A pooled session with what the checkout checks need.
struct Conn {
    conn: PgConnection,
    generation: u64,
    born: Instant,
    /// When the session last went back to the pool (bb8 asks `has_broken` then).
    idle_since: Instant,
    /// Set by [`Backend::discard`]: closed when returned, never reused.
    discarded: bool,
    /// One of the adapter's statements is in flight or lost its connection (see
    /// [`PooledConn::run`]).
    suspect: bool,
}

/// A connect failure, kept so checkouts waiting on the pool fail at once with the cause instead
/// of waiting for bb8's timeout (bb8 only hands connect errors to its error sink).
#[derive(Clone)]
struct Failure {
    kind: ErrorKind,
    sqlstate: Option<String>,
    message: String,
}

impl Failure {
    fn of(e: &BackendError) -> Self {
        Failure {
            kind: e.kind,
            sqlstate: e.sqlstate.clone(),
            message: e.message.clone(),
        }
    }

    fn to_error(&self) -> BackendError {
        let mut e = BackendError::new(self.kind, &self.message);
        e.sqlstate = self.sqlstate.clone();
        e
    }
}

/// What the pool and its manager share.
struct Shared {
    node: Arc<str>,
    access: Access,
    /// `pg-1 (ReadOnly)`: the prefix of every error message.
    label: String,
    epoch: Epoch,
    settings: PoolSettings,
    failures: watch::Sender<Option<Failure>>,
}

impl Shared {
    fn err(&self, kind: ErrorKind, what: impl fmt::Display) -> BackendError {
        BackendError::new(kind, format!("{}: {what}", self.label))
    }
}

/// bb8 manager: sqlx's connect, the generation stamp, the connect-time check (a writer session
/// on a node in recovery is refused) and the checkout checks.
struct Manager {
    opts: PgConnectOptions,
    shared: Arc<Shared>,
}

impl Manager {
    async fn try_connect(&self) -> Result<PgConnection, BackendError> {
        let s = &self.shared;
        let limit = s.settings.connect_timeout;
        let mut conn = tokio::time::timeout(limit, PgConnection::connect_with(&self.opts))
            .await
            .map_err(|_| {
                s.err(
                    ErrorKind::Connection,
                    format_args!("could not connect within {limit:?}"),
                )
            })?
            .map_err(|e| backend_error_at(&s.label, e))?;
        if s.access.checks_at_connect() {
            session_check(&s.label, s.access, &s.epoch, &mut conn).await?;
        }
        Ok(conn)
    }
}

impl ManageConnection for Manager {
    type Connection = Conn;
    type Error = BackendError;

    async fn connect(&self) -> Result<Conn, BackendError> {
        let s = &self.shared;
        // Stamp with the generation from before connecting: if roles change while we connect,
        // the session is refused at checkout and made again under the new generation.
        let generation = s.epoch.generation();
        match self.try_connect().await {
            Ok(conn) => Ok(Conn {
                conn,
                generation,
                born: Instant::now(),
                idle_since: Instant::now(),
                discarded: false,
                suspect: false,
            }),
            Err(e) => {
                tracing::debug!(node = %s.node, access = ?s.access, error = %e, "connect failed");
                s.failures.send_replace(Some(Failure::of(&e)));
                Err(e)
            }
        }
    }

    async fn is_valid(&self, c: &mut Conn) -> Result<(), BackendError> {
        let s = &self.shared;
        if !s.epoch.admits(c.generation) {
            return Err(s.err(
                ErrorKind::Connection,
                format_args!(
                    "session from topology generation {} refused (now {})",
                    c.generation,
                    s.epoch.generation()
                ),
            ));
        }
        // bb8's reaper enforces these only once per period: an idle session can outlive them.
        if s.settings
            .is_expired(c.born.elapsed(), c.idle_since.elapsed())
        {
            return Err(s.err(
                ErrorKind::Connection,
                "session past max_lifetime or idle_timeout",
            ));
        }
        // A recently used read session came back through a reset that succeeded (or
        // untouched): known good, no round trip. Writer sessions and idle ones are checked.
        if !s
            .epoch
            .needs_check(&s.settings, s.access, c.idle_since.elapsed())
        {
            return Ok(());
        }
        session_check(&s.label, s.access, &s.epoch, &mut c.conn).await
    }

    fn has_broken(&self, c: &mut Conn) -> bool {
        // bb8 asks on every return to the pool: the session's idle time starts now.
        c.idle_since = Instant::now();
        // A `sqlx::Transaction` leaked with `mem::forget` leaves sqlx counting it open.
        c.discarded || c.suspect || c.conn.is_in_transaction()
    }
}

/// Every connection the pool may open is open (in use when the wait ran out; one released
/// just then does not make it a connect failure).
fn is_exhausted(pool: &bb8::Pool<Manager>, s: &Shared) -> bool {
    pool.state().connections >= s.settings.max_size.max(1)
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
        let PoolSpec {
            node,
            access,
            settings,
            epoch,
        } = spec;
        let mut opts = options::parse(&node)?;
        if let Some(f) = &self.configure {
            opts = f(&node, access, opts);
        }
        let opts = options::for_access(opts, access, &settings);
        let shared = Arc::new(Shared {
            node: Arc::from(node.name.as_str()),
            access,
            label: format!("{} ({access:?})", node.name),
            epoch,
            settings,
            failures: watch::channel(None).0,
        });
        let manager = Manager {
            opts,
            shared: shared.clone(),
        };
        let pool = bb8::Pool::builder()
            .max_size(settings.max_size.max(1))
            .min_idle(Some(0))
            .connection_timeout(settings.connect_timeout)
            .max_lifetime(settings.max_lifetime)
            .idle_timeout(settings.idle_timeout)
            // Always: the generation check runs at every checkout (no round trip); the check
            // query only on a session that sat idle, or after trouble.
            .test_on_check_out(true)
            // The router decides what to do about a node that refuses connections.
            .retry_connection(false)
            .build_unchecked(manager);
        Ok(NodePool { pool, shared })
    }

    async fn checkout(pool: &NodePool) -> Result<PooledConn, BackendError> {
        let s = &pool.shared;
        let mut failures = s.failures.subscribe();
        failures.mark_unchanged();
        tokio::select! {
            biased;
            got = pool.pool.get_owned() => match got {
                Ok(inner) => Ok(PooledConn { inner }),
                Err(bb8::RunError::User(e)) => Err(e),
                // bb8 counts only established connections (not connects in flight): all of
                // them in use means the wait was for a free session, and the node answers.
                Err(bb8::RunError::TimedOut) if is_exhausted(&pool.pool, s) => Err(s.err(
                    ErrorKind::PoolBusy,
                    format_args!(
                        "no free session within {:?}: all {} in use",
                        s.settings.connect_timeout,
                        pool.pool.state().connections
                    ),
                )),
                Err(bb8::RunError::TimedOut) => Err(s.err(
                    ErrorKind::Timeout,
                    format_args!("could not connect within {:?}", s.settings.connect_timeout),
                )),
            },
            // A connect attempt failed while we waited (refused, in recovery for a writer,
            // bad password): that is the answer; bb8 itself would only time out.
            Ok(()) = failures.changed() => {
                let failure = failures.borrow_and_update().clone();
                Err(failure.map_or_else(
                    || s.err(ErrorKind::Connection, "connect failed"),
                    |f| f.to_error(),
                ))
            }
        }
    }

    async fn query_text<'a>(
        pooled: &'a mut PooledConn,
        sql: &'a str,
    ) -> Result<Option<String>, BackendError> {
        pooled
            .run(async |conn| text_query(conn, sql).await)
            .await
            .map_err(backend_error)
    }

    async fn execute<'a>(pooled: &'a mut PooledConn, sql: &'a str) -> Result<u64, BackendError> {
        pooled
            .run(async |conn| sqlx::raw_sql(AssertSqlSafe(sql)).execute(conn).await)
            .await
            .map(|done| done.rows_affected())
            .map_err(backend_error)
    }

    async fn execute_batch<'a>(
        pooled: &'a mut PooledConn,
        sql: &'a str,
    ) -> Result<(), BackendError> {
        pooled
            .run(async |conn| sqlx::raw_sql(AssertSqlSafe(sql)).execute(conn).await)
            .await
            .map(drop)
            .map_err(backend_error)
    }

    fn discard(pooled: &mut PooledConn) {
        pooled.inner.discarded = true;
    }

    /// A `sqlx::Transaction` leaked without being dropped leaves sqlx counting it open; a
    /// server-side ROLLBACK would not tell sqlx, whose next `begin()` would then only open a
    /// savepoint.
    fn reusable(pooled: &mut PooledConn) -> bool {
        !pooled.inner.conn.is_in_transaction()
    }

    fn classify(err: &sqlx::Error) -> ErrorKind {
        crate::errors::classify(err)
    }

    fn pool_state(pool: &NodePool) -> Option<routing_core::PoolState> {
        let state = pool.pool.state();
        Some(routing_core::PoolState {
            connections: state.connections,
            idle: state.idle_connections,
        })
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
