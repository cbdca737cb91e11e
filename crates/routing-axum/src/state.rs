//! What the layer keeps for one request: its routing context, the write sessions the handler
//! left for the layer to end, and the newest commit to hand back as a token.

use std::sync::{Arc, Mutex, PoisonError};

use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, header};
use axum::response::Response;
use routing_core::{
    Backend, CausalToken, Consistency, Error, RequestContext, Router, UserKey, WriteConn,
    WriteReceipt,
};

use crate::cookie::{self, CookieSettings};
use crate::error::error_response;
use crate::region::{RegionResolver, peer_of};

/// Set by [`crate::force_primary`] on a route's requests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForcePrimaryMark;

/// The application's hook from a request to its user.
pub(crate) type UserHook = Arc<dyn Fn(&Parts) -> Option<UserKey> + Send + Sync>;

/// The layer's settings, shared by every request.
#[derive(Clone, Default)]
pub(crate) struct Settings {
    pub(crate) user: Option<UserHook>,
    pub(crate) cookie: Option<CookieSettings>,
    pub(crate) region: Option<Arc<dyn RegionResolver>>,
    pub(crate) method_defaults: bool,
    pub(crate) consistency: Option<Consistency>,
}

/// How the layer ends a write session the handler left behind.
pub(crate) enum Ending {
    /// Autocommit work: read its commit position (`WriteConn::finish`).
    Finish,
    /// A request-bound transaction: commit on a 2xx/3xx response, else roll back.
    Commit,
}

struct Ctx {
    context: RequestContext,
    /// Named by the handler ([`crate::Routing::set_user`]): the hook no longer overrides it.
    user_fixed: bool,
}

pub(crate) struct RequestState<B: Backend> {
    pub(crate) router: Router<B>,
    settings: Arc<Settings>,
    write_method: bool,
    ctx: Mutex<Ctx>,
    parked: Mutex<Vec<(WriteConn<B>, Ending)>>,
    committed: Mutex<Option<CausalToken>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing here can leave the data half-updated: a poisoned lock is still consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<B: Backend> RequestState<B> {
    /// The request's state, or the response to send at once (a bad token: 400, and the bad
    /// cookie cleared so that it cannot fail every later request).
    pub(crate) fn new(
        router: Router<B>,
        settings: Arc<Settings>,
        parts: &Parts,
    ) -> Result<Self, Box<Response>> {
        let mut context = RequestContext::new();
        context.consistency = settings.consistency;
        if router.tokens().is_some() {
            let header = parts
                .headers
                .get(crate::TOKEN_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty());
            let (text, from_cookie) = match (header, &settings.cookie) {
                (Some(text), _) => (Some(text), false),
                (None, Some(c)) => (
                    cookie::find(&parts.headers, &c.name).filter(|v| !v.is_empty()),
                    true,
                ),
                (None, None) => (None, false),
            };
            if let Some(text) = text {
                match router.verify_token(text) {
                    Ok(token) => context.token = Some(token),
                    Err(e) => {
                        let mut response = error_response(&e);
                        if let (true, Some(c)) = (from_cookie, &settings.cookie)
                            && let Some(clear) = c.clear()
                        {
                            response.headers_mut().append(header::SET_COOKIE, clear);
                        }
                        return Err(Box::new(response));
                    }
                }
            }
        }
        if let Some(resolver) = &settings.region {
            context.region = resolver.region(parts, peer_of(parts));
        }
        if let Some(hook) = &settings.user {
            context.user = hook(parts);
        }
        let write_method = settings.method_defaults
            && !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        Ok(RequestState {
            router,
            settings,
            write_method,
            ctx: Mutex::new(Ctx {
                context,
                user_fixed: false,
            }),
            parked: Mutex::new(Vec::new()),
            committed: Mutex::new(None),
        })
    }

    /// The state the layer put on the request, or the error that says the layer is missing.
    pub(crate) fn of(parts: &mut Parts) -> Result<Arc<Self>, Error> {
        let state = parts
            .extensions
            .get::<Arc<Self>>()
            .cloned()
            .ok_or_else(|| {
                Error::Config(format!(
                    "no RoutingLayer<{}> on this route: add `.layer(RoutingLayer::new(router))` \
                 to the axum Router (outside the routes that extract sessions)",
                    std::any::type_name::<B>()
                ))
            })?;
        state.refresh(parts);
        Ok(state)
    }

    /// What an extractor sees that the layer could not: a route's force-primary switch, and a
    /// user an earlier extractor (the application's auth) put in the extensions.
    fn refresh(&self, parts: &Parts) {
        let mut ctx = lock(&self.ctx);
        if parts.extensions.get::<ForcePrimaryMark>().is_some() {
            ctx.context.force_primary = true;
        }
        if !ctx.user_fixed
            && let Some(hook) = &self.settings.user
            && let Some(user) = hook(parts)
        {
            ctx.context.user = Some(user);
        }
    }

    pub(crate) fn context(&self) -> RequestContext {
        lock(&self.ctx).context.clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut RequestContext)) {
        f(&mut lock(&self.ctx).context);
    }

    pub(crate) fn set_user(&self, user: UserKey) {
        let mut ctx = lock(&self.ctx);
        ctx.context.user = Some(user);
        ctx.user_fixed = true;
    }

    /// Should a [`crate::Db`] be a write session here?
    pub(crate) fn wants_write(&self) -> bool {
        self.write_method || lock(&self.ctx).context.force_primary
    }

    /// A write session the handler is done with, for the layer to end after the response.
    pub(crate) fn park(&self, conn: WriteConn<B>, ending: Ending) {
        lock(&self.parked).push((conn, ending));
    }

    /// A commit made in this request: its token goes on the response.
    pub(crate) fn record(&self, receipt: &WriteReceipt) {
        let mut committed = lock(&self.committed);
        *committed = Some(match *committed {
            Some(t) => t.merge(receipt.causal),
            None => receipt.causal,
        });
    }

    /// The newest commit of this request so far.
    pub(crate) fn committed(&self) -> Option<CausalToken> {
        *lock(&self.committed)
    }

    /// After the handler: ends the parked sessions (transactions commit only on a 2xx/3xx
    /// response; a commit that fails turns the response into its error) and puts the token of
    /// whatever committed on the response.
    pub(crate) async fn end(&self, response: &mut Response) {
        let parked = std::mem::take(&mut *lock(&self.parked));
        let success = response.status().is_success() || response.status().is_redirection();
        let mut failed = None;
        for (conn, ending) in parked {
            match ending {
                Ending::Finish => match conn.finish().await {
                    Ok(receipt) => self.record(&receipt),
                    Err(e) => {
                        tracing::warn!(error = %e, "a write session ended without a commit position: no mark or token for it");
                    }
                },
                Ending::Commit if success && failed.is_none() => match conn.commit().await {
                    Ok(receipt) => self.record(&receipt),
                    Err(e) => failed = Some(error_response(&e)),
                },
                // Rolled back by the session's reset before it is reused.
                Ending::Commit => drop(conn),
            }
        }
        if let Some(failed) = failed {
            *response = failed;
        }
        let Some(token) = self.committed() else {
            return;
        };
        let Some(text) = self.router.sign_token(&token) else {
            return;
        };
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&text) {
            headers.insert(crate::TOKEN_HEADER, value);
        }
        if let Some(cookie) = self.settings.cookie.as_ref().and_then(|c| c.set(&text)) {
            headers.append(header::SET_COOKIE, cookie);
        }
    }
}
