//! Nodes discovered at run time: a [`Discovery`] source says which members the cluster has now,
//! and a [`Discoverer`] keeps the router's membership in step with it ([`Router::add_node`],
//! [`Router::remove_node`]).
//!
//! A source only adds and removes members: roles still come from the servers themselves (the
//! monitor's probes), whatever the source says about them. A source that fails, times out or
//! answers with no member changes nothing (it is logged and counted in
//! [`crate::telemetry::DISCOVERY_POLLS`]), so an outage of the source never empties the router.
//! The elected writer is never removed: a writer the source no longer lists is removed on a
//! later poll, once the monitor elected another.
//!
//! With the `patroni` feature, [`crate::patroni::PatroniDiscovery`] reads Patroni's REST API.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::{Backend, Error, NodeConfig, Router};

/// Why a source could not say which members the cluster has.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// No endpoint of the source answered (connection refused, reset, HTTP error status).
    #[error("discovery source unavailable: {0}")]
    Unavailable(String),
    /// An endpoint answered something that cannot be read as a member list.
    #[error("discovery source answered an unreadable member list: {0}")]
    Invalid(String),
    /// The source did not answer within the poll's timeout.
    #[error("discovery source did not answer within {0:?}")]
    Timeout(Duration),
    /// The source answered with no member at all; taken as a failure, never applied.
    #[error("discovery source listed no member")]
    Empty,
}

/// One member a source lists: the node as the router should connect to it, and what the source
/// says about it (for logs and callers; the router decides roles from the servers).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Member {
    /// The node, named as the source names the member.
    pub node: NodeConfig,
    /// The role the source reports (Patroni: `leader`, `replica`, `sync_standby`, ...).
    pub role: Option<String>,
    /// The state the source reports (Patroni: `running`, `streaming`, `stopped`, ...).
    pub state: Option<String>,
    /// Replication lag in bytes the source reports, when it knows.
    pub lag_bytes: Option<u64>,
}

impl Member {
    /// A member with nothing but its node.
    pub fn new(node: NodeConfig) -> Self {
        Member {
            node,
            role: None,
            state: None,
            lag_bytes: None,
        }
    }
}

/// Says which members the cluster has now. Object-safe (`Arc<dyn Discovery>`); written with
/// [`crate::async_trait`]. A DNS name or a cloud API fits as well as Patroni.
#[async_trait::async_trait]
pub trait Discovery: Send + Sync + 'static {
    /// A short name for logs and metrics (`patroni`, `dns`, ...).
    fn name(&self) -> &str;

    /// Every member now. May take long or hang: the [`Discoverer`] bounds it with its timeout.
    async fn members(&self) -> Result<Vec<Member>, DiscoveryError>;
}

/// How a [`Discoverer`] polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiscoverySettings {
    /// Between polls (default 1 s).
    pub interval: Duration,
    /// Bound on one poll of the source (default 500 ms).
    pub timeout: Duration,
}

impl Default for DiscoverySettings {
    fn default() -> Self {
        DiscoverySettings {
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
        }
    }
}

impl DiscoverySettings {
    /// Polls every `interval`, each bounded by `timeout`.
    pub fn new(interval: Duration, timeout: Duration) -> Self {
        DiscoverySettings { interval, timeout }
    }
}

/// What one poll changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Changes {
    /// Nodes added (new members, or members whose address changed).
    pub added: Vec<String>,
    /// Nodes removed (members no longer listed, or whose address changed).
    pub removed: Vec<String>,
    /// Members the router could not add or remove this time (retried at the next poll): the
    /// elected writer no longer listed, a member whose configuration the router refused.
    pub deferred: Vec<String>,
}

impl Changes {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// What decides whether a listed member is the node the router already has under that name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    url: String,
    reader_url: Option<String>,
    monitor_url: Option<String>,
    reads: bool,
    load_balanced: bool,
}

impl Shape {
    fn of(n: &NodeConfig) -> Self {
        Shape {
            url: n.url.expose().to_string(),
            reader_url: n.reader_url.as_ref().map(|u| u.expose().to_string()),
            monitor_url: n.monitor_url.as_ref().map(|u| u.expose().to_string()),
            reads: n.reads,
            load_balanced: n.load_balanced,
        }
    }
}

