//! Signed causal tokens: "this client has seen the cluster at least at LSN X on timeline T", and
//! [`judge`], which decides what a verified token means for a read on this cluster now.
//!
//! Token layout (version 2): version, key id, LSN, timeline, system identifier, an 8-byte tag of
//! the configured cluster identity ([`TokenCodec::cluster`]), then a truncated HMAC-SHA256 over
//! all of it. Version 1 had no cluster tag.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::{Lsn, Snapshot};

/// Version 2 added the cluster tag (tokens of clones that share a system identifier differ).
const VERSION: u8 = 2;
const MAC_LEN: usize = 16;
const CLUSTER_TAG_LEN: usize = 8;
const BODY_LEN: usize = 1 + 1 + 8 + 4 + 8 + CLUSTER_TAG_LEN;
const TOKEN_LEN: usize = BODY_LEN + MAC_LEN;
/// Longest text a token can be; longer input is rejected before decoding.
pub const MAX_TOKEN_TEXT: usize = (TOKEN_LEN * 4).div_ceil(3);

/// Version 1 (no cluster tag), still recognised so that a process upgraded mid-rotation reports
/// an older process's tokens as unbound ([`TokenError::ForeignCluster`]), not as forged.
const V1_BODY_LEN: usize = 1 + 1 + 8 + 4 + 8;
const V1_TOKEN_LEN: usize = V1_BODY_LEN + MAC_LEN;
const V1_TOKEN_TEXT: usize = (V1_TOKEN_LEN * 4).div_ceil(3);
// MAX_TOKEN_TEXT bounds every format verify reads.
const _: () = assert!(V1_TOKEN_TEXT < MAX_TOKEN_TEXT);

/// What a causal token asserts about the cluster state a client has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CausalToken {
    /// The commit LSN the client has seen.
    pub lsn: Lsn,
    /// The primary's timeline when that commit happened.
    pub timeline: u32,
    /// The cluster's system identifier (`pg_control_system()`), 0 when unknown.
    pub system_id: u64,
}

impl CausalToken {
    /// The newer of two tokens. A token on a newer timeline wins; on one timeline the higher LSN.
    pub fn merge(self, other: CausalToken) -> CausalToken {
        if (other.timeline, other.lsn) > (self.timeline, self.lsn) {
            other
        } else {
            self
        }
    }
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a token at all: wrong length, not base64url, unknown version.
    #[error("malformed causal token")]
    Malformed,
    /// Well-formed, but not signed by a key this server holds: forged, tampered or signed elsewhere.
    #[error("causal token signature is invalid")]
    BadSignature,
    /// Signed with one of our keys but for another cluster: another configured cluster identity
    /// ([`TokenCodec::cluster`]), or the version-1 format, which carried none. Not trusted for
    /// replica choice: read on the primary (it is not forged, so not a client error).
    #[error("causal token belongs to another cluster")]
    ForeignCluster,
    /// Claims an LSN far beyond anything the primary has written.
    #[error("causal token LSN {lsn} is beyond the primary's position {primary}")]
    FromTheFuture {
        /// LSN in the token.
        lsn: Lsn,
        /// Latest known primary LSN.
        primary: Lsn,
    },
}

/// A signing key. Debug never shows the secret.
#[derive(Clone)]
pub struct TokenKey {
    id: u8,
    secret: Vec<u8>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("id", &self.id)
            .field("secret", &"***")
            .finish()
    }
}

/// A key is too short to be a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("token key must be at least 16 bytes, got {0}")]
pub struct WeakKey(pub usize);

impl TokenKey {
    /// A key with an id (carried in each token so rotation can find the right key).
    pub fn new(id: u8, secret: impl AsRef<[u8]>) -> Result<Self, WeakKey> {
        let secret = secret.as_ref().to_vec();
        if secret.len() < 16 {
            return Err(WeakKey(secret.len()));
        }
        Ok(TokenKey { id, secret })
    }

    fn mac(&self, body: &[u8]) -> Hmac<Sha256> {
        #[allow(clippy::expect_used)]
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes keys of any length");
        mac.update(body);
        mac
    }
}

