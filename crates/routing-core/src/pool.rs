//! The pool both adapters use (feature `bb8`): a bb8 pool whose connections are stamped with
//! the topology generation they were made under, checked at checkout only when the router's
//! rules say so, and whose connect failures reach the checkouts waiting on it.
//!
//! An adapter supplies a [`Driver`]: how to connect, the check query, and what the driver knows
//! about a broken session without a round trip. Everything else (the connect-time check,
//! generation, lifetimes, the idle threshold, `PoolBusy` against `Timeout`, handing connect
//! failures to waiting checkouts, the standby writer session) lives here, once.

use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bb8::ManageConnection;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::{Access, BackendError, Epoch, ErrorKind, PoolSettings, PoolSpec, PoolState};

pub use bb8;

/// What an adapter tells the pool about its driver.
pub trait Driver: Send + Sync + 'static {
    /// The driver's connection (with any per-session state the adapter keeps).
    type Conn: Send + 'static;

    /// Opens a session with the pool's access mode's startup settings (read-only readers, the
    /// statement timeout). The pool bounds it by `connect_timeout`, and runs [`Self::check`]
    /// on it where [`Access::checks_at_connect`] says so.
    fn connect(&self) -> impl Future<Output = Result<Self::Conn, BackendError>> + Send;

    /// Runs [`Access::check_sql`] on a pooled session and applies [`Access::judge_check`].
    fn check<'a>(
        &'a self,
        conn: &'a mut Self::Conn,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'a;

    /// What the driver knows without a round trip: the socket closed, a transaction it still
    /// counts open. Such a session is never reused.
    fn has_broken(&self, conn: &mut Self::Conn) -> bool;
}

/// A pooled session: the driver's connection and what the checkout checks need.
struct Stamped<C> {
    conn: C,
    generation: u64,
    born: Instant,
    /// The pool's label (`pg-1 reader`), for the adapter's error messages.
    label: Arc<str>,
    /// When the session last went back to the pool (bb8 asks `has_broken` then).
    idle_since: Instant,
    /// Set by [`PooledSession::discard`]: closed when returned, never reused.
    discarded: bool,
    /// One of the adapter's statements is in flight or lost its connection (see
    /// [`PooledSession::run`]).
    suspect: bool,
    /// Passed the access check when it was pooled ([`StampedPool::admit_standby`]): the first
    /// checkout soon after needs no second one.
    checked_at: Option<Instant>,
}

impl<C> Stamped<C> {
    /// A session opened at `born`, idle since now, not yet checked at a checkout.
    fn new(conn: C, generation: u64, born: Instant, label: Arc<str>) -> Self {
        Stamped {
            conn,
            generation,
            born,
            label,
            idle_since: Instant::now(),
            discarded: false,
            suspect: false,
            checked_at: None,
        }
    }
}

/// A session checked out of a [`StampedPool`]: dereferences to the driver's connection and goes
/// back to its pool when dropped (closed instead when [`Self::discard`]ed, when the driver
/// reports it broken, or when a statement run through [`Self::run`] did not finish cleanly).
pub struct PooledSession<D: Driver> {
    inner: Checkout<D>,
}

impl<D: Driver> PooledSession<D> {
    /// The topology generation this session was made under.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// How long ago the session was opened.
    pub fn age(&self) -> Duration {
        self.inner.born.elapsed()
    }

    /// The pool's label (`pg-1 reader`), the prefix of the adapter's error messages.
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// Closes the session when it returns instead of pooling it again.
    pub fn discard(&mut self) {
        self.inner.discarded = true;
    }

    /// Runs one of the adapter's own statements (the router's queries, resets, commits), given
    /// the connection and the pool's label. Dropped before it finished (a timeout, a cancelled
    /// request) or failed at the transport ([`ErrorKind::Connection`]), the session is closed
    /// when it returns: a driver may otherwise hand the next holder a connection with an answer
    /// still on the way, or a dead one (sqlx tells neither, and the monitor's probes return
    /// sessions without a reset).
    pub async fn run<T>(
        &mut self,
        op: impl AsyncFnOnce(&mut D::Conn, &str) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let s = &mut *self.inner;
        s.suspect = true;
        let out = op(&mut s.conn, &s.label).await;
        s.suspect = matches!(&out, Err(e) if e.kind == ErrorKind::Connection);
        out
    }
}

