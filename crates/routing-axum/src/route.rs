//! Per-route switches: force every read and write of a route onto the primary.

use std::task::{Context, Poll};

use axum::http::Request;
use tower_layer::Layer;
use tower_service::Service;

use crate::state::ForcePrimaryMark;

/// A layer for routes whose every read and write must stay on the primary (a money transfer
/// that reads balances and writes them in one transaction, say). Apply it per route, inside the
/// [`crate::RoutingLayer`]: `post(transfer).layer(force_primary())`. On such a route [`crate::Read`]
/// reads on the primary (read-only) and [`crate::Db`] is a write session.
pub fn force_primary() -> ForcePrimaryLayer {
    ForcePrimaryLayer
}

/// See [`force_primary`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ForcePrimaryLayer;

impl<S> Layer<S> for ForcePrimaryLayer {
    type Service = ForcePrimary<S>;
    fn layer(&self, inner: S) -> ForcePrimary<S> {
        ForcePrimary { inner }
    }
}

/// The service [`ForcePrimaryLayer`] wraps a route in.
#[derive(Debug, Clone)]
pub struct ForcePrimary<S> {
    inner: S,
}

impl<S, Body> Service<Request<Body>> for ForcePrimary<S>
where
    S: Service<Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> S::Future {
        // A marker, not the state: this layer need not know the backend type. The extractors
        // read it when they build the context.
        req.extensions_mut().insert(ForcePrimaryMark);
        self.inner.call(req)
    }
}