/// The current and previous keys of a rotation share an id: a token names its key by id, so the
/// previous key's tokens would be checked against the current key and all fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the current and previous token keys both have id {0}: give the new key another id")]
pub struct DuplicateKeyId(pub u8);

/// Signs with the current key, verifies with the current or the previous one (key rotation), for
/// one configured cluster identity ([`TokenCodec::cluster`]).
#[derive(Debug, Clone)]
pub struct TokenCodec {
    current: TokenKey,
    previous: Option<TokenKey>,
    cluster: [u8; CLUSTER_TAG_LEN],
}

/// The 8-byte tag a cluster identity is carried as (a domain-separated SHA-256 prefix: the name
/// itself stays out of the token).
fn cluster_tag(name: &str) -> [u8; CLUSTER_TAG_LEN] {
    let digest = Sha256::new()
        .chain_update(b"routing-core causal token cluster\0")
        .chain_update(name.as_bytes())
        .finalize();
    let mut tag = [0u8; CLUSTER_TAG_LEN];
    tag.copy_from_slice(&digest[..CLUSTER_TAG_LEN]);
    tag
}

impl TokenCodec {
    /// A codec that signs and verifies with `current`, for the unnamed cluster identity: set one
    /// with [`TokenCodec::cluster`] whenever two clusters may share a key.
    pub fn new(current: TokenKey) -> Self {
        TokenCodec {
            current,
            previous: None,
            cluster: cluster_tag(""),
        }
    }

    /// Binds tokens to a cluster identity the operator names (`"prod-eu"`): a token signed for
    /// another name fails [`TokenCodec::verify`] with [`TokenError::ForeignCluster`], even with
    /// the same key and the same PostgreSQL system identifier (a base backup restored as
    /// staging, a blue/green pair). Every process of one cluster must use the same name.
    pub fn cluster(mut self, name: impl AsRef<str>) -> Self {
        self.cluster = cluster_tag(name.as_ref());
        self
    }

    /// Also accept tokens signed with `previous` (during a rotation). Its id must differ from the
    /// current key's, or the rotation would silently reject every token the previous key signed.
    pub fn with_previous(mut self, previous: TokenKey) -> Result<Self, DuplicateKeyId> {
        if previous.id == self.current.id {
            return Err(DuplicateKeyId(previous.id));
        }
        self.previous = Some(previous);
        Ok(self)
    }

    /// The token as compact URL/header-safe text ([`MAX_TOKEN_TEXT`] characters).
    pub fn sign(&self, token: &CausalToken) -> String {
        let mut buf = [0u8; TOKEN_LEN];
        buf[0] = VERSION;
        buf[1] = self.current.id;
        buf[2..10].copy_from_slice(&token.lsn.0.to_be_bytes());
        buf[10..14].copy_from_slice(&token.timeline.to_be_bytes());
        buf[14..22].copy_from_slice(&token.system_id.to_be_bytes());
        buf[22..BODY_LEN].copy_from_slice(&self.cluster);
        let tag = self.current.mac(&buf[..BODY_LEN]).finalize().into_bytes();
        buf[BODY_LEN..].copy_from_slice(&tag[..MAC_LEN]);
        URL_SAFE_NO_PAD.encode(buf)
    }

    /// The key a token names by id.
    fn key(&self, id: u8) -> Result<&TokenKey, TokenError> {
        [Some(&self.current), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|k| k.id == id)
            .ok_or(TokenError::BadSignature)
    }

