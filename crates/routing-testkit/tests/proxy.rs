//! The fault proxy in front of a real server.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use routing_testkit::{FaultProxy, ProxyMode, shared};

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

#[test]
fn pass_mode_talks_to_postgres() {
    let c = shared();
    let p = c.proxy(0).unwrap();
    assert_eq!(p.mode(), ProxyMode::Pass);
    assert_eq!(ssl_probe(p.port(), Duration::from_secs(5)).unwrap(), b'N');
    // A full session through the proxy: startup, auth ok, a query.
    let mut s = TcpStream::connect(addr(p.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&startup("postgres")).unwrap();
    let seen = read_until_ready(&mut s).unwrap();
    assert_eq!(seen.first(), Some(&b'R'));
    s.write_all(&query("SELECT 42")).unwrap();
    let seen = read_until_ready(&mut s).unwrap();
    assert!(seen.contains(&b'D'), "no data row: {seen:?}");
}

#[test]
fn blackhole_hangs_new_and_existing_connections() {
    let c = shared();
    let p = c.proxy(1).unwrap();

    // An existing session, set up while passing.
    let mut s = TcpStream::connect(addr(p.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&startup("postgres")).unwrap();
    read_until_ready(&mut s).unwrap();

    p.set_mode(ProxyMode::Blackhole);
    // New connection: TCP connects (the proxy accepts) but the server's reply never comes.
    let t = Instant::now();
    let e = ssl_probe(p.port(), Duration::from_secs(1)).unwrap_err();
    assert!(is_timeout(&e), "expected a timeout, got {e}");
    assert!(t.elapsed() >= Duration::from_millis(900));
    // Existing connection: the query is swallowed.
    s.write_all(&query("SELECT 1")).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut b = [0u8; 1];
    let e = s.read(&mut b).unwrap_err();
    assert!(is_timeout(&e), "expected a timeout, got {e}");

    // Healed: held data flows again, and new connections work.
    p.set_mode(ProxyMode::Pass);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let seen = read_until_ready(&mut s).unwrap();
    assert!(seen.contains(&b'D'), "{seen:?}");
    assert_eq!(ssl_probe(p.port(), Duration::from_secs(5)).unwrap(), b'N');
}

#[test]
fn delay_adds_latency_each_way() {
    let c = shared();
    let p = c.proxy(0).unwrap();
    let direct = Instant::now();
    ssl_probe(c.node(0).port(), Duration::from_secs(5)).unwrap();
    let direct = direct.elapsed();
    p.set_mode(ProxyMode::Delay(Duration::from_millis(200)));
    let t = Instant::now();
    assert_eq!(ssl_probe(p.port(), Duration::from_secs(5)).unwrap(), b'N');
    let rtt = t.elapsed();
    eprintln!("round trip direct {direct:?}, through a 200 ms delay {rtt:?}");
    assert!(
        rtt >= Duration::from_millis(390),
        "round trip {rtt:?} < 2 x 200 ms"
    );
    assert!(rtt < Duration::from_secs(3), "round trip {rtt:?}");
}

#[test]
fn dropped_proxy_stops_listening_and_cuts_connections() {
    let c = shared();
    let p = FaultProxy::start(addr(c.node(0).port())).unwrap();
    let port = p.port();
    let mut s = TcpStream::connect(addr(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&SSL_REQUEST).unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    let t = Instant::now();
    drop(p);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "drop took {:?}",
        t.elapsed()
    );
    assert!(
        TcpStream::connect(addr(port)).is_err(),
        "still listening after drop"
    );
    // The old connection is closed (EOF or reset), not left hanging.
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
}

#[test]
fn proxy_to_a_dead_target_closes_the_client() {
    // A port nothing listens on: the proxy accepts, fails to connect upstream, and hangs up.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap();
    drop(l);
    let p = FaultProxy::start(dead).unwrap();
    let mut s = TcpStream::connect(addr(p.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
}

/// A listener that greets every connection with one tag byte and keeps it open.
fn greeter(tag: u8) -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut keep = Vec::new();
        for s in l.incoming().flatten() {
            let mut s = s;
            let _ = s.write_all(&[tag]);
            keep.push(s);
        }
    });
    a
}

fn greeting(s: &mut TcpStream) -> u8 {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    b[0]
}

#[test]
fn retarget_moves_new_connections_and_keeps_old_ones() {
    let (a, b) = (greeter(b'A'), greeter(b'B'));
    let p = FaultProxy::start(a).unwrap();
    let mut old = TcpStream::connect(addr(p.port())).unwrap();
    assert_eq!(greeting(&mut old), b'A');
    p.retarget(b);
    let mut new = TcpStream::connect(addr(p.port())).unwrap();
    assert_eq!(greeting(&mut new), b'B');
    // The old session still reaches A: a write through it does not fail.
    old.write_all(b"still here").unwrap();
}
