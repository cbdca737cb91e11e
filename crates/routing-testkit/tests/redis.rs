//! Redis kill/restart: the library must survive a Redis that loses every mark.

mod common;

use common::redis_cmd;
use routing_testkit::{ClusterBuilder, KitError};

#[test]
fn redis_kill_and_restart_on_the_same_port_empty() {
    let c = ClusterBuilder::new()
        .replicas(0)
        .with_redis(true)
        .start()
        .unwrap();
    let port = c.redis_port().unwrap();
    assert_eq!(c.redis_url().unwrap(), format!("redis://127.0.0.1:{port}/"));
    assert_eq!(redis_cmd(port, "PING").unwrap(), "+PONG");
    assert_eq!(redis_cmd(port, "SET mark 1").unwrap(), "+OK");

    c.kill_redis().unwrap();
    assert!(
        redis_cmd(port, "PING").is_err(),
        "redis still answers after kill"
    );
    c.kill_redis().unwrap(); // already down: fine

    c.restart_redis().unwrap();
    assert_eq!(c.redis_port(), Some(port));
    assert_eq!(redis_cmd(port, "PING").unwrap(), "+PONG");
    assert_eq!(
        redis_cmd(port, "GET mark").unwrap(),
        "$-1",
        "restart must come back empty"
    );
    // Restart while running also works (kill + start).
    c.restart_redis().unwrap();
    assert_eq!(redis_cmd(port, "PING").unwrap(), "+PONG");
}

#[test]
fn redis_operations_without_redis_are_errors() {
    let c = ClusterBuilder::new().replicas(0).start().unwrap();
    assert_eq!(c.redis_url(), None);
    assert!(matches!(c.kill_redis(), Err(KitError::NoRedis)));
    assert!(matches!(c.restart_redis(), Err(KitError::NoRedis)));
}
