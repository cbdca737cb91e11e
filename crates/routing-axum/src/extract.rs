//! Extractors: sessions checked out on first use, and the request's routing context.

use std::marker::PhantomData;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::response::IntoResponse;
use routing_core::{
    Backend, CausalToken, Consistency, Error, ReadConn, RequestContext, Router, UserKey, WriteConn,
    WriteReceipt,
};

use crate::WebError;
use crate::state::{Ending, RequestState};

/// A read session routed by the request's context: a replica that fits its consistency mode
/// (the user's mark, the client's token, the region), or the primary read-only. Checked out on
/// the first [`Read::conn`], returned to the pool by [`Read::release`] or at the end of the
/// handler. `E` is the error the handler returns (default [`WebError`]).
pub struct Read<B: Backend, E = WebError> {
    state: Arc<RequestState<B>>,
    session: Option<ReadConn<B>>,
    _error: PhantomData<fn() -> E>,
}

impl<B: Backend, E: From<Error>> Read<B, E> {
    /// The driver's connection (`&mut PgConnection`, `&mut AsyncPgConnection`), checking a
    /// session out on first use.
    pub async fn conn(&mut self) -> Result<&mut B::Connection, E> {
        Ok(&mut **self.session().await?)
    }

    /// The routed session itself (its node, whether it is on the primary, `check`).
    pub async fn session(&mut self) -> Result<&mut ReadConn<B>, E> {
        let session = match self.session.take() {
            Some(s) => s,
            None => {
                let ctx = self.state.context();
                self.state.router.read_with(&ctx).await?
            }
        };
        Ok(self.session.insert(session))
    }

    /// Returns the session to the pool now (before slow work that needs no database, say);
    /// a later [`Read::conn`] checks out another.
    pub fn release(&mut self) {
        self.session = None;
    }

    /// The node of the checked-out session, if any.
    pub fn node_name(&self) -> Option<&str> {
        self.session.as_ref().map(ReadConn::node_name)
    }
}

impl<B: Backend, E> Read<B, E> {
    fn new(state: Arc<RequestState<B>>) -> Self {
        Read {
            state,
            session: None,
            _error: PhantomData,
        }
    }
}

impl<B, S, E> FromRequestParts<S> for Read<B, E>
where
    B: Backend,
    S: Send + Sync,
    E: From<Error> + IntoResponse,
{
    type Rejection = E;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, E> {
        Ok(Read::new(RequestState::of(parts)?))
    }
}

/// A session on the primary for autocommit writes. Checked out on the first [`Write::conn`].
/// [`Write::finish`] reads the commit position, raises the users' marks and records the token
/// for the response; whatever the handler did not finish, the layer finishes after the
/// handler, so forgetting it loses nothing.
pub struct Write<B: Backend, E = WebError> {
    state: Arc<RequestState<B>>,
    session: Option<WriteConn<B>>,
    also_mark: Vec<UserKey>,
    ending: Ending,
    _error: PhantomData<fn() -> E>,
}

impl<B: Backend, E: From<Error>> Write<B, E> {
    /// The driver's connection on the primary, checking a session out on first use.
    pub async fn conn(&mut self) -> Result<&mut B::Connection, E> {
        Ok(&mut **self.session().await?)
    }

    /// The write session itself.
    pub async fn session(&mut self) -> Result<&mut WriteConn<B>, E> {
        let session = match self.session.take() {
            Some(s) => s,
            None => {
                let ctx = self.state.context();
                let mut session = self.state.router.write_with(&ctx).await?;
                for user in &self.also_mark {
                    session.mark_user(user.clone());
                }
                if matches!(self.ending, Ending::Commit)
                    && let Err(e) = session.begin().await
                {
                    return Err(e.into());
                }
                session
            }
        };
        Ok(self.session.insert(session))
    }

    /// Also raises this user's mark when the work commits: for a write that creates the user
    /// (a sign-up: the id exists only after the INSERT). The request's own user is marked too.
    pub fn mark_user(&mut self, user: impl Into<UserKey>) {
        let user = user.into();
        if let Some(s) = &mut self.session {
            s.mark_user(user.clone());
        }
        self.also_mark.push(user);
    }

    /// Finishes the work now: reads the commit position, raises the marks and records the token
    /// for the response (a [`Tx`] commits). `None` when no session was checked out.
    pub async fn finish(&mut self) -> Result<Option<WriteReceipt>, E> {
        let Some(session) = self.session.take() else {
            return Ok(None);
        };
        let receipt = match self.ending {
            Ending::Finish => session.finish().await?,
            Ending::Commit => session.commit().await?,
        };
        self.state.record(&receipt);
        Ok(Some(receipt))
    }

    /// The primary serving the checked-out session, if any.
    pub fn node_name(&self) -> Option<&str> {
        self.session.as_ref().map(WriteConn::node_name)
    }
}

impl<B: Backend, E> Drop for Write<B, E> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let ending = std::mem::replace(&mut self.ending, Ending::Finish);
            self.state.park(session, ending);
        }
    }
}

impl<B, S, E> FromRequestParts<S> for Write<B, E>
where
    B: Backend,
    S: Send + Sync,
    E: From<Error> + IntoResponse,
{
    type Rejection = E;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, E> {
        Ok(Write::new(RequestState::of(parts)?, Ending::Finish))
    }
}

