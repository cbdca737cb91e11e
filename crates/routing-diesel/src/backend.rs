//! The [`Backend`] implementation: one bb8 pool of diesel-async connections per node and access.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bb8::ManageConnection;
use diesel::OptionalExtension;
use diesel::QueryableByName;
use diesel::sql_types::{Nullable, Text};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, PoolError, PoolableConnection,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use routing_core::{
    Access, Backend, BackendError, Epoch, ErrorKind, Lsn, PoolSettings, PoolSpec, sql,
};
use tokio::sync::watch;
use tokio_postgres::config::TargetSessionAttrs;

use crate::error;
use crate::lsn::Static;

/// The diesel-async backend: `Router<DieselBackend>` hands out [`AsyncPgConnection`]s.
///
/// Per node it keeps three lazily filled bb8 pools: writers (each new session is checked with
/// [`sql::WRITER_CHECK`] and refused if the node is in recovery), readers and probes (sessions
/// made read-only at the server with `SET default_transaction_read_only = on`). Every session is
/// stamped with the topology generation it was made under and never handed out once the
/// generation moved on.
#[derive(Debug, Clone, Default)]
pub struct DieselBackend {
    _private: (),
}

impl DieselBackend {
    /// The backend. It has no settings of its own: pools follow the router's
    /// [`routing_core::PoolSettings`].
    pub fn new() -> Self {
        DieselBackend::default()
    }
}

/// One node's pool for one [`Access`].
pub struct DieselPool {
    pool: bb8::Pool<Manager>,
    shared: Arc<Shared>,
}

impl fmt::Debug for DieselPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.pool.state();
        f.debug_struct("DieselPool")
            .field("node", &self.shared.node)
            .field("access", &self.shared.access)
            .field("connections", &state.connections)
            .field("idle", &state.idle_connections)
            .finish()
    }
}

impl DieselPool {
    /// The node this pool connects to.
    pub fn node_name(&self) -> &str {
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

/// A session checked out of a [`DieselPool`]; dereferences to [`AsyncPgConnection`] and goes back
/// to its pool when dropped.
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
}

impl Deref for PooledConn {
    type Target = AsyncPgConnection;
    fn deref(&self) -> &AsyncPgConnection {
        &self.inner.conn
    }
}

impl DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut AsyncPgConnection {
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
    conn: AsyncPgConnection,
    generation: u64,
    born: Instant,
    label: Arc<str>,
    /// Set by [`Backend::discard`]: closed when returned, never reused.
    discarded: bool,
    /// When the session last went back to the pool (bb8 asks `has_broken` then).
    idle_since: Instant,
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
    /// `pg-1 reader`: the prefix of every error message.
    label: Arc<str>,
    epoch: Epoch,
    settings: PoolSettings,
    failures: watch::Sender<Option<Failure>>,
}

impl Shared {
    fn err(&self, kind: ErrorKind, what: impl fmt::Display) -> BackendError {
        BackendError::new(kind, format!("{}: {what}", self.label))
    }
}

/// bb8 manager: diesel-async's manager for connecting, plus the generation stamp, the
/// writer check and the checkout checks.
struct Manager {
    inner: AsyncDieselConnectionManager<AsyncPgConnection>,
    shared: Arc<Shared>,
}

impl ManageConnection for Manager {
    type Connection = Conn;
    type Error = BackendError;

