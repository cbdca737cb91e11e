//! # pg-routing
//!
//! Primary/replica routing for PostgreSQL, in one dependency: writes go to the primary, reads
//! to streaming replicas that are fresh enough for the request (read-your-writes, causal tokens,
//! regions), and writes come back on their own after a failover. The backend and the extras are
//! chosen by feature flags; a feature that is off compiles none of its dependencies.
//!
//! | feature | what it adds |
//! |---|---|
//! | (always) | the routing model: [`Router`], [`Consistency`], [`NodeConfig`], tokens, marks, ... (`routing-core`) |
//! | `sqlx` | [`sqlx`]: the sqlx backend, `pg_routing::sqlx::Router`, and its `DbError` |
//! | `diesel` | [`diesel`]: the diesel-async + bb8 backend |
//! | `redis` | [`redis`]: recent-writer marks shared by every process |
//! | `axum` | [`axum`]: the layer and extractors; with a backend, `pg_routing::sqlx::{Read, Write, Tx, Db}` whose errors are that backend's `DbError` |
//! | `patroni` | `pg_routing::patroni::PatroniDiscovery`: members discovered from Patroni's REST API, kept in step by a [`Discoverer`] (serde_json; no HTTP client crate) |
//!
//! ```toml
//! [dependencies]
//! pg-routing = { path = "crates/pg-routing", features = ["sqlx", "redis", "axum"] }
//! ```
//!
//! See the repository's README for a whole service, and `examples/` for runnable ones.

pub use routing_core::*;

/// The sqlx backend: a [`Router`] over pools of sqlx `PgConnection`s.
#[cfg(feature = "sqlx")]
pub mod sqlx {
    pub use routing_sqlx::{
        DbError, NodePool, PooledConn, SqlxBackend, backend_error, classify, sqlstate,
    };

    /// The sqlx this backend is built on.
    pub use routing_sqlx::sqlx;

    /// A router over sqlx.
    pub type Router = routing_core::Router<SqlxBackend>;

    /// A read session extractor; see [`routing_axum::Read`].
    #[cfg(feature = "axum")]
    pub type Read<E = DbError> = routing_axum::Read<SqlxBackend, E>;
    /// A write session extractor; see [`routing_axum::Write`].
    #[cfg(feature = "axum")]
    pub type Write<E = DbError> = routing_axum::Write<SqlxBackend, E>;
    /// A request-bound transaction extractor; see [`routing_axum::Tx`].
    #[cfg(feature = "axum")]
    pub type Tx<E = DbError> = routing_axum::Tx<SqlxBackend, E>;
    /// The route's session extractor; see [`routing_axum::Db`].
    #[cfg(feature = "axum")]
    pub type Db<E = DbError> = routing_axum::Db<SqlxBackend, E>;
    /// The request's routing context; see [`routing_axum::Routing`].
    #[cfg(feature = "axum")]
    pub type Routing = routing_axum::Routing<SqlxBackend>;
    /// The layer; see [`routing_axum::RoutingLayer`].
    #[cfg(feature = "axum")]
    pub type RoutingLayer = routing_axum::RoutingLayer<SqlxBackend>;
    /// What a web service needs besides the aliases above, so one `use` brings it all.
    #[cfg(feature = "axum")]
    pub use routing_axum::{RegionHeader, TOKEN_HEADER, WebError, error_response, force_primary};
}

/// The diesel-async + bb8 backend: a [`Router`] over `AsyncPgConnection` pools.
#[cfg(feature = "diesel")]
pub mod diesel {
    pub use routing_diesel::{
        AsyncPgConnection, DbError, DieselBackend, DieselPool, PooledConn, classify, commit_lsn,
        from_pg_lsn, replay_lsn, to_pg_lsn,
    };

    /// The crates this backend is built on.
    pub use routing_diesel::{bb8, diesel, diesel_async};

    /// A router over diesel-async.
    pub type Router = routing_core::Router<DieselBackend>;

    /// A read session extractor; see [`routing_axum::Read`].
    #[cfg(feature = "axum")]
    pub type Read<E = DbError> = routing_axum::Read<DieselBackend, E>;
    /// A write session extractor; see [`routing_axum::Write`].
    #[cfg(feature = "axum")]
    pub type Write<E = DbError> = routing_axum::Write<DieselBackend, E>;
    /// A request-bound transaction extractor; see [`routing_axum::Tx`].
    #[cfg(feature = "axum")]
    pub type Tx<E = DbError> = routing_axum::Tx<DieselBackend, E>;
    /// The route's session extractor; see [`routing_axum::Db`].
    #[cfg(feature = "axum")]
    pub type Db<E = DbError> = routing_axum::Db<DieselBackend, E>;
    /// The request's routing context; see [`routing_axum::Routing`].
    #[cfg(feature = "axum")]
    pub type Routing = routing_axum::Routing<DieselBackend>;
    /// The layer; see [`routing_axum::RoutingLayer`].
    #[cfg(feature = "axum")]
    pub type RoutingLayer = routing_axum::RoutingLayer<DieselBackend>;
    /// What a web service needs besides the aliases above, so one `use` brings it all.
    #[cfg(feature = "axum")]
    pub use routing_axum::{RegionHeader, TOKEN_HEADER, WebError, error_response, force_primary};
}

/// Recent-writer marks in Redis (`routing-redis`).
#[cfg(feature = "redis")]
pub mod redis {
    pub use routing_redis::*;
}

/// The axum/tower integration, generic over the backend (`routing-axum`).
#[cfg(feature = "axum")]
pub mod axum {
    pub use routing_axum::*;
}

/// The repository README's examples, compiled (with every feature on).
#[cfg(all(doctest, feature = "sqlx", feature = "redis", feature = "axum"))]
#[doc = include_str!("../../../README.md")]
mod readme {}
