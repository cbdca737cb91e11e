//! The product tour: the users/transfers web service of the `users_sqlx` example, on a local
//! primary with two streaming replicas (and Redis for marks when `redis-server` is installed),
//! driven over HTTP by a real client through the story the library exists for. Each step prints
//! the node that served it (the `x-served-by` header) and how long it took.
//!
//! Run it with `cargo xtask demo` (which installs the PostgreSQL server binaries and
//! redis-server when missing) or `cargo run -p routing-examples --example tour`. The same
//! service runs against a real deployment with `ROUTING_*` environment variables: see
//! `cargo run -p routing-examples --example users_sqlx` and `web_service::router_from_env`.

#![allow(clippy::print_stdout)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_routing::axum::RegionHeader;
use pg_routing::sqlx::{Router, SqlxBackend};
use pg_routing::{
    Consistency, InMemoryMarks, LagBounds, RouterConfig, TokenCodec, TokenKey, WriterMarks,
};
use routing_examples::http::{Client, Reply};
use routing_examples::web_service::{self, BoxError};
use routing_testkit::{ClusterBuilder, KitError};
use serde_json::json;

/// Runs a blocking test-kit call off the runtime's threads.
async fn kit<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KitError> + Send + 'static,
) -> Result<T, BoxError> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

/// One request, printed with its outcome, node and time.
async fn call(
    client: &Client,
    what: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<serde_json::Value>,
) -> Result<Reply, BoxError> {
    let started = Instant::now();
    let reply = client.send(method, path, headers, body.as_ref()).await?;
    let took = started.elapsed();
    let detail = if reply.status >= 400 {
        format!("  {}", reply.body.trim())
    } else {
        String::new()
    };
    println!(
        "  {what:<46} {method:<4} {path:<28} -> {} by {:<4} in {:>6.1} ms{detail}",
        reply.status,
        reply.served_by(),
        took.as_secs_f64() * 1e3
    );
    Ok(reply)
}

