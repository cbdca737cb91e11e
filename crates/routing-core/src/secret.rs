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
///
/// Masked: the password of every `scheme://user:password@host` (the userinfo runs to the *last*
/// `@` before whitespace, so a raw `@`, `/`, `?` or `#` in the password is masked too, at the cost
/// of masking more than needed when a query value holds an `@`); the value of every `key=value`
/// whose key, percent-decoded and case-folded, contains `password` (`password`, `sslpassword`,
/// `pass%77ord`, `PGPASSWORD`), with blanks around `=`, single- or double-quoted values, in URL
/// queries (value ends at `&`, `#` or a blank) and in conninfo (value ends at a blank, as libpq
/// reads it); and Rust Debug renderings such as `password: Some("...")`. When in doubt it masks
/// more, never less.
pub fn redact(s: &str) -> String {
    mask_password_params(&mask_url_userinfo(s))
}

fn is_blank(b: u8) -> bool {
    b.is_ascii_whitespace()
}

/// `scheme://user:pass@host` -> `scheme://user:***@host`, for every URL in the text.
fn mask_url_userinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        // Not the authority's end (the first `/?#`): a password may hold those characters raw,
        // and then the userinfo only ends at the last `@`.
        let end = tail.bytes().position(is_blank).unwrap_or(tail.len());
        let url = &tail[..end];
        match url.rfind('@') {
            Some(at) => match url[..at].find(':') {
                Some(colon) => {
                    out.push_str(&url[..colon]);
                    out.push_str(":***");
                    out.push_str(&url[at..]);
                }
                None => out.push_str(url),
            },
            None => out.push_str(url),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Bytes a parameter name may hold (`%` for percent-encoded names such as `pass%77ord`).
fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'%')
}

/// Whether a parameter name, percent-decoded and case-folded as a driver would read it, names a
/// password.
fn names_a_password(key: &[u8]) -> bool {
    let mut decoded = Vec::with_capacity(key.len());
    let mut i = 0;
    while i < key.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if key[i] == b'%'
            && let (Some(h), Some(l)) = (
                key.get(i + 1).copied().and_then(hex),
                key.get(i + 2).copied().and_then(hex),
            )
        {
            decoded.push((h * 16 + l) as u8);
            i += 3;
        } else {
            decoded.push(key[i]);
            i += 1;
        }
    }
    decoded.make_ascii_lowercase();
    decoded.windows(8).any(|w| w == b"password")
}

/// End of a quoted value starting at `start` (the opening quote): just past the closing quote,
/// skipping backslash escapes, or the end of the text when it is not closed.
fn quoted_end(bytes: &[u8], start: usize) -> usize {
    let quote = bytes[start];
    let mut end = start + 1;
    while end < bytes.len() && bytes[end] != quote {
        end += if bytes[end] == b'\\' { 2 } else { 1 };
    }
    (end + 1).min(bytes.len())
}