    /// Decodes, checks the signature, then the cluster identity: a token signed with our key for
    /// another identity (or in the unbound version-1 format) is [`TokenError::ForeignCluster`].
    /// Does not judge the LSN, timeline or system identifier: [`judge`] does, with the topology.
    pub fn verify(&self, text: &str) -> Result<CausalToken, TokenError> {
        let text = text.trim();
        if text.len() == V1_TOKEN_TEXT {
            return self.verify_v1(text);
        }
        if text.len() != MAX_TOKEN_TEXT {
            return Err(TokenError::Malformed);
        }
        let mut buf = [0u8; TOKEN_LEN];
        let n = URL_SAFE_NO_PAD
            .decode_slice(text, &mut buf)
            .map_err(|_| TokenError::Malformed)?;
        if n != TOKEN_LEN || buf[0] != VERSION {
            return Err(TokenError::Malformed);
        }
        self.key(buf[1])?
            .mac(&buf[..BODY_LEN])
            .verify_truncated_left(&buf[BODY_LEN..])
            .map_err(|_| TokenError::BadSignature)?;
        // Checked after the signature, so only a token we signed can be called foreign.
        if buf[22..BODY_LEN] != self.cluster {
            return Err(TokenError::ForeignCluster);
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let mut tl = [0u8; 4];
        tl.copy_from_slice(&buf[10..14]);
        Ok(CausalToken {
            lsn: Lsn(u64_at(2)),
            timeline: u32::from_be_bytes(tl),
            system_id: u64_at(14),
        })
    }

    /// A version-1 token: never accepted (it names no cluster), but one we signed is reported as
    /// foreign rather than forged, so readers holding one during an upgrade go to the primary.
    fn verify_v1(&self, text: &str) -> Result<CausalToken, TokenError> {
        let mut buf = [0u8; V1_TOKEN_LEN];
        let n = URL_SAFE_NO_PAD
            .decode_slice(text, &mut buf)
            .map_err(|_| TokenError::Malformed)?;
        if n != V1_TOKEN_LEN || buf[0] != 1 {
            return Err(TokenError::Malformed);
        }
        self.key(buf[1])?
            .mac(&buf[..V1_BODY_LEN])
            .verify_truncated_left(&buf[V1_BODY_LEN..])
            .map_err(|_| TokenError::BadSignature)?;
        Err(TokenError::ForeignCluster)
    }
}

/// What the router knows about the cluster when it judges a token. Build it with
/// [`ClusterView::from_snapshot`], or by hand in tests.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ClusterView {
    /// The cluster's system identifier, when known.
    pub system_id: Option<u64>,
    /// The writer's timeline, when known.
    pub timeline: Option<u32>,
    /// The writer's last probed WAL position; `None` while no writer is known (an outage, or a
    /// process that started during one).
    pub primary_lsn: Option<Lsn>,
    /// How long ago `primary_lsn` was probed, when known.
    pub primary_lsn_age: Option<Duration>,
    /// The highest commit LSN this process has seen (a lower bound of the primary's position).
    pub max_commit_lsn: Lsn,
    /// The monitor's probe interval.
    pub probe_interval: Duration,
    /// The primary's observed WAL write rate, bytes per second, when measured.
    pub wal_rate: Option<f64>,
}

impl ClusterView {
    /// The view a router has: identity and writer position from the snapshot (the writer's
    /// probed LSN, its age and its rate of advance, which on a primary is the WAL write rate),
    /// plus what the router tracks itself. With no elected writer the primary position is
    /// unknown, whatever stale value the snapshot keeps.
    pub fn from_snapshot(
        snap: &Snapshot,
        max_commit_lsn: Lsn,
        probe_interval: Duration,
        now: Instant,
    ) -> Self {
        let writer = snap.writer();
        ClusterView {
            system_id: snap.system_id,
            timeline: snap.timeline,
            primary_lsn: writer.and(snap.primary_lsn),
            primary_lsn_age: writer
                .and_then(|w| w.last_probe)
                .map(|t| now.saturating_duration_since(t)),
            max_commit_lsn,
            probe_interval,
            wal_rate: writer.and_then(|w| w.replay_rate),
        }
    }
}

/// How far beyond the known primary position a token may claim to be (the primary keeps writing
/// between probes). The tolerance is what the primary can have written since its last probe plus
/// `intervals` probe intervals at the observed write rate, and never less than `floor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenPolicy {
    /// Probe intervals of writing, at the observed rate, allowed beyond the last probed position.
    pub intervals: u32,
    /// Smallest tolerance, bytes: covers an idle primary that starts writing in a burst right
    /// after a probe (its rate estimate is still near zero).
    pub floor: u64,
}

impl Default for TokenPolicy {
    /// Two probe intervals, and a 16 MiB floor (one WAL segment).
    fn default() -> Self {
        TokenPolicy {
            intervals: 2,
            floor: 16 * 1024 * 1024,
        }
    }
}