fn new_user(name: &str) -> serde_json::Value {
    json!({ "name": name, "email": format!("{name}@example.com"), "balance": 100 })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    println!("== 1. A local primary, two streaming replicas and the users service");
    let started = Instant::now();
    let (cluster, redis) = match kit(|| ClusterBuilder::new().replicas(2).with_redis(true).start())
        .await
    {
        Ok(c) => (c, true),
        Err(e) => {
            println!("  redis-server is not available ({e}): marks stay in this process's memory");
            (
                kit(|| ClusterBuilder::new().replicas(2).start()).await?,
                false,
            )
        }
    };
    let cluster = Arc::new(cluster);
    let primary = cluster.primary();
    let replicas: Vec<usize> = (0..cluster.nodes().len())
        .filter(|&i| i != primary)
        .collect();
    let (eu, us) = (replicas[0], replicas[1]);
    let name = |i: usize| cluster.node(i).name().to_string();
    let nodes = cluster
        .node_configs()
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            let region = if i == us { "us" } else { "eu" };
            n.region(region)
        });
    let marks: Arc<dyn WriterMarks> = match cluster.redis_url() {
        Some(url) if redis => Arc::new(pg_routing::redis::RedisMarks::new(url.as_str())?),
        _ => Arc::new(InMemoryMarks::default()),
    };
    let config = RouterConfig {
        default_consistency: Consistency::ReadYourWrites,
        // A replica more than a second behind serves no read (the default is 10 s; shorter
        // here so the tour shows it without waiting).
        lag: LagBounds {
            max_time: Some(Duration::from_secs(1)),
            ..LagBounds::default()
        },
        ..RouterConfig::default()
    };
    let router: Router = pg_routing::Router::builder(SqlxBackend::new())
        .nodes(nodes)
        .config(config)
        .marks(marks)
        .tokens(
            TokenCodec::new(TokenKey::new(1, "tour-demo-key-not-a-secret-0123456789")?)
                .cluster("tour"),
        )
        .build()
        .await?;
    web_service::create_schema(&router).await?;
    let c = cluster.clone();
    kit(move || c.wait_replicated(Duration::from_secs(10))).await?;
    // Regions: `x-region` is believed only from the proxy at 127.0.0.1; other clients get `eu`.
    let regions = RegionHeader::new("x-region")
        .trust_proxy("127.0.0.1")
        .fallback("eu");
    let app = web_service::app_with(web_service::layer(router.clone()).region(regions));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(web_service::serve(listener, app, async {
        let _ = stopped.await;
    }));
    println!(
        "  primary {} (eu), replicas {} (eu) and {} (us); marks in {}; serving http://{addr} ({:.1} s)",
        name(primary),
        name(eu),
        name(us),
        if redis { "Redis" } else { "memory" },
        started.elapsed().as_secs_f64()
    );
    // The trusted proxy, and a client connecting directly from another address.
    let proxy = Client::new(addr).from_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let direct = Client::new(addr).from_ip(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));

    println!("\n== 2. Writes go to the primary, reads to a replica in the client's region");
    let alice = call(
        &proxy,
        "sign up alice",
        "POST",
        "/users",
        &[],
        Some(new_user("alice")),
    )
    .await?;
    let alice_id = alice.json()["id"].as_i64().unwrap_or(1);
    let c = cluster.clone();
    kit(move || c.wait_replicated(Duration::from_secs(10))).await?;
    for _ in 0..3 {
        call(
            &proxy,
            "list users (region eu by default)",
            "GET",
            "/users",
            &[],
            None,
        )
        .await?;
    }

    println!("\n== 3. A read right after a write is fresh while the replicas lag 500 ms");
    for &i in &replicas {
        let c = cluster.clone();
        kit(move || c.set_apply_delay(i, Duration::from_millis(500))).await?;
    }
    let bob = call(
        &proxy,
        "sign up bob (no user yet)",
        "POST",
        "/users",
        &[],
        Some(new_user("bob")),
    )
    .await?;
    let token = bob.token().unwrap_or_default().to_string();
    println!(
        "  the response carries X-Read-After: {}...",
        &token[..token.len().min(24)]
    );
    let by_email = "/users/by-email/bob@example.com";
    call(
        &proxy,
        "log in bob with the token",
        "GET",
        by_email,
        &[("x-read-after", &token)],
        None,
    )
    .await?;
    call(
        &direct,
        "another client without it (the control)",
        "GET",
        by_email,
        &[],
        None,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    call(
        &proxy,
        "with the token, once replicas caught up",
        "GET",
        by_email,
        &[("x-read-after", &token)],
        None,
    )
    .await?;
    for &i in &replicas {
        let c = cluster.clone();
        kit(move || c.clear_apply_delay(i)).await?;
    }

    println!("\n== 4. A misrouted write fails loudly");
    call(
        &proxy,
        "a handler that writes through a read session",
        "POST",
        "/bug/write-through-read",
        &[],
        None,
    )
    .await?;

    println!("\n== 5. A lagging replica is skipped");
    let c = cluster.clone();
    kit(move || c.pause_replay(eu)).await?;
    println!(
        "  replay paused on {} (eu); writes continue for 1.5 s",
        name(eu)
    );
    for n in 0..6 {
        let user = new_user(&format!("carol{n}"));
        call(&proxy, "sign up", "POST", "/users", &[], Some(user)).await?;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    router.reprobe();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        call(
            &proxy,
            "list users (eu replica lagging)",
            "GET",
            "/users",
            &[],
            None,
        )
        .await?;
    }
    let c = cluster.clone();
    kit(move || c.resume_replay(eu)).await?;
    println!("  replay resumed on {}", name(eu));

    println!("\n== 6. A region header picks the local replica; a spoofed one is ignored");
    let c = cluster.clone();
    kit(move || c.wait_replicated(Duration::from_secs(10))).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    call(
        &proxy,
        "x-region: us, from the trusted proxy",
        "GET",
        "/users",
        &[("x-region", "us")],
        None,
    )
    .await?;
    call(
        &direct,
        "x-region: us, sent by a client itself",
        "GET",
        "/users",
        &[("x-region", "us")],
        None,
    )
    .await?;

    println!("\n== 7. The primary fails; writes come back on the promoted replica");
    let c = cluster.clone();
    let killed = Instant::now();
    kit(move || c.kill(primary)).await?;
    println!("  killed the primary {}", name(primary));
    let c = cluster.clone();
    kit(move || c.promote(eu)).await?;
    let promoted = Instant::now();
    println!(
        "  promoted {} ({:.0} ms after the kill); repointing {}",
        name(eu),
        promoted.duration_since(killed).as_secs_f64() * 1e3,
        name(us)
    );
    let c = cluster.clone();
    kit(move || c.follow(us, eu)).await?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let user = new_user(&format!("dave{attempt}"));
        let reply = call(
            &proxy,
            "sign up after the failover",
            "POST",
            "/users",
            &[],
            Some(user),
        )
        .await?;
        if reply.status == 201 {
            println!(
                "  writes are back on {}: {:.0} ms after the promotion, {:.0} ms after the kill",
                reply.served_by(),
                promoted.elapsed().as_secs_f64() * 1e3,
                killed.elapsed().as_secs_f64() * 1e3
            );
            break;
        }
        if attempt > 20 {
            return Err("writes did not come back after the failover".into());
        }
    }
    call(
        &proxy,
        "alice, read after the failover",
        "GET",
        &format!("/users/{alice_id}"),
        &[],
        None,
    )
    .await?;

    println!(
        "\n== Done: stopping the service; dropping the cluster removes every process and directory."
    );
    let _ = stop.send(());
    server.await??;
    router.shutdown();
    drop(router);
    kit(move || {
        drop(cluster);
        Ok(())
    })
    .await?;
    Ok(())
}
