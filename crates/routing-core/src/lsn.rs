//! PostgreSQL write-ahead-log positions.

use std::fmt;
use std::str::FromStr;

/// A WAL position (`pg_lsn`), ordered like PostgreSQL orders them.
///
/// Text form is PostgreSQL's `X/Y` (two hex numbers of at most 8 digits each).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

/// Why a string is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid LSN {text:?}: expected two hex numbers of 1-8 digits separated by '/' (e.g. 16/B374D848)"
)]
pub struct LsnParseError {
    /// The rejected text, cut to 64 characters so a hostile input cannot bloat logs.
    pub text: String,
}

impl Lsn {
    /// The zero position, `0/0`.
    pub const ZERO: Lsn = Lsn(0);

    /// Bytes from `other` up to `self`; zero when `other` is ahead.
    pub fn bytes_after(self, other: Lsn) -> u64 {
        self.0.saturating_sub(other.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError {
            text: s.chars().take(64).collect(),
        };
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |part: &str| -> Result<u64, LsnParseError> {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u64::from_str_radix(part, 16).map_err(|_| err())
        };
        Ok(Lsn((half(hi)? << 32) | half(lo)?))
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_postgres_text() {
        let l: Lsn = "16/B374D848".parse().expect("valid");
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().expect("zero"), Lsn::ZERO);
        assert_eq!(
            "ffffffff/ffffffff".parse::<Lsn>().expect("max"),
            Lsn(u64::MAX)
        );
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "1",
            "1/2/3",
            "g/1",
            "1/ 2",
            " 1/2",
            "123456789/0",
            "-1/0",
            "+1/0",
            "1/0x1",
            "０/0",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn orders_and_measures_distance() {
        let a = Lsn(100);
        let b = Lsn(350);
        assert!(a < b);
        assert_eq!(b.bytes_after(a), 250);
        assert_eq!(a.bytes_after(b), 0);
    }
}
