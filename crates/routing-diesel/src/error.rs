//! Turning diesel, diesel-async and tokio-postgres errors into [`BackendError`]s.
//!
//! Every message names the node and the pool (`pg-1 reader: ...`) and goes through
//! [`BackendError::new`], which redacts passwords.

use diesel::result::{ConnectionError, DatabaseErrorKind, Error as DieselError};
use routing_core::{BackendError, ErrorKind};

/// Classifies an error from an application query (see [`routing_core::Backend::classify`]).
///
/// diesel keeps no SQLSTATE, only a [`DatabaseErrorKind`]: `ReadOnlyTransaction` (25006) is
/// [`ErrorKind::ReadOnly`]; `ClosedConnection` and `UnableToSendCommand` (diesel-async's kind for
/// errors without a server code: the socket closed) are [`ErrorKind::Connection`]. For the other
/// server errors only the message is left, so statement timeouts and terminated sessions are
/// recognized by PostgreSQL's (English) message text.
pub fn classify(err: &DieselError) -> ErrorKind {
    match err {
        DieselError::DatabaseError(kind, info) => match kind {
            DatabaseErrorKind::ReadOnlyTransaction => ErrorKind::ReadOnly,
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand => {
                ErrorKind::Connection
            }
            _ => classify_message(info.message()).unwrap_or(ErrorKind::Query),
        },
        DieselError::BrokenTransactionManager => ErrorKind::Connection,
        _ => ErrorKind::Query,
    }
}

/// The SQLSTATE diesel's error kind stands for, where it stands for exactly one.
pub(crate) fn sqlstate(err: &DieselError) -> Option<&'static str> {
    let DieselError::DatabaseError(kind, _) = err else {
        return None;
    };
    Some(match kind {
        DatabaseErrorKind::ReadOnlyTransaction => "25006",
        DatabaseErrorKind::UniqueViolation => "23505",
        DatabaseErrorKind::ForeignKeyViolation => "23503",
        DatabaseErrorKind::NotNullViolation => "23502",
        DatabaseErrorKind::CheckViolation => "23514",
        DatabaseErrorKind::ExclusionViolation => "23P01",
        DatabaseErrorKind::RestrictViolation => "23001",
        DatabaseErrorKind::SerializationFailure => "40001",
        _ => return None,
    })
}

/// Server messages whose SQLSTATE diesel drops but that matter for routing.
fn classify_message(message: &str) -> Option<ErrorKind> {
    let m = message.to_ascii_lowercase();
    if m.contains("statement timeout") {
        // 57014 query_canceled by statement_timeout
        Some(ErrorKind::Timeout)
    } else if m.starts_with("terminating connection")
        || m.contains("the database system is shutting down")
        || m.contains("the database system is starting up")
        || m.contains("the database system is in recovery mode")
        || m.contains("connection closed")
    {
        // 57P01/57P02/57P03 and friends: the session is gone
        Some(ErrorKind::Connection)
    } else {
        // Read-only refusals, including a standby's "read-write mode during recovery".
        ErrorKind::from_server_message(&m)
    }
}

/// A query error on `label`'s session.
pub(crate) fn query_error(label: &str, err: DieselError) -> BackendError {
    classified(format!("{label}: {err}"), err)
}

/// An application query's error (see [`crate::DbError`]).
pub(crate) fn application_error(err: DieselError) -> BackendError {
    classified(err.to_string(), err)
}

fn classified(message: String, err: DieselError) -> BackendError {
    let kind = classify(&err);
    let code = sqlstate(&err);
    let mut out = BackendError::new(kind, message);
    if let Some(code) = code {
        out = out.with_sqlstate(code);
    }
    // Query errors carry no connection string: the driver's error is safe to keep as the source.
    out.with_source(err)
}

/// The kind a server's SQLSTATE implies for connect-time errors (one table for every adapter:
/// routing-core's).
fn kind_of_sqlstate(code: &str) -> ErrorKind {
    ErrorKind::from_sqlstate(code).unwrap_or(ErrorKind::Query)
}

/// An error from `tokio_postgres::connect` (or from a query run while setting a session up).
pub(crate) fn pg_error(label: &str, err: tokio_postgres::Error) -> BackendError {
    if let Some(code) = err.code() {
        let code = code.code().to_string();
        let message = match err.as_db_error() {
            Some(db) => format!("{label}: {}: {}", db.severity(), db.message()),
            None => format!("{label}: {err}"),
        };
        return BackendError::new(kind_of_sqlstate(&code), message)
            .with_sqlstate(code)
            .with_source(err);
    }
    let head = err.to_string();
    let kind = if err.is_closed() {
        ErrorKind::Connection
    } else if head.starts_with("authentication error") {
        // e.g. the server wants a password and the URL has none
        ErrorKind::Auth
    } else if head.starts_with("invalid configuration")
        || head.starts_with("invalid connection string")
        || head.contains("TLS")
    {
        ErrorKind::Config
    } else {
        ErrorKind::Connection
    };
    let text = with_causes(&err);
    let out = BackendError::new(kind, format!("{label}: {text}"));
    if kind == ErrorKind::Config {
        // A configuration error may quote the connection string: keep only the redacted text.
        out
    } else {
        out.with_source(err)
    }
}

