//! The service [`crate::RoutingLayer`] wraps an application in.

use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::Request;
use axum::response::Response;
use futures_util::future::BoxFuture;
use routing_core::{Backend, Router};
use tower_service::Service;

use crate::state::{RequestState, Settings};

/// See [`crate::RoutingLayer`].
pub struct RoutingService<S, B: Backend> {
    inner: S,
    router: Router<B>,
    settings: Arc<Settings>,
}

impl<S: Clone, B: Backend> Clone for RoutingService<S, B> {
    fn clone(&self) -> Self {
        RoutingService {
            inner: self.inner.clone(),
            router: self.router.clone(),
            settings: self.settings.clone(),
        }
    }
}

impl<S, B: Backend> std::fmt::Debug for RoutingService<S, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutingService")
            .field("router", &self.router)
            .finish_non_exhaustive()
    }
}

impl<S, B: Backend> RoutingService<S, B> {
    pub(crate) fn new(inner: S, router: Router<B>, settings: Arc<Settings>) -> Self {
        RoutingService {
            inner,
            router,
            settings,
        }
    }
}

impl<S, B, ReqBody> Service<Request<ReqBody>> for RoutingService<S, B>
where
    S: Service<Request<ReqBody>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Backend,
    ReqBody: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The clone is not ready; the instance poll_ready was called on is (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let router = self.router.clone();
        let settings = self.settings.clone();
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let state = match RequestState::new(router, settings, &parts) {
                Ok(state) => Arc::new(state),
                Err(response) => return Ok(*response),
            };
            parts.extensions.insert(state.clone());
            let mut response = inner.call(Request::from_parts(parts, body)).await?;
            state.end(&mut response).await;
            Ok(response)
        })
    }
}
