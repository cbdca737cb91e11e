//! The users/transfers service of the `users_sqlx` example, from the library, on a real
//! listener over a local cluster: a sign-up answered 201 by the primary with a causal token,
//! the log-in lookup with that token, a taken e-mail answered 422, a transfer on the primary,
//! and a read without a token on a replica.

use std::net::SocketAddr;
use std::time::Duration;

use pg_routing::axum::TOKEN_HEADER;
use pg_routing::sqlx::SqlxBackend;
use routing_examples::http::Client;
use routing_examples::web_service::{app, create_schema, kit_router, serve};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_service_routes_and_protects_reads() {
    let cluster = routing_testkit::shared();
    let primary = cluster.node(cluster.primary()).name().to_string();
    let router = kit_router(SqlxBackend::new(), cluster.node_configs())
        .await
        .expect("router");
    create_schema(&router).await.expect("schema");
    cluster
        .wait_replicated(Duration::from_secs(10))
        .expect("schema replicated");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, app(router), async {
        let _ = stopped.await;
    }));
    let client = Client::new(addr);

    // Unique per run: the shared cluster outlives one test run's tables.
    let email = format!("ada-{}@example.com", std::process::id());
    let sign_up = json!({ "name": "Ada", "email": email, "balance": 100 });
    let res = client
        .send("POST", "/users", &[], Some(&sign_up))
        .await
        .expect("sign-up");
    assert_eq!(res.status, 201, "{}", res.body);
    assert_eq!(res.served_by(), primary, "a write is served by the primary");
    let token = res
        .token()
        .expect("a committing response carries X-Read-After");
    let ada = res.json()["id"].as_i64().expect("id");

    let login = format!("/users/by-email/{email}");
    let res = client
        .send("GET", &login, &[(TOKEN_HEADER, token)], None)
        .await
        .expect("log-in");
    assert_eq!(
        res.status, 200,
        "the log-in right after the sign-up: {}",
        res.body
    );
    assert_eq!(res.json()["id"], ada);

    let res = client
        .send("POST", "/users", &[], Some(&sign_up))
        .await
        .expect("duplicate");
    assert_eq!(res.status, 422, "a taken e-mail: {}", res.body);
    assert!(
        res.token().is_none(),
        "a rolled-back sign-up issues no token"
    );

    let bob = json!({ "name": "Bob", "email": format!("bob-{}@example.com", std::process::id()) });
    let res = client
        .send("POST", "/users", &[], Some(&bob))
        .await
        .expect("second sign-up");
    assert_eq!(res.status, 201, "{}", res.body);
    let bob = res.json()["id"].as_i64().expect("id");
    let res = client
        .send(
            "POST",
            "/transfers",
            &[],
            Some(&json!({ "from": ada, "to": bob, "amount": 30 })),
        )
        .await
        .expect("transfer");
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(
        res.served_by(),
        primary,
        "the transfer stays on the primary"
    );
    assert_eq!(res.json(), json!({ "from": 70, "to": 30 }));

    let res = client.send("GET", "/users", &[], None).await.expect("list");
    assert_eq!(res.status, 200, "{}", res.body);
    assert_ne!(
        res.served_by(),
        primary,
        "a read without a token: a replica"
    );
    assert!(res.served_by().starts_with("pg"), "{:?}", res.headers);

    let _ = stop.send(());
    server.await.expect("server task").expect("server");
}