impl TokenPolicy {
    /// Bytes a token may be ahead of the known primary position in `view`.
    pub fn tolerance(&self, view: &ClusterView) -> u64 {
        let window = view
            .probe_interval
            .saturating_mul(self.intervals)
            .saturating_add(view.primary_lsn_age.unwrap_or_default());
        let rate = view.wal_rate.filter(|r| r.is_finite() && *r > 0.0);
        // `as` saturates for floats: an absurd rate gives u64::MAX, not a wrap.
        let written = rate.map_or(0, |r| (r * window.as_secs_f64()) as u64);
        written.max(self.floor)
    }
}

/// Why a token is not from this cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForeignReason {
    /// The token names no system identifier (0): it could come from any cluster.
    Unbound,
    /// The token names another PostgreSQL system identifier.
    SystemId {
        /// In the token.
        token: u64,
        /// This cluster's.
        cluster: u64,
    },
}

/// What a verified token means for a read now (see [`judge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenVerdict {
    /// Replicas that have replayed `lsn` may serve the read.
    Replicas {
        /// The LSN a replica must have replayed.
        lsn: Lsn,
    },
    /// The primary's position is unknown (no writer elected), so "from the future" cannot be
    /// told: the LSN is trusted and routed like [`TokenVerdict::Replicas`]. A forged LSN then costs
    /// one wait budget, like any LSN no replica has reached; it is never an error.
    PrimaryUnknown {
        /// The LSN a replica must have replayed.
        lsn: Lsn,
    },
    /// Not from this cluster: not trusted for replica choice (read on the primary).
    Foreign(ForeignReason),
    /// From another timeline than the writer's: its LSN is on another history, not trusted for
    /// replica choice (read on the primary).
    OtherTimeline {
        /// In the token.
        token: u32,
        /// The writer's.
        current: u32,
    },
    /// Claims an LSN further beyond the primary's known position than it can have written: a
    /// client error, not a reason to send reads to the primary.
    FromTheFuture {
        /// In the token.
        lsn: Lsn,
        /// The known primary position (probed, or the highest commit this process saw).
        primary: Lsn,
        /// The tolerance that was exceeded, bytes.
        tolerance: u64,
    },
}

impl TokenVerdict {
    /// The LSN replicas must have replayed, when replicas may serve.
    pub fn replica_lsn(&self) -> Option<Lsn> {
        match *self {
            TokenVerdict::Replicas { lsn } | TokenVerdict::PrimaryUnknown { lsn } => Some(lsn),
            _ => None,
        }
    }

    /// Foreign or other timeline: the read goes to the primary, and is counted as untrusted.
    pub fn is_untrusted(&self) -> bool {
        matches!(
            self,
            TokenVerdict::Foreign(_) | TokenVerdict::OtherTimeline { .. }
        )
    }

    /// The routing decision: `Ok(Some(lsn))` replicas at `lsn`, `Ok(None)` the primary,
    /// `Err` for a token from the future.
    pub fn route(&self) -> Result<Option<Lsn>, TokenError> {
        match *self {
            TokenVerdict::FromTheFuture { lsn, primary, .. } => {
                Err(TokenError::FromTheFuture { lsn, primary })
            }
            v => Ok(v.replica_lsn()),
        }
    }
}

