//! The [`Backend`] implementation: one bb8 pool of diesel-async connections per node and access.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bb8::ManageConnection;
use diesel::OptionalExtension;
use diesel::QueryableByName;
use diesel::sql_types::{Nullable, Text};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, PoolError, PoolableConnection,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use routing_core::pool::{Driver, PooledSession, StampedPool};
use routing_core::{Access, Backend, BackendError, Epoch, ErrorKind, Lsn, PoolSpec, sql};
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

/// One node's pool for one [`Access`] (routing-core's [`StampedPool`] over diesel-async).
pub type DieselPool = StampedPool<DieselDriver>;

/// How routing-core's pool connects and checks diesel-async sessions: diesel-async's manager
/// connects (through [`establish`]), and knows a closed socket or an open diesel transaction
/// without a round trip.
pub struct DieselDriver {
    inner: AsyncDieselConnectionManager<AsyncPgConnection>,
    access: Access,
    epoch: Epoch,
    /// `pg-1 reader`: the prefix of every error message.
    label: String,
}

impl fmt::Debug for DieselDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DieselDriver")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl Driver for DieselDriver {
    type Conn = AsyncPgConnection;

    async fn connect(&self) -> Result<AsyncPgConnection, BackendError> {
        self.inner.connect().await.map_err(|e| match e {
            PoolError::ConnectionError(e) => error::from_connection_error(&self.label, e),
            PoolError::QueryError(e) => error::query_error(&self.label, e),
        })
    }

    async fn check<'a>(&'a self, conn: &'a mut AsyncPgConnection) -> Result<(), BackendError> {
        session_check(&self.label, self.access, &self.epoch, conn).await
    }

    /// diesel-async: the socket closed, or a diesel-managed transaction was left open/failed.
    fn has_broken(&self, conn: &mut AsyncPgConnection) -> bool {
        self.inner.has_broken(conn)
    }
}

/// A session checked out of a [`DieselPool`]; dereferences to [`AsyncPgConnection`] and goes back
/// to its pool when dropped.
pub type PooledConn = PooledSession<DieselDriver>;

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
    Ok(conn)
}

/// What `custom_setup` needs.
struct Setup {
    label: String,
    access: Access,
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
        let (node, access, settings) = (&spec.node, spec.access, &spec.settings);
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
        let driver = DieselDriver {
            inner: AsyncDieselConnectionManager::new_with_config(node.url.expose(), config),
            access,
            epoch: spec.epoch.clone(),
            label: label.clone(),
        };
        Ok(StampedPool::new(spec, label, driver))
    }

    async fn checkout(pool: &DieselPool) -> Result<PooledConn, BackendError> {
        pool.checkout().await
    }

    async fn query_text<'a>(
        pooled: &'a mut PooledConn,
        sql: &'a str,
    ) -> Result<Option<String>, BackendError> {
        pooled
            .run(async |conn, label| text_query(label, conn, sql).await)
            .await
    }

    async fn execute<'a>(pooled: &'a mut PooledConn, sql: &'a str) -> Result<u64, BackendError> {
        pooled
            .run(async |conn, label| {
                diesel::sql_query(sql)
                    .execute(conn)
                    .await
                    .map(|n| n as u64)
                    .map_err(|e| error::query_error(label, e))
            })
            .await
    }

    async fn execute_batch<'a>(
        pooled: &'a mut PooledConn,
        sql: &'a str,
    ) -> Result<(), BackendError> {
        pooled
            .run(async |conn, label| {
                conn.batch_execute(sql)
                    .await
                    .map_err(|e| error::query_error(label, e))
            })
            .await
    }

    fn hold_standby(pool: &DieselPool) {
        pool.hold_standby();
    }

    async fn admit_standby(pool: &DieselPool) -> bool {
        pool.admit_standby().await
    }

    fn release_standby(pool: &DieselPool) {
        pool.release_standby();
    }

    fn discard(pooled: &mut PooledConn) {
        pooled.discard();
    }

    /// A diesel transaction left open (its future dropped) is still open to diesel's transaction
    /// manager; a server-side ROLLBACK would not tell it, and its next `transaction()` would only
    /// open a savepoint.
    fn reusable(pooled: &mut PooledConn) -> bool {
        !pooled.is_broken()
    }

    fn classify(err: &diesel::result::Error) -> ErrorKind {
        error::classify(err)
    }

    fn pool_state(pool: &DieselPool) -> Option<routing_core::PoolState> {
        Some(pool.pool_state())
    }

    fn sqlstate(err: &diesel::result::Error) -> Option<String> {
        error::sqlstate(err).map(str::to_string)
    }

    /// Read as diesel's binary `PgLsn`, not text.
    async fn current_wal_lsn(pooled: &mut PooledConn) -> Result<Option<Lsn>, BackendError> {
        pooled
            .run(async |conn, label| {
                crate::lsn::commit_lsn(conn)
                    .await
                    .map_err(|e| error::query_error(label, e))
            })
            .await
    }

    /// One round trip: the COMMIT and the LSN query are pipelined (diesel-async sends requests
    /// made through a shared reference without waiting for the previous answer; the server runs
    /// them in order, so the position is read after the COMMIT, whatever became of it). A failed
    /// COMMIT is the answer; the position is then ignored.
    async fn commit_returning_lsn(pooled: &mut PooledConn) -> Result<Option<Lsn>, BackendError> {
        pooled
            .run(async |conn, label| {
                let conn: &AsyncPgConnection = conn;
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
                committed.map_err(|e| error::query_error(label, e))?;
                position.map_err(|e| error::query_error(label, e))
            })
            .await
    }
}
