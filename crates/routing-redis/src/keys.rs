//! Redis key names: a configurable namespace plus the SHA-256 of the user id in hex.
//!
//! Hashing makes every id, whatever its bytes (empty, megabytes long, `:`, `*`, `{`, newlines,
//! invalid UTF-8), a fixed-size key of 64 lowercase hex digits: keys cannot collide (short of a
//! SHA-256 collision), cannot escape the namespace, cannot act as glob patterns in `SCAN MATCH`,
//! and do not leak the id itself into Redis.

use std::fmt::Write as _;

use routing_core::UserKey;
use sha2::{Digest, Sha256};

/// Name of the per-store (or, in cluster mode, per-slot-group) key that records when the current
/// Redis data set started: see the crate docs on restarts.
const EPOCH: &str = "epoch";

#[derive(Debug, Clone)]
pub(crate) struct KeyLayout {
    prefix: String,
    /// Cluster mode: put a `{xx}` hash tag (first digest byte) in every key so that a user's mark
    /// and the epoch key its script reads live in the same slot, while marks still spread over
    /// 256 slot groups.
    tagged: bool,
}

/// The two keys one operation touches; both go to the script as `KEYS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Keys {
    pub(crate) mark: String,
    pub(crate) epoch: String,
}

impl KeyLayout {
    pub(crate) fn new(prefix: &str, tagged: bool) -> Result<Self, String> {
        if prefix.is_empty() {
            return Err("the key prefix must not be empty (marks must live in a namespace)".into());
        }
        if prefix.len() > 256 {
            return Err("the key prefix must be at most 256 bytes".into());
        }
        if let Some(c) = prefix
            .chars()
            .find(|c| matches!(c, '{' | '}') || c.is_control() || c.is_whitespace())
        {
            return Err(format!(
                "the key prefix must not contain {c:?} (braces are hash tags in Redis Cluster; \
                 control characters and whitespace make keys hard to handle)"
            ));
        }
        Ok(KeyLayout {
            prefix: prefix.to_owned(),
            tagged,
        })
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn keys(&self, user: &UserKey) -> Keys {
        let digest = Sha256::digest(user.as_bytes());
        // prefix + "{xx}:" + 64 hex digits
        let mut mark = String::with_capacity(self.prefix.len() + 5 + 64);
        mark.push_str(&self.prefix);
        let epoch = if self.tagged {
            let _ = write!(mark, "{{{:02x}}}:", digest[0]);
            let mut e = mark.clone();
            e.push_str(EPOCH);
            e
        } else {
            format!("{}{EPOCH}", self.prefix)
        };
        for b in digest {
            let _ = write!(mark, "{b:02x}");
        }
        Keys { mark, epoch }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced_fixed_size_hex() {
        let l = KeyLayout::new("app:m:", false).expect("layout");
        let k = l.keys(&UserKey::from("alice"));
        assert_eq!(
            k.mark,
            // sha256("alice")
            "app:m:2bd806c97f0e00af1a1fc3328fa763a9269723c8db8fac4f93af71db186d6e90"
        );
        assert_eq!(k.epoch, "app:m:epoch");
        let empty = l.keys(&UserKey::new(b""));
        assert_eq!(empty.mark.len(), "app:m:".len() + 64);
        assert_ne!(empty.mark, k.mark);
    }

    #[test]
    fn cluster_keys_share_a_hash_tag_with_their_epoch() {
        let l = KeyLayout::new("p:", true).expect("layout");
        let k = l.keys(&UserKey::from("alice"));
        assert_eq!(
            k.mark,
            "p:{2b}:2bd806c97f0e00af1a1fc3328fa763a9269723c8db8fac4f93af71db186d6e90"
        );
        assert_eq!(k.epoch, "p:{2b}:epoch");
    }

    #[test]
    fn bad_prefixes_are_rejected() {
        for p in ["", "a{b", "a}b", "a b", "a\nb"] {
            assert!(KeyLayout::new(p, false).is_err(), "{p:?}");
        }
        assert!(KeyLayout::new(&"x".repeat(257), false).is_err());
        assert!(KeyLayout::new("routing:mark:", true).is_ok());
    }
}