    async fn connect(&self) -> Result<Conn, BackendError> {
        let s = &self.shared;
        // Stamp with the generation from before connecting: if roles change while we connect,
        // the session is refused at checkout and made again under the new generation.
        let generation = s.epoch.generation();
        let made =
            match tokio::time::timeout(s.settings.connect_timeout, self.inner.connect()).await {
                Ok(Ok(conn)) => Ok(conn),
                Ok(Err(PoolError::ConnectionError(e))) => {
                    Err(error::from_connection_error(&s.label, e))
                }
                Ok(Err(PoolError::QueryError(e))) => Err(error::query_error(&s.label, e)),
                Err(_) => Err(s.err(
                    ErrorKind::Connection,
                    format_args!("could not connect within {:?}", s.settings.connect_timeout),
                )),
            };
        match made {
            Ok(conn) => Ok(Conn {
                conn,
                generation,
                born: Instant::now(),
                label: s.label.clone(),
                discarded: false,
                idle_since: Instant::now(),
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
        if s.settings.is_expired(c.born.elapsed(), Duration::ZERO) {
            return Err(s.err(ErrorKind::Connection, "session past max_lifetime"));
        }
        if self.inner.has_broken(&mut c.conn) {
            // Costs no round trip: the socket is known closed (the node died), or a diesel
            // transaction was left open. Never hand those out, pre-ping or not.
            return Err(s.err(ErrorKind::Connection, "session closed"));
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
        // diesel-async: the socket closed, or a diesel-managed transaction was left open/failed.
        c.discarded || self.inner.has_broken(&mut c.conn)
    }
}

/// Every connection the pool may open is open (in use when the wait ran out; one released
/// just then does not make it a connect failure).
fn is_exhausted(pool: &bb8::Pool<Manager>, s: &Shared) -> bool {
    pool.state().connections >= s.settings.max_size.max(1)
}

#[derive(QueryableByName)]
struct TextRow {
    #[diesel(sql_type = Nullable<Text>)]
    v: Option<String>,
}

/// Runs `sql` (one text column named `v`) and returns the first row's value. The router's own
/// statements (constants of [`sql`]) run as cached prepared statements ([`Static`]): one round
/// trip, where `sql_query` prepares, runs and closes a statement each time.
async fn text_query(
    label: &str,
    conn: &mut AsyncPgConnection,
    sql: &str,
) -> Result<Option<String>, BackendError> {
    let row = match Static::of(sql) {
        Some(stmt) => stmt.get_result::<TextRow>(conn).await,
        None => diesel::sql_query(sql).get_result::<TextRow>(conn).await,
    };
    row.optional()
        .map(|row| row.and_then(|r| r.v))
        .map_err(|e| error::query_error(label, e))
}

/// Runs the access's check query and applies routing-core's verdict (a writer session on a node
/// in recovery is refused with `NotWriter`, a reader session that is not read-only with `Config`).
async fn session_check(
    label: &str,
    access: Access,
    epoch: &Epoch,
    conn: &mut AsyncPgConnection,
) -> Result<(), BackendError> {
    let answer = text_query(label, conn, access.check_sql()).await?;
    access
        .judge_check(answer.as_deref(), epoch)
        .map_err(|kind| {
            let why = access.check_failure(answer.as_deref());
            BackendError::new(kind, format!("{label}: {why}"))
        })
}

/// diesel-async's `custom_setup`: connect (keeping the server's SQLSTATE for classification),
/// then prepare the session for its access mode.
async fn establish(setup: Arc<Setup>, url: String) -> Result<AsyncPgConnection, BackendError> {
    let label = &setup.label;
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
        BackendError::new(
            ErrorKind::Config,
            format!("{label}: {}", error::with_causes(&e)),
        )
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(setup.connect_timeout);
    }
    // Session defaults travel in the startup packet: `RESET ALL` and `DISCARD ALL` restore
    // them rather than undo them, which a `SET` after connect would not survive.
    let mut options: Vec<String> = config
        .get_options()
        .map(str::to_string)
        .into_iter()
        .collect();
    let read_only = matches!(setup.access, Access::ReadOnly | Access::Probe);
    // With `target_session_attrs=read-write`, tokio-postgres asks each host whether its session
    // is read-write and would refuse every one of them: such sessions are made read-only after
    // connect instead (a `RESET ALL` inside a request then undoes it until the session's reset;
    // a read-only role, `NodeConfig::reader_url`, holds regardless).
    let picks_writer = config.get_target_session_attrs() == TargetSessionAttrs::ReadWrite;
    if read_only && !picks_writer {
        let (name, value) = sql::READ_ONLY_SETTING;
        options.push(format!("-c {name}={value}"));
    }
    if let Some(t) = setup.statement_timeout {
        options.push(format!("-c statement_timeout={}", t.as_millis().max(1)));
    }
    if !options.is_empty() {
        config.options(options.join(" "));
    }
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| error::pg_error(label, e))?;
    let mut conn = AsyncPgConnection::try_from_client_and_connection(client, connection)
        .await
        .map_err(|e| error::from_connection_error(label, e))?;
    if read_only && picks_writer {
        conn.batch_execute(sql::SET_READ_ONLY)
            .await
            .map_err(|e| error::query_error(label, e))?;
    }
    if setup.access.checks_at_connect() {
        session_check(label, setup.access, &setup.epoch, &mut conn).await?;
    }
    Ok(conn)
}

/// What `custom_setup` needs.
struct Setup {
    label: String,
    access: Access,
    epoch: Epoch,
    connect_timeout: Duration,
    statement_timeout: Option<Duration>,
}

fn access_label(access: Access) -> &'static str {
    match access {
        Access::ReadWrite => "writer",
        Access::ReadOnly => "reader",
        Access::Probe => "probe",
    }
}

impl Backend for DieselBackend {
    type Pool = DieselPool;
    type Pooled = PooledConn;
    type Connection = AsyncPgConnection;
    type QueryError = diesel::result::Error;

