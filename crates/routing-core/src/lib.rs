//! # routing-core
//!
//! The routing model for a PostgreSQL primary with streaming replicas: every routing decision
//! lives here, once, and driver adapters (`routing-diesel`, `routing-sqlx`) only teach it how to
//! pool and query a connection through the [`Backend`] trait.
//!
//! - [`Router`] hands out [`WriteConn`]s (always the primary) and [`ReadConn`]s (a replica, or the
//!   primary in a read-only session), routed by a [`Consistency`] mode per request.
//! - A monitor task probes every node, elects the writer (newest timeline wins, others are fenced),
//!   tracks lag, bans failing replicas with backoff, and bumps a generation on role changes so old
//!   pooled connections are never handed out again.
//! - Read-your-writes uses commit LSNs: the user's [`WriterMarks`] mark or a signed
//!   [`CausalToken`] says which LSN a replica must have replayed.
//!
//! See `ARCHITECTURE.md` at the repository root for the request flow and invariants.

mod alerts;
mod backend;
mod config;
mod context;
mod discovery;
mod error;
mod handle;
mod lsn;
mod marks;
mod monitor;
#[cfg(feature = "patroni")]
pub mod patroni;
mod policy;
#[cfg(feature = "bb8")]
pub mod pool;
mod probe;
mod refusal;
mod router;
mod secret;
mod settings;
mod stats;
pub mod telemetry;
mod throttle;
mod token;
mod topology;

pub use alerts::{LagAlert, LagAlertHandler, LagAlertKind, LagAlertThresholds};
pub use backend::{Access, Backend, CHECK_IDLE_AFTER, Epoch, PoolSpec, parse_lsn, sql};
pub use config::{
    BanPolicy, LagBounds, MarksFailure, NodeConfig, PoolSettings, RoleHint, RouterConfig,
};
pub use context::{Consistency, Region, RequestContext, UserKey};
pub use discovery::{
    Changes, Discoverer, Discovery, DiscoveryError, DiscoverySettings, DiscoveryTask, Member,
};
pub use error::{BackendError, Error, ErrorClass, ErrorKind, RoutedError};
pub use lsn::{Lsn, LsnParseError};
pub use marks::{InMemoryMarks, Mark, MarksError, WriterMarks};
pub use policy::{Candidate, LeastOutstanding, Random, RegionPolicy, ReplicaPicker, RoundRobin};
pub use probe::{ProbeParseError, ProbeReport};
pub use router::{
    BanState, MARKS_UNHEALTHY_FOR, MarksHealth, NodeRemoval, NodeState, PoolOccupancy, PoolState,
    ReadConn, Router, RouterBuilder, RouterStatus, WriteConn, WriteReceipt,
};
pub use secret::{ConnString, RedactedError, redact};
pub use settings::{
    BanSettings, ByteSize, LagAlertSettings, LagSettings, NodeSettings, PoolSettingsText,
    RegionSettings, RouterParts, RouterSettings,
};
pub use stats::RouterStats;
pub use token::{
    CausalToken, ClusterView, DuplicateKeyId, ForeignReason, MAX_TOKEN_TEXT, TokenCodec,
    TokenError, TokenKey, TokenPolicy, TokenVerdict, WeakKey, judge,
};
pub use topology::{NodeRole, NodeStatus, Snapshot};

/// `futures_util`'s boxed future, used by [`Router::read_retrying`].
pub use futures_util::future::BoxFuture;

/// The attribute [`WriterMarks`] (and every object-safe async extension trait here) is written
/// with; put it on an `impl` block of one.
pub use async_trait::async_trait;
