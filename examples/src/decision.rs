//! The cost of one routing decision, measured in-process the way routing-core's criterion bench
//! (`cargo bench -p routing-core --bench routing`) measures it: `read_with` on a router over the
//! in-memory fake cluster of routing-core's own tests (8 replicas, no I/O), less a bare fake
//! checkout timed in the same loop, rounds of each interleaved. Token verification is timed
//! alone. Medians over rounds; nanoseconds per call.

#[path = "../../crates/routing-core/tests/fake/mod.rs"]
#[allow(clippy::all, missing_docs, unreachable_pub)]
mod fake;

use crate::median;
use std::hint::black_box;
use std::time::{Duration, Instant};

use fake::{FakeBackend, World};
use routing_core::{
    Access, Backend, CausalToken, Consistency, Epoch, Lsn, PoolSettings, PoolSpec, RequestContext,
    Router, RouterConfig, TokenCodec, TokenKey,
};
use serde::Serialize;

/// The decision figures.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRow {
    /// Median cost of a routed `Eventual` read decision (router checkout less a bare checkout).
    pub eventual_ns: f64,
    /// The same for a `Causal` read with a token and 8 caught-up replicas.
    pub causal_ns: f64,
    /// The bare fake checkout both include, per call.
    pub baseline_checkout_ns: f64,
    /// Verifying one causal token (HMAC).
    pub token_verify_ns: f64,
    /// Rounds of `iters` calls each side.
    pub rounds: usize,
    /// Calls per round.
    pub iters: usize,
}

/// Measures `rounds` interleaved rounds of `iters` calls per side.
pub async fn measure(rounds: usize, iters: usize) -> Result<DecisionRow, String> {
    let world = World::new(8);
    let codec = TokenCodec::new(
        TokenKey::new(1, "bench-key-0123456789abcdef").map_err(|e| format!("{e:?}"))?,
    );
    let router = Router::builder(FakeBackend(world.clone()))
        .nodes(world.node_configs())
        .config(RouterConfig {
            probe_interval: Duration::from_secs(3600),
            ..RouterConfig::default()
        })
        .tokens(codec.clone())
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let pool = FakeBackend(world.clone())
        .build_pool(PoolSpec {
            node: world.node_configs()[1].clone(),
            access: Access::ReadOnly,
            settings: PoolSettings::default(),
            epoch: Epoch::default(),
        })
        .map_err(|e| format!("{e:?}"))?;
    let token = CausalToken {
        lsn: Lsn(1000),
        timeline: 1,
        system_id: 42,
    };
    let eventual = RequestContext::new().consistency(Consistency::Eventual);
    let causal = RequestContext::new()
        .token(token)
        .consistency(Consistency::Causal);
    let (mut base, mut ev, mut ca, mut verify) = (vec![], vec![], vec![], vec![]);
    let per = |d: Duration| d.as_nanos() as f64 / iters as f64;
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..iters {
            let c = FakeBackend::checkout(&pool)
                .await
                .map_err(|e| e.to_string())?;
            black_box(&c);
        }
        base.push(per(t.elapsed()));
        for (ctx, out) in [(&eventual, &mut ev), (&causal, &mut ca)] {
            let t = Instant::now();
            for _ in 0..iters {
                let c = router.read_with(ctx).await.map_err(|e| e.to_string())?;
                black_box(&c);
            }
            out.push(per(t.elapsed()));
        }
        let text = codec.sign(&token);
        let t = Instant::now();
        for _ in 0..iters {
            black_box(
                codec
                    .verify(black_box(&text))
                    .map_err(|e| format!("{e:?}"))?,
            );
        }
        verify.push(per(t.elapsed()));
    }
    router.shutdown();
    let b = median(base.clone());
    // Per round: candidate less the same round's baseline, then the median.
    let diff = |v: &[f64]| median(v.iter().zip(&base).map(|(c, b)| (c - b).max(0.0)).collect());
    Ok(DecisionRow {
        eventual_ns: diff(&ev),
        causal_ns: diff(&ca),
        baseline_checkout_ns: b,
        token_verify_ns: median(verify),
        rounds,
        iters,
    })
}
