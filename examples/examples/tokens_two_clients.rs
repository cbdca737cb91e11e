//! Causal tokens passed between two clients: client A signs a user up and gets the commit's
//! token in `X-Read-After`; it hands the token to client B (another device, another service),
//! whose read with it sees the new user even while the replicas lag. Client C makes the same
//! read without a token and gets the stale answer from a lagging replica.
//!
//! Run it (starts a local primary and two replicas with the test kit, which needs the
//! PostgreSQL server binaries; runs to completion and prints what served each request):
//!
//! ```text
//! cargo run -p routing-examples --example tokens_two_clients
//! ```
//!
//! The service is the `users_sqlx` example's (`routing_examples::web_service::app`), served on
//! 127.0.0.1 on a free port; the clients speak HTTP/1.1 to it. Lag is injected with the test
//! kit's `set_apply_delay` (PostgreSQL's `recovery_min_apply_delay`).

#![allow(clippy::print_stdout)]

use std::time::Duration;

use pg_routing::axum::TOKEN_HEADER;
use pg_routing::sqlx::SqlxBackend;
use routing_examples::http::{Client, Reply};
use routing_examples::web_service::{self, BoxError};
use routing_testkit::ClusterBuilder;
use serde_json::json;

const LAG: Duration = Duration::from_secs(2);

fn show(who: &str, what: &str, res: &Reply) {
    println!(
        "  {who:<9} {what:<38} -> {} served by {:<4} {}",
        res.status,
        res.served_by(),
        res.body
    );
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    println!("== A local primary and two replicas (routing-testkit)");
    let cluster =
        tokio::task::spawn_blocking(|| ClusterBuilder::new().replicas(2).start()).await??;
    let router = web_service::kit_router(SqlxBackend::new(), cluster.node_configs()).await?;
    web_service::create_schema(&router).await?;
    cluster.wait_replicated(Duration::from_secs(10))?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(web_service::serve(
        listener,
        web_service::app(router),
        async {
            let _ = stopped.await;
        },
    ));
    println!("  serving the users app on http://{addr}");

    let replicas: Vec<usize> = (0..cluster.nodes().len())
        .filter(|&i| i != cluster.primary())
        .collect();
    println!("== The replicas now apply each commit {LAG:?} late");
    for &i in &replicas {
        cluster.set_apply_delay(i, LAG)?;
    }

    let (a, b, c) = (Client::new(addr), Client::new(addr), Client::new(addr));
    println!("== Client A signs up; client B logs in with A's token, client C without one");
    let sign_up = json!({ "name": "Grace", "email": "grace@example.com", "balance": 10 });
    let res = a.send("POST", "/users", &[], Some(&sign_up)).await?;
    show("client A", "POST /users", &res);
    let token = res
        .token()
        .ok_or("the sign-up carried no X-Read-After")?
        .to_string();
    println!("  client A got X-Read-After: {token}");

    let login = "/users/by-email/grace@example.com";
    let with_token = b
        .send("GET", login, &[(TOKEN_HEADER, &token)], None)
        .await?;
    show("client B", "GET ... with X-Read-After", &with_token);
    let without = c.send("GET", login, &[], None).await?;
    show("client C", "GET ... without a token", &without);

    println!("== {LAG:?} later the replicas have caught up, token or not");
    tokio::time::sleep(LAG + Duration::from_millis(500)).await;
    let later = c.send("GET", login, &[], None).await?;
    show("client C", "GET ... without a token", &later);

    println!(
        "== With the token: {} (fresh); without it, while lagging: {}",
        with_token.status, without.status
    );
    for &i in &replicas {
        cluster.clear_apply_delay(i)?;
    }
    let _ = stop.send(());
    server.await??;
    Ok(())
}