/// Values of password parameters: `password=...` in query strings (`?password=x&...`, also with a
/// percent-encoded name) and conninfo (`password=x user=y`, `password = 'a b'`), and Debug output
/// (`password: "x"`, `password: Some("x")`) and JSON (`"password": "x"`).
fn mask_password_params(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut copied = 0;
    let mut pos = 0;
    while let Some(off) = bytes[pos..].iter().position(|b| matches!(b, b'=' | b':')) {
        let sep = pos + off;
        pos = sep + 1;
        let mut key_end = sep;
        while key_end > copied && matches!(bytes[key_end - 1], b' ' | b'\t') {
            key_end -= 1;
        }
        // JSON and similar: `"password": "x"`.
        if key_end > copied && matches!(bytes[key_end - 1], b'"' | b'\'') {
            key_end -= 1;
        }
        let mut key_start = key_end;
        while key_start > copied && is_key_byte(bytes[key_start - 1]) {
            key_start -= 1;
        }
        if key_start == key_end || !names_a_password(&bytes[key_start..key_end]) {
            continue;
        }
        let mut value_start = sep + 1;
        while value_start < bytes.len() && matches!(bytes[value_start], b' ' | b'\t') {
            value_start += 1;
        }
        let value_end = if bytes[sep] == b':' {
            // Debug output only: a quoted string, bare or in `Some(..)`. Anything else after a
            // colon is prose ("password: authentication failed"), not a value.
            let rest = &s[value_start..];
            let quote_at = if rest.starts_with('"') {
                value_start
            } else if rest.starts_with("Some(\"") {
                value_start + 5
            } else {
                continue;
            };
            value_start = quote_at;
            quoted_end(bytes, quote_at)
        } else if matches!(bytes.get(value_start), Some(b'\'' | b'"')) {
            quoted_end(bytes, value_start)
        } else if key_start > 0 && matches!(bytes[key_start - 1], b'?' | b'&') {
            // URL query: the value ends where the next parameter or the fragment starts.
            let n = bytes[value_start..]
                .iter()
                .position(|&b| is_blank(b) || matches!(b, b'&' | b'#'))
                .unwrap_or(bytes.len() - value_start);
            value_start + n
        } else {
            // conninfo: libpq reads an unquoted value up to the next blank (`&`, `;`, `,` are
            // part of it); a backslash escapes the next character.
            let mut end = value_start;
            while end < bytes.len() && !is_blank(bytes[end]) {
                end += if bytes[end] == b'\\' { 2 } else { 1 };
            }
            end.min(bytes.len())
        };
        out.push_str(&s[copied..value_start]);
        out.push_str("***");
        copied = value_end;
        pos = value_end;
    }
    out.push_str(&s[copied..]);
    out
}

/// A driver error kept for its type, whose Display, Debug and every cause's Display and Debug go
/// through [`redact`]: nothing printed through the error chain (`{}`, `{:?}`, walking
/// [`std::error::Error::source`], `anyhow`'s `{:#}`) can show a password the driver echoed.
///
/// The texts are rendered and redacted once, when the error is wrapped. The original error stays
/// reachable through [`RedactedError::downcast_ref`] and [`RedactedError::original`]; its own
/// Display is *not* redacted, so do not log what those return.
pub struct RedactedError(Box<Wrapped>);

/// Behind one box, so an `Option<RedactedError>` in an error type is one pointer wide.
struct Wrapped {
    text: RedactedText,
    original: Box<dyn std::error::Error + Send + Sync + 'static>,
}

/// One error of a chain, as redacted text.
struct RedactedText {
    display: String,
    debug: String,
    cause: Option<Box<RedactedText>>,
}

/// Causes rendered below a wrapped error; deeper ones are dropped (chains are a few levels deep).
const MAX_CAUSES: usize = 32;

impl RedactedText {
    fn of(err: &(dyn std::error::Error + 'static), depth: usize) -> Self {
        RedactedText {
            display: redact(&err.to_string()),
            debug: redact(&format!("{err:?}")),
            cause: err
                .source()
                .filter(|_| depth < MAX_CAUSES)
                .map(|c| Box::new(RedactedText::of(c, depth + 1))),
        }
    }
}

impl RedactedError {
    /// Wraps a driver error.
    pub fn new(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::from_boxed(Box::new(err))
    }

    /// Wraps an already boxed error.
    pub fn from_boxed(err: Box<dyn std::error::Error + Send + Sync + 'static>) -> Self {
        RedactedError(Box::new(Wrapped {
            text: RedactedText::of(&*err, 0),
            original: err,
        }))
    }

    /// The wrapped error as its concrete type, if it is a `T`. Its own Display is not redacted.
    pub fn downcast_ref<T: std::error::Error + 'static>(&self) -> Option<&T> {
        self.0.original.downcast_ref::<T>()
    }

    /// The wrapped error. Its own Display is not redacted: do not log it.
    pub fn original(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0.original
    }

    /// Unwraps the original error. Its own Display is not redacted: do not log it.
    pub fn into_original(self) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self.0.original
    }
}

impl fmt::Display for RedactedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.text.display)
    }
}

