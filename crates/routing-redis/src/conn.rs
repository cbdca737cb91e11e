//! Connections: one Redis server through `ConnectionManager`, or a Redis Cluster through the
//! redis crate's async cluster client (feature `cluster`). Both connect lazily and reconnect by
//! themselves; `Target::connect` builds a fresh one when the old one looks stuck.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, RedisResult, ScriptInvocation};

/// What to connect to, with the timeouts to use.
#[derive(Clone)]
pub(crate) enum Target {
    Single {
        client: redis::Client,
        config: ConnectionManagerConfig,
    },
    #[cfg(feature = "cluster")]
    Cluster {
        client: redis::cluster::ClusterClient,
        config: redis::cluster::ClusterConfig,
    },
}

/// Reconnection backoff of the single-server manager: quick first retries, and never more than
/// `RECONNECT_MAX_DELAY` between attempts, so a restarted Redis is picked up within about that.
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(20);
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);
const RECONNECT_RETRIES: usize = 6;

impl Target {
    pub(crate) fn single(
        client: redis::Client,
        response_timeout: Duration,
        connect_timeout: Duration,
    ) -> Self {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(connect_timeout))
            .set_min_delay(RECONNECT_MIN_DELAY)
            .set_max_delay(RECONNECT_MAX_DELAY)
            .set_number_of_retries(RECONNECT_RETRIES);
        Target::Single { client, config }
    }

    #[cfg(feature = "cluster")]
    pub(crate) fn cluster(
        nodes: Vec<redis::ConnectionInfo>,
        response_timeout: Duration,
        connect_timeout: Duration,
    ) -> RedisResult<Self> {
        let client = redis::cluster::ClusterClientBuilder::new(nodes)
            .connection_timeout(connect_timeout)
            .response_timeout(response_timeout)
            .retries(2)
            .min_retry_wait(5)
            .max_retry_wait(100)
            .build()?;
        let config = redis::cluster::ClusterConfig::new()
            .set_connection_timeout(connect_timeout)
            .set_response_timeout(response_timeout);
        Ok(Target::Cluster { client, config })
    }

    /// A new connection handle that connects in the background / on first use. Never fails for
    /// an unreachable server; needs a tokio runtime.
    pub(crate) fn connect(&self) -> RedisResult<Conn> {
        match self {
            Target::Single { client, config } => Ok(Conn::Single(
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?,
            )),
            #[cfg(feature = "cluster")]
            Target::Cluster { client, config } => Ok(Conn::Cluster(
                client.get_pending_async_connection_with_config(config.clone()),
            )),
        }
    }

    /// `host:port` of the server or of the first cluster node, never credentials.
    pub(crate) fn describe(&self) -> String {
        match self {
            Target::Single { client, .. } => {
                format!("redis {}", client.get_connection_info().addr())
            }
            #[cfg(feature = "cluster")]
            Target::Cluster { client, .. } => {
                let _ = client;
                "redis cluster".to_owned()
            }
        }
    }
}

/// A cheap-to-clone handle on the connection.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Conn {
    pub(crate) async fn invoke<T: FromRedisValue>(
        &mut self,
        invocation: &ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        match self {
            Conn::Single(c) => invocation.invoke_async(c).await,
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => invocation.invoke_async(c).await,
        }
    }

    pub(crate) async fn query<T: FromRedisValue>(&mut self, cmd: &redis::Cmd) -> RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    }

    /// Loads the scripts (on every primary of a cluster), so the first EVALSHA on the request
    /// path does not pay for a NOSCRIPT round trip.
    pub(crate) async fn load_scripts(&mut self) -> RedisResult<()> {
        for source in [crate::scripts::GET, crate::scripts::SET_MAX] {
            let mut cmd = redis::cmd("SCRIPT");
            cmd.arg("LOAD").arg(source);
            let _: redis::Value = self.query(&cmd).await?;
        }
        Ok(())
    }
}
