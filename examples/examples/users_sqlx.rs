//! A users/transfers web service on sqlx, through the `pg-routing` facade: sign-ups in a
//! request-bound transaction that marks the new user, reads on replicas, a log-in lookup by
//! e-mail protected by the client's causal token, a transfer that stays on the primary, and a
//! taken e-mail answered 422 from the driver's constraint. Every response names the node that
//! served it in `x-served-by`. The app itself is `routing_examples::web_service::app`.
//!
//! Run it (with no `ROUTING_*` variable it starts a local primary and two replicas with the test
//! kit, the PostgreSQL server binaries must be installed, and keeps marks in memory):
//!
//! ```text
//! cargo run -p routing-examples --example users_sqlx
//! curl -si -X POST localhost:3000/users -H 'content-type: application/json' \
//!      -d '{"name":"Ada","email":"ada@example.com","balance":100}'   # 201, X-Read-After: <token>
//! curl -si localhost:3000/users/by-email/ada@example.com -H 'x-read-after: <token>'
//! curl -si localhost:3000/users                                      # x-served-by: a replica
//! curl -si -X POST localhost:3000/transfers -H 'content-type: application/json' \
//!      -d '{"from":1,"to":2,"amount":10}'                            # x-served-by: the primary
//! ```
//!
//! Against a real deployment, set:
//!
//! | variable | meaning |
//! |---|---|
//! | `ROUTING_WRITER_URL` | the primary's connection URL (`postgres://app:...@db1/app`) |
//! | `ROUTING_REPLICA_URLS` | replicas' URLs, comma-separated |
//! | `ROUTING_TOKEN_KEY` | the causal tokens' signing key, 16 bytes or more, 32 random ones advised (required) |
//! | `ROUTING_CLUSTER` | the cluster name tokens are bound to (default `pg-routing`) |
//! | `ROUTING_REDIS_URL` | Redis for marks shared by every process (optional; else in memory) |
//! | `ROUTING_LISTEN` | the address to serve on (default `127.0.0.1:3000`) |
//!
//! Stop it with Ctrl-C.

#![allow(clippy::print_stdout)]

use pg_routing::sqlx::SqlxBackend;
use routing_examples::web_service::{self, BoxError};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let setup = web_service::router_from_env(SqlxBackend::new()).await?;
    web_service::create_schema(&setup.router).await?;
    let listener = tokio::net::TcpListener::bind(setup.listen).await?;
    println!("users_sqlx listening on http://{}", listener.local_addr()?);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    web_service::serve(listener, web_service::app(setup.router), shutdown).await?;
    println!("stopped");
    Ok(())
}