impl fmt::Debug for RedactedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.text.debug)
    }
}

impl std::error::Error for RedactedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .text
            .cause
            .as_deref()
            .map(|c| c as &(dyn std::error::Error + 'static))
    }
}

impl fmt::Display for RedactedText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

impl fmt::Debug for RedactedText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.debug)
    }
}

impl std::error::Error for RedactedText {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|c| c as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Neither the password nor any encoding of it may appear in what is shown.
    fn assert_hidden(shown: &str, secrets: &[&str]) {
        for secret in secrets {
            assert!(!shown.contains(secret), "{secret:?} leaked in {shown:?}");
        }
    }

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
    fn masks_percent_encoded_password_keys() {
        // sqlx percent-decodes query keys, so `pass%77ord` is `password` to it.
        let cases = [
            (
                "postgres://app@db/x?pass%77ord=s3cret&sslmode=off",
                "postgres://app@db/x?pass%77ord=***&sslmode=off",
            ),
            (
                "postgres://app@db/x?sslmode=off&PASS%57ORD=s3cret",
                "postgres://app@db/x?sslmode=off&PASS%57ORD=***",
            ),
            (
                "postgres://app@db/x?%70%61%73%73%77%6f%72%64=s%33cret",
                "postgres://app@db/x?%70%61%73%73%77%6f%72%64=***",
            ),
        ];
        for (input, want) in cases {
            let c = ConnString::new(input);
            assert_eq!(c.to_string(), want);
            assert_hidden(&format!("{c} {c:?}"), &["s3cret", "s%33cret"]);
        }
    }

    #[test]
    fn masks_raw_separators_in_url_passwords() {
        let cases = [
            ("postgres://u:pa?ss/wd@host/db", "postgres://u:***@host/db"),
            (
                "postgres://u:pa/ss?wd@host:5432/db?sslmode=off",
                "postgres://u:***@host:5432/db?sslmode=off",
            ),
            ("postgres://u:p@ss/w#d@host/db", "postgres://u:***@host/db"),
            (
                "connect postgres://u:pa?ss/wd@host/db: refused",
                "connect postgres://u:***@host/db: refused",
            ),
        ];
        for (input, want) in cases {
            let c = ConnString::new(input);
            assert_eq!(c.to_string(), want);
            assert_hidden(
                &format!("{c} {c:?}"),
                &["pa?ss", "ss/wd", "pa/ss", "ss?wd", "p@ss", "ss/w#d", "w#d"],
            );
        }
    }

    #[test]
    fn masks_conninfo_with_blanks_quotes_and_sslpassword() {
        let cases = [
            (
                "host=db password = s3cret user=app",
                "host=db password = *** user=app",
            ),
            (
                "host=db password\t=\ts3cret user=app",
                "host=db password\t=\t*** user=app",
            ),
            (
                "host=db password = 'a b s3cret' user=app",
                "host=db password = *** user=app",
            ),
            (
                r"host=db password='it\'s s3cret' user=app",
                "host=db password=*** user=app",
            ),
            (
                "host=db sslpassword=s3cret sslkey=/k.pem",
                "host=db sslpassword=*** sslkey=/k.pem",
            ),
            (
                "postgres://u@h/db?sslpassword=s3cret&sslmode=verify-full",
                "postgres://u@h/db?sslpassword=***&sslmode=verify-full",
            ),
            // libpq reads an unquoted value to the next blank: `&`, `;` and `,` are part of it.
            (
                "host=db password=s3&cr;et,x user=app",
                "host=db password=*** user=app",
            ),
            ("PGPASSWORD=s3cret psql", "PGPASSWORD=*** psql"),
        ];
        for (input, want) in cases {
            let c = ConnString::new(input);
            assert_eq!(c.to_string(), want);
            assert_hidden(&format!("{c} {c:?}"), &["s3cret", "s3&cr", "cr;et", "a b"]);
        }
    }

