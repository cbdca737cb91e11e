//! Helpers shared by the integration tests (each test file includes this module).
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use routing_redis::{RedisMarks, RedisMarksBuilder, RestartPolicy};

/// A prefix no other test (or earlier run against the same Redis) uses.
pub fn unique_prefix(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "t:{test}:{}:{nanos}:{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A builder with a generous timeout (correctness tests on a loaded 2-core machine must not
/// trip over scheduling hiccups; the failure tests use short timeouts) and a restart window
/// that never gets in the way.
pub fn builder(url: &str, test: &str) -> RedisMarksBuilder {
    RedisMarks::builder(url)
        .prefix(unique_prefix(test))
        .timeout(Duration::from_secs(2))
        .restart_policy(RestartPolicy::Trust)
}

/// A plain connection for looking at what the store wrote.
pub async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("raw redis connection")
}

/// The shared cluster's Redis URL (the cluster starts on first use; blocking, so off the runtime).
pub async fn shared_redis_url() -> String {
    tokio::task::spawn_blocking(|| {
        routing_testkit::shared()
            .redis_url()
            .expect("the shared cluster has redis")
    })
    .await
    .expect("spawn_blocking")
}

/// Runs blocking test-kit calls off the async runtime.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("spawn_blocking")
}

/// Polls `op` until it succeeds; returns how long that took.
#[allow(dead_code)] // not every test binary polls
pub async fn until_ok<T, F, Fut>(what: &str, limit: Duration, mut op: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, routing_redis::MarksError>>,
{
    let t = Instant::now();
    loop {
        match op().await {
            Ok(v) => return (v, t.elapsed()),
            Err(e) if t.elapsed() > limit => panic!("{what} still failing after {limit:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
