//! One error type for a routed query with sqlx, so `?` works on the router's results and on
//! sqlx's alike.

use routing_core::{BackendError, RoutedError};

use crate::errors::backend_error;

/// The error of a routed operation with sqlx: the router refused or failed, or the query
/// itself failed. Both `routing_core::Error` and `sqlx::Error` convert into it, so one `?`
/// fits both; [`RoutedError`] classifies it (a misrouted write is recognised from its
/// SQLSTATE), and sqlx's own error stays reachable for existing mappings:
///
/// ```
/// use routing_sqlx::{DbError, RoutedError};
///
/// fn status(e: &DbError) -> u16 {
///     if e.is_misrouted_write() {
///         500 // a bug: a write through a read session
///     } else if e.constraint() == Some("users_email_key") {
///         422 // the application's own mapping of its unique constraint
///     } else {
///         500
///     }
/// }
/// let e = DbError::from(sqlx::Error::RowNotFound);
/// assert_eq!(status(&e), 500);
/// assert!(matches!(e.as_sqlx(), Some(sqlx::Error::RowNotFound)));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// The router refused or failed (no node, a bad token, a lost commit, ...).
    #[error(transparent)]
    Routing(#[from] routing_core::Error),
    /// The application's query failed; classified, its message redacted, sqlx's error its
    /// source.
    #[error("query failed: {0}")]
    Query(BackendError),
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        DbError::Query(backend_error(e))
    }
}

impl RoutedError for DbError {
    fn routing(&self) -> Option<&routing_core::Error> {
        match self {
            DbError::Routing(e) => Some(e),
            DbError::Query(_) => None,
        }
    }

    fn query(&self) -> Option<&BackendError> {
        match self {
            DbError::Query(e) => Some(e),
            DbError::Routing(_) => None,
        }
    }
}

impl DbError {
    /// sqlx's own error, from the query or behind the router's error.
    pub fn as_sqlx(&self) -> Option<&sqlx::Error> {
        self.driver()?.source.as_ref()?.downcast_ref()
    }

    /// The server's error, for errors the server sent (with `code()`, `constraint()`, ...).
    pub fn as_database_error(&self) -> Option<&dyn sqlx::error::DatabaseError> {
        match self.as_sqlx()? {
            sqlx::Error::Database(db) => Some(&**db),
            _ => None,
        }
    }

    /// The constraint a violation names (for example a unique index the application maps to
    /// 422).
    pub fn constraint(&self) -> Option<&str> {
        self.as_database_error()?.constraint()
    }
}

#[cfg(feature = "axum")]
impl routing_axum::axum::response::IntoResponse for DbError {
    fn into_response(self) -> routing_axum::axum::response::Response {
        routing_axum::error_response(&self)
    }
}
