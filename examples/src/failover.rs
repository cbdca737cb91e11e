//! Failover time: from a replica's promotion to the router's first successful write on it, for
//! a killed primary and for a blackholed one (its packets dropped, the process still up), over
//! several runs, each on a fresh cluster with the router's default configuration.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use routing_core::{NodeConfig, Router, RouterConfig};
use routing_sqlx::SqlxBackend;
use routing_testkit::{
    ClusterBuilder, KitError, MONITOR_PASSWORD, MONITOR_ROLE, ProxyMode, READER_PASSWORD,
    READER_ROLE, WRITER_PASSWORD, WRITER_ROLE,
};
use serde::Serialize;

/// How the primary fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Fault {
    /// Its postmaster killed.
    Kill,
    /// Unreachable: a proxy in front of it drops every packet.
    Blackhole,
}

/// The runs of one fault.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverRow {
    /// The fault.
    pub fault: Fault,
    /// Runs done.
    pub runs: usize,
    /// Median time from promotion to the first write on the new primary, milliseconds.
    pub p50_ms: f64,
    /// Slowest run, milliseconds.
    pub max_ms: f64,
    /// Each run, milliseconds.
    pub samples_ms: Vec<f64>,
}

async fn kit<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KitError> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// `runs` failovers with `fault`.
pub async fn measure(fault: Fault, runs: usize) -> Result<FailoverRow, String> {
    let mut samples = Vec::new();
    for _ in 0..runs {
        samples.push(one(fault).await?.as_secs_f64() * 1e3);
    }
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(FailoverRow {
        fault,
        runs,
        p50_ms: sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
        max_ms: sorted.last().copied().unwrap_or(0.0),
        samples_ms: samples,
    })
}

async fn one(fault: Fault) -> Result<Duration, String> {
    let c = Arc::new(kit(|| ClusterBuilder::new().replicas(1).start()).await?);
    let (old, new) = (0, 1);
    let cc = c.clone();
    let proxy = match fault {
        Fault::Blackhole => Some(kit(move || cc.proxy(old)).await?),
        Fault::Kill => None,
    };
    let mut nodes = c.node_configs();
    if let Some(p) = &proxy {
        let url = |role: &str, pw: &str| {
            format!("postgres://{role}:{pw}@127.0.0.1:{}/postgres", p.port())
        };
        nodes[old] = NodeConfig::writer(c.node(old).name(), url(WRITER_ROLE, WRITER_PASSWORD))
            .reader_url(url(READER_ROLE, READER_PASSWORD))
            .monitor_url(url(MONITOR_ROLE, MONITOR_PASSWORD));
    }
    let router = Router::builder(SqlxBackend::new())
        .nodes(nodes)
        .config(RouterConfig::default())
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let new_name = c.node(new).name().to_string();
    let first_on_new: Arc<Mutex<Option<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    // A write every 5 ms, each on its own task, so a write stuck on the dead primary does not
    // hold back the next.
    let load = {
        let (router, first, stop, new_name) = (
            router.clone(),
            first_on_new.clone(),
            stop.clone(),
            new_name.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (router, first, new_name) = (router.clone(), first.clone(), new_name.clone());
                tokio::spawn(async move {
                    let Ok(mut w) = router.write().await else {
                        return;
                    };
                    let node = w.node_name().to_string();
                    let done = sqlx::query("SELECT pg_catalog.txid_current()")
                        .execute(&mut *w)
                        .await;
                    if done.is_ok() && node == new_name {
                        let now = Instant::now();
                        first.lock().get_or_insert(now);
                    }
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The moment of promotion, as a client sees it: the new primary first answers that it is
    // out of recovery (kit's promote() returns later than that, after its own checks).
    let promoted_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let watch = {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&c.url(new))
            .await
            .map_err(|e| e.to_string())?;
        let (promoted_at, stop) = (promoted_at.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let in_recovery: Result<bool, _> =
                    sqlx::query_scalar("SELECT pg_catalog.pg_is_in_recovery()")
                        .fetch_one(&mut conn)
                        .await;
                if matches!(in_recovery, Ok(false)) {
                    promoted_at.lock().get_or_insert(Instant::now());
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    match &proxy {
        Some(p) => p.set_mode(ProxyMode::Blackhole),
        None => {
            let cc = c.clone();
            kit(move || cc.kill(old)).await?;
        }
    }
    let cc = c.clone();
    kit(move || cc.promote(new)).await?;
    let limit = Instant::now() + Duration::from_secs(15);
    let first = loop {
        if let Some(at) = *first_on_new.lock() {
            break at;
        }
        if Instant::now() > limit {
            stop.store(true, Ordering::Relaxed);
            return Err(format!(
                "{fault:?}: no write on the new primary within 15 s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    let _ = watch.await;
    let promoted = (*promoted_at.lock()).ok_or("the promotion was never seen")?;
    router.shutdown();
    drop(router);
    drop(proxy);
    kit(move || {
        drop(c);
        Ok(())
    })
    .await?;
    Ok(first.saturating_duration_since(promoted))
}