/// An error's text followed by its causes (tokio-postgres keeps the interesting part, such as
/// "Connection refused", in the source).
pub(crate) fn with_causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// Carries a classified [`BackendError`] through diesel-async's `custom_setup`, whose signature
/// only allows a [`ConnectionError`]; [`from_connection_error`] takes it out again.
pub(crate) fn into_connection_error(err: BackendError) -> ConnectionError {
    ConnectionError::CouldntSetupConfiguration(DieselError::QueryBuilderError(Box::new(err)))
}

/// The inverse of [`into_connection_error`]; other diesel connection errors are classified here.
pub(crate) fn from_connection_error(label: &str, err: ConnectionError) -> BackendError {
    match err {
        ConnectionError::CouldntSetupConfiguration(DieselError::QueryBuilderError(inner))
            if inner.is::<BackendError>() =>
        {
            match inner.downcast::<BackendError>() {
                Ok(b) => *b,
                Err(other) => BackendError::new(ErrorKind::Connection, format!("{label}: {other}")),
            }
        }
        ConnectionError::CouldntSetupConfiguration(e) => query_error(label, e),
        ConnectionError::InvalidConnectionUrl(m) => BackendError::new(
            ErrorKind::Config,
            format!("{label}: invalid connection URL: {m}"),
        ),
        ConnectionError::InvalidCString(_) => BackendError::new(
            ErrorKind::Config,
            format!("{label}: connection string contains a NUL byte"),
        ),
        ConnectionError::BadConnection(m) => {
            BackendError::new(ErrorKind::Connection, format!("{label}: {m}"))
        }
        other => BackendError::new(ErrorKind::Connection, format!("{label}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Info(&'static str);

    impl diesel::result::DatabaseErrorInformation for Info {
        fn message(&self) -> &str {
            self.0
        }
        fn details(&self) -> Option<&str> {
            None
        }
        fn hint(&self) -> Option<&str> {
            None
        }
        fn table_name(&self) -> Option<&str> {
            None
        }
        fn column_name(&self) -> Option<&str> {
            None
        }
        fn constraint_name(&self) -> Option<&str> {
            None
        }
        fn statement_position(&self) -> Option<i32> {
            None
        }
    }

    fn db(kind: DatabaseErrorKind, msg: &'static str) -> DieselError {
        DieselError::DatabaseError(kind, Box::new(Info(msg)))
    }

    #[test]
    fn classifies_diesel_errors() {
        let read_only = db(
            DatabaseErrorKind::ReadOnlyTransaction,
            "cannot execute INSERT in a read-only transaction",
        );
        assert_eq!(classify(&read_only), ErrorKind::ReadOnly);
        let e = query_error("n1 reader", read_only);
        assert_eq!(e.kind, ErrorKind::ReadOnly);
        assert_eq!(e.sqlstate.as_deref(), Some("25006"));
        assert!(e.message.starts_with("n1 reader: "), "{}", e.message);

        let closed = db(DatabaseErrorKind::UnableToSendCommand, "connection closed");
        assert_eq!(classify(&closed), ErrorKind::Connection);
        let closed = db(DatabaseErrorKind::ClosedConnection, "x");
        assert_eq!(classify(&closed), ErrorKind::Connection);
        let killed = db(
            DatabaseErrorKind::Unknown,
            "terminating connection due to administrator command",
        );
        assert_eq!(classify(&killed), ErrorKind::Connection);
        let timeout = db(
            DatabaseErrorKind::Unknown,
            "canceling statement due to statement timeout",
        );
        assert_eq!(classify(&timeout), ErrorKind::Timeout);
        let unique = db(DatabaseErrorKind::UniqueViolation, "duplicate key");
        assert_eq!(classify(&unique), ErrorKind::Query);
        assert_eq!(sqlstate(&unique), Some("23505"));
        assert_eq!(classify(&DieselError::NotFound), ErrorKind::Query);
    }

    #[test]
    fn classified_errors_survive_custom_setup() {
        let original = BackendError::new(ErrorKind::NotWriter, "n0 writer: node is in recovery")
            .with_sqlstate("XX000");
        let through = from_connection_error("n0 writer", into_connection_error(original));
        assert_eq!(through.kind, ErrorKind::NotWriter);
        assert_eq!(through.sqlstate.as_deref(), Some("XX000"));
        assert_eq!(through.message, "n0 writer: node is in recovery");
    }

    #[test]
    fn connection_errors_are_redacted() {
        let e = from_connection_error(
            "n0 writer",
            ConnectionError::BadConnection(
                "could not connect to postgres://app:hunter2@db/x".into(),
            ),
        );
        assert_eq!(e.kind, ErrorKind::Connection);
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(!format!("{e:?}").contains("hunter2"), "{e:?}");
    }

    #[test]
    fn sqlstates_at_connect() {
        assert_eq!(kind_of_sqlstate("28P01"), ErrorKind::Auth);
        assert_eq!(kind_of_sqlstate("28000"), ErrorKind::Auth);
        assert_eq!(kind_of_sqlstate("3D000"), ErrorKind::Config);
        assert_eq!(kind_of_sqlstate("57P03"), ErrorKind::Connection);
        assert_eq!(kind_of_sqlstate("08006"), ErrorKind::Connection);
        assert_eq!(kind_of_sqlstate("42601"), ErrorKind::Query);
    }
}
