//! Cost of one routing decision with 8 replicas, against a baseline measured in the same run:
//! the bare fake checkout that every routed read also pays. Report the difference, not the
//! absolute time (machines are shared and noisy).
//!
//! Run: `cargo bench -p routing-core --bench routing`

// `criterion_group!` defines an undocumented public function.
#![allow(missing_docs)]

#[path = "../tests/fake/mod.rs"]
mod fake;

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use fake::{FakeBackend, World};
use routing_core::{
    Backend, CausalToken, Consistency, InMemoryMarks, Lsn, PoolSettings, RequestContext, Router,
    RouterConfig, TokenCodec, TokenKey, UserKey,
};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let world = World::new(8);
    let codec = TokenCodec::new(TokenKey::new(1, "bench-key-0123456789abcdef").expect("key"));
    let router = rt.block_on(async {
        Router::builder(FakeBackend(world.clone()))
            .nodes(world.node_configs())
            .config(RouterConfig {
                probe_interval: Duration::from_secs(3600),
                ..RouterConfig::default()
            })
            .tokens(codec.clone())
            .build()
            .await
            .expect("router")
    });
    let pool = FakeBackend(world.clone())
        .build_pool(routing_core::PoolSpec {
            node: world.node_configs()[1].clone(),
            access: routing_core::Access::ReadOnly,
            settings: PoolSettings::default(),
            epoch: routing_core::Epoch::default(),
        })
        .expect("pool");

    let run = |name: &str, c: &mut Criterion, ctx: RequestContext, routed: bool| {
        c.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        if routed {
                            let conn = router.read_with(&ctx).await.expect("read");
                            std::hint::black_box(&conn);
                        } else {
                            let conn = FakeBackend::checkout(&pool).await.expect("checkout");
                            std::hint::black_box(&conn);
                        }
                    }
                    start.elapsed()
                })
            })
        });
    };
    run(
        "baseline: bare fake checkout",
        c,
        RequestContext::new(),
        false,
    );
    run(
        "read: Eventual, 8 replicas, least-outstanding",
        c,
        RequestContext::new().consistency(Consistency::Eventual),
        true,
    );
    let token = CausalToken {
        lsn: Lsn(1000),
        timeline: 1,
        system_id: 42,
    };
    run(
        "read: Causal token, 8 caught-up replicas",
        c,
        RequestContext::new()
            .token(token)
            .consistency(Consistency::Causal),
        true,
    );
    rt.block_on(async {
        let mut w = router
            .write_with(&RequestContext::new().user("u"))
            .await
            .expect("write");
        FakeBackend::execute(w.pooled(), "INSERT x")
            .await
            .expect("insert");
        w.finish().await.expect("finish");
        world.set(1, |n| n.lsn = 2000);
        for i in 2..=8 {
            world.set(i, |n| n.lsn = 2000);
        }
        router.reprobe();
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
    run(
        "read: ReadYourWrites with in-memory mark, 8 caught-up replicas",
        c,
        RequestContext::new()
            .user("u")
            .consistency(Consistency::ReadYourWrites),
        true,
    );

    let text = codec.sign(&token);
    c.bench_function("token verify", |b| {
        b.iter(|| codec.verify(std::hint::black_box(&text)).expect("valid"))
    });
    c.bench_function("token sign", |b| {
        b.iter(|| codec.sign(std::hint::black_box(&token)))
    });

    // Every insert lands in a full shard and evicts: this must cost about what a plain insert
    // costs (no scan of the shard). The ring is twice the capacity, so a key's previous mark has
    // been evicted by the time it comes round again.
    let marks = InMemoryMarks::with_capacity(100_000);
    let keys: Vec<UserKey> = (0..200_000u64).map(UserKey::from).collect();
    let ttl = Duration::from_secs(3600);
    let now = Instant::now();
    for (i, k) in keys.iter().enumerate() {
        marks.set_max_now(k, Lsn(i as u64), ttl, now);
    }
    let mut next = 0usize;
    c.bench_function("marks: insert into a full in-memory store", |b| {
        b.iter(|| {
            next = (next + 1) % keys.len();
            marks.set_max_now(&keys[next], Lsn(next as u64), ttl, now);
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
