//! The layer and its settings.

use std::sync::Arc;

use axum::http::request::Parts;
use routing_core::{Backend, Consistency, Router, UserKey};
use tower_layer::Layer;

use crate::cookie::CookieSettings;
use crate::region::RegionResolver;
use crate::service::RoutingService;
use crate::state::Settings;

/// The header that carries a causal token, both ways: clients send the token of their last
/// write, and every response to a request that committed carries the new one.
pub const TOKEN_HEADER: &str = "x-read-after";

/// Builds each request's routing context and ends its write sessions after the handler; see
/// the crate documentation. Apply it to the whole `axum::Router` with `.layer(...)`.
pub struct RoutingLayer<B: Backend> {
    router: Router<B>,
    settings: Settings,
}

impl<B: Backend> Clone for RoutingLayer<B> {
    fn clone(&self) -> Self {
        RoutingLayer {
            router: self.router.clone(),
            settings: self.settings.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for RoutingLayer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutingLayer")
            .field("router", &self.router)
            .field("user_hook", &self.settings.user.is_some())
            .field("cookie", &self.settings.cookie)
            .field("region", &self.settings.region.is_some())
            .field("method_defaults", &self.settings.method_defaults)
            .finish()
    }
}

impl<B: Backend> RoutingLayer<B> {
    /// A layer for this router. Tokens are read and issued when the router has a token codec
    /// ([`routing_core::RouterBuilder::tokens`]).
    pub fn new(router: Router<B>) -> Self {
        RoutingLayer {
            router,
            settings: Settings::default(),
        }
    }

    /// How to find the request's user: from the application's own auth (a value its middleware
    /// or an earlier extractor put in the request extensions, a verified header, ...). Asked
    /// when the request arrives and again by each routing extractor, so an auth extractor listed
    /// before the session extractor in a handler's arguments is seen. A handler can also name the
    /// user itself ([`crate::Routing::set_user`]).
    pub fn user_from(
        mut self,
        hook: impl Fn(&Parts) -> Option<UserKey> + Send + Sync + 'static,
    ) -> Self {
        self.settings.user = Some(Arc::new(hook));
        self
    }

    /// Also carries the causal token in a cookie named `name` (HttpOnly, SameSite=Lax, Path=/,
    /// for ten minutes: long past any replica's catch-up), for clients that keep cookies:
    /// browsers are protected with no code on their side, logged in or not. `X-Read-After`, when
    /// sent, wins over the cookie.
    pub fn token_cookie(mut self, name: &str) -> Self {
        self.settings.cookie = Some(CookieSettings {
            name: name.to_string(),
            secure: false,
            max_age_secs: 600,
        });
        self
    }

    /// Marks the token cookie `Secure` (sent over HTTPS only). Set it whenever the service is
    /// served over HTTPS.
    pub fn secure_cookie(mut self, secure: bool) -> Self {
        if let Some(c) = &mut self.settings.cookie {
            c.secure = secure;
        }
        self
    }

    /// How to find the request's region ([`crate::RegionHeader`], or a closure).
    pub fn region(mut self, resolver: impl RegionResolver) -> Self {
        self.settings.region = Some(Arc::new(resolver));
        self
    }

    /// Routes [`crate::Db`] by HTTP method, as Rails' automatic role switching does: GET, HEAD
    /// and OPTIONS read, every other method writes (on the primary, finished by the layer).
    pub fn method_defaults(mut self, on: bool) -> Self {
        self.settings.method_defaults = on;
        self
    }

    /// The consistency mode of this service's requests, instead of the router's default.
    pub fn consistency(mut self, mode: Consistency) -> Self {
        self.settings.consistency = Some(mode);
        self
    }
}

impl<S, B: Backend> Layer<S> for RoutingLayer<B> {
    type Service = RoutingService<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        RoutingService::new(inner, self.router.clone(), Arc::new(self.settings.clone()))
    }
}