impl<D: Driver> Deref for PooledSession<D> {
    type Target = D::Conn;
    fn deref(&self) -> &D::Conn {
        &self.inner.conn
    }
}

impl<D: Driver> DerefMut for PooledSession<D> {
    fn deref_mut(&mut self) -> &mut D::Conn {
        &mut self.inner.conn
    }
}

impl<D: Driver> fmt::Debug for PooledSession<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledSession")
            .field("pool", &self.inner.label)
            .field("generation", &self.inner.generation)
            .field("age", &self.inner.born.elapsed())
            .finish_non_exhaustive()
    }
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

/// A session checked this recently when it was pooled is not checked again at its first checkout.
const JUST_CHECKED: Duration = Duration::from_millis(100);

/// What the pool and its manager share.
struct Shared {
    node: Arc<str>,
    access: Access,
    /// `pg-1 reader`: the prefix of the pool's own error messages.
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

/// The bb8 manager over a [`Driver`].
struct Manager<D: Driver> {
    driver: Arc<D>,
    shared: Arc<Shared>,
}

impl<D: Driver> ManageConnection for Manager<D> {
    type Connection = Stamped<D::Conn>;
    type Error = BackendError;

    async fn connect(&self) -> Result<Self::Connection, BackendError> {
        let s = &self.shared;
        // Stamp with the generation from before connecting: if roles change while we connect,
        // the session is refused at checkout and made again under the new generation.
        let generation = s.epoch.generation();
        let limit = s.settings.connect_timeout;
        let made = tokio::time::timeout(limit, async {
            let mut conn = self.driver.connect().await?;
            if s.access.checks_at_connect() {
                self.driver.check(&mut conn).await?;
            }
            Ok(conn)
        })
        .await;
        let made = made.unwrap_or_else(|_| {
            Err(s.err(
                ErrorKind::Connection,
                format_args!("could not connect within {limit:?}"),
            ))
        });
        match made {
            Ok(conn) => Ok(Stamped::new(
                conn,
                generation,
                Instant::now(),
                s.label.clone(),
            )),
            Err(e) => {
                tracing::debug!(node = %s.node, access = ?s.access, error = %e, "connect failed");
                s.failures.send_replace(Some(Failure::of(&e)));
                Err(e)
            }
        }
    }

    async fn is_valid(&self, c: &mut Self::Connection) -> Result<(), BackendError> {
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
        let idle_for = c.idle_since.elapsed();
        // bb8's reaper enforces these only once per period: an idle session can outlive them.
        if s.settings.is_expired(c.born.elapsed(), idle_for) {
            return Err(s.err(
                ErrorKind::Connection,
                "session past max_lifetime or idle_timeout",
            ));
        }
        if self.driver.has_broken(&mut c.conn) {
            // Costs no round trip: never hand those out, pre-ping or not.
            return Err(s.err(ErrorKind::Connection, "session closed"));
        }
        // A recently used read session came back through a reset that succeeded (or
        // untouched): known good, no round trip. Writer sessions and idle ones are checked.
        if !s.epoch.needs_check(&s.settings, s.access, idle_for) {
            return Ok(());
        }
        // Admitted from standby just now, through the same check.
        if c.checked_at
            .take()
            .is_some_and(|at| at.elapsed() < JUST_CHECKED)
        {
            return Ok(());
        }
        self.driver.check(&mut c.conn).await
    }

