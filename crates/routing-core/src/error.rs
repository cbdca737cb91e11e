//! The one error type of routing-core, with variants a caller can act on.

use std::time::Duration;

use crate::TokenError;
use crate::secret::RedactedError;

/// What went wrong talking to a node, as the adapters classify their driver's errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The node could not be reached or the connection broke.
    Connection,
    /// The statement tried to write in a read-only session (SQLSTATE 25006).
    ReadOnly,
    /// A writer connection landed on a node in recovery (role changed under a stable endpoint).
    NotWriter,
    /// Authentication or authorization failed.
    Auth,
    /// The connection string is invalid.
    Config,
    /// Timed out (a connect that did not finish in time, or a statement timeout).
    Timeout,
    /// Any other query error.
    Query,
    /// No free session within the pool's timeout: every session of the pool was in use and the
    /// node was answering. Says nothing about the node's health, so it neither bans a replica
    /// nor unseats the writer nor asks for a re-probe; the request may go elsewhere or be
    /// retried. Adapters report it only when the wait was for a free session, not for a connect.
    PoolBusy,
}

impl ErrorKind {
    /// Errors that say the node (or our view of it) is wrong, so the topology is re-probed at once.
    /// Not [`ErrorKind::PoolBusy`]: a busy pool is load, not a topology change.
    pub fn calls_for_reprobe(self) -> bool {
        matches!(
            self,
            ErrorKind::Connection | ErrorKind::ReadOnly | ErrorKind::NotWriter | ErrorKind::Timeout
        )
    }

    /// The kind a server's SQLSTATE implies, where it implies one, so every adapter classifies
    /// server errors the same way: 25006 is [`ErrorKind::ReadOnly`], 28000/28P01
    /// [`ErrorKind::Auth`], 3D000 (no such database) [`ErrorKind::Config`], 57014 (statement
    /// timeout) [`ErrorKind::Timeout`], class 08, 57P01-57P03 (the server closed or is shutting
    /// down the session) and 53300 (too many connections) [`ErrorKind::Connection`]. `None` for
    /// everything else (an ordinary query error).
    pub fn from_sqlstate(code: &str) -> Option<ErrorKind> {
        match code {
            "25006" => Some(ErrorKind::ReadOnly),
            "28000" | "28P01" => Some(ErrorKind::Auth),
            "3D000" => Some(ErrorKind::Config),
            "57014" => Some(ErrorKind::Timeout),
            "57P01" | "57P02" | "57P03" | "53300" => Some(ErrorKind::Connection),
            c if c.starts_with("08") => Some(ErrorKind::Connection),
            _ => None,
        }
    }

    /// The kind a server's (English) message implies where its SQLSTATE does not say it, for
    /// drivers that drop the code and for codes that are too broad: a standby refuses
    /// `BEGIN READ WRITE` or `SET transaction_read_only = off` with 0A000 ("cannot set
    /// transaction read-write mode during recovery"), which is a write through a read session.
    pub fn from_server_message(message: &str) -> Option<ErrorKind> {
        let m = message.to_ascii_lowercase();
        if m.contains("read-only transaction") || m.contains("read-write mode during recovery") {
            Some(ErrorKind::ReadOnly)
        } else {
            None
        }
    }
}

/// A driver error, classified, with passwords redacted from its text and from its source's.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct BackendError {
    /// Classification.
    pub kind: ErrorKind,
    /// SQLSTATE when the server sent one.
    pub sqlstate: Option<String>,
    /// Redacted message.
    pub message: String,
    /// The driver's error, behind a wrapper whose Display and Debug (and its causes') are
    /// redacted: drivers echo connection strings in their errors. The driver's own type is
    /// reachable with [`RedactedError::downcast_ref`].
    #[source]
    pub source: Option<RedactedError>,
}

impl BackendError {
    /// Builds one; `message` is redacted here so adapters cannot forget. A plain
    /// [`ErrorKind::Query`] whose message names a read-only refusal becomes
    /// [`ErrorKind::ReadOnly`] (see [`ErrorKind::from_server_message`]).
    pub fn new(kind: ErrorKind, message: impl AsRef<str>) -> Self {
        let message = message.as_ref();
        let kind = match kind {
            ErrorKind::Query => ErrorKind::from_server_message(message).unwrap_or(kind),
            other => other,
        };
        BackendError {
            kind,
            sqlstate: None,
            message: crate::secret::redact(message),
            source: None,
        }
    }

    /// Attaches the SQLSTATE; a code [`ErrorKind::from_sqlstate`] knows (25006 `ReadOnly`, ...)
    /// sets the kind whatever the adapter said.
    pub fn with_sqlstate(mut self, code: impl Into<String>) -> Self {
        let code = code.into();
        if let Some(kind) = ErrorKind::from_sqlstate(&code) {
            self.kind = kind;
        }
        self.sqlstate = Some(code);
        self
    }

