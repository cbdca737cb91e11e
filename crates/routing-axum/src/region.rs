//! Where a request comes from, for replica locality, without trusting what clients claim.

use std::net::{IpAddr, SocketAddr};

use axum::extract::ConnectInfo;
use axum::http::HeaderName;
use axum::http::request::Parts;
use routing_core::Region;

/// Decides a request's region. Implemented for closures
/// `Fn(&Parts, Option<IpAddr>) -> Option<Region>` (the second argument is the peer's address,
/// when the server was started with `into_make_service_with_connect_info::<SocketAddr>()`).
pub trait RegionResolver: Send + Sync + 'static {
    /// The request's region, if known.
    fn region(&self, parts: &Parts, peer: Option<IpAddr>) -> Option<Region>;
}

impl<F> RegionResolver for F
where
    F: Fn(&Parts, Option<IpAddr>) -> Option<Region> + Send + Sync + 'static,
{
    fn region(&self, parts: &Parts, peer: Option<IpAddr>) -> Option<Region> {
        self(parts, peer)
    }
}

/// The peer's address, from axum's `ConnectInfo`.
pub(crate) fn peer_of(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// Addresses and networks (`10.0.0.0/8`, `::1`) whose headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// Adds an address or a CIDR network. Text that is neither is ignored with a warning, so a
    /// typo trusts nothing rather than everything.
    pub fn add(&mut self, net: &str) {
        match parse_net(net) {
            Some(n) => self.0.push(n),
            None => tracing::warn!(net, "not an address or network; not trusted"),
        }
    }

    /// Is `ip` one of them?
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|&(net, len)| in_net(ip, net, len))
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn parse_net(text: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a.parse::<IpAddr>().ok()?, Some(l.parse::<u8>().ok()?)),
        None => (text.parse::<IpAddr>().ok()?, None),
    };
    let addr = canonical(addr);
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    (len <= max).then_some((addr, len))
}

fn in_net(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// The region from a request header (set by an edge proxy or load balancer), believed only when
/// the request came straight from a trusted proxy; otherwise the service's own region, if set.
/// A client that sends the header itself cannot pick a replica.
#[derive(Debug, Clone)]
pub struct RegionHeader {
    header: HeaderName,
    trusted: TrustedProxies,
    fallback: Option<Region>,
}

impl RegionHeader {
    /// Reads `header` (for example `x-region`); trusts no one until [`RegionHeader::trust_proxy`].
    /// A name that is not a valid header name falls back to `x-region`.
    pub fn new(header: &str) -> Self {
        RegionHeader {
            header: HeaderName::try_from(header).unwrap_or(HeaderName::from_static("x-region")),
            trusted: TrustedProxies::default(),
            fallback: None,
        }
    }

    /// Believes the header from this address or network (`10.0.0.0/8`, `127.0.0.1`).
    pub fn trust_proxy(mut self, net: &str) -> Self {
        self.trusted.add(net);
        self
    }

    /// The region of requests without a believable header (usually the service's own).
    pub fn fallback(mut self, region: impl Into<Region>) -> Self {
        self.fallback = Some(region.into());
        self
    }
}

impl RegionResolver for RegionHeader {
    fn region(&self, parts: &Parts, peer: Option<IpAddr>) -> Option<Region> {
        let trusted = peer.is_some_and(|ip| self.trusted.contains(ip));
        let claimed = parts
            .headers
            .get(&self.header)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty() && v.len() <= 64);
        match claimed {
            Some(name) if trusted => Some(Region::new(name)),
            Some(name) => {
                tracing::debug!(
                    ?peer,
                    region = name,
                    "region header from an untrusted peer ignored"
                );
                self.fallback.clone()
            }
            None => self.fallback.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_match_their_members_only() {
        let mut t = TrustedProxies::default();
        t.add("10.0.0.0/8");
        t.add("::1");
        t.add("192.168.1.7");
        t.add("not an address");
        t.add("10.0.0.0/33");
        assert!(t.contains("10.200.3.4".parse().expect("ip")));
        assert!(!t.contains("11.0.0.1".parse().expect("ip")));
        assert!(t.contains("::1".parse().expect("ip")));
        assert!(t.contains("192.168.1.7".parse().expect("ip")));
        assert!(!t.contains("192.168.1.8".parse().expect("ip")));
        assert!(
            t.contains("::ffff:10.1.1.1".parse().expect("ip")),
            "v4-mapped v6"
        );
        let mut all = TrustedProxies::default();
        all.add("0.0.0.0/0");
        assert!(all.contains("8.8.8.8".parse().expect("ip")));
    }

    #[test]
    fn the_header_is_believed_only_from_a_trusted_peer() {
        let r = RegionHeader::new("x-region")
            .trust_proxy("127.0.0.1")
            .fallback("home");
        let req = axum::http::Request::builder()
            .header("x-region", "eu")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        let local = Some("127.0.0.1".parse().expect("ip"));
        let remote = Some("203.0.113.9".parse().expect("ip"));
        assert_eq!(r.region(&parts, local), Some(Region::new("eu")));
        assert_eq!(r.region(&parts, remote), Some(Region::new("home")));
        assert_eq!(r.region(&parts, None), Some(Region::new("home")));
    }
}
