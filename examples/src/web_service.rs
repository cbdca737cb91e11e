//! The users/transfers web service of the `users_sqlx` example, as a library so the tour, the
//! other examples and the tests run the very same app.
//!
//! What an application copies from here:
//! - [`app`]: the axum app — one [`RoutingLayer`], the [`Read`] and [`Tx`] extractors, a
//!   force-primary route, and the application's own error type ([`AppError`]) that `?`
//!   converts into from both the router's errors and sqlx's;
//! - [`router_from_env`]: a router configured from `ROUTING_*` environment variables (or, when
//!   none is set, a local test-kit cluster).
//!
//! Every response names the node that served it in the `x-served-by` header.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use pg_routing::axum::force_primary;
use pg_routing::sqlx::{DbError, Read, Router, RoutingLayer, Tx, sqlx};
use pg_routing::{
    Backend, Consistency, InMemoryMarks, NodeConfig, RouterConfig, TokenCodec, TokenKey,
    WriteReceipt, WriterMarks,
};
use routing_testkit::{Cluster, ClusterBuilder};
use serde::{Deserialize, Serialize};

/// A boxed error for `main`s and setup code.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response header naming the node that served the request.
pub const SERVED_BY: &str = "x-served-by";

/// The request header this demo takes the user from. A real service takes it from its own
/// authentication (a session, a verified JWT) in [`RoutingLayer::user_from`].
pub const USER_HEADER: &str = "x-user-id";

/// The cookie that carries the causal token for browsers.
pub const TOKEN_COOKIE: &str = "read_after";

/// The schema, created at start; idempotent.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS users (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL CONSTRAINT users_email_key UNIQUE,
    balance bigint NOT NULL DEFAULT 0 CHECK (balance >= 0)
)";

/// A user and the balance of their account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub email: String,
    pub balance: i64,
}

/// The body of `POST /users`.
#[derive(Debug, Deserialize)]
pub struct NewUser {
    pub name: String,
    pub email: String,
    #[serde(default)]
    pub balance: i64,
}

/// The body of `POST /transfers`.
#[derive(Debug, Deserialize)]
pub struct Transfer {
    pub from: i64,
    pub to: i64,
    pub amount: i64,
}

/// The application's own error type. `?` converts into it from the router's errors (through
/// the extractors) and from sqlx's (through [`DbError`]), and it keeps the application's own
/// mapping of its unique constraint to 422.
#[derive(Debug)]
pub enum AppError {
    /// A routing or database failure, answered by the library's mapping (503, 400, 500, ...).
    Db(DbError),
    /// No such user.
    NotFound,
    /// The e-mail is already registered (the `users_email_key` constraint).
    EmailTaken,
    /// The request cannot be honoured as sent.
    Invalid(&'static str),
}

impl From<DbError> for AppError {
    fn from(e: DbError) -> Self {
        match e.constraint() {
            Some("users_email_key") => AppError::EmailTaken,
            _ => AppError::Db(e),
        }
    }
}

impl From<pg_routing::Error> for AppError {
    fn from(e: pg_routing::Error) -> Self {
        DbError::from(e).into()
    }
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        DbError::from(e).into()
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            AppError::Db(e) => return e.into_response(),
            AppError::NotFound => (StatusCode::NOT_FOUND, "no such user"),
            AppError::EmailTaken => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "this e-mail is already registered",
            ),
            AppError::Invalid(why) => (StatusCode::UNPROCESSABLE_ENTITY, why),
        };
        (status, Json(serde_json::json!({ "error": message }))).into_response()
    }
}

