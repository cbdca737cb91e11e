//! One error type for a routed query with diesel, so `?` works on the router's results and on
//! diesel's alike.

use diesel::result::Error as DieselError;
use routing_core::{BackendError, RoutedError};

/// The error of a routed operation with diesel: the router refused or failed, or the query
/// itself failed. Both `routing_core::Error` and `diesel::result::Error` convert into it, so
/// one `?` fits both; [`RoutedError`] classifies it (a misrouted write is recognised from
/// diesel's `ReadOnlyTransaction` kind), and diesel's own error stays reachable:
///
/// ```
/// use routing_diesel::{DbError, RoutedError};
/// use routing_diesel::diesel::result::Error as DieselError;
///
/// let e = DbError::from(DieselError::NotFound);
/// assert!(!e.is_misrouted_write());
/// assert!(matches!(e.as_diesel(), Some(DieselError::NotFound)));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// The router refused or failed (no node, a bad token, a lost commit, ...).
    #[error(transparent)]
    Routing(#[from] routing_core::Error),
    /// The application's query failed; classified, its message redacted, diesel's error its
    /// source.
    #[error("query failed: {0}")]
    Query(BackendError),
}

impl From<DieselError> for DbError {
    fn from(e: DieselError) -> Self {
        DbError::Query(crate::error::application_error(e))
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
    /// diesel's own error, from the query or behind the router's error.
    pub fn as_diesel(&self) -> Option<&DieselError> {
        self.driver()?.source.as_ref()?.downcast_ref()
    }

    /// The constraint a violation names (for example a unique index the application maps to
    /// 422).
    pub fn constraint(&self) -> Option<&str> {
        match self.as_diesel()? {
            DieselError::DatabaseError(_, info) => info.constraint_name(),
            _ => None,
        }
    }
}

#[cfg(feature = "axum")]
impl routing_axum::axum::response::IntoResponse for DbError {
    fn into_response(self) -> routing_axum::axum::response::Response {
        routing_axum::error_response(&self)
    }
}