    fn has_broken(&self, c: &mut Self::Connection) -> bool {
        // bb8 asks on every return to the pool: the session's idle time starts now.
        c.idle_since = Instant::now();
        c.discarded || c.suspect || self.driver.has_broken(&mut c.conn)
    }
}

/// One node's pool for one [`Access`] mode.
pub struct StampedPool<D: Driver> {
    pool: bb8::Pool<Manager<D>>,
    shared: Arc<Shared>,
    driver: Arc<D>,
    standby: Arc<StandbySlot<D::Conn>>,
}

/// A writer pool's standby session (see [`StampedPool::hold_standby`]).
struct StandbySlot<C> {
    state: Mutex<Standby<C>>,
    /// `wanted` or `held`: false lets the write path skip the lock ([`StampedPool::admit_standby`]
    /// runs on every write checkout).
    active: AtomicBool,
}

struct Standby<C> {
    /// Asked for and not yet admitted or released: a connect that finishes is kept.
    wanted: bool,
    /// A connect is in flight.
    opening: bool,
    /// The connected, unchecked session and when it was opened.
    held: Option<(C, Instant)>,
}

impl<C> StandbySlot<C> {
    fn new() -> Self {
        StandbySlot {
            state: Mutex::new(Standby {
                wanted: false,
                opening: false,
                held: None,
            }),
            active: AtomicBool::new(false),
        }
    }

    /// Runs `f` on the state under the lock and keeps `active` in step with it.
    fn with<T>(&self, f: impl FnOnce(&mut Standby<C>) -> T) -> T {
        let mut st = self.state.lock();
        let out = f(&mut st);
        self.active
            .store(st.wanted || st.held.is_some(), Ordering::Release);
        out
    }

    /// No longer wanted: the held session, if any (a connect in flight is dropped when done).
    fn take(&self) -> Option<(C, Instant)> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        self.with(|st| {
            st.wanted = false;
            st.held.take()
        })
    }
}

type Checkout<D> = bb8::PooledConnection<'static, Manager<D>>;

impl<D: Driver> fmt::Debug for StampedPool<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.pool.state();
        f.debug_struct("StampedPool")
            .field("node", &self.shared.node)
            .field("access", &self.shared.access)
            .field("connections", &state.connections)
            .field("idle", &state.idle_connections)
            .finish()
    }
}

impl<D: Driver> StampedPool<D> {
    /// A lazily connecting pool for `spec` (needs a tokio runtime). `label` prefixes the pool's
    /// own error messages.
    pub fn new(spec: PoolSpec, label: impl Into<Arc<str>>, driver: D) -> Self {
        let PoolSpec {
            node,
            access,
            settings,
            epoch,
        } = spec;
        let shared = Arc::new(Shared {
            node: Arc::from(node.name.as_str()),
            access,
            label: label.into(),
            epoch,
            settings,
            failures: watch::channel(None).0,
        });
        let driver = Arc::new(driver);
        let manager = Manager {
            driver: driver.clone(),
            shared: shared.clone(),
        };
        let pool = bb8::Pool::builder()
            .max_size(settings.max_size.max(1))
            .min_idle(Some(0))
            .connection_timeout(settings.connect_timeout)
            .max_lifetime(settings.max_lifetime)
            .idle_timeout(settings.idle_timeout)
            // Always: the generation check runs at every checkout (no round trip); the check
            // query only with pre_ping, on a writer session or one that sat idle.
            .test_on_check_out(true)
            // The router decides what to do about a node that refuses connections.
            .retry_connection(false)
            .build_unchecked(manager);
        StampedPool {
            pool,
            shared,
            driver,
            standby: Arc::new(StandbySlot::new()),
        }
    }

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

    /// The router's view of [`Self::state`].
    pub fn pool_state(&self) -> PoolState {
        let state = self.pool.state();
        PoolState {
            connections: state.connections,
            idle: state.idle_connections,
            standby: self.holds_standby(),
        }
    }

    /// A session, or why not: [`ErrorKind::PoolBusy`] when every session is in use for the
    /// whole wait, [`ErrorKind::Timeout`] when connecting took too long, and the cause at once
    /// when a connect attempt fails while we wait (refused, in recovery for a writer, a bad
    /// password), where bb8 itself would only time out.
    pub async fn checkout(&self) -> Result<PooledSession<D>, BackendError> {
        let s = &self.shared;
        let mut failures = s.failures.subscribe();
        failures.mark_unchanged();
        tokio::select! {
            biased;
            got = self.pool.get_owned() => match got {
                Ok(inner) => Ok(PooledSession { inner }),
                Err(bb8::RunError::User(e)) => Err(e),
                // bb8 counts only established connections (not connects in flight): all of
                // them in use means the wait was for a free session, and the node answers.
                Err(bb8::RunError::TimedOut) if self.is_exhausted() => Err(s.err(
                    ErrorKind::PoolBusy,
                    format_args!(
                        "no free session within {:?}: all {} in use",
                        s.settings.connect_timeout,
                        self.pool.state().connections
                    ),
                )),
                Err(bb8::RunError::TimedOut) => Err(s.err(
                    ErrorKind::Timeout,
                    format_args!("could not connect within {:?}", s.settings.connect_timeout),
                )),
            },
            Ok(()) = failures.changed() => {
                let failure = failures.borrow_and_update().clone();
                Err(failure.map_or_else(
                    || s.err(ErrorKind::Connection, "connect failed"),
                    |f| f.to_error(),
                ))
            }
        }
    }