    /// Did the statement fail because the session's transaction was already aborted by an
    /// earlier error (SQLSTATE 25P02, or its message where the driver dropped the code)?
    pub fn is_aborted_transaction(&self) -> bool {
        self.sqlstate.as_deref() == Some("25P02")
            || self
                .message
                .contains("current transaction is aborted, commands ignored")
    }

    /// Attaches the driver's error, wrapped so that printing it never shows a password.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(RedactedError::new(source));
        self
    }
}

/// Everything the router can refuse or fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration cannot work; fix it and rebuild.
    #[error("invalid router configuration: {0}")]
    Config(String),
    /// No reachable primary within the write deadline. Nothing was sent: safe to retry.
    #[error("no primary accepted a connection within {waited:?}; the write was not sent")]
    NoPrimary {
        /// How long the router waited.
        waited: Duration,
    },
    /// No node could serve the read (every replica and the primary failed).
    #[error("no node could serve the read: {reason}")]
    NoReader {
        /// Why.
        reason: String,
    },
    /// A write reached a read-only session (SQLSTATE 25006): the caller used a read connection
    /// for a write. Nothing was written.
    #[error("write attempted on read-only node {node}: use a write connection")]
    MisroutedWrite {
        /// Node that refused the write.
        node: String,
    },
    /// The connection to the primary was lost after work was sent: the write may or may not have
    /// committed. Not retried automatically; the caller must check or make the write idempotent.
    #[error("connection to primary {node} lost during a write: outcome unknown")]
    WriteOutcomeUnknown {
        /// The primary.
        node: String,
        /// Driver error.
        #[source]
        source: BackendError,
    },
    /// The node refused the write because it is no longer the primary (demoted or fenced under a
    /// stable endpoint). Nothing was written: safe to retry; the topology is being re-probed.
    #[error("node {node} refused the write: it is no longer the primary")]
    WriteRejected {
        /// The node.
        node: String,
        /// Driver error.
        #[source]
        source: BackendError,
    },
    /// The work was not committed, and nothing of it was written: the transaction was aborted
    /// by an earlier error (PostgreSQL answers such a COMMIT with ROLLBACK), or `finish` was
    /// called while a transaction that wrote was still open (it is rolled back when the session
    /// returns to the pool). No mark was set and no token issued.
    #[error("nothing was committed on {node}: {reason}")]
    NotCommitted {
        /// The primary.
        node: String,
        /// Why.
        reason: String,
    },
    /// The client's causal token was rejected.
    #[error("causal token rejected: {0}")]
    Token(#[from] TokenError),
    /// Waiting for a replica to replay an LSN took longer than the budget.
    #[error("replica {node} did not reach the required LSN within {budget:?}")]
    WaitBudgetExceeded {
        /// The replica.
        node: String,
        /// The budget.
        budget: Duration,
    },
    /// A node's driver reported an error.
    #[error("node {node}: {source}")]
    Backend {
        /// The node.
        node: String,
        /// The classified driver error.
        #[source]
        source: BackendError,
    },
    /// The router was shut down.
    #[error("router is shut down")]
    Shutdown,
    /// Every session of the node's pool stayed in use for the pool's whole timeout (more
    /// concurrent work than `PoolSettings::max_size`). The node is healthy and stays elected;
    /// nothing was sent: safe to retry, ideally after a pause or with less concurrency.
    #[error("pool of {node} exhausted: no free session within {waited:?}; nothing was sent")]
    PoolExhausted {
        /// The node whose pool was full.
        node: String,
        /// How long the checkout waited.
        waited: Duration,
    },
    /// No node of that name is present ([`crate::Router::remove_node`]).
    #[error("no node named {node:?} is present")]
    UnknownNode {
        /// The name asked for.
        node: String,
    },
    /// The node is the elected writer and was not removed: writes would stop until another
    /// node is promoted. Switch over first (Patroni's switchover), then remove it.
    #[error("node {node} is the elected writer and cannot be removed; switch over first")]
    RemoveWriter {
        /// The writer.
        node: String,
    },
}

impl Error {
    /// True when nothing reached the database, so the same call may be retried.
    pub fn is_safe_to_retry(&self) -> bool {
        matches!(
            self,
            Error::NoPrimary { .. }
                | Error::NoReader { .. }
                | Error::WaitBudgetExceeded { .. }
                | Error::WriteRejected { .. }
                | Error::PoolExhausted { .. }
        )
    }
}

