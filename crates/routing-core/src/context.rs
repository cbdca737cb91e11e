//! What a request asks of the router: who it is, what it has seen, where it is, how fresh it must be.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::CausalToken;

/// How fresh a read must be. A router has a default; a request may override it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Consistency {
    /// Read on the primary (through a read-only session).
    Primary,
    /// Any healthy replica within the lag bounds.
    #[default]
    Eventual,
    /// The primary while the user's recent-writer mark is younger than `ttl`, else `Eventual`.
    /// Kept for comparison and for apps without LSN access: it over-pins users to the primary.
    RecentWriterTtl {
        /// How long after a write the user stays on the primary.
        ttl: Duration,
    },
    /// A replica that has replayed the user's last commit (their mark), else wait within the
    /// budget, else the primary. Also honours a causal token when the request carries one.
    ReadYourWrites,
    /// Like `ReadYourWrites`, but driven only by the signed token the client carries.
    Causal,
}

/// An opaque user identity for recent-writer marks. Any bytes; stores must escape or hash them.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UserKey(Arc<[u8]>);

impl UserKey {
    /// A key from any bytes (ids need not be UTF-8).
    pub fn new(bytes: impl AsRef<[u8]>) -> Self {
        UserKey(Arc::from(bytes.as_ref()))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for UserKey {
    fn from(s: &str) -> Self {
        UserKey::new(s)
    }
}

impl From<String> for UserKey {
    fn from(s: String) -> Self {
        UserKey::new(s)
    }
}

impl From<u64> for UserKey {
    fn from(v: u64) -> Self {
        UserKey::new(v.to_string())
    }
}

impl fmt::Debug for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserKey({:?})", String::from_utf8_lossy(&self.0))
    }
}

/// A region tag (for example `eu-west`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Region(Arc<str>);

impl Region {
    /// A region by name.
    pub fn new(name: impl AsRef<str>) -> Self {
        Region(Arc::from(name.as_ref()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Region {
    fn from(s: &str) -> Self {
        Region::new(s)
    }
}

/// Per-request routing input. Built by the web layer (or by hand); cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    /// Who the request acts for; needed for recent-writer marks.
    pub user: Option<UserKey>,
    /// A verified causal token the client sent (see [`crate::TokenCodec::verify`]).
    pub token: Option<CausalToken>,
    /// Where the request comes from, for replica locality.
    pub region: Option<Region>,
    /// Overrides the router's default consistency.
    pub consistency: Option<Consistency>,
    /// Read on the primary whatever the mode says.
    pub force_primary: bool,
}

impl RequestContext {
    /// An empty context: router defaults, no user, no token, no region.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the user.
    pub fn user(mut self, user: impl Into<UserKey>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Sets the verified causal token.
    pub fn token(mut self, token: CausalToken) -> Self {
        self.token = Some(token);
        self
    }

    /// Sets the region.
    pub fn region(mut self, region: impl Into<Region>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Overrides the consistency mode.
    pub fn consistency(mut self, mode: Consistency) -> Self {
        self.consistency = Some(mode);
        self
    }

    /// Forces reads onto the primary.
    pub fn force_primary(mut self, on: bool) -> Self {
        self.force_primary = on;
        self
    }
}