    fn build_pool(&self, spec: PoolSpec) -> Result<DieselPool, BackendError> {
        let PoolSpec {
            node,
            access,
            settings,
            epoch,
        } = spec;
        let label = format!("{} {}", node.name, access_label(access));
        // Parse now so a bad URL fails the router's build, naming the node, instead of every
        // checkout later. Multi-host URLs with target_session_attrs are tokio-postgres's.
        node.url
            .expose()
            .parse::<tokio_postgres::Config>()
            .map_err(|e| {
                BackendError::new(
                    ErrorKind::Config,
                    format!("{label}: {} ({})", error::with_causes(&e), node.url),
                )
            })?;
        let setup = Arc::new(Setup {
            label: label.clone(),
            access,
            epoch: epoch.clone(),
            connect_timeout: settings.connect_timeout,
            statement_timeout: settings.statement_timeout,
        });
        let mut config = ManagerConfig::<AsyncPgConnection>::default();
        config.custom_setup = Box::new(move |url: &str| {
            let setup = setup.clone();
            let url = url.to_owned();
            Box::pin(async move {
                establish(setup, url)
                    .await
                    .map_err(error::into_connection_error)
            })
        });
        let shared = Arc::new(Shared {
            node: Arc::from(node.name.as_str()),
            access,
            label: Arc::from(label),
            epoch,
            settings,
            failures: watch::channel(None).0,
        });
        let manager = Manager {
            inner: AsyncDieselConnectionManager::new_with_config(node.url.expose(), config),
            shared: shared.clone(),
        };
        let pool = bb8::Pool::builder()
            .max_size(settings.max_size.max(1))
            .min_idle(Some(0))
            .connection_timeout(settings.connect_timeout)
            .max_lifetime(settings.max_lifetime)
            .idle_timeout(settings.idle_timeout)
            // Always: the generation check runs at every checkout (no round trip); the check
            // query only with pre_ping, on a session that sat idle.
            .test_on_check_out(true)
            // The router decides what to do about a node that refuses connections.
            .retry_connection(false)
            .build_unchecked(manager);
        Ok(DieselPool { pool, shared })
    }

    async fn checkout(pool: &DieselPool) -> Result<PooledConn, BackendError> {
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
            // A connect attempt failed while we waited: that is the answer (bb8 itself would
            // only time out).
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
        let c = &mut *pooled.inner;
        text_query(&c.label, &mut c.conn, sql).await
    }

    async fn execute<'a>(pooled: &'a mut PooledConn, sql: &'a str) -> Result<u64, BackendError> {
        let c = &mut *pooled.inner;
        diesel::sql_query(sql)
            .execute(&mut c.conn)
            .await
            .map(|n| n as u64)
            .map_err(|e| error::query_error(&c.label, e))
    }

    async fn execute_batch<'a>(
        pooled: &'a mut PooledConn,
        sql: &'a str,
    ) -> Result<(), BackendError> {
        let c = &mut *pooled.inner;
        c.conn
            .batch_execute(sql)
            .await
            .map_err(|e| error::query_error(&c.label, e))
    }

    fn discard(pooled: &mut PooledConn) {
        pooled.inner.discarded = true;
    }

    /// A diesel transaction left open (its future dropped) is still open to diesel's transaction
    /// manager; a server-side ROLLBACK would not tell it, and its next `transaction()` would only
    /// open a savepoint.
    fn reusable(pooled: &mut PooledConn) -> bool {
        !pooled.inner.conn.is_broken()
    }

    fn classify(err: &diesel::result::Error) -> ErrorKind {
        error::classify(err)
    }

    fn pool_state(pool: &DieselPool) -> Option<routing_core::PoolState> {
        let state = pool.pool.state();
        Some(routing_core::PoolState {
            connections: state.connections,
            idle: state.idle_connections,
        })
    }

    fn sqlstate(err: &diesel::result::Error) -> Option<String> {
        error::sqlstate(err).map(str::to_string)
    }

    /// Read as diesel's binary `PgLsn`, not text.
    async fn current_wal_lsn(pooled: &mut PooledConn) -> Result<Option<Lsn>, BackendError> {
        let c = &mut *pooled.inner;
        crate::lsn::commit_lsn(&mut c.conn)
            .await
            .map_err(|e| error::query_error(&c.label, e))
    }

    /// One round trip: the COMMIT and the LSN query are pipelined (diesel-async sends requests
    /// made through a shared reference without waiting for the previous answer; the server runs
    /// them in order, so the position is read after the COMMIT, whatever became of it). A failed
    /// COMMIT is the answer; the position is then ignored.
    async fn commit_returning_lsn(pooled: &mut PooledConn) -> Result<Option<Lsn>, BackendError> {
        let c = &mut *pooled.inner;
        let conn: &AsyncPgConnection = &c.conn;
        let commit = async {
            let mut shared = conn;
            SimpleAsyncConnection::batch_execute(&mut shared, sql::COMMIT).await
        };
        let mut commit = std::pin::pin!(commit);
        // Poll the COMMIT once before the position query exists: that sends it first.
        let early = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(commit.as_mut(), cx))
        })
        .await;
        let position = crate::lsn::commit_lsn_shared(conn);
        let (committed, position) = match early {
            std::task::Poll::Ready(done) => (done, position.await),
            std::task::Poll::Pending => tokio::join!(commit, position),
        };
        committed.map_err(|e| error::query_error(&c.label, e))?;
        position.map_err(|e| error::query_error(&c.label, e))
    }
}