impl Error {
    /// The classified driver error behind this one, when a node's driver reported it.
    pub fn backend_error(&self) -> Option<&BackendError> {
        match self {
            Error::Backend { source, .. }
            | Error::WriteOutcomeUnknown { source, .. }
            | Error::WriteRejected { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// What a failed routed operation means for the caller, whatever the driver: the one mapping
/// every adapter's error type and the web integration share (see [`RoutedError::class`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorClass {
    /// The client sent a causal token that cannot be used (malformed, forged, from another
    /// cluster, or claiming a position the primary cannot have reached): a client error.
    BadToken,
    /// No node could serve in time, or the node's session broke before anything was written:
    /// retry later.
    Unavailable,
    /// A write went through a read session: a bug in the caller, never retried.
    MisroutedWrite,
    /// The server refused the transaction for a conflict with another (serialization failure,
    /// deadlock): retry the whole transaction.
    Conflict,
    /// The write may or may not have committed (the connection broke after it was sent).
    OutcomeUnknown,
    /// Anything else: the query's own error (constraint, syntax, ...), or a configuration error.
    Other,
}

/// The error of a routed query, as every adapter's error type (`routing_sqlx::DbError`,
/// `routing_diesel::DbError`) and the router's own [`Error`] expose it: either the router
/// refused or failed, or the driver's query failed. The provided methods classify both the same
/// way, so code that handles errors (the web layer's HTTP mapping, an application's own) is
/// written once.
pub trait RoutedError: std::error::Error + Send + Sync + 'static {
    /// The router's error, when the router refused or failed.
    fn routing(&self) -> Option<&Error>;

    /// The driver's error from the application's own query, classified (its driver error is
    /// reachable with [`crate::RedactedError::downcast_ref`] on `source`).
    fn query(&self) -> Option<&BackendError>;

    /// The classified driver error, from the query or behind the router's error.
    fn driver(&self) -> Option<&BackendError> {
        self.query()
            .or_else(|| self.routing().and_then(Error::backend_error))
    }

    /// The server's SQLSTATE, when the server sent one.
    fn sqlstate(&self) -> Option<&str> {
        self.driver().and_then(|d| d.sqlstate.as_deref())
    }

    /// A write went through a read session: the router's [`Error::MisroutedWrite`], or a
    /// query refused as read-only ([`ErrorKind::ReadOnly`]: 25006, or a standby's refusal of
    /// read-write mode). A permission error under a read-only role is recognised only by the
    /// session's own `check` ([`crate::ReadConn::check`]), which knows the role.
    fn is_misrouted_write(&self) -> bool {
        matches!(self.routing(), Some(Error::MisroutedWrite { .. }))
            || self.query().is_some_and(|q| q.kind == ErrorKind::ReadOnly)
    }

    /// What the failure means for the caller.
    fn class(&self) -> ErrorClass {
        if self.is_misrouted_write() {
            return ErrorClass::MisroutedWrite;
        }
        if matches!(self.sqlstate(), Some("40001" | "40P01")) {
            return ErrorClass::Conflict;
        }
        match (self.routing(), self.query()) {
            (Some(Error::Token(_)), _) => ErrorClass::BadToken,
            (Some(Error::WriteOutcomeUnknown { .. }), _) => ErrorClass::OutcomeUnknown,
            (Some(e), _) if e.is_safe_to_retry() || matches!(e, Error::Shutdown) => {
                ErrorClass::Unavailable
            }
            (Some(Error::Backend { source, .. }), _) | (None, Some(source))
                if matches!(
                    source.kind,
                    ErrorKind::Connection | ErrorKind::Timeout | ErrorKind::PoolBusy
                ) =>
            {
                ErrorClass::Unavailable
            }
            _ => ErrorClass::Other,
        }
    }
}

impl RoutedError for Error {
    fn routing(&self) -> Option<&Error> {
        Some(self)
    }

    fn query(&self) -> Option<&BackendError> {
        None
    }
}

#[cfg(test)]
mod class_tests {
    use super::*;

    #[test]
    fn classes_of_the_routers_errors() {
        let t = Error::Token(TokenError::BadSignature);
        assert_eq!(t.class(), ErrorClass::BadToken);
        let m = Error::MisroutedWrite { node: "r".into() };
        assert!(m.is_misrouted_write());
        assert_eq!(m.class(), ErrorClass::MisroutedWrite);
        let busy = Error::PoolExhausted {
            node: "p".into(),
            waited: Duration::ZERO,
        };
        assert_eq!(busy.class(), ErrorClass::Unavailable);
        let lost = Error::WriteOutcomeUnknown {
            node: "p".into(),
            source: BackendError::new(ErrorKind::Connection, "reset"),
        };
        assert_eq!(lost.class(), ErrorClass::OutcomeUnknown);
        let serial = Error::Backend {
            node: "p".into(),
            source: BackendError::new(ErrorKind::Query, "could not serialize")
                .with_sqlstate("40001"),
        };
        assert_eq!(serial.class(), ErrorClass::Conflict);
        assert_eq!(serial.sqlstate(), Some("40001"));
        let unique = Error::Backend {
            node: "p".into(),
            source: BackendError::new(ErrorKind::Query, "duplicate").with_sqlstate("23505"),
        };
        assert_eq!(unique.class(), ErrorClass::Other);
    }
}
