//! Bad input fails fast with an error that names the cause.

mod common;

use std::time::{Duration, Instant};

use common::scratch;

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
    let base = scratch("rtk-errors-base");
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

/// The newest `/usr/lib/postgresql/<v>/bin` (what the kit picks by default on Debian).
fn real_pg_bin() -> Option<std::path::PathBuf> {
    let mut v: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .collect();
    v.sort();
    v.pop().map(|(_, p)| p)
}

#[test]
fn failed_server_start_shows_the_log_tail() {
    use std::os::unix::fs::PermissionsExt;
    let Some(real) = real_pg_bin() else {
        eprintln!("no /usr/lib/postgresql: skipped");
        return;
    };
    // A bin dir whose `postgres` works for initdb (-V, --boot, --single) but dies when started
    // as a server, the way a broken config would.
    let root = scratch("rtk-fakepg");
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["initdb", "psql"] {
        // A copy, not a symlink: initdb looks for `postgres` next to its resolved path.
        std::fs::copy(real.join(tool), bin.join(tool)).unwrap();
    }
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = -D ]; then echo 'FATAL:  simulated start failure' >&2; exit 1; fi\nexec {} \"$@\"\n",
        real.join("postgres").display()
    );
    std::fs::write(bin.join("postgres"), script).unwrap();
    std::fs::set_permissions(bin.join("postgres"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();

    let err = quick(|| {
        ClusterBuilder::new()
            .replicas(0)
            .pg_bin_dir(&bin)
            .base_dir(root.join("base"))
            .start()
    })
    .unwrap_err();
    let _ = std::fs::remove_dir_all(&root);
    match &err {
        KitError::ServerStart { name, log_tail, .. } => {
            assert_eq!(name, "pg0");
            assert!(log_tail.contains("simulated start failure"), "{log_tail}");
        }
        other => panic!("expected ServerStart, got {other:?}"),
    }
    assert!(err.to_string().contains("simulated start failure"));
}
