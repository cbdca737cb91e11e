//! Errors of the kit: each variant names the cause so a failing test says what to fix.

use std::path::PathBuf;

/// Why a kit operation failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// A server binary is not installed (or not where the caller said).
    #[error(
        "`{name}` not found (searched: {}); install the Debian package `{package}`",
        display_paths(searched)
    )]
    MissingBinary {
        /// The executable that was looked for (`initdb`, `redis-server`, ...).
        name: String,
        /// The package that provides it.
        package: String,
        /// Every directory that was looked in.
        searched: Vec<PathBuf>,
    },

    /// A server could not bind its port because something else listens there.
    #[error("port 127.0.0.1:{port} is already in use")]
    PortInUse {
        /// The port that was taken.
        port: u16,
    },

    /// A directory of the kit could not be created, copied, owned or removed.
    #[error("data directory {}: {source}", path.display())]
    DataDir {
        /// The directory concerned.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },

    /// An external command (initdb, psql, cp, ...) failed.
    #[error("{what} failed ({status}): {stderr}")]
    Command {
        /// What was run, e.g. `psql on pg1: SELECT 1`.
        what: String,
        /// Its exit status.
        status: String,
        /// The tail of its stderr (or of the server log).
        stderr: String,
    },

    /// A server process exited or never became ready during start.
    #[error("{name} failed to start: {reason}\n--- tail of {} ---\n{log_tail}", log.display())]
    ServerStart {
        /// `pg0`, `pg1`, ..., or `redis`.
        name: String,
        /// Why it is considered failed.
        reason: String,
        /// Where the full server log is.
        log: PathBuf,
        /// The last lines of that log.
        log_tail: String,
    },

    /// A wait did not finish in time (the kit never waits forever).
    #[error("timed out: {what}")]
    Timeout {
        /// What was being waited for.
        what: String,
    },

    /// A node index beyond the cluster's nodes.
    #[error("no node {index}: the cluster has {count} nodes")]
    NoSuchNode {
        /// The index asked for.
        index: usize,
        /// How many nodes exist.
        count: usize,
    },

    /// A Redis operation on a cluster started without Redis.
    #[error("this cluster was started without redis (use ClusterBuilder::with_redis(true))")]
    NoRedis,

    /// Running as root needs an unprivileged OS user for the servers, and it is missing.
    #[error(
        "running as root, but the OS user `{user}` does not exist (PostgreSQL refuses to run as root; install the `postgresql` package, which creates it)"
    )]
    NoServerUser {
        /// The user looked for (`postgres`).
        user: String,
    },

    /// Any other I/O error.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

fn display_paths(p: &[PathBuf]) -> String {
    if p.is_empty() {
        return "nothing".into();
    }
    p.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
