//! Connection strings whose passwords never reach Debug, Display, logs or errors.

use std::fmt;

/// A connection URL or key=value conninfo string. Debug and Display print it with every password
/// replaced by `***` (the `user:pass@` form, `password=` parameters and `?password=` query
/// parameters alike). Only [`ConnString::expose`] gives the real text, for the driver.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnString(String);

impl ConnString {
    /// Wraps a connection string.
    pub fn new(s: impl Into<String>) -> Self {
        ConnString(s.into())
    }

    /// The real string, password included: hand it to the driver, never to a log.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The string with passwords masked.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }
}

impl From<&str> for ConnString {
    fn from(s: &str) -> Self {
        ConnString::new(s)
    }
}

impl From<String> for ConnString {
    fn from(s: String) -> Self {
        ConnString(s)
    }
}

impl fmt::Debug for ConnString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnString({:?})", self.redacted())
    }
}

impl fmt::Display for ConnString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Masks passwords in any text that may contain a connection string (also used on driver error
/// messages, which sometimes echo the URL).
pub fn redact(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    // userinfo of every `scheme://user:pass@host` occurrence
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        let authority_end = tail.find(['/', '?', '#', ' ', '\n']).unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    mask_password_params(&out)
}

/// `password=...` in query strings (`?password=x&...`) and conninfo (`password=x user=y`, or quoted).
fn mask_password_params(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while let Some(found) = lower[i..].find("password=") {
        let start = i + found;
        let boundary_ok = start == 0
            || matches!(
                s.as_bytes()[start - 1],
                b'?' | b'&' | b' ' | b'\t' | b'\n' | b';' | b','
            );
        let value_start = start + "password=".len();
        out.push_str(&s[i..value_start]);
        if !boundary_ok {
            i = value_start;
            continue;
        }
        let bytes = s.as_bytes();
        let mut end = value_start;
        if bytes.get(end) == Some(&b'\'') {
            end += 1;
            while end < bytes.len() && bytes[end] != b'\'' {
                end += if bytes[end] == b'\\' { 2 } else { 1 };
            }
            end = (end + 1).min(bytes.len());
        } else {
            while end < bytes.len()
                && !matches!(bytes[end], b'&' | b' ' | b'\t' | b'\n' | b'#' | b';' | b',')
            {
                end += 1;
            }
        }
        out.push_str("***");
        i = end;
    }
    out.push_str(&s[i..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_password_form() {
        let cases = [
            (
                "postgres://app:s3cret@db:5432/x",
                "postgres://app:***@db:5432/x",
            ),
            (
                "postgres://app@db/x?password=s3cret&sslmode=off",
                "postgres://app@db/x?password=***&sslmode=off",
            ),
            (
                "host=db user=app password=s3cret dbname=x",
                "host=db user=app password=*** dbname=x",
            ),
            (
                "host=db password='s3 cret' user=app",
                "host=db password=*** user=app",
            ),
            (
                "postgres://a:p%40ss@h1,h2/db?target_session_attrs=read-write",
                "postgres://a:***@h1,h2/db?target_session_attrs=read-write",
            ),
            ("postgres://db/x", "postgres://db/x"),
        ];
        for (input, want) in cases {
            let c = ConnString::new(input);
            assert_eq!(c.to_string(), want);
            let dbg = format!("{c:?}");
            assert!(!dbg.contains("s3cret") && !dbg.contains("p%40ss"), "{dbg}");
        }
    }

    #[test]
    fn redacts_urls_inside_error_text() {
        let msg = "error connecting to postgres://u:hunter2@10.0.0.1/db: refused";
        assert!(!redact(msg).contains("hunter2"));
    }
}
