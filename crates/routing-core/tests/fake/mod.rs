//! An in-memory cluster implementing `Backend`, for unit tests of routing decisions only.
//! Real behaviour is tested against real servers in the adapter crates.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use routing_core::{Access, Backend, BackendError, Epoch, ErrorKind, NodeConfig, PoolSpec, sql};

#[derive(Debug, Clone)]
pub struct FakeNode {
    pub up: bool,
    pub in_recovery: bool,
    pub lsn: u64,
    pub timeline: u32,
    pub system_id: u64,
    pub replay_age_ms: u64,
    /// Silent (blackholed): checkouts never complete.
    pub hang: bool,
}

#[derive(Debug, Clone, Default)]
pub struct World(
    pub Arc<Mutex<Vec<FakeNode>>>,
    pub Arc<std::sync::atomic::AtomicUsize>,
);

impl World {
    /// A primary (node 0) and `replicas` caught-up replicas.
    pub fn new(replicas: usize) -> Self {
        let mut v = vec![FakeNode {
            up: true,
            in_recovery: false,
            lsn: 1000,
            timeline: 1,
            system_id: 42,
            replay_age_ms: 0,
            hang: false,
        }];
        for _ in 0..replicas {
            v.push(FakeNode {
                up: true,
                in_recovery: true,
                lsn: 1000,
                timeline: 1,
                system_id: 42,
                replay_age_ms: 0,
                hang: false,
            });
        }
        World(Arc::new(Mutex::new(v)), Arc::default())
    }

    pub fn set(&self, i: usize, f: impl FnOnce(&mut FakeNode)) {
        f(&mut self.0.lock()[i]);
    }

    pub fn get(&self, i: usize) -> FakeNode {
        self.0.lock()[i].clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().len()
    }

    pub fn node_configs(&self) -> Vec<NodeConfig> {
        (0..self.len())
            .map(|i| {
                if i == 0 {
                    NodeConfig::writer(format!("n{i}"), format!("fake://u:pw@n{i}"))
                } else {
                    NodeConfig::replica(format!("n{i}"), format!("fake://u:pw@n{i}"))
                }
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct FakeBackend(pub World);

#[derive(Debug)]
pub struct FakePool {
    node: usize,
    access: Access,
    world: World,
    epoch: Epoch,
}

#[derive(Debug)]
pub struct FakeConn {
    pub node: usize,
    pub read_only: bool,
    pub generation: u64,
    world: World,
}

#[derive(Debug)]
pub struct Pooled(pub FakeConn);

impl std::ops::Deref for Pooled {
    type Target = FakeConn;
    fn deref(&self) -> &FakeConn {
        &self.0
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut FakeConn {
        &mut self.0
    }
}

#[derive(Debug, thiserror::Error)]
#[error("fake error {0:?}")]
pub struct FakeError(pub ErrorKind);

impl Backend for FakeBackend {
    type Pool = FakePool;
    type Pooled = Pooled;
    type Connection = FakeConn;
    type QueryError = FakeError;

    fn build_pool(&self, spec: PoolSpec) -> Result<FakePool, BackendError> {
        let node = spec
            .node
            .name
            .trim_start_matches('n')
            .parse()
            .map_err(|_| BackendError::new(ErrorKind::Config, "bad name"))?;
        Ok(FakePool {
            node,
            access: spec.access,
            world: self.0.clone(),
            epoch: spec.epoch,
        })
    }

    async fn checkout(pool: &FakePool) -> Result<Pooled, BackendError> {
        {
            let n = pool.world.get(pool.node);
            if n.hang {
                std::future::pending::<()>().await;
            }
            if !n.up {
                return Err(BackendError::new(
                    ErrorKind::Connection,
                    "connection refused",
                ));
            }
            if pool.access == Access::ReadWrite && n.in_recovery {
                return Err(BackendError::new(
                    ErrorKind::NotWriter,
                    "node is in recovery",
                ));
            }
            Ok(Pooled(FakeConn {
                node: pool.node,
                read_only: pool.access != Access::ReadWrite,
                generation: pool.epoch.generation(),
                world: pool.world.clone(),
            }))
        }
    }

    async fn query_text<'a>(
        pooled: &'a mut Pooled,
        sql: &'a str,
    ) -> Result<Option<String>, BackendError> {
        {
            let n = pooled.world.get(pooled.node);
            if !n.up {
                return Err(BackendError::new(ErrorKind::Connection, "connection reset"));
            }
            if sql == sql::PROBE {
                pooled
                    .world
                    .1
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let lsn = routing_core::Lsn(n.lsn).to_string();
            Ok(Some(match sql {
                sql::PROBE => format!(
                    "{} {} {} {} {} {}",
                    n.in_recovery,
                    lsn,
                    if n.in_recovery {
                        lsn.clone()
                    } else {
                        "-".into()
                    },
                    if n.in_recovery {
                        n.replay_age_ms.to_string()
                    } else {
                        "-".into()
                    },
                    if n.in_recovery {
                        n.timeline.to_string()
                    } else {
                        format!("{:08X}", n.timeline)
                    },
                    n.system_id
                ),
                sql::REPLAY_LSN | sql::COMMIT_LSN => lsn,
                sql::WRITER_CHECK if n.in_recovery => "true".into(),
                sql::WRITER_CHECK => format!("false {:08X} {}", n.timeline, n.system_id),
                sql::READ_ONLY_CHECK => "on".into(),
                "SELECT node" => pooled.node.to_string(),
                _ => "1".into(),
            }))
        }
    }

    async fn execute<'a>(pooled: &'a mut Pooled, sql: &'a str) -> Result<u64, BackendError> {
        {
            if sql.starts_with("INSERT") {
                if pooled.read_only {
                    return Err(BackendError::new(
                        ErrorKind::Query,
                        "cannot execute INSERT in a read-only transaction",
                    )
                    .with_sqlstate("25006"));
                }
                pooled.world.set(pooled.node, |n| n.lsn += 100);
            }
            Ok(1)
        }
    }

    async fn execute_batch<'a>(pooled: &'a mut Pooled, _sql: &'a str) -> Result<(), BackendError> {
        if pooled.world.get(pooled.node).up {
            Ok(())
        } else {
            Err(BackendError::new(ErrorKind::Connection, "connection reset"))
        }
    }

    fn discard(_pooled: &mut Pooled) {}

    fn classify(err: &FakeError) -> ErrorKind {
        err.0
    }
}

/// Lets the replicas replay up to the primary's LSN after `delay`.
pub fn catch_up_after(world: &World, delay: Duration) {
    let world = world.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let p = world.get(0).lsn;
        for i in 1..world.len() {
            world.set(i, |n| n.lsn = p);
        }
    });
}