    #[test]
    fn masks_debug_and_json_renderings() {
        let cases = [
            (
                r#"PgConnectOptions { host: "h", password: Some("s3cret"), port: 5432 }"#,
                r#"PgConnectOptions { host: "h", password: Some(***), port: 5432 }"#,
            ),
            (
                r#"Config { password: "s3\"cret", user: "u" }"#,
                r#"Config { password: ***, user: "u" }"#,
            ),
            (
                r#"{"user": "u", "password": "s3cret"}"#,
                r#"{"user": "u", "password": ***}"#,
            ),
            // Prose is not a value.
            (
                "FATAL: password authentication failed for user \"app\"",
                "FATAL: password authentication failed for user \"app\"",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(redact(input), want);
            assert_hidden(&redact(input), &["s3cret", "s3\\\"cret"]);
        }
    }

    #[test]
    fn redacts_urls_inside_error_text() {
        let msg = "error connecting to postgres://u:hunter2@10.0.0.1/db: refused";
        assert!(!redact(msg).contains("hunter2"));
        let two = "tried postgres://a:one1@h1/db then postgres://b:two2@h2/db?password=three3";
        assert_hidden(&redact(two), &["one1", "two2", "three3"]);
    }

    #[test]
    fn redaction_never_panics_on_odd_text() {
        for s in [
            "=",
            ":",
            "password=",
            "password",
            "password='",
            "password=\\",
            "://",
            "://@",
            "a://:@",
            "password=\\é",
            "pass%7",
            "pass%=x",
            "é://ü:ö@ä?password=ß&x",
            "password: Some(\"",
            "\"password\":",
        ] {
            let out = redact(s);
            assert!(!out.contains('ß') && !out.contains('ö'), "{s:?} -> {out:?}");
        }
    }

    /// A driver error that echoes the URL, caused by one that echoes the conninfo.
    #[derive(Debug)]
    struct DriverError {
        url: String,
        cause: Option<Box<DriverError>>,
    }

    impl fmt::Display for DriverError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "cannot connect to {}", self.url)
        }
    }

    impl std::error::Error for DriverError {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.cause
                .as_deref()
                .map(|c| c as &(dyn std::error::Error + 'static))
        }
    }

    /// Every Display and Debug along an error chain.
    fn everything_shown(err: &(dyn std::error::Error + 'static)) -> String {
        let mut shown = format!("{err} | {err:?} | {err:#?}");
        let mut cause = err.source();
        while let Some(c) = cause {
            shown.push_str(&format!(" | {c} | {c:?} | {c:#?}"));
            cause = c.source();
        }
        shown
    }

    #[test]
    fn backend_error_sources_are_redacted_and_still_reachable() {
        use crate::{BackendError, Error, ErrorKind};
        let driver = DriverError {
            url: "postgres://app:hunter2@db/x?pass%77ord=hunter3".into(),
            cause: Some(Box::new(DriverError {
                url: "host=db password = 'hunter 4' sslpassword=hunter5".into(),
                cause: None,
            })),
        };
        let err = BackendError::new(ErrorKind::Connection, driver.to_string()).with_source(driver);
        let secrets = ["hunter2", "hunter3", "hunter 4", "hunter5"];
        let shown = everything_shown(&err);
        assert_hidden(&shown, &secrets);
        assert!(
            shown.contains("cannot connect to postgres://app:***@db"),
            "{shown}"
        );
        assert!(
            shown.contains("sslpassword=***"),
            "the cause is shown: {shown}"
        );

        let routed = Error::Backend {
            node: "primary".into(),
            source: err,
        };
        assert_hidden(&everything_shown(&routed), &secrets);

        // The driver's error is still there, for code that matches on it.
        let Error::Backend { source, .. } = routed else {
            unreachable!()
        };
        let wrapped = source.source.expect("source kept");
        let original = wrapped.downcast_ref::<DriverError>().expect("driver type");
        assert!(original.url.contains("hunter2"));
        assert!(wrapped.original().is::<DriverError>());
        assert!(wrapped.into_original().downcast::<DriverError>().is_ok());
    }
}