    /// Keeps one session connected, and not yet checked, to a writer pool's node while it is not
    /// the writer (no writer is elected: a failover is under way), so that when the node is
    /// elected the first write needs no connection setup ([`Self::admit_standby`]). A server
    /// that has just been promoted, or restarted and promoted, may take a long time to accept
    /// a connection; one made while it was still in recovery serves at once. The session is
    /// never handed out before it passed the writer check under the new generation. Opens it
    /// in a task of its own; does nothing when one is held or opening, or for other pools.
    pub fn hold_standby(&self) {
        if self.shared.access != Access::ReadWrite {
            return;
        }
        let open = self.standby.with(|st| {
            st.wanted = true;
            let open = !st.opening && st.held.is_none();
            st.opening |= open;
            open
        });
        if !open {
            return;
        }
        let slot = Arc::downgrade(&self.standby);
        let driver = self.driver.clone();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let limit = shared.settings.connect_timeout;
            let made = tokio::time::timeout(limit, driver.connect()).await;
            // The pool is gone: drop the session with the task.
            let Some(slot) = slot.upgrade() else { return };
            // A session no longer wanted is closed here, outside the lock.
            let unwanted = slot.with(|st| {
                st.opening = false;
                match made {
                    Ok(Ok(conn)) if st.wanted => {
                        st.held = Some((conn, Instant::now()));
                        None
                    }
                    Ok(Ok(conn)) => Some(conn),
                    Ok(Err(e)) => {
                        tracing::debug!(node = %shared.node, error = %e, "standby connect failed");
                        None
                    }
                    Err(_) => {
                        tracing::debug!(node = %shared.node, "standby connect timed out");
                        None
                    }
                }
            });
            drop(unwanted);
        });
    }

    /// Once the node is the elected writer: runs the writer check on the standby session (not
    /// in recovery, the elected writer's timeline and cluster) and pools it under the current
    /// generation. Returns whether a session was pooled; a standby that fails the check, or
    /// finds the pool full, is closed. Stops holding one either way.
    pub async fn admit_standby(&self) -> bool {
        let Some((mut conn, born)) = self.standby.take() else {
            return false;
        };
        let s = &self.shared;
        // Read before the check, as a connect does: a change while checking refuses it later.
        let generation = s.epoch.generation();
        let checked =
            tokio::time::timeout(s.settings.connect_timeout, self.driver.check(&mut conn)).await;
        match checked {
            Ok(Ok(())) if !self.driver.has_broken(&mut conn) => {}
            Ok(Ok(())) => return false,
            Ok(Err(e)) => {
                tracing::debug!(node = %s.node, error = %e, "standby session refused");
                return false;
            }
            Err(_) => return false,
        }
        let checked_at = Instant::now();
        let stamped = Stamped::new(conn, generation, born, s.label.clone());
        self.pool
            .add(Stamped {
                checked_at: Some(checked_at),
                ..stamped
            })
            .is_ok()
    }

    /// Stops holding a standby session (a writer was elected elsewhere) and closes it.
    pub fn release_standby(&self) {
        drop(self.standby.take());
    }

    /// Whether a standby session is held (connected, waiting for an election).
    pub fn holds_standby(&self) -> bool {
        self.standby.state.lock().held.is_some()
    }

    /// Every connection the pool may open is open (in use when the wait ran out; one released
    /// just then does not make it a connect failure).
    fn is_exhausted(&self) -> bool {
        self.pool.state().connections >= self.shared.settings.max_size.max(1)
    }
}
