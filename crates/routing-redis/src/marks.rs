//! `RedisMarks`: the `WriterMarks` store on Redis.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::{IntoConnectionInfo, RedisResult};
use routing_core::{Lsn, Mark, MarksError, UserKey, WriterMarks};

use crate::conn::{Conn, Target};
use crate::keys::{KeyLayout, Keys};
use crate::pending::{Added, Pending};
use crate::scripts::{GET_SCRIPT, SET_MAX_SCRIPT, decode, encode};
use crate::stats::{Counters, RedisMarksStats, bump};

/// Default key namespace.
pub const DEFAULT_PREFIX: &str = "routing:mark:";
/// Default budget of one operation, waiting for a connection included. Keep it below the
/// router's `marks_timeout` (50 ms by default) so the error says what happened.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(20);
/// Default budget of one `set_max` (the write path, after the commit): longer than lookups,
/// because a lost update can cost a stale read, a failed lookup only a read on the primary.
/// Matches the router's default `marks_timeout`.
pub const DEFAULT_UPDATE_TIMEOUT: Duration = Duration::from_millis(50);
/// Default budget of one connection attempt (these run in the background, not on requests).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
/// Default restart window: `routing_core::RouterConfig::default().mark_ttl`.
pub const DEFAULT_RESTART_WINDOW: Duration = Duration::from_secs(30);
/// Default time without a single success, while operations keep timing out, after which the
/// connection is replaced (a silently dropped TCP path never recovers by itself).
pub const DEFAULT_STUCK_AFTER: Duration = Duration::from_secs(2);

/// What a lookup answers for a user without a mark, right after Redis lost its data.
///
/// Redis without persistence comes back empty after a restart (so does a `FLUSHALL`, or a key
/// evicted under memory pressure). A user who wrote just before that has lost their mark, and a
/// replica that has not replayed their write yet would serve them stale data. `RedisMarks` keeps
/// an *epoch key* next to the marks: when it is missing, the data set is new, and the store knows
/// it cannot vouch for "no mark" until every mark set before the loss would have expired anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RestartPolicy {
    /// The default. While the store's data is younger than `window`, a lookup that finds no
    /// mark returns an error ("unknown") instead of `None`, so the router follows its
    /// `on_marks_failure` policy (the primary, by default) for that read. Users who wrote since
    /// the loss have a mark again and are routed normally. The window used is the larger of
    /// `window` and the longest TTL this process has passed to `set_max`: set `window` to the
    /// router's `mark_ttl` (the default matches `RouterConfig::default()`).
    Distrust {
        /// How long after the epoch starts a missing mark counts as unknown.
        window: Duration,
    },
    /// A missing mark always means "no recent write". Cheaper right after a deployment or a
    /// flush, but users who wrote shortly before Redis lost its data may read stale data from a
    /// lagging replica until their mark would have expired.
    Trust,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy::Distrust {
            window: DEFAULT_RESTART_WINDOW,
        }
    }
}

/// `RedisMarks` could not be built. Only configuration mistakes: an unreachable Redis is not
/// an error at build time (see [`RedisMarksBuilder::build`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The URL or connection info was rejected by the redis crate.
    #[error("invalid Redis connection info: {0}")]
    Connection(#[source] redis::RedisError),
    /// A setting is out of range.
    #[error("invalid RedisMarks configuration: {0}")]
    Config(String),
    /// `build` ran outside a tokio runtime (the connection tasks need one).
    #[error("RedisMarks must be built inside a tokio runtime")]
    NoRuntime,
}

enum Spec {
    Single(redis::ConnectionInfo),
    #[cfg(feature = "cluster")]
    Cluster(Vec<redis::ConnectionInfo>),
}

/// Configures a [`RedisMarks`]. Start with [`RedisMarks::builder`] (or
/// [`RedisMarks::cluster_builder`] with the `cluster` feature).
pub struct RedisMarksBuilder {
    spec: Result<Spec, redis::RedisError>,
    prefix: String,
    timeout: Duration,
    update_timeout: Duration,
    connect_timeout: Duration,
    restart: RestartPolicy,
    stuck_after: Duration,
}

impl fmt::Debug for RedisMarksBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No connection info: it may hold a password.
        f.debug_struct("RedisMarksBuilder")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("update_timeout", &self.update_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("restart", &self.restart)
            .field("stuck_after", &self.stuck_after)
            .finish_non_exhaustive()
    }
}

