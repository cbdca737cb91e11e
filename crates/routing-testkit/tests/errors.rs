//! Bad input fails fast with an error that names the cause.

use std::time::{Duration, Instant};

use routing_testkit::{ClusterBuilder, KitError};

fn quick<T>(f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    r
}

#[test]
fn taken_port_is_port_in_use() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let err = quick(|| ClusterBuilder::new().replicas(0).primary_port(port).start()).unwrap_err();
    match &err {
        KitError::PortInUse { port: p } => assert_eq!(*p, port),
        other => panic!("expected PortInUse, got {other:?}"),
    }
    assert!(err.to_string().contains(&port.to_string()));
}

#[test]
fn pinned_free_port_is_used() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = ClusterBuilder::new()
        .replicas(0)
        .primary_port(port)
        .start()
        .unwrap();
    assert_eq!(c.node(0).port(), port);
    assert_eq!(c.psql(0, "SHOW port").unwrap(), port.to_string());
}

#[test]
fn missing_postgres_binaries_name_the_package() {
    let err = quick(|| {
        ClusterBuilder::new()
            .pg_bin_dir("/nonexistent/pg/bin")
            .start()
    })
    .unwrap_err();
    assert!(
        matches!(&err, KitError::MissingBinary { name, package, .. } if name == "initdb" && package == "postgresql"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("/nonexistent/pg/bin") && msg.contains("postgresql"),
        "{msg}"
    );
}

#[test]
fn missing_redis_names_the_package() {
    let err = quick(|| {
        ClusterBuilder::new()
            .with_redis(true)
            .redis_bin("/nonexistent/redis-server")
            .start()
    })
    .unwrap_err();
    assert!(
        matches!(&err, KitError::MissingBinary { name, package, .. } if name == "redis-server" && package == "redis-server"),
        "{err:?}"
    );
}

#[test]
fn uncreatable_data_dir_is_data_dir_error() {
    // A path below a regular file cannot be created, not even by root.
    let err = quick(|| {
        ClusterBuilder::new()
            .base_dir("/dev/null/routing-testkit")
            .start()
    })
    .unwrap_err();
    match &err {
        KitError::DataDir { path, .. } => assert!(path.starts_with("/dev/null"), "{path:?}"),
        other => panic!("expected DataDir, got {other:?}"),
    }
    assert!(
        err.to_string().contains("/dev/null/routing-testkit"),
        "{err}"
    );
}

#[test]
fn custom_base_dir_is_used_and_cleaned() {
    let base = std::env::temp_dir().join(format!("rtk-errors-base-{}", std::process::id()));
    let c = ClusterBuilder::new()
        .replicas(0)
        .base_dir(&base)
        .start()
        .unwrap();
    assert!(c.dir().starts_with(&base));
    let dir = c.dir().to_path_buf();
    drop(c);
    assert!(!dir.exists());
    let _ = std::fs::remove_dir_all(&base);
}
