//! # routing-axum
//!
//! Web integration for [`routing_core`] on axum and tower, generic over the backend: a
//! [`RoutingLayer`] builds each request's routing context, lazy extractors hand out sessions,
//! and every response to a request that committed carries the client's causal token.
//!
//! - **The layer** ([`RoutingLayer`]) reads the client's causal token from `X-Read-After` or,
//!   for browsers, from a cookie it sets itself (HttpOnly, SameSite=Lax); takes the user from a
//!   hook the application provides; resolves the region with a [`RegionResolver`] (for example
//!   [`RegionHeader`], which trusts its header only from configured proxies). A malformed,
//!   forged or foreign token is answered 400 before the handler runs.
//! - **Extractors**, each checked out on first use and releasable before the handler ends:
//!   [`Read`] (a read session routed by the request's consistency mode), [`Write`] (a session on
//!   the primary; the layer finishes it after the handler, so a forgotten `finish` loses
//!   nothing), [`Tx`] (a request-bound transaction: committed when the response is 2xx/3xx,
//!   rolled back otherwise) and [`Db`] (a read or write session chosen by the route: see
//!   [`force_primary`] and [`RoutingLayer::method_defaults`]). [`Routing`] gives the handler
//!   the request's context (to name the user once the handler knows it, say).
//! - **After the handler**, the layer commits or rolls back, records the users' marks, and puts
//!   the new token on the response (header, and cookie when enabled).
//! - **Errors** become responses through [`error_response`]: 400 for a bad token, 503 with
//!   `Retry-After` when no node can serve in time, 500 for a misrouted write (a bug in the
//!   handler), 409 for a serialization conflict; never a panic. Every extractor takes an error
//!   type parameter (default [`WebError`]) so handlers can use their own.
//!
//! ```no_run
//! use axum::routing::{get, post};
//! use routing_axum::{force_primary, RoutingLayer, RegionHeader, Read, Tx, WebError};
//! use routing_core::{Backend, Router};
//!
//! fn app<B: Backend>(router: Router<B>) -> axum::Router {
//!     axum::Router::new()
//!         .route("/users", get(list::<B>))
//!         .route("/transfer", post(transfer::<B>).layer(force_primary()))
//!         .layer(
//!             RoutingLayer::new(router)
//!                 .user_from(|parts| parts.headers.get("x-user")?.to_str().ok().map(Into::into))
//!                 .token_cookie("read_after")
//!                 .region(RegionHeader::new("x-region").trust_proxy("10.0.0.0/8")),
//!         )
//! }
//! # async fn list<B: Backend>(mut db: Read<B>) -> Result<String, WebError> { db.conn().await?; Ok(String::new()) }
//! # async fn transfer<B: Backend>(mut tx: Tx<B>) -> Result<(), WebError> { tx.conn().await?; Ok(()) }
//! ```

mod cookie;
mod error;
mod extract;
mod layer;
mod region;
mod route;
mod service;
mod state;
#[cfg(feature = "status")]
mod status;

pub use error::{WebError, error_response};
pub use extract::{Db, Read, Routing, Tx, Write};
pub use layer::{RoutingLayer, TOKEN_HEADER};
pub use region::{RegionHeader, RegionResolver, TrustedProxies};
pub use route::{ForcePrimary, ForcePrimaryLayer, force_primary};
pub use service::RoutingService;
#[cfg(feature = "status")]
pub use status::status;

/// The axum this crate is built on, for adapters and applications that need its types.
pub use axum;
