//! The `users_sqlx` service on diesel-async, through the `pg-routing` facade: the same routes
//! (`POST /users`, `GET /users`, `GET /users/{id}`, `GET /users/by-email/{email}`,
//! `POST /transfers` on the primary), the same `x-served-by` header, written with diesel's
//! query builder and diesel-async's `RunQueryDsl`. A taken e-mail is a 422, mapped from the
//! driver's constraint name through `DbError::constraint()`.
//!
//! Run it (with no `ROUTING_*` variable it starts a local primary and two replicas with the test
//! kit, the PostgreSQL server binaries must be installed, and keeps marks in memory):
//!
//! ```text
//! cargo run -p routing-examples --example users_diesel
//! curl -si -X POST localhost:3000/users -H 'content-type: application/json' \
//!      -d '{"name":"Ada","email":"ada@example.com","balance":100}'   # 201, X-Read-After: <token>
//! curl -si localhost:3000/users/by-email/ada@example.com -H 'x-read-after: <token>'
//! curl -si localhost:3000/users                                      # x-served-by: a replica
//! ```
//!
//! The `ROUTING_*` variables (`ROUTING_WRITER_URL`, `ROUTING_REPLICA_URLS` comma-separated,
//! `ROUTING_TOKEN_KEY`, `ROUTING_CLUSTER`, `ROUTING_REDIS_URL`, `ROUTING_LISTEN`) are those of
//! `users_sqlx`; see its header. Stop it with Ctrl-C.

#![allow(clippy::print_stdout)]

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use pg_routing::axum::force_primary;
use pg_routing::diesel::{DbError, DieselBackend, Read, Router, RoutingLayer, Tx};
use routing_examples::web_service::{self, BoxError, SERVED_BY, TOKEN_COOKIE, USER_HEADER};
use serde::{Deserialize, Serialize};

diesel::table! {
    users (id) {
        id -> Int8,
        name -> Text,
        email -> Text,
        balance -> Int8,
    }
}

#[derive(Debug, Queryable, Selectable, Serialize)]
#[diesel(table_name = users, check_for_backend(diesel::pg::Pg))]
struct User {
    id: i64,
    name: String,
    email: String,
    balance: i64,
}

#[derive(Debug, Insertable, Deserialize)]
#[diesel(table_name = users)]
struct NewUser {
    name: String,
    email: String,
    #[serde(default)]
    balance: i64,
}

#[derive(Debug, Deserialize)]
struct Transfer {
    from: i64,
    to: i64,
    amount: i64,
}

/// The application's error type: `?` converts into it from the router's errors and diesel's.
#[derive(Debug)]
enum AppError {
    Db(DbError),
    NotFound,
    EmailTaken,
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

impl From<diesel::result::Error> for AppError {
    fn from(e: diesel::result::Error) -> Self {
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

fn served_by(node: &str) -> [(&'static str, String); 1] {
    [(SERVED_BY, node.to_string())]
}

/// `POST /users`: a sign-up, marking the new user once the transaction commits.
async fn create_user(
    mut tx: Tx<AppError>,
    Json(new): Json<NewUser>,
) -> Result<impl IntoResponse, AppError> {
    let created = diesel::insert_into(users::table)
        .values(&new)
        .returning(User::as_returning())
        .get_result(tx.conn().await?)
        .await?;
    tx.mark_user(created.id.to_string());
    let node = tx.session().await?.node_name().to_string();
    Ok((StatusCode::CREATED, served_by(&node), Json(created)))
}

/// `GET /users`.
async fn list_users(mut db: Read<AppError>) -> Result<impl IntoResponse, AppError> {
    let all: Vec<User> = users::table
        .order(users::id)
        .limit(100)
        .select(User::as_select())
        .load(db.conn().await?)
        .await?;
    let node = db.node_name().unwrap_or_default().to_string();
    Ok((served_by(&node), Json(all)))
}

/// `GET /users/{id}`.
async fn get_user(
    Path(id): Path<i64>,
    mut db: Read<AppError>,
) -> Result<impl IntoResponse, AppError> {
    let found = users::table
        .find(id)
        .select(User::as_select())
        .first(db.conn().await?)
        .await
        .optional()?;
    let node = db.node_name().unwrap_or_default().to_string();
    Ok((served_by(&node), found.map(Json).ok_or(AppError::NotFound)))
}

/// `GET /users/by-email/{email}`: the log-in lookup, protected by the client's token.
async fn user_by_email(
    Path(email): Path<String>,
    mut db: Read<AppError>,
) -> Result<impl IntoResponse, AppError> {
    let found = users::table
        .filter(users::email.eq(&email))
        .select(User::as_select())
        .first(db.conn().await?)
        .await
        .optional()?;
    let node = db.node_name().unwrap_or_default().to_string();
    Ok((served_by(&node), found.map(Json).ok_or(AppError::NotFound)))
}

/// `POST /transfers` (force-primary): both balances read and updated in one transaction.
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
    let rows: Vec<(i64, i64)> = users::table
        .filter(users::id.eq_any([t.from, t.to]))
        .select((users::id, users::balance))
        .order(users::id)
        .for_update()
        .load(&mut *conn)
        .await?;
    let balance = |id| rows.iter().find(|r| r.0 == id).map(|r| r.1);
    let (Some(from), Some(to)) = (balance(t.from), balance(t.to)) else {
        return Err(AppError::NotFound);
    };
    if from < t.amount {
        return Err(AppError::Invalid("insufficient funds"));
    }
    for (id, delta) in [(t.from, -t.amount), (t.to, t.amount)] {
        diesel::update(users::table.find(id))
            .set(users::balance.eq(users::balance + delta))
            .execute(&mut *conn)
            .await?;
    }
    let node = tx.session().await?.node_name().to_string();
    let balances = serde_json::json!({ "from": from - t.amount, "to": to + t.amount });
    Ok((served_by(&node), Json(balances)))
}

fn app(router: Router) -> axum::Router {
    axum::Router::new()
        .route("/users", post(create_user).get(list_users))
        .route("/users/{id}", get(get_user))
        .route("/users/by-email/{email}", get(user_by_email))
        .route("/transfers", post(transfer).layer(force_primary()))
        .layer(
            RoutingLayer::new(router)
                .user_from(|parts| {
                    parts
                        .headers
                        .get(USER_HEADER)?
                        .to_str()
                        .ok()
                        .map(Into::into)
                })
                .token_cookie(TOKEN_COOKIE),
        )
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let setup = web_service::router_from_env(DieselBackend::new()).await?;
    let mut w = setup.router.write().await?;
    diesel::sql_query(web_service::SCHEMA)
        .execute(&mut *w)
        .await?;
    w.finish().await?;
    let listener = tokio::net::TcpListener::bind(setup.listen).await?;
    println!(
        "users_diesel listening on http://{}",
        listener.local_addr()?
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    web_service::serve(listener, app(setup.router), shutdown).await?;
    println!("stopped");
    Ok(())
}
