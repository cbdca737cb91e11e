//! sqlx errors, classified for the router.

use routing_core::{BackendError, ErrorKind};

/// Classifies a sqlx error: transport failures are [`ErrorKind::Connection`], a pool wait that
/// ran out is [`ErrorKind::Timeout`], a bad connection string [`ErrorKind::Config`], and a
/// server error is whatever its SQLSTATE says ([`ErrorKind::from_sqlstate`]: 25006 read-only,
/// 28P01 auth, ...), else [`ErrorKind::Query`].
pub fn classify(err: &sqlx::Error) -> ErrorKind {
    use sqlx::Error as E;
    match err {
        E::Io(_) | E::Tls(_) | E::Protocol(_) | E::PoolClosed | E::WorkerCrashed => {
            ErrorKind::Connection
        }
        E::PoolTimedOut => ErrorKind::Timeout,
        E::Configuration(_) => ErrorKind::Config,
        E::Database(db) => db
            .code()
            .and_then(|code| ErrorKind::from_sqlstate(&code))
            .unwrap_or(ErrorKind::Query),
        _ => ErrorKind::Query,
    }
}

/// A sqlx error as the core's [`BackendError`]: classified, with its SQLSTATE, its message
/// redacted, and the sqlx error as its source.
pub fn backend_error(err: sqlx::Error) -> BackendError {
    let message = err.to_string();
    with_message(message, err)
}

/// [`backend_error`] with its message prefixed by where it happened (`pg-1 (ReadOnly): ...`).
pub(crate) fn backend_error_at(context: &str, err: sqlx::Error) -> BackendError {
    let message = format!("{context}: {err}");
    with_message(message, err)
}

/// The server's SQLSTATE, for errors the server sent.
pub fn sqlstate(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

fn with_message(message: String, err: sqlx::Error) -> BackendError {
    let mut out = BackendError::new(classify(&err), message);
    if let Some(code) = sqlstate(&err) {
        out = out.with_sqlstate(code);
    }
    out.with_source(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_and_pool_errors() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(classify(&io), ErrorKind::Connection);
        assert_eq!(classify(&sqlx::Error::PoolClosed), ErrorKind::Connection);
        assert_eq!(
            classify(&sqlx::Error::Protocol("x".into())),
            ErrorKind::Connection
        );
        assert_eq!(classify(&sqlx::Error::PoolTimedOut), ErrorKind::Timeout);
        assert_eq!(
            classify(&sqlx::Error::Configuration("bad".into())),
            ErrorKind::Config
        );
        assert_eq!(classify(&sqlx::Error::RowNotFound), ErrorKind::Query);
    }

    #[test]
    fn messages_are_redacted() {
        let e = sqlx::Error::Configuration("cannot use postgres://app:hunter2@db/x".into());
        let b = backend_error(e);
        assert_eq!(b.kind, ErrorKind::Config);
        assert!(!b.message.contains("hunter2"), "{}", b.message);
        assert!(!b.to_string().contains("hunter2"));
    }
}
