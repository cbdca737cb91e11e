//! Routing errors as HTTP responses: one mapping for every backend.

use std::fmt;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use routing_core::{ErrorClass, RoutedError};

/// Turns any routed error into a response, by its [`ErrorClass`]:
///
/// | class | status | body |
/// |---|---|---|
/// | a bad causal token | 400 | what is wrong with it |
/// | no node could serve in time, pool full, connection lost before anything was written | 503, `Retry-After: 1` | "database temporarily unavailable" |
/// | serialization failure or deadlock | 409 | "conflict with a concurrent transaction; retry" |
/// | a write through a read session (a bug in the handler) | 500 | "misrouted write" |
/// | outcome of a write unknown, anything else | 500 | generic |
///
/// 5xx bodies never carry the database's message (it is logged at `error` level instead,
/// redacted like every error of the library).
pub fn error_response(err: &(dyn RoutedError + '_)) -> Response {
    let (status, body) = match err.class() {
        ErrorClass::BadToken => (
            StatusCode::BAD_REQUEST,
            format!("bad X-Read-After token: {err}"),
        ),
        ErrorClass::Unavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "database temporarily unavailable; retry".to_string(),
        ),
        ErrorClass::Conflict => (
            StatusCode::CONFLICT,
            "conflict with a concurrent transaction; retry".to_string(),
        ),
        ErrorClass::MisroutedWrite => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error: a write was sent through a read session".to_string(),
        ),
        ErrorClass::OutcomeUnknown => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error: the write's outcome is unknown".to_string(),
        ),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error".to_string(),
        ),
    };
    if status.is_server_error() {
        tracing::error!(error = %err, class = ?err.class(), "request failed");
    }
    let mut response = (status, body).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// The extractors' default error type: any routed error (the router's, or an adapter's
/// `DbError`), answered with [`error_response`]. `?` converts into it from every type that
/// implements [`RoutedError`]; a handler that returns its own error type names it as the
/// extractors' second type parameter instead.
pub struct WebError(Box<dyn RoutedError>);

impl WebError {
    /// The error inside, to inspect (`is_misrouted_write`, `sqlstate`, `class`, ...).
    pub fn inner(&self) -> &(dyn RoutedError + 'static) {
        &*self.0
    }
}

impl<E: RoutedError> From<E> for WebError {
    fn from(e: E) -> Self {
        WebError(Box::new(e))
    }
}

impl fmt::Debug for WebError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for WebError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        error_response(&*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use routing_core::{Error, TokenError};
    use std::time::Duration;

    #[test]
    fn statuses_by_class() {
        let r = WebError::from(Error::Token(TokenError::Malformed)).into_response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let r = WebError::from(Error::NoPrimary {
            waited: Duration::from_secs(2),
        })
        .into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = WebError::from(Error::MisroutedWrite { node: "r1".into() }).into_response();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