impl<B: Backend, E> Write<B, E> {
    fn new(state: Arc<RequestState<B>>, ending: Ending) -> Self {
        Write {
            state,
            session: None,
            also_mark: Vec::new(),
            ending,
            _error: PhantomData,
        }
    }
}

/// A request-bound transaction on the primary (axum-sqlx-tx's model): `BEGIN` on the first
/// [`Tx::conn`]; after the handler, the layer commits it when the response is a success (2xx or
/// 3xx) and rolls it back otherwise. Only a real commit raises marks and puts a token on the
/// response; a commit that fails replaces the response with its error.
pub struct Tx<B: Backend, E = WebError>(Write<B, E>);

impl<B: Backend, E: From<Error>> Tx<B, E> {
    /// The driver's connection inside the transaction.
    pub async fn conn(&mut self) -> Result<&mut B::Connection, E> {
        self.0.conn().await
    }

    /// The write session itself.
    pub async fn session(&mut self) -> Result<&mut WriteConn<B>, E> {
        self.0.session().await
    }

    /// See [`Write::mark_user`].
    pub fn mark_user(&mut self, user: impl Into<UserKey>) {
        self.0.mark_user(user);
    }

    /// Commits now rather than after the handler (to put the receipt in the body, say).
    pub async fn commit(&mut self) -> Result<Option<WriteReceipt>, E> {
        self.0.finish().await
    }

    /// The primary serving the transaction, once begun.
    pub fn node_name(&self) -> Option<&str> {
        self.0.node_name()
    }
}

impl<B, S, E> FromRequestParts<S> for Tx<B, E>
where
    B: Backend,
    S: Send + Sync,
    E: From<Error> + IntoResponse,
{
    type Rejection = E;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, E> {
        Ok(Tx(Write::new(RequestState::of(parts)?, Ending::Commit)))
    }
}

/// The session the route calls for: a [`Write`] on a [`crate::force_primary`] route or, with
/// [`crate::RoutingLayer::method_defaults`], for a method other than GET, HEAD or OPTIONS;
/// otherwise a [`Read`] routed by the request's consistency mode.
pub enum Db<B: Backend, E = WebError> {
    /// A read session.
    Read(Read<B, E>),
    /// A write session, finished by the layer.
    Write(Write<B, E>),
}

impl<B: Backend, E: From<Error>> Db<B, E> {
    /// The driver's connection, checking a session out on first use.
    pub async fn conn(&mut self) -> Result<&mut B::Connection, E> {
        match self {
            Db::Read(r) => r.conn().await,
            Db::Write(w) => w.conn().await,
        }
    }

    /// Is this a write session?
    pub fn is_write(&self) -> bool {
        matches!(self, Db::Write(_))
    }

    /// See [`Write::mark_user`]; nothing on a read session.
    pub fn mark_user(&mut self, user: impl Into<UserKey>) {
        if let Db::Write(w) = self {
            w.mark_user(user);
        }
    }

    /// Returns a read session to the pool, or finishes a write session, now.
    pub async fn release(&mut self) -> Result<Option<WriteReceipt>, E> {
        match self {
            Db::Read(r) => {
                r.release();
                Ok(None)
            }
            Db::Write(w) => w.finish().await,
        }
    }

    /// The node of the checked-out session, if any.
    pub fn node_name(&self) -> Option<&str> {
        match self {
            Db::Read(r) => r.node_name(),
            Db::Write(w) => w.node_name(),
        }
    }
}

impl<B, S, E> FromRequestParts<S> for Db<B, E>
where
    B: Backend,
    S: Send + Sync,
    E: From<Error> + IntoResponse,
{
    type Rejection = E;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, E> {
        let state = RequestState::of(parts)?;
        Ok(if state.wants_write() {
            Db::Write(Write::new(state, Ending::Finish))
        } else {
            Db::Read(Read::new(state))
        })
    }
}

/// The request's routing context, for handlers that learn something the layer could not: the
/// user (after a log-in), a stricter consistency for one request.
pub struct Routing<B: Backend> {
    state: Arc<RequestState<B>>,
}

impl<B: Backend> Routing<B> {
    /// Routes this request's later sessions for `user` (and marks them for it). Wins over the
    /// layer's user hook.
    pub fn set_user(&self, user: impl Into<UserKey>) {
        self.state.set_user(user.into());
    }

    /// Overrides the consistency mode of this request's later read sessions.
    pub fn set_consistency(&self, mode: Consistency) {
        self.state.update(|ctx| ctx.consistency = Some(mode));
    }

    /// The context later sessions are routed with.
    pub fn context(&self) -> RequestContext {
        self.state.context()
    }

    /// The newest commit this request made so far (its token goes on the response).
    pub fn committed(&self) -> Option<CausalToken> {
        self.state.committed()
    }

    /// The router.
    pub fn router(&self) -> &Router<B> {
        &self.state.router
    }
}

impl<B, S> FromRequestParts<S> for Routing<B>
where
    B: Backend,
    S: Send + Sync,
{
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, WebError> {
        Ok(Routing {
            state: RequestState::of(parts)?,
        })
    }
}

macro_rules! debug_by_node {
    ($($ty:ident),*) => {$(
        impl<B: Backend, E> std::fmt::Debug for $ty<B, E> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($ty)).finish_non_exhaustive()
            }
        }
    )*};
}
debug_by_node!(Read, Write, Tx, Db);

impl<B: Backend> std::fmt::Debug for Routing<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing")
            .field("context", &self.state.context())
            .finish()
    }
}
