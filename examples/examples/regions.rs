//! Region-aware routing: replicas in two regions, `eu` and `us`. An edge proxy (here the
//! trusted address 127.0.0.1) names the client's region in the `x-region` header and the read
//! goes to that region's replica; the same header sent by a client that connects directly (from
//! 127.0.0.2, which is not trusted) is ignored and the service's own region, `eu`, is used.
//!
//! Run it (starts a local primary and two replicas with the test kit, which needs the
//! PostgreSQL server binaries; runs to completion and prints what served each request):
//!
//! ```text
//! cargo run -p routing-examples --example regions
//! ```
//!
//! How the trust works: the server is started with
//! `into_make_service_with_connect_info::<SocketAddr>()` (see `web_service::serve`), so every
//! request carries axum's `ConnectInfo`, the TCP peer's address. `RegionHeader` believes the
//! header only when that peer is one of its `trust_proxy` networks. A client can write any
//! header it likes but cannot choose the address its TCP connection comes from; here the
//! untrusted client binds its socket to 127.0.0.2 (all of 127.0.0.0/8 is loopback on Linux) to
//! play a client on another host. Behind a real proxy, trust the proxy's addresses only.

#![allow(clippy::print_stdout)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use pg_routing::axum::RegionHeader;
use pg_routing::sqlx::SqlxBackend;
use routing_examples::http::Client;
use routing_examples::web_service::{self, BoxError};
use routing_testkit::ClusterBuilder;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    println!("== A local primary and two replicas (routing-testkit), in two regions");
    let cluster =
        tokio::task::spawn_blocking(|| ClusterBuilder::new().replicas(2).start()).await??;
    let primary = cluster.primary();
    let mut replicas = (0..cluster.nodes().len()).filter(|&i| i != primary);
    let (eu, us) = (
        replicas.next().ok_or("no replica")?,
        replicas.next().ok_or("one replica")?,
    );
    let nodes = cluster
        .node_configs()
        .into_iter()
        .enumerate()
        .map(|(i, node)| {
            let region = if i == us { "us" } else { "eu" };
            println!(
                "  {:<4} region {region}{}",
                node.name,
                if i == primary { " (primary)" } else { "" }
            );
            node.region(region)
        });
    let router = web_service::kit_router(SqlxBackend::new(), nodes.collect()).await?;
    web_service::create_schema(&router).await?;
    cluster.wait_replicated(Duration::from_secs(10))?;

    // The region from `x-region`, believed only from the proxy at 127.0.0.1; else `eu`.
    let regions = RegionHeader::new("x-region")
        .trust_proxy("127.0.0.1")
        .fallback("eu");
    let app = web_service::app_with(web_service::layer(router).region(regions));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(web_service::serve(listener, app, async {
        let _ = stopped.await;
    }));
    println!("  serving the users app on http://{addr}");

    let proxy = Client::new(addr).from_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let direct = Client::new(addr).from_ip(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    println!(
        "== GET /users; the eu replica is {}, the us replica {}",
        cluster.node(eu).name(),
        cluster.node(us).name()
    );
    for (who, client, region) in [
        ("proxy 127.0.0.1", &proxy, Some("us")),
        ("proxy 127.0.0.1", &proxy, Some("eu")),
        ("proxy 127.0.0.1", &proxy, None),
        ("client 127.0.0.2 (spoofed)", &direct, Some("us")),
    ] {
        for _ in 0..2 {
            let headers: Vec<(&str, &str)> = region.map(|r| ("x-region", r)).into_iter().collect();
            let res = client.send("GET", "/users", &headers, None).await?;
            println!(
                "  from {who:<27} x-region: {:<3} -> {} served by {}",
                region.unwrap_or("-"),
                res.status,
                res.served_by()
            );
        }
    }
    let _ = stop.send(());
    server.await??;
    Ok(())
}
