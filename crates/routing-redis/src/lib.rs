//! # routing-redis
//!
//! Recent-writer marks in Redis, shared by every process of a service. A mark says "user U last
//! committed at LSN X" for a TTL; the router reads it to send U's reads to a replica that has
//! replayed X (or to the primary). In one process, `routing_core::InMemoryMarks` is enough; with
//! several processes behind a load balancer, U's next request may land anywhere, so the mark
//! must live where every process sees it: [`RedisMarks`].
//!
//! ```no_run
//! # async fn demo(backend: impl routing_core::Backend) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use routing_redis::RedisMarks;
//!
//! let marks = RedisMarks::builder("redis://127.0.0.1:6379/")
//!     .prefix("myapp:mark:")
//!     .timeout(Duration::from_millis(20))
//!     .build()?; // does not connect yet: an app starts even while Redis is down
//! let router = routing_core::Router::builder(backend)
//!     .marks(Arc::new(marks))
//!     .build()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! ## What is stored
//!
//! - **Keys**: `prefix` (default `routing:mark:`) followed by the SHA-256 of the user id's bytes
//!   in hex, e.g. `routing:mark:2bd806c9…6e90` for `alice`. Ids are arbitrary bytes
//!   ([`UserKey`]); hashing gives every id, however long or hostile (empty, 100 KB, `:`, `*`,
//!   `{`, newlines, invalid UTF-8), a distinct, fixed-size, printable key inside the namespace
//!   that cannot act as a pattern and does not reveal the id. [`RedisMarks::key_for`] names a
//!   user's key for operators.
//! - **Values**: the user's newest commit LSN as 16 hex digits (`00000016b374d848` is
//!   `16/B374D848`), with a TTL (`PX`) equal to the router's `mark_ttl`.
//! - **Max-merge**: `set_max` is a Lua script (EVALSHA through `redis::Script`) that keeps the
//!   larger of the stored and the new LSN and restarts the TTL, atomically on the server: two
//!   processes writing for the same user at once never move the mark backwards.
//! - **Lookups**: `get` is one script call returning the LSN, the remaining TTL and the epoch
//!   (below) in one round trip.
//!
//! ## The TTL-only mode
//!
//! The cheat sheet's `recent_writer:{user}` key with an expiry is this same store with the LSN
//! ignored: `Consistency::RecentWriterTtl { ttl }` in routing-core reads only
//! [`Mark::expires_in`] (the mark's age is `mark_ttl - expires_in`) and pins the user to the
//! primary while the mark is younger than `ttl`. Nothing to configure here; the stored LSN costs
//! 16 bytes and lets you switch to `ReadYourWrites` (replicas that have caught up serve the user)
//! without a migration.
//!
//! ## When Redis is slow or down
//!
//! - Every operation is bounded, waiting for a (re)connection included: lookups by
//!   [`RedisMarksBuilder::timeout`] (default 20 ms), updates by
//!   [`RedisMarksBuilder::update_timeout`] (default 50 ms, the router's default `marks_timeout`:
//!   a lost update can cost a stale read, a failed lookup only a primary read). The client's
//!   response timeout is set to match, instead of the redis crate's 500 ms. Past it, or on a
//!   connection error, `get` / `set_max` return a [`MarksError`]; they never hang. The router
//!   then counts `marks_errors` (lookups) or `mark_update_failures` (updates) and follows
//!   `RouterConfig::on_marks_failure`: by default (`MarksFailure::Primary`) reads whose mark
//!   cannot be read go to the primary in a read-only session, and writes succeed regardless.
//!   Keep the lookup timeout below the router's `marks_timeout`.
//! - **Failed updates are retried.** An update that fails or times out (or whose future the
//!   router drops at its own deadline) is kept in memory, max-merged per user, and retried in
//!   the background every 25 ms until it lands or its TTL passes ([`RedisMarksStats`]:
//!   `updates_retried`, `updates_dropped`; at most 100 000 users wait). Meanwhile, lookups *in
//!   this process* include it. The residual risk: **another** process that looks the user up
//!   before the retry lands sees the older mark (or none), so a mark-only user whose update
//!   failed while Redis stayed readable for others (a blip on one process's connection, a
//!   stalled process) may read from a replica that has not replayed that write. When Redis
//!   itself is down, every process's lookups fail too and go to the primary, so a Redis outage
//!   alone does not open this gap. Causal tokens close it entirely.
//! - Connecting is lazy: [`RedisMarksBuilder::build`] never fails because Redis is unreachable
//!   (only on bad configuration), so a service starts while Redis is down and routes
//!   conservatively until it is back. Use [`RedisMarks::ping`] for a readiness check.
//! - Reconnection is automatic (the redis crate's `ConnectionManager`, with a reconnect backoff
//!   capped at 500 ms): after Redis comes back, operations succeed again without rebuilding
//!   anything. A connection on which every request times out for
//!   [`RedisMarksBuilder::stuck_after`] (a silently dropped network path) is replaced.
//! - Logs (tracing): one warning when the store becomes unavailable, a reminder every 10 s while
//!   it stays so, an info line when it answers again. Counters: [`RedisMarks::stats`].
//!
//! ## Redis restarts: what read-your-writes guarantees remain
//!
//! A Redis without persistence comes back **empty**: every mark is gone. Unreachable-Redis
//! handling does not help here, since the empty Redis answers promptly with "no mark".
//!
//! - **Users with a causal token** (`X-Read-After`, `Consistency::Causal`, or a token sent along
//!   with `ReadYourWrites`) stay correct: the LSN travels with the client, not in Redis.
//! - **Mark-only users**, with a plain marks store, would be treated as "no recent write" and could
//!   read from a replica that has not replayed their last write, for as long as their lost mark
//!   would have lived (up to `mark_ttl` after the restart) and only while replicas lag behind
//!   that write.
//! - **What `RedisMarks` does about it (the default, [`RestartPolicy::Distrust`])**: next to the
//!   marks it keeps an *epoch key* (`prefix + "epoch"`, no TTL) holding the server time at which
//!   the current data set was first used. Both scripts read it in the same round trip, and create
//!   it when it is missing: a missing epoch means the data set is new (first use of this Redis, a
//!   restart without persistence, `FLUSHALL`, or eviction). While the epoch is younger than the
//!   restart window (at least `mark_ttl`: any mark lost before the epoch began has expired by
//!   then), a lookup that finds no mark returns an error instead of `None`, so the router sends
//!   that read to the primary (under `MarksFailure::Primary`). Users who wrote after the restart
//!   have a mark again, and since their new commit LSN is above any lost one, they are routed to
//!   replicas normally. The state lives in Redis, so every process agrees on the window, and a
//!   process started later still honours it. Cost: for one `mark_ttl` after a loss (and after
//!   the very first use of a Redis), unmarked users read from the primary.
//!   [`RestartPolicy::Trust`] turns this off.
//!
//! Limits, stated precisely:
//!
//! - Losses that leave the epoch key in place are not detected: a Redis restarted **with**
//!   persistence (RDB or AOF) that lost its last seconds of writes, a failover to an async
//!   Redis replica that had not received the newest marks, or marks evicted while the epoch key
//!   survives. Run the marks Redis with `maxmemory-policy noeviction` (or an `allkeys-*` policy,
//!   which may evict the epoch key too and so opens a window: safe) rather than `volatile-*`
//!   (which evicts only keys with a TTL, i.e. marks, and never the epoch key).
//! - Under `MarksFailure::Eventual` the router treats "unknown" as "no mark": staleness is then
//!   accepted by configuration.
//! - The window is the configured one widened to the longest TTL this process has set; if
//!   processes use different `mark_ttl`s, configure the largest.
//!
//! ## Redis Cluster
//!
//! With the `cluster` feature, [`RedisMarks::cluster_builder`] uses the redis crate's async
//! cluster client. Keys then carry a hash tag made of the first byte of the id's digest
//! (`prefix{2b}:2bd8…`): a mark and the epoch key of its slot group (`prefix{2b}:epoch`) live in
//! the same slot, so each script touches one node, and marks spread over 256 slot groups. Each
//! group has its own epoch, so a shard that restarts empty is detected on its own.
//!
//! ## Security
//!
//! Keys are hashed ids in a namespace (never raw ids); connection info (which may hold a
//! password) is never printed by `Debug` or in errors and logs, which name only `host:port`.

mod conn;
mod keys;
mod marks;
mod pending;
mod scripts;
mod stats;

pub use marks::{
    BuildError, DEFAULT_CONNECT_TIMEOUT, DEFAULT_PREFIX, DEFAULT_RESTART_WINDOW,
    DEFAULT_STUCK_AFTER, DEFAULT_TIMEOUT, DEFAULT_UPDATE_TIMEOUT, RedisMarks, RedisMarksBuilder,
    RestartPolicy,
};
pub use stats::RedisMarksStats;

/// The trait and types of routing-core that a `RedisMarks` user handles.
pub use routing_core::{Lsn, Mark, MarksError, MarksFailure, UserKey, WriterMarks};

/// The redis crate this store is built on (for `ConnectionInfo`, TLS settings and the like).
pub use redis;
