//! Signed causal tokens: "this client has seen the cluster at least at LSN X on timeline T".

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::Lsn;

const VERSION: u8 = 1;
const MAC_LEN: usize = 16;
const BODY_LEN: usize = 1 + 1 + 8 + 4 + 8;
const TOKEN_LEN: usize = BODY_LEN + MAC_LEN;
/// Longest text a token can be; longer input is rejected before decoding.
pub const MAX_TOKEN_TEXT: usize = (TOKEN_LEN * 4).div_ceil(3);

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
    /// Signed by us but for another cluster (system identifier differs).
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

/// Signs with the current key, verifies with the current or the previous one (key rotation).
#[derive(Debug, Clone)]
pub struct TokenCodec {
    current: TokenKey,
    previous: Option<TokenKey>,
}

impl TokenCodec {
    /// A codec that signs and verifies with `current`.
    pub fn new(current: TokenKey) -> Self {
        TokenCodec {
            current,
            previous: None,
        }
    }

    /// Also accept tokens signed with `previous` (during a rotation).
    pub fn with_previous(mut self, previous: TokenKey) -> Self {
        self.previous = Some(previous);
        self
    }

    /// The token as compact URL/header-safe text (51 characters).
    pub fn sign(&self, token: &CausalToken) -> String {
        let mut buf = [0u8; TOKEN_LEN];
        buf[0] = VERSION;
        buf[1] = self.current.id;
        buf[2..10].copy_from_slice(&token.lsn.0.to_be_bytes());
        buf[10..14].copy_from_slice(&token.timeline.to_be_bytes());
        buf[14..22].copy_from_slice(&token.system_id.to_be_bytes());
        let tag = self.current.mac(&buf[..BODY_LEN]).finalize().into_bytes();
        buf[BODY_LEN..].copy_from_slice(&tag[..MAC_LEN]);
        URL_SAFE_NO_PAD.encode(buf)
    }

    /// Decodes and checks the signature. Does not judge the LSN or cluster: the router does, since
    /// it knows the topology.
    pub fn verify(&self, text: &str) -> Result<CausalToken, TokenError> {
        let text = text.trim();
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
        let key = [Some(&self.current), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|k| k.id == buf[1])
            .ok_or(TokenError::BadSignature)?;
        key.mac(&buf[..BODY_LEN])
            .verify_truncated_left(&buf[BODY_LEN..])
            .map_err(|_| TokenError::BadSignature)?;
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
            .with_previous(key(1, "old-key-0123456789"));
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
}