/// Decides what a verified token means for a read on the cluster `view` describes. Pure: the
/// router calls it with its snapshot; see [`TokenVerdict`] for each outcome. In order: a token with
/// no system identifier, or another one, is foreign; one from another timeline than the writer's
/// is untrusted; with no writer known it is trusted ([`TokenVerdict::PrimaryUnknown`], never
/// "from the future"); otherwise it is from the future when its LSN is more than
/// [`TokenPolicy::tolerance`] beyond the known primary position (the probed primary LSN or the
/// highest commit this process saw, whichever is newer). A system identifier or timeline the
/// router does not know yet is not held against the token.
pub fn judge(token: &CausalToken, view: &ClusterView, policy: &TokenPolicy) -> TokenVerdict {
    if token.system_id == 0 {
        return TokenVerdict::Foreign(ForeignReason::Unbound);
    }
    if let Some(cluster) = view.system_id
        && cluster != token.system_id
    {
        return TokenVerdict::Foreign(ForeignReason::SystemId {
            token: token.system_id,
            cluster,
        });
    }
    if let Some(current) = view.timeline
        && current != token.timeline
    {
        return TokenVerdict::OtherTimeline {
            token: token.timeline,
            current,
        };
    }
    let Some(probed) = view.primary_lsn else {
        return TokenVerdict::PrimaryUnknown { lsn: token.lsn };
    };
    let primary = probed.max(view.max_commit_lsn);
    let tolerance = policy.tolerance(view);
    if token.lsn.bytes_after(primary) > tolerance {
        return TokenVerdict::FromTheFuture {
            lsn: token.lsn,
            primary,
            tolerance,
        };
    }
    TokenVerdict::Replicas { lsn: token.lsn }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u8, s: &str) -> TokenKey {
        TokenKey::new(id, s).expect("long enough")
    }

    fn sample() -> CausalToken {
        CausalToken {
            lsn: Lsn(0x1_0000_0042),
            timeline: 3,
            system_id: 7_300_000_000_000_000_001,
        }
    }

    #[test]
    fn round_trips_and_is_header_safe() {
        let codec = TokenCodec::new(key(1, "0123456789abcdef-current"));
        let text = codec.sign(&sample());
        assert_eq!(text.len(), MAX_TOKEN_TEXT);
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(codec.verify(&text), Ok(sample()));
    }

    #[test]
    fn rejects_tampering_in_every_byte() {
        let codec = TokenCodec::new(key(1, "0123456789abcdef-current"));
        let text = codec.sign(&sample());
        let raw = URL_SAFE_NO_PAD.decode(&text).expect("b64");
        for i in 0..raw.len() {
            let mut t = raw.clone();
            t[i] ^= 0x01;
            let forged = URL_SAFE_NO_PAD.encode(&t);
            assert!(codec.verify(&forged).is_err(), "byte {i} flip accepted");
        }
    }

    #[test]
    fn rejects_other_keys_and_garbage() {
        let ours = TokenCodec::new(key(1, "0123456789abcdef-current"));
        let theirs = TokenCodec::new(key(1, "another-server-key-000"));
        assert_eq!(
            ours.verify(&theirs.sign(&sample())),
            Err(TokenError::BadSignature)
        );
        for junk in [
            "",
            "x",
            "!!!!",
            &"A".repeat(51),
            &"A".repeat(10_000),
            "0/16B374D8",
        ] {
            assert!(ours.verify(junk).is_err(), "{junk:?}");
        }
        let text = ours.sign(&sample());
        assert!(ours.verify(&text[..50]).is_err());
    }

    #[test]
    fn rotation_accepts_previous_key_only_while_configured() {
        let old = TokenCodec::new(key(1, "old-key-0123456789"));
        let token = old.sign(&sample());
        let rotated = TokenCodec::new(key(2, "new-key-0123456789"))
            .with_previous(key(1, "old-key-0123456789"))
            .expect("distinct ids");
        assert_eq!(rotated.verify(&token), Ok(sample()));
        let after = TokenCodec::new(key(2, "new-key-0123456789"));
        assert_eq!(after.verify(&token), Err(TokenError::BadSignature));
    }

    #[test]
    fn merge_keeps_the_newer() {
        let a = CausalToken {
            lsn: Lsn(10),
            timeline: 1,
            system_id: 1,
        };
        let b = CausalToken {
            lsn: Lsn(20),
            timeline: 1,
            system_id: 1,
        };
        let c = CausalToken {
            lsn: Lsn(5),
            timeline: 2,
            system_id: 1,
        };
        assert_eq!(a.merge(b), b);
        assert_eq!(b.merge(a), b);
        assert_eq!(b.merge(c), c);
    }

    #[test]
    fn weak_keys_are_refused() {
        assert!(TokenKey::new(0, "short").is_err());
        assert!(!format!("{:?}", key(0, "0123456789abcdef-secret")).contains("secret\""));
    }

    #[test]
    fn duplicate_key_ids_are_refused_at_construction() {
        let codec = TokenCodec::new(key(1, "new-key-0123456789"));
        let err = codec
            .with_previous(key(1, "old-key-0123456789"))
            .expect_err("same id");
        assert_eq!(err, DuplicateKeyId(1));
        assert!(err.to_string().contains("id 1"), "{err}");
    }

    #[test]
    fn tokens_are_bound_to_the_configured_cluster() {
        // Same key, same system identifier (a clone), different configured identities.
        let k = "shared-key-0123456789";
        let prod = TokenCodec::new(key(1, k)).cluster("prod-eu");
        let staging = TokenCodec::new(key(1, k)).cluster("staging-eu");
        let unnamed = TokenCodec::new(key(1, k));
        let text = prod.sign(&sample());
        assert_eq!(text.len(), MAX_TOKEN_TEXT);
        assert_eq!(prod.verify(&text), Ok(sample()));
        assert_eq!(staging.verify(&text), Err(TokenError::ForeignCluster));
        assert_eq!(unnamed.verify(&text), Err(TokenError::ForeignCluster));
        assert_eq!(
            prod.verify(&unnamed.sign(&sample())),
            Err(TokenError::ForeignCluster)
        );
        // The identity is in the signed body: rewriting it breaks the signature.
        let mut raw = URL_SAFE_NO_PAD.decode(&text).expect("b64");
        raw[22..BODY_LEN].copy_from_slice(&cluster_tag("staging-eu"));
        assert_eq!(
            staging.verify(&URL_SAFE_NO_PAD.encode(&raw)),
            Err(TokenError::BadSignature)
        );
        // The previous key of a rotation is bound the same way.
        let rotated = TokenCodec::new(key(2, "next-key-0123456789"))
            .with_previous(key(1, k))
            .expect("distinct ids")
            .cluster("prod-eu");
        assert_eq!(rotated.verify(&text), Ok(sample()));
    }

    /// A token in the version-1 layout (no cluster tag), as an older process signed it.
    fn sign_v1(k: &TokenKey, token: &CausalToken) -> String {
        let mut buf = [0u8; V1_TOKEN_LEN];
        buf[0] = 1;
        buf[1] = k.id;
        buf[2..10].copy_from_slice(&token.lsn.0.to_be_bytes());
        buf[10..14].copy_from_slice(&token.timeline.to_be_bytes());
        buf[14..22].copy_from_slice(&token.system_id.to_be_bytes());
        let tag = k.mac(&buf[..V1_BODY_LEN]).finalize().into_bytes();
        buf[V1_BODY_LEN..].copy_from_slice(&tag[..MAC_LEN]);
        URL_SAFE_NO_PAD.encode(buf)
    }

    #[test]
    fn version_1_tokens_are_unbound_not_forged() {
        let k = key(1, "0123456789abcdef-current");
        let codec = TokenCodec::new(k.clone()).cluster("prod-eu");
        let v1 = sign_v1(&k, &sample());
        assert_eq!(v1.len(), V1_TOKEN_TEXT);
        assert_eq!(codec.verify(&v1), Err(TokenError::ForeignCluster));
        let theirs = sign_v1(&key(1, "another-server-key-000"), &sample());
        assert_eq!(codec.verify(&theirs), Err(TokenError::BadSignature));
    }

    const MIB: u64 = 1024 * 1024;

    fn token(lsn: u64) -> CausalToken {
        CausalToken {
            lsn: Lsn(lsn),
            timeline: 3,
            system_id: 42,
        }
    }

    /// A healthy cluster: writer at 1 GiB, probed just now, writing 1 MiB/s, 250 ms probes.
    fn view() -> ClusterView {
        ClusterView {
            system_id: Some(42),
            timeline: Some(3),
            primary_lsn: Some(Lsn(1024 * MIB)),
            primary_lsn_age: Some(Duration::ZERO),
            max_commit_lsn: Lsn::ZERO,
            probe_interval: Duration::from_millis(250),
            wal_rate: Some(MIB as f64),
        }
    }

    fn judged(t: CausalToken, v: &ClusterView) -> TokenVerdict {
        judge(&t, v, &TokenPolicy::default())
    }

    #[test]
    fn judge_serves_replicas_for_a_token_the_primary_can_have_written() {
        let v = view();
        for lsn in [0, 1000, 1024 * MIB, 1024 * MIB + 16 * MIB] {
            let verdict = judged(token(lsn), &v);
            assert_eq!(verdict, TokenVerdict::Replicas { lsn: Lsn(lsn) });
            assert_eq!(verdict.route(), Ok(Some(Lsn(lsn))));
            assert!(!verdict.is_untrusted());
        }
        // What this process committed itself counts as known, even ahead of the last probe.
        let v = ClusterView {
            max_commit_lsn: Lsn(2048 * MIB),
            ..view()
        };
        assert_eq!(
            judged(token(2048 * MIB + MIB), &v),
            TokenVerdict::Replicas {
                lsn: Lsn(2048 * MIB + MIB)
            }
        );
    }

    #[test]
    fn judge_reports_foreign_system_ids() {
        let v = judged(
            CausalToken {
                system_id: 7,
                ..token(100)
            },
            &view(),
        );
        assert_eq!(
            v,
            TokenVerdict::Foreign(ForeignReason::SystemId {
                token: 7,
                cluster: 42
            })
        );
        assert!(v.is_untrusted());
        assert_eq!(v.route(), Ok(None));
    }

    #[test]
    fn judge_never_trusts_a_token_without_a_system_id() {
        let unbound = CausalToken {
            system_id: 0,
            ..token(100)
        };
        // Not on a cluster that knows its id, nor on one that does not yet.
        for v in [
            view(),
            ClusterView {
                system_id: None,
                ..view()
            },
        ] {
            let verdict = judged(unbound, &v);
            assert_eq!(verdict, TokenVerdict::Foreign(ForeignReason::Unbound));
            assert_eq!(verdict.route(), Ok(None));
        }
    }

    #[test]
    fn judge_reports_other_timelines() {
        for tl in [2, 4, 0] {
            let t = CausalToken {
                timeline: tl,
                ..token(100)
            };
            let v = judged(t, &view());
            assert_eq!(
                v,
                TokenVerdict::OtherTimeline {
                    token: tl,
                    current: 3
                }
            );
            assert!(v.is_untrusted());
        }
        // A timeline the router has not seen yet is not held against the token.
        let v = ClusterView {
            timeline: None,
            ..view()
        };
        assert_eq!(
            judged(token(100), &v),
            TokenVerdict::Replicas { lsn: Lsn(100) }
        );
    }

    #[test]
    fn judge_rejects_the_far_future_with_a_tolerance_from_the_write_rate() {
        // 1 MiB/s for two 250 ms intervals is well under the 16 MiB floor: the floor applies.
        // The old fixed 256 MiB tolerance let a token 100 MiB ahead through (and every read
        // with it waited, then went to the primary).
        let v = view();
        assert_eq!(TokenPolicy::default().tolerance(&v), 16 * MIB);
        let primary = Lsn(1024 * MIB);
        for ahead in [16 * MIB + 1, 100 * MIB, u64::MAX - 1024 * MIB] {
            let verdict = judged(token(1024 * MIB + ahead), &v);
            assert_eq!(
                verdict,
                TokenVerdict::FromTheFuture {
                    lsn: Lsn(1024 * MIB + ahead),
                    primary,
                    tolerance: 16 * MIB
                }
            );
            assert_eq!(
                verdict.route(),
                Err(TokenError::FromTheFuture {
                    lsn: Lsn(1024 * MIB + ahead),
                    primary
                })
            );
        }

        // A busy primary (400 MiB/s) can write 200 MiB in two intervals: that is tolerated.
        let busy = ClusterView {
            wal_rate: Some(400.0 * MIB as f64),
            ..view()
        };
        assert_eq!(TokenPolicy::default().tolerance(&busy), 200 * MIB);
        assert!(
            judged(token(1024 * MIB + 200 * MIB), &busy)
                .replica_lsn()
                .is_some()
        );
        assert!(
            judged(token(1024 * MIB + 201 * MIB), &busy)
                .route()
                .is_err()
        );

        // An older probe widens the window by its age.
        let stale = ClusterView {
            primary_lsn_age: Some(Duration::from_secs(60)),
            ..view()
        };
        assert_eq!(
            TokenPolicy::default().tolerance(&stale),
            (60.5 * MIB as f64) as u64
        );

        // No rate measured yet, or a nonsense one: the floor.
        for rate in [None, Some(0.0), Some(-5.0), Some(f64::NAN)] {
            let v = ClusterView {
                wal_rate: rate,
                ..view()
            };
            assert_eq!(TokenPolicy::default().tolerance(&v), 16 * MIB, "{rate:?}");
        }
        // An absurd rate saturates instead of wrapping.
        let v = ClusterView {
            wal_rate: Some(f64::INFINITY),
            ..view()
        };
        assert_eq!(TokenPolicy::default().tolerance(&v), 16 * MIB);
        let v = ClusterView {
            wal_rate: Some(1e30),
            ..view()
        };
        assert_eq!(TokenPolicy::default().tolerance(&v), u64::MAX);
    }

    #[test]
    fn judge_never_says_future_while_the_primary_position_is_unknown() {
        // A process started during a primary outage: no writer, nothing committed yet.
        let outage = ClusterView {
            primary_lsn: None,
            primary_lsn_age: None,
            wal_rate: None,
            ..view()
        };
        for lsn in [1, 1024 * MIB, u64::MAX] {
            let v = judged(token(lsn), &outage);
            assert_eq!(v, TokenVerdict::PrimaryUnknown { lsn: Lsn(lsn) });
            assert_eq!(v.route(), Ok(Some(Lsn(lsn))));
        }
        // Identity checks still apply.
        let foreign = CausalToken {
            system_id: 7,
            ..token(1)
        };
        assert!(judged(foreign, &outage).is_untrusted());
    }

    #[test]
    fn the_view_comes_from_the_snapshot() {
        use crate::topology::Topology;
        use crate::{BanPolicy, Epoch, LagBounds, NodeConfig, ProbeReport};
        let nodes = [
            NodeConfig::writer("p", "postgres://p/db"),
            NodeConfig::replica("r", "postgres://r/db"),
        ];
        let mut t = Topology::new(
            &nodes,
            LagBounds::default(),
            BanPolicy::default(),
            Epoch::default(),
        );
        let interval = Duration::from_millis(250);
        let t0 = Instant::now();
        let empty = ClusterView::from_snapshot(&t.snapshot(), Lsn(5), interval, t0);
        assert_eq!(empty.primary_lsn, None);
        assert_eq!(empty.max_commit_lsn, Lsn(5));
        assert_eq!(
            judged(token(u64::MAX), &empty),
            TokenVerdict::PrimaryUnknown { lsn: Lsn(u64::MAX) }
        );

        let primary = |lsn: u64| ProbeReport {
            in_recovery: false,
            lsn: Some(Lsn(lsn)),
            receive_lsn: None,
            replay_age: None,
            timeline: Some(3),
            system_id: Some(42),
            started: None,
        };
        t.apply_probe(0, primary(0), t0);
        let t1 = t0 + Duration::from_secs(1);
        t.apply_probe(0, primary(8 * MIB), t1);
        let v = ClusterView::from_snapshot(&t.snapshot(), Lsn(5), interval, t1 + interval);
        assert_eq!(v.system_id, Some(42));
        assert_eq!(v.timeline, Some(3));
        assert_eq!(v.primary_lsn, Some(Lsn(8 * MIB)));
        assert_eq!(v.primary_lsn_age, Some(interval));
        assert_eq!(v.probe_interval, interval);
        assert!(
            v.wal_rate
                .is_some_and(|r| (r - 8.0 * MIB as f64).abs() < 1.0)
        );
        assert_eq!(
            judged(token(8 * MIB + 16 * MIB), &v),
            TokenVerdict::Replicas { lsn: Lsn(24 * MIB) }
        );
        assert!(judged(token(8 * MIB + 17 * MIB), &v).route().is_err());
    }
}