impl RedisMarksBuilder {
    fn new(spec: Result<Spec, redis::RedisError>) -> Self {
        RedisMarksBuilder {
            spec,
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            update_timeout: DEFAULT_UPDATE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            restart: RestartPolicy::default(),
            stuck_after: DEFAULT_STUCK_AFTER,
        }
    }

    /// Key namespace (default [`DEFAULT_PREFIX`]). Every key is this prefix followed by 64 hex
    /// digits (or, in cluster mode, `{xx}:` and 64 hex digits) and the epoch key `prefix + "epoch"`
    /// (`prefix{xx}:epoch`). Must be non-empty, at most 256 bytes, without braces, whitespace or
    /// control characters.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Longest time one lookup (`get`, and `ping`) may take, waiting for a (re)connection
    /// included (default [`DEFAULT_TIMEOUT`]). Past it the lookup returns a [`MarksError`] and the
    /// router follows its `on_marks_failure` policy. Keep it below the router's `marks_timeout`
    /// so the error says what happened. 1 ms ..= 60 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Longest time one `set_max` may take (default [`DEFAULT_UPDATE_TIMEOUT`], never less than
    /// [`Self::timeout`]). The router also bounds it by its `marks_timeout`: raise both together.
    /// An update that misses it is retried in the background. 1 ms ..= 60 s.
    pub fn update_timeout(mut self, timeout: Duration) -> Self {
        self.update_timeout = timeout;
        self
    }

    /// Budget of one TCP connect + handshake (default [`DEFAULT_CONNECT_TIMEOUT`]). Connection
    /// attempts run in the background; requests never wait longer than [`Self::timeout`].
    /// 1 ms ..= 60 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// What a missing mark means right after Redis lost its data (default:
    /// [`RestartPolicy::Distrust`] for [`DEFAULT_RESTART_WINDOW`]).
    pub fn restart_policy(mut self, policy: RestartPolicy) -> Self {
        self.restart = policy;
        self
    }

    /// Replace the connection when every operation has timed out for this long (default
    /// [`DEFAULT_STUCK_AFTER`]); 10 ms ..= 1 h.
    pub fn stuck_after(mut self, after: Duration) -> Self {
        self.stuck_after = after;
        self
    }

    /// Builds the store without contacting Redis: it connects in the background and on first
    /// use, and reconnects by itself, so an application starts (and its reads fall back to the
    /// primary under the default router policy) while Redis is down. Use [`RedisMarks::ping`]
    /// to check reachability, for example in a readiness probe. Fails only on configuration
    /// errors, or outside a tokio runtime.
    pub fn build(self) -> Result<RedisMarks, BuildError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(BuildError::NoRuntime);
        }
        let ranged = |name: &str, d: Duration, min: Duration, max: Duration| {
            if d < min || d > max {
                Err(BuildError::Config(format!(
                    "{name} = {d:?} is outside {min:?}..={max:?}"
                )))
            } else {
                Ok(())
            }
        };
        let ms = Duration::from_millis;
        ranged("timeout", self.timeout, ms(1), ms(60_000))?;
        ranged("update_timeout", self.update_timeout, ms(1), ms(60_000))?;
        let update_timeout = self.update_timeout.max(self.timeout);
        ranged("connect_timeout", self.connect_timeout, ms(1), ms(60_000))?;
        ranged("stuck_after", self.stuck_after, ms(10), ms(3_600_000))?;
        if let RestartPolicy::Distrust { window } = self.restart {
            ranged(
                "restart window",
                window,
                Duration::ZERO,
                Duration::from_secs(7 * 24 * 3600),
            )?;
        }
        let spec = self.spec.map_err(BuildError::Connection)?;
        let (target, tagged) = match spec {
            Spec::Single(info) => {
                let client = redis::Client::open(info).map_err(BuildError::Connection)?;
                (
                    Target::single(client, update_timeout, self.connect_timeout),
                    false,
                )
            }
            #[cfg(feature = "cluster")]
            Spec::Cluster(nodes) => {
                if nodes.is_empty() {
                    return Err(BuildError::Config("no cluster nodes given".into()));
                }
                let target = Target::cluster(nodes, update_timeout, self.connect_timeout)
                    .map_err(BuildError::Connection)?;
                (target, true)
            }
        };
        let keys = KeyLayout::new(&self.prefix, tagged).map_err(BuildError::Config)?;
        let conn = target.connect().map_err(BuildError::Connection)?;
        let inner = Arc::new(Inner {
            describe: target.describe(),
            target,
            conn: ArcSwap::from_pointee(conn),
            keys,
            timeout: self.timeout,
            update_timeout,
            restart: self.restart,
            stuck_after: self.stuck_after,
            max_ttl_ms: AtomicU64::new(0),
            counters: Counters::default(),
            health: Health::default(),
            pending: Pending::default(),
            clock: Instant::now(),
        });
        inner.prime();
        Ok(RedisMarks { inner })
    }
}