/// The `x-served-by` header, as a response part.
fn served_by(node: &str) -> [(&'static str, String); 1] {
    [(SERVED_BY, node.to_string())]
}

type Row = (i64, String, String, i64);

fn user((id, name, email, balance): Row) -> User {
    User {
        id,
        name,
        email,
        balance,
    }
}

/// `POST /users`: a sign-up. The new user's id exists only after the INSERT, so the handler
/// names it for a mark; the response carries `X-Read-After` (and the cookie) for the client.
async fn create_user(
    mut tx: Tx<AppError>,
    Json(new): Json<NewUser>,
) -> Result<impl IntoResponse, AppError> {
    let conn = tx.conn().await?; // the router's error
    let (id,): (i64,) =
        sqlx::query_as("INSERT INTO users (name, email, balance) VALUES ($1, $2, $3) RETURNING id")
            .bind(&new.name)
            .bind(&new.email)
            .bind(new.balance)
            .fetch_one(&mut *conn)
            .await?; // sqlx's error: a taken e-mail becomes 422, and the transaction rolls back
    tx.mark_user(id.to_string());
    let node = tx.session().await?.node_name().to_string();
    let created = user((id, new.name, new.email, new.balance));
    Ok((StatusCode::CREATED, served_by(&node), Json(created)))
}

/// `GET /users`: the first hundred users, from a replica.
async fn list_users(mut db: Read<AppError>) -> Result<impl IntoResponse, AppError> {
    let rows: Vec<Row> =
        sqlx::query_as("SELECT id, name, email, balance FROM users ORDER BY id LIMIT 100")
            .fetch_all(db.conn().await?)
            .await?;
    let node = db.node_name().unwrap_or_default().to_string();
    Ok((
        served_by(&node),
        Json(rows.into_iter().map(user).collect::<Vec<_>>()),
    ))
}

/// `GET /users/{id}`.
async fn get_user(
    Path(id): Path<i64>,
    mut db: Read<AppError>,
) -> Result<impl IntoResponse, AppError> {
    let row: Option<Row> =
        sqlx::query_as("SELECT id, name, email, balance FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(db.conn().await?)
            .await?;
    let node = db.node_name().unwrap_or_default().to_string();
    // A miss names its node too: a 404 from a lagging replica is worth knowing about.
    let found = row.map(|r| Json(user(r))).ok_or(AppError::NotFound);
    Ok((served_by(&node), found))
}

/// `GET /users/by-email/{email}`: the log-in lookup. There is no user yet, so only the
/// client's causal token (header or cookie) protects a read right after the sign-up.
async fn user_by_email(
    Path(email): Path<String>,
    mut db: Read<AppError>,
) -> Result<impl IntoResponse, AppError> {
    let row: Option<Row> =
        sqlx::query_as("SELECT id, name, email, balance FROM users WHERE email = $1")
            .bind(&email)
            .fetch_optional(db.conn().await?)
            .await?;
    let node = db.node_name().unwrap_or_default().to_string();
    // A miss names its node too: a 404 from a lagging replica is worth knowing about.
    let found = row.map(|r| Json(user(r))).ok_or(AppError::NotFound);
    Ok((served_by(&node), found))
}

/// `POST /transfers` (a force-primary route): reads both balances and updates them in one
/// transaction on the primary, committed when the response is a success.
async fn transfer(
    mut tx: Tx<AppError>,
    Json(t): Json<Transfer>,
) -> Result<impl IntoResponse, AppError> {
    if t.amount <= 0 || t.from == t.to {
        return Err(AppError::Invalid(
            "a transfer moves a positive amount between two accounts",
        ));
    }
    let conn = tx.conn().await?;
    let rows: Vec<(i64, i64)> =
        sqlx::query_as("SELECT id, balance FROM users WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(vec![t.from, t.to])
            .fetch_all(&mut *conn)
            .await?;
    let balance = |id| rows.iter().find(|r| r.0 == id).map(|r| r.1);
    let (Some(from), Some(to)) = (balance(t.from), balance(t.to)) else {
        return Err(AppError::NotFound);
    };
    if from < t.amount {
        return Err(AppError::Invalid("insufficient funds"));
    }
    for (id, delta) in [(t.from, -t.amount), (t.to, t.amount)] {
        sqlx::query("UPDATE users SET balance = balance + $2 WHERE id = $1")
            .bind(id)
            .bind(delta)
            .execute(&mut *conn)
            .await?;
    }
    let node = tx.session().await?.node_name().to_string();
    let balances = serde_json::json!({ "from": from - t.amount, "to": to + t.amount });
    Ok((served_by(&node), Json(balances)))
}

/// `POST /bug/write-through-read`: a deliberate bug, kept for the tour: a handler that writes
/// through a read session. The session refuses it and the library answers 500 (a misrouted
/// write is a bug in the handler, never retried elsewhere).
async fn write_through_read(mut db: Read<AppError>) -> Result<impl IntoResponse, AppError> {
    let done = sqlx::query("UPDATE users SET balance = balance + 1")
        .execute(db.conn().await?)
        .await;
    let node = db.node_name().unwrap_or_default().to_string();
    done?;
    Ok((served_by(&node), "written"))
}

/// The layer this service uses: the user from [`USER_HEADER`], the causal token in
/// `X-Read-After` and, for browsers, in the [`TOKEN_COOKIE`] cookie.
pub fn layer(router: Router) -> RoutingLayer {
    RoutingLayer::new(router)
        .user_from(|parts| {
            parts
                .headers
                .get(USER_HEADER)?
                .to_str()
                .ok()
                .map(Into::into)
        })
        .token_cookie(TOKEN_COOKIE)
}

/// The users/transfers app with [`layer`].
pub fn app(router: Router) -> axum::Router {
    app_with(layer(router))
}

/// The users/transfers app with a layer of the caller's (a region resolver, say).
pub fn app_with(layer: RoutingLayer) -> axum::Router {
    axum::Router::new()
        .route("/users", post(create_user).get(list_users))
        .route("/users/{id}", get(get_user))
        .route("/users/by-email/{email}", get(user_by_email))
        .route("/transfers", post(transfer).layer(force_primary()))
        .route("/bug/write-through-read", post(write_through_read))
        .layer(layer)
}

/// Creates the schema (idempotent) on the primary.
pub async fn create_schema(router: &Router) -> Result<WriteReceipt, DbError> {
    let mut w = router.write().await?;
    sqlx::query(SCHEMA).execute(&mut *w).await?;
    Ok(w.finish().await?)
}

/// Serves `app` on `listener` until `shutdown` resolves, with the peer's address available to
/// the region resolver (`ConnectInfo`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// A router and where to serve it, from [`router_from_env`].
pub struct Setup<B: Backend> {
    pub router: pg_routing::Router<B>,
    /// `ROUTING_LISTEN`, default `127.0.0.1:3000`.
    pub listen: SocketAddr,
    /// The local cluster when no `ROUTING_WRITER_URL` is set; stopped when dropped.
    pub cluster: Option<Arc<Cluster>>,
}

impl<B: Backend> std::fmt::Debug for Setup<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setup")
            .field("router", &self.router)
            .field("listen", &self.listen)
            .field("local_cluster", &self.cluster.is_some())
            .finish()
    }
}

/// The token key of local clusters. Never use it elsewhere.
const LOCAL_TOKEN_KEY: &str = "local-demo-key-not-a-secret-0123456789";

/// A router from the `ROUTING_*` environment variables:
///
/// | variable | meaning |
/// |---|---|
/// | `ROUTING_WRITER_URL` | the primary's connection URL; unset: a local test-kit cluster |
/// | `ROUTING_REPLICA_URLS` | replicas' URLs, comma-separated (named `replica1`, `replica2`, ...) |
/// | `ROUTING_TOKEN_KEY` | the causal tokens' signing key, at least 16 bytes, 32 random ones advised (required with a writer URL) |
/// | `ROUTING_CLUSTER` | the cluster name tokens are bound to (default `pg-routing`) |
/// | `ROUTING_REDIS_URL` | Redis for marks shared by every process; unset: marks in memory |
/// | `ROUTING_LISTEN` | the address to serve on (default `127.0.0.1:3000`) |
///
/// With no `ROUTING_WRITER_URL`, it starts a local primary and two streaming replicas with the
/// test kit (the PostgreSQL binaries must be installed) and keeps marks in memory, saying so.
pub async fn router_from_env<B: Backend>(backend: B) -> Result<Setup<B>, BoxError> {
    let var = |name| {
        std::env::var(name)
            .ok()
            .filter(|v: &String| !v.trim().is_empty())
    };
    let listen = var("ROUTING_LISTEN")
        .unwrap_or_else(|| "127.0.0.1:3000".into())
        .parse()?;
    let Some(writer) = var("ROUTING_WRITER_URL") else {
        println!("ROUTING_WRITER_URL is not set: starting a local primary and two replicas");
        println!("(routing-testkit); marks in memory, tokens signed with a local demo key");
        let cluster =
            tokio::task::spawn_blocking(|| ClusterBuilder::new().replicas(2).start()).await??;
        let router = kit_router(backend, cluster.node_configs()).await?;
        return Ok(Setup {
            router,
            listen,
            cluster: Some(Arc::new(cluster)),
        });
    };
    let mut nodes = vec![NodeConfig::writer("primary", writer)];
    for (i, url) in var("ROUTING_REPLICA_URLS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .enumerate()
    {
        nodes.push(NodeConfig::replica(format!("replica{}", i + 1), url));
    }
    let key =
        var("ROUTING_TOKEN_KEY").ok_or("ROUTING_TOKEN_KEY is required with ROUTING_WRITER_URL")?;
    let key = TokenKey::new(1, key).map_err(|e| format!("ROUTING_TOKEN_KEY: {e}"))?;
    let codec =
        TokenCodec::new(key).cluster(var("ROUTING_CLUSTER").unwrap_or_else(|| "pg-routing".into()));
    let marks: Arc<dyn WriterMarks> = match var("ROUTING_REDIS_URL") {
        Some(url) => Arc::new(pg_routing::redis::RedisMarks::new(url.as_str())?),
        None => {
            println!("ROUTING_REDIS_URL is not set: marks in memory (this process only)");
            Arc::new(InMemoryMarks::default())
        }
    };
    let router = pg_routing::Router::builder(backend)
        .nodes(nodes)
        .config(service_config())
        .tokens(codec)
        .marks(marks)
        .build()
        .await?;
    Ok(Setup {
        router,
        listen,
        cluster: None,
    })
}

/// A router over a local test-kit cluster's nodes (its `node_configs()`, perhaps tagged with
/// regions), marks in memory, tokens signed with a local demo key.
pub async fn kit_router<B: Backend>(
    backend: B,
    nodes: Vec<NodeConfig>,
) -> Result<pg_routing::Router<B>, BoxError> {
    let codec = TokenCodec::new(TokenKey::new(1, LOCAL_TOKEN_KEY)?).cluster("local");
    Ok(pg_routing::Router::builder(backend)
        .nodes(nodes)
        .config(service_config())
        .tokens(codec)
        .marks(Arc::new(InMemoryMarks::default()))
        .build()
        .await?)
}

/// Read-your-writes by default: a read honours the user's mark and the client's token, and
/// is eventual (any fresh-enough replica) without either.
fn service_config() -> RouterConfig {
    RouterConfig {
        default_consistency: Consistency::ReadYourWrites,
        ..RouterConfig::default()
    }
}