/// Keeps a router's membership in step with a [`Discovery`] source: [`Discoverer::sync`] once,
/// or [`Discoverer::spawn`] to poll in the background.
///
/// It manages the nodes it added and, by default, every node the router had when it was made
/// (the usual setup builds the router from the source's first answer, see
/// [`Discoverer::initial_nodes`]); [`Discoverer::keep_existing`] leaves those alone instead.
pub struct Discoverer<B: Backend> {
    router: Router<B>,
    source: Arc<dyn Discovery>,
    settings: DiscoverySettings,
    /// Name -> shape of every node this discoverer manages.
    managed: HashMap<String, Option<Shape>>,
}

impl<B: Backend> std::fmt::Debug for Discoverer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discoverer")
            .field("source", &self.source.name())
            .field("settings", &self.settings)
            .field("managed", &self.managed.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl<B: Backend> Discoverer<B> {
    /// A discoverer of `source` for `router`, managing the nodes the router has now.
    pub fn new(router: Router<B>, source: Arc<dyn Discovery>, settings: DiscoverySettings) -> Self {
        let managed = router.node_names().into_iter().map(|n| (n, None)).collect();
        Discoverer {
            router,
            source,
            settings,
            managed,
        }
    }

    /// Leaves the nodes the router had before alone (configured statically): only members this
    /// discoverer adds are ever removed by it.
    pub fn keep_existing(mut self) -> Self {
        self.managed.clear();
        self
    }

    /// The source's members now, as nodes to build a router with, bounded by `timeout`; an
    /// empty answer is [`DiscoveryError::Empty`].
    pub async fn initial_nodes(
        source: &dyn Discovery,
        timeout: Duration,
    ) -> Result<Vec<NodeConfig>, DiscoveryError> {
        let members = poll(source, timeout).await?;
        Ok(members.into_iter().map(|m| m.node).collect())
    }

    /// Polls the source once and applies the difference. A failed poll changes nothing.
    pub async fn sync(&mut self) -> Result<Changes, DiscoveryError> {
        let members = poll(self.source.as_ref(), self.settings.timeout).await;
        let members = match members {
            Ok(m) => {
                crate::telemetry::discovery_poll(self.source.name(), "ok");
                m
            }
            Err(e) => {
                let outcome = match e {
                    DiscoveryError::Timeout(_) => "timeout",
                    DiscoveryError::Empty => "empty",
                    _ => "error",
                };
                crate::telemetry::discovery_poll(self.source.name(), outcome);
                return Err(e);
            }
        };
        Ok(self.apply(members).await)
    }

    async fn apply(&mut self, members: Vec<Member>) -> Changes {
        let mut changes = Changes::default();
        let listed: HashMap<&str, &Member> =
            members.iter().map(|m| (m.node.name.as_str(), m)).collect();
        let present: Vec<String> = self.router.node_names();
        // Gone, or changed address: removed (never the writer; retried next time).
        let mut to_remove: Vec<String> = Vec::new();
        for (name, shape) in &self.managed {
            match listed.get(name.as_str()) {
                None => to_remove.push(name.clone()),
                Some(m) => {
                    if shape.as_ref().is_some_and(|s| *s != Shape::of(&m.node)) {
                        to_remove.push(name.clone());
                    }
                }
            }
        }
        to_remove.sort();
        for name in to_remove {
            match self.router.remove_node(&name) {
                Ok(_) => {
                    self.managed.remove(&name);
                    changes.removed.push(name);
                }
                Err(Error::UnknownNode { .. }) => {
                    self.managed.remove(&name);
                }
                Err(e) => {
                    // The elected writer, until the monitor elects another: retried every
                    // poll, so not logged at info each time.
                    tracing::debug!(source = self.source.name(), node = %name, error = %e,
                        "discovery: member not removed yet");
                    changes.deferred.push(name);
                }
            }
        }
        let present: Vec<String> = if changes.removed.is_empty() {
            present
        } else {
            self.router.node_names()
        };
        for m in &members {
            let name = &m.node.name;
            if present.contains(name) {
                // Adopted at start: remember its shape from now on.
                if let Some(slot) = self.managed.get_mut(name)
                    && slot.is_none()
                {
                    *slot = Some(Shape::of(&m.node));
                }
                continue;
            }
            match self.router.add_node(m.node.clone()).await {
                Ok(()) => {
                    self.managed.insert(name.clone(), Some(Shape::of(&m.node)));
                    changes.added.push(name.clone());
                }
                Err(e) => {
                    tracing::warn!(source = self.source.name(), node = %name, error = %e,
                        "discovery: member not added");
                    changes.deferred.push(name.clone());
                }
            }
        }
        if !changes.is_empty() {
            tracing::info!(
                source = self.source.name(),
                added = ?changes.added,
                removed = ?changes.removed,
                "discovery changed the membership"
            );
        }
        changes
    }

    /// Polls in the background every `interval` until the returned handle is dropped or the
    /// router is shut down. Failed polls are logged (at most once per failure streak at warn
    /// level) and counted; they change nothing.
    pub fn spawn(self) -> DiscoveryTask {
        let mut shutdown = self.router.subscribe_shutdown();
        // The task holds the router weakly: it ends with the router's last clone.
        let weak = self.router.downgrade();
        let Discoverer {
            router,
            source,
            settings,
            managed,
        } = self;
        drop(router);
        let task = tokio::spawn(async move {
            let mut failing = false;
            let mut managed = managed;
            loop {
                let Some(router) = weak.upgrade() else { return };
                let mut this = Discoverer {
                    router,
                    source: source.clone(),
                    settings,
                    managed: std::mem::take(&mut managed),
                };
                let outcome = this.sync().await;
                managed = std::mem::take(&mut this.managed);
                drop(this);
                match outcome {
                    Ok(_) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(source = source.name(), error = %e,
                            "discovery poll failed; membership unchanged");
                    }
                    Err(e) => tracing::debug!(source = source.name(), error = %e,
                        "discovery poll failed; membership unchanged"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(settings.interval) => {}
                    _ = shutdown.changed() => return,
                }
            }
        });
        DiscoveryTask { task }
    }
}

/// The background poll of [`Discoverer::spawn`]; stops when dropped.
#[derive(Debug)]
pub struct DiscoveryTask {
    task: tokio::task::JoinHandle<()>,
}

impl DiscoveryTask {
    /// Stops polling (as dropping does).
    pub fn stop(self) {}
}

impl Drop for DiscoveryTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn poll(source: &dyn Discovery, timeout: Duration) -> Result<Vec<Member>, DiscoveryError> {
    let members = tokio::time::timeout(timeout, source.members())
        .await
        .map_err(|_| DiscoveryError::Timeout(timeout))??;
    if members.is_empty() {
        return Err(DiscoveryError::Empty);
    }
    let mut names = std::collections::HashSet::new();
    for m in &members {
        if !names.insert(m.node.name.as_str()) {
            return Err(DiscoveryError::Invalid(format!(
                "member {:?} listed twice",
                m.node.name
            )));
        }
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Result<Vec<Member>, ()>);

    #[async_trait::async_trait]
    impl Discovery for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        async fn members(&self) -> Result<Vec<Member>, DiscoveryError> {
            self.0
                .clone()
                .map_err(|()| DiscoveryError::Unavailable("down".into()))
        }
    }

    struct Hangs;

    #[async_trait::async_trait]
    impl Discovery for Hangs {
        fn name(&self) -> &str {
            "hangs"
        }
        async fn members(&self) -> Result<Vec<Member>, DiscoveryError> {
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn failing_empty_duplicate_or_slow_sources_are_errors() {
        let t = Duration::from_millis(20);
        assert!(matches!(
            poll(&Fixed(Err(())), t).await,
            Err(DiscoveryError::Unavailable(_))
        ));
        assert!(matches!(
            poll(&Fixed(Ok(vec![])), t).await,
            Err(DiscoveryError::Empty)
        ));
        let m = Member::new(NodeConfig::replica("a", "postgres://x"));
        assert!(matches!(
            poll(&Fixed(Ok(vec![m.clone(), m.clone()])), t).await,
            Err(DiscoveryError::Invalid(_))
        ));
        assert!(matches!(
            poll(&Hangs, t).await,
            Err(DiscoveryError::Timeout(_))
        ));
        assert_eq!(poll(&Fixed(Ok(vec![m])), t).await.unwrap().len(), 1);
    }

    #[test]
    fn the_shape_ignores_the_role_hint() {
        let a = NodeConfig::writer("a", "postgres://h:1/d");
        let b = NodeConfig::replica("a", "postgres://h:1/d");
        assert_eq!(Shape::of(&a), Shape::of(&b));
        assert_ne!(Shape::of(&a), Shape::of(&b.clone().no_reads()));
        assert_ne!(
            Shape::of(&a),
            Shape::of(&NodeConfig::writer("a", "postgres://h:2/d"))
        );
    }
}