/// Recent-writer marks in Redis, shared by every process of a service: implements
/// [`WriterMarks`] for `RouterBuilder::marks`. Cheap to clone (clones share one connection and
/// one set of counters).
///
/// Every `get` and `set_max` is one script call (one round trip), bounded by the configured
/// timeout; see the crate docs for keys, values, failures and restarts.
#[derive(Clone)]
pub struct RedisMarks {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    conn: ArcSwap<Conn>,
    keys: KeyLayout,
    timeout: Duration,
    update_timeout: Duration,
    restart: RestartPolicy,
    stuck_after: Duration,
    /// Longest TTL passed to `set_max` by this process, in ms (widens the restart window).
    max_ttl_ms: AtomicU64,
    counters: Counters,
    health: Health,
    /// Mark updates waiting for a background retry.
    pending: Pending,
    describe: String,
    clock: Instant,
}

/// Failure bookkeeping for logs (one warning when the store goes away, a reminder every
/// `WARN_EVERY` while it stays away, one info line when it is back) and stuck detection.
#[derive(Default)]
struct Health {
    failing: AtomicBool,
    failures_in_row: AtomicU64,
    last_warn_ms: AtomicU64,
    last_ok_ms: AtomicU64,
    timeouts_in_row: AtomicU32,
    last_rebuild_ms: AtomicU64,
}

const WARN_EVERY_MS: u64 = 10_000;
const STUCK_TIMEOUTS: u32 = 3;

impl fmt::Debug for RedisMarks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("RedisMarks")
            .field("target", &i.describe)
            .field("prefix", &i.keys.prefix())
            .field("timeout", &i.timeout)
            .field("update_timeout", &i.update_timeout)
            .field("restart", &i.restart)
            .finish_non_exhaustive()
    }
}

impl RedisMarks {
    /// A builder for one Redis server (a `redis://[user:password@]host:port/db` or `rediss://`
    /// URL, or anything else the redis crate accepts as connection info).
    pub fn builder(info: impl IntoConnectionInfo) -> RedisMarksBuilder {
        RedisMarksBuilder::new(info.into_connection_info().map(Spec::Single))
    }

    /// A builder for a Redis Cluster, from one or more of its nodes.
    #[cfg(feature = "cluster")]
    pub fn cluster_builder<T: IntoConnectionInfo>(
        nodes: impl IntoIterator<Item = T>,
    ) -> RedisMarksBuilder {
        let nodes = nodes
            .into_iter()
            .map(|n| n.into_connection_info())
            .collect::<Result<Vec<_>, _>>();
        RedisMarksBuilder::new(nodes.map(Spec::Cluster))
    }

    /// A store with every default (see [`RedisMarksBuilder::build`]: does not connect yet).
    pub fn new(info: impl IntoConnectionInfo) -> Result<Self, BuildError> {
        Self::builder(info).build()
    }

    /// Round-trips a `PING` within the timeout: for readiness probes and start-up checks.
    pub async fn ping(&self) -> Result<Duration, MarksError> {
        let started = Instant::now();
        let mut conn = self.inner.conn();
        let cmd = redis::cmd("PING");
        let _: String = self
            .inner
            .run("ping", self.inner.timeout, conn.query(&cmd))
            .await?;
        Ok(started.elapsed())
    }

    /// The counters.
    pub fn stats(&self) -> RedisMarksStats {
        self.inner.counters.read()
    }

