//! The token cookie: just enough cookie syntax for one name, without a cookie crate.

use axum::http::{HeaderMap, HeaderValue, header};

/// The value of cookie `name` in the request's `Cookie` headers, if present.
pub(crate) fn find<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// How the layer writes the token cookie.
#[derive(Debug, Clone)]
pub(crate) struct CookieSettings {
    pub(crate) name: String,
    pub(crate) secure: bool,
    pub(crate) max_age_secs: u64,
}

impl CookieSettings {
    /// `Set-Cookie` carrying `value`: HttpOnly (scripts never need it), SameSite=Lax (sent on
    /// top-level navigation, not on cross-site subrequests), for the whole site.
    pub(crate) fn set(&self, value: &str) -> Option<HeaderValue> {
        self.header(value, self.max_age_secs)
    }

    /// `Set-Cookie` that removes the cookie (a bad token must not fail every later request).
    pub(crate) fn clear(&self) -> Option<HeaderValue> {
        self.header("", 0)
    }

    fn header(&self, value: &str, max_age: u64) -> Option<HeaderValue> {
        let secure = if self.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}",
            self.name
        ))
        .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_named_cookie_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; read_after=tok.en"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(find(&h, "read_after"), Some("tok.en"));
        assert_eq!(find(&h, "b"), Some("2"));
        assert_eq!(find(&h, "read"), None);
    }

    #[test]
    fn set_cookie_is_http_only_and_lax() {
        let c = CookieSettings {
            name: "read_after".into(),
            secure: true,
            max_age_secs: 600,
        };
        let v = c.set("abc").expect("valid header");
        assert_eq!(
            v.to_str().expect("ascii"),
            "read_after=abc; Path=/; Max-Age=600; HttpOnly; SameSite=Lax; Secure"
        );
        assert!(
            c.clear()
                .expect("valid")
                .to_str()
                .expect("ascii")
                .contains("Max-Age=0")
        );
    }
}
