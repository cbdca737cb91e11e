//! A ready-made status endpoint: the router's [`RouterStatus`] as JSON.

use axum::Json;
use routing_core::{Backend, RouterStatus};

use crate::Routing;

/// `GET` handler answering the router's status (nodes, roles, generation, lag, bans, marks
/// store health, pool occupancy) as JSON. Mount it inside the [`crate::RoutingLayer`], ideally
/// behind the application's own access control:
/// `.route("/internal/routing", get(routing_axum::status::<SqlxBackend>))`. It never touches a
/// database: the status is the monitor's latest snapshot. Passwords never appear in it.
pub async fn status<B: Backend>(routing: Routing<B>) -> Json<RouterStatus> {
    Json(routing.router().status())
}