    /// The Redis key holding `user`'s mark (for operators: `GET` / `PTTL` it by hand).
    pub fn key_for(&self, user: &UserKey) -> String {
        self.inner.keys.keys(user).mark
    }

    /// The epoch key consulted along with `user`'s mark (one per store; one per slot group in
    /// cluster mode).
    pub fn epoch_key_for(&self, user: &UserKey) -> String {
        self.inner.keys.keys(user).epoch
    }

    /// The lookup (and ping) timeout.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The update timeout in force (at least [`Self::timeout`]).
    pub fn update_timeout(&self) -> Duration {
        self.inner.update_timeout
    }

    /// The restart policy as configured.
    pub fn restart_policy(&self) -> RestartPolicy {
        self.inner.restart
    }

    /// The restart window in force: the configured one, widened to the longest TTL this
    /// process has set; `None` under [`RestartPolicy::Trust`].
    pub fn restart_window(&self) -> Option<Duration> {
        self.inner.window()
    }
}

impl Inner {
    fn conn(&self) -> Conn {
        (**self.conn.load()).clone()
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    fn window(&self) -> Option<Duration> {
        match self.restart {
            RestartPolicy::Trust => None,
            RestartPolicy::Distrust { window } => Some(window.max(Duration::from_millis(
                self.max_ttl_ms.load(Ordering::Relaxed),
            ))),
        }
    }

    /// Loads the scripts on a fresh connection in the background (which also connects it).
    fn prime(&self) {
        let mut conn = self.conn();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), conn.load_scripts()).await;
        });
    }

    /// Runs one operation within the timeout and keeps the books.
    async fn run<T>(
        &self,
        op: &'static str,
        budget: Duration,
        work: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, MarksError> {
        match tokio::time::timeout(budget, work).await {
            Ok(Ok(v)) => {
                self.succeeded();
                Ok(v)
            }
            Ok(Err(e)) => {
                // The connection's own response timeout (the update budget) can fire first.
                let timed_out = e.is_timeout();
                let message = if timed_out {
                    bump(&self.counters.timeouts);
                    format!("{}: {op} got no answer within {budget:?}", self.describe)
                } else {
                    bump(&self.counters.errors);
                    self.health.timeouts_in_row.store(0, Ordering::Relaxed);
                    format!("{}: {op} failed: {e}", self.describe)
                };
                self.failed(op, &message);
                if timed_out {
                    self.maybe_reconnect();
                }
                Err(MarksError {
                    message,
                    source: Some(Box::new(e)),
                })
            }
            Err(_) => {
                bump(&self.counters.timeouts);
                let message = format!("{}: {op} got no answer within {budget:?}", self.describe);
                self.failed(op, &message);
                self.maybe_reconnect();
                Err(MarksError::new(message))
            }
        }
    }

    fn succeeded(&self) {
        let h = &self.health;
        h.last_ok_ms.store(self.now_ms(), Ordering::Relaxed);
        h.timeouts_in_row.store(0, Ordering::Relaxed);
        if h.failing.load(Ordering::Relaxed) && h.failing.swap(false, Ordering::Relaxed) {
            let failures = h.failures_in_row.swap(0, Ordering::Relaxed);
            tracing::info!(store = %self.describe, failures, "Redis marks store answers again");
        }
    }

    fn failed(&self, op: &'static str, message: &str) {
        let h = &self.health;
        let failures = h.failures_in_row.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.now_ms();
        if !h.failing.swap(true, Ordering::Relaxed) {
            h.last_warn_ms.store(now, Ordering::Relaxed);
            tracing::warn!(
                op,
                error = %message,
                "Redis marks store unavailable: lookups fail fast and the router follows its \
                 on_marks_failure policy until it is back"
            );
        } else {
            let last = h.last_warn_ms.load(Ordering::Relaxed);
            if now.saturating_sub(last) >= WARN_EVERY_MS
                && h.last_warn_ms
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(op, failures, error = %message, "Redis marks store still unavailable");
            }
        }
    }

    /// A connection whose requests all time out may be on a dead TCP path that the client will
    /// not notice for minutes (no RST ever arrives): replace it.
    fn maybe_reconnect(&self) {
        let h = &self.health;
        let in_row = h.timeouts_in_row.fetch_add(1, Ordering::Relaxed) + 1;
        if in_row < STUCK_TIMEOUTS {
            return;
        }
        let now = self.now_ms();
        let stuck = self.stuck_after.as_millis() as u64;
        let last_ok = h.last_ok_ms.load(Ordering::Relaxed);
        let last_rebuild = h.last_rebuild_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last_ok) < stuck || now.saturating_sub(last_rebuild) < stuck {
            return;
        }
        if h.last_rebuild_ms
            .compare_exchange(last_rebuild, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        match self.target.connect() {
            Ok(conn) => {
                self.conn.store(Arc::new(conn));
                h.timeouts_in_row.store(0, Ordering::Relaxed);
                bump(&self.counters.reconnects_forced);
                tracing::warn!(store = %self.describe, "Redis marks store: every request timed out, opening a new connection");
                self.prime();
            }
            Err(e) => {
                tracing::warn!(store = %self.describe, error = %e, "Redis marks store: could not open a new connection")
            }
        }
    }

    fn epoch_started(&self) {
        bump(&self.counters.epochs_started);
        match self.window() {
            Some(window) => tracing::warn!(
                store = %self.describe,
                ?window,
                "Redis marks store had no epoch key: first use of this Redis, or it lost its data \
                 (restart without persistence, flush, eviction). Users without a mark count as \
                 unknown (their reads follow on_marks_failure) until the window has passed"
            ),
            None => tracing::warn!(
                store = %self.describe,
                "Redis marks store had no epoch key: first use of this Redis, or it lost its data. \
                 RestartPolicy::Trust: users who wrote just before a loss may read stale data \
                 until their mark would have expired"
            ),
        }
    }

    async fn get(&self, user: &UserKey) -> Result<Option<Mark>, MarksError> {
        bump(&self.counters.gets);
        let keys = self.keys.keys(user);
        // Read this process's pending update before Redis: a retry that lands it in between
        // then shows in the Redis answer. Read after, a landing that removed it while Redis
        // was answering with the older value would make the mark go backwards.
        let pending = self.pending.get(&keys.mark, Instant::now());
        let mut invocation = GET_SCRIPT.prepare_invoke();
        invocation.key(&keys.mark).key(&keys.epoch);
        let mut conn = self.conn();
        let (value, pttl, age_ms, fresh): (Vec<u8>, i64, i64, i64) = self
            .run("get", self.timeout, conn.invoke(&invocation))
            .await?;
        if fresh == 1 {
            self.epoch_started();
        }
        if value.is_empty() {
            if let Some(p) = pending {
                // This process's own update, not landed yet: a lower bound all the same.
                return Ok(Some(Mark {
                    lsn: Lsn(p.lsn),
                    expires_in: p.expires.saturating_duration_since(Instant::now()),
                }));
            }
            if let Some(window) = self.window() {
                let age = Duration::from_millis(age_ms.max(0) as u64);
                if age < window {
                    bump(&self.counters.unknown_after_data_loss);
                    return Err(MarksError::new(format!(
                        "{}: no mark for this user, but the marks store's data is only {age:?} old \
                         (first use, or Redis lost its data): a mark set before that may be lost, \
                         so the user's last write is unknown until {window:?} have passed",
                        self.describe
                    )));
                }
            }
            return Ok(None);
        }
        let Some(lsn) = decode(&value) else {
            bump(&self.counters.errors);
            return Err(MarksError::new(format!(
                "{}: key {} holds a value that is not a mark ({} bytes)",
                self.describe,
                keys.mark,
                value.len()
            )));
        };
        let mut mark = Mark {
            lsn: Lsn(lsn),
            expires_in: u64::try_from(pttl).map_or(Duration::MAX, Duration::from_millis),
        };
        if let Some(p) = pending
            && p.lsn > lsn
        {
            mark = Mark {
                lsn: Lsn(p.lsn),
                expires_in: mark
                    .expires_in
                    .max(p.expires.saturating_duration_since(Instant::now())),
            };
        }
        Ok(Some(mark))
    }

    async fn set_max(
        self: &Arc<Self>,
        user: &UserKey,
        lsn: Lsn,
        ttl: Duration,
    ) -> Result<(), MarksError> {
        bump(&self.counters.sets);
        let ttl_ms = u64::try_from(ttl.as_millis())
            .unwrap_or(u64::MAX)
            .clamp(1, i64::MAX as u64);
        self.max_ttl_ms.fetch_max(ttl_ms, Ordering::Relaxed);
        let keys = self.keys.keys(user);
        let expires = Instant::now()
            .checked_add(Duration::from_millis(ttl_ms))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(7 * 24 * 3600));
        // If this future fails, times out or is dropped by the caller's own timeout, the update
        // is queued for a background retry.
        let mut guard = RetryOnDrop {
            inner: self,
            keys: Some((keys.clone(), lsn.0, expires)),
        };
        self.store(&keys, lsn.0, ttl_ms, "set_max").await?;
        guard.keys = None;
        Ok(())
    }

    /// One max-merge in Redis (request path or retry).
    async fn store(
        &self,
        keys: &Keys,
        lsn: u64,
        ttl_ms: u64,
        op: &'static str,
    ) -> Result<(), MarksError> {
        let mut invocation = SET_MAX_SCRIPT.prepare_invoke();
        invocation
            .key(&keys.mark)
            .key(&keys.epoch)
            .arg(encode(lsn))
            .arg(ttl_ms);
        let mut conn = self.conn();
        let (kept, fresh): (String, i64) = self
            .run(op, self.update_timeout, conn.invoke(&invocation))
            .await?;
        if fresh == 1 {
            self.epoch_started();
        }
        self.pending
            .landed(&keys.mark, decode(kept.as_bytes()).unwrap_or(lsn));
        Ok(())
    }

    fn queue_retry(self: &Arc<Self>, keys: &Keys, lsn: u64, expires: Instant) {
        if self.pending.add(&keys.mark, &keys.epoch, lsn, expires) == Added::Full {
            bump(&self.counters.updates_dropped);
            tracing::warn!(
                store = %self.describe,
                "Redis marks store: too many mark updates waiting for a retry; dropping one"
            );
        }
        if self.pending.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.pending.flushing.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(RETRY_EVERY).await;
                let Some(inner) = weak.upgrade() else { return };
                if inner.retry_pending().await {
                    continue;
                }
                inner.pending.flushing.store(false, Ordering::Release);
                // An update queued between the last round and the flag going down.
                if inner.pending.len() == 0 || inner.pending.flushing.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
        });
    }

    /// One round of retries; true while updates remain.
    async fn retry_pending(&self) -> bool {
        let now = Instant::now();
        let (due, expired) = self.pending.due(RETRY_BATCH, now);
        if expired > 0 {
            self.counters
                .updates_dropped
                .fetch_add(expired as u64, Ordering::Relaxed);
            tracing::warn!(
                store = %self.describe,
                expired,
                "Redis marks store: mark updates expired before Redis took them"
            );
        }
        for (mark, p) in due {
            let left = p.expires.saturating_duration_since(Instant::now());
            let ttl_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
            if ttl_ms == 0 {
                continue;
            }
            let keys = Keys {
                mark,
                epoch: p.epoch_key,
            };
            match self.store(&keys, p.lsn, ttl_ms, "set_max (retry)").await {
                Ok(()) => bump(&self.counters.updates_retried),
                // Still unavailable: try again next round, without hammering it.
                Err(_) => break,
            }
        }
        self.pending.len() > 0
    }
}

/// How often failed mark updates are retried, and how many per round.
const RETRY_EVERY: Duration = Duration::from_millis(25);
const RETRY_BATCH: usize = 1000;

/// Queues the update for a retry unless disarmed (success): covers errors, timeouts and a
/// caller that drops the future at its own deadline.
struct RetryOnDrop<'a> {
    inner: &'a Arc<Inner>,
    keys: Option<(Keys, u64, Instant)>,
}

impl Drop for RetryOnDrop<'_> {
    fn drop(&mut self) {
        if let Some((keys, lsn, expires)) = self.keys.take() {
            self.inner.queue_retry(&keys, lsn, expires);
        }
    }
}

#[async_trait::async_trait]
impl WriterMarks for RedisMarks {
    async fn get(&self, user: &UserKey) -> Result<Option<Mark>, MarksError> {
        self.inner.get(user).await
    }

    async fn set_max(&self, user: &UserKey, lsn: Lsn, ttl: Duration) -> Result<(), MarksError> {
        self.inner.set_max(user, lsn, ttl).await
    }
}
