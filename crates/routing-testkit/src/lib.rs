//! Throwaway PostgreSQL primary + streaming replicas (+ Redis) for tests, from the machine's own
//! binaries, with fault injection: replication lag, paused replay, crashes, failover, a dead Redis,
//! and a TCP proxy that can blackhole or slow a node.
//!
//! The API is blocking on purpose: it works the same from plain `#[test]`s and from any async
//! runtime (use a multi-thread runtime, or `spawn_blocking`). Every wait has a timeout, and every
//! process and directory is removed on drop, on panic, and (through a watchdog process) when the
//! test process dies without dropping.
//!
//! ```no_run
//! let c = routing_testkit::ClusterBuilder::new().replicas(1).start()?;
//! c.psql(0, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)")?;
//! c.wait_replicated(std::time::Duration::from_secs(5))?;
//! assert_eq!(c.psql(1, "SELECT x FROM t")?, "1");
//! # Ok::<(), routing_testkit::KitError>(())
//! ```

mod bins;
mod cleanup;
mod cluster;
mod error;
#[cfg(feature = "ha")]
pub mod ha;
mod pgpool;
mod ports;
mod proc;
mod proxy;

pub use cluster::{
    APP_PASSWORD, Cluster, ClusterBuilder, MONITOR_PASSWORD, MONITOR_ROLE, Node, READER_PASSWORD,
    READER_ROLE, WRITER_PASSWORD, WRITER_ROLE, shared,
};
pub use error::KitError;
#[cfg(feature = "ha")]
pub use ha::{HaBuilder, HaStack, MemberState};
pub use pgpool::Pgpool;
pub use proxy::{FaultProxy, ProxyMode};
