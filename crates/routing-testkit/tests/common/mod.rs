//! Helpers shared by the integration tests: polling, raw wire-protocol probes, process scans.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use routing_testkit::Cluster;

/// A table name unique within the test process (tests share clusters).
pub fn table(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `sql` on node `i` until it returns `want`; returns the time it took.
pub fn wait_for(c: &Cluster, i: usize, sql: &str, want: &str, timeout: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let got = c.psql(i, sql);
        if got.as_deref().ok() == Some(want) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < timeout,
            "node {i}: {sql} still gives {got:?}, want {want}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The PostgreSQL SSLRequest: the server answers one byte, `N` (no SSL) or `S`.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A protocol 3.0 startup message.
pub fn startup(user: &str) -> Vec<u8> {
    let mut body = vec![0, 3, 0, 0];
    for s in ["user", user, "database", "postgres"] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    m.extend(body);
    m
}

/// A simple-query message.
pub fn query(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

/// Reads one backend message (type byte + body).
pub fn read_msg(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body)?;
    Ok((head[0], body))
}

/// Reads messages until ReadyForQuery (`Z`), returning the types seen.
pub fn read_until_ready(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut seen = Vec::new();
    loop {
        let (t, _) = read_msg(s)?;
        seen.push(t);
        if t == b'Z' {
            return Ok(seen);
        }
    }
}

/// Connects and sends an SSLRequest, returning the byte answered within `timeout`.
pub fn ssl_probe(port: u16, timeout: Duration) -> std::io::Result<u8> {
    let mut s = TcpStream::connect_timeout(&addr(port), Duration::from_secs(2))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(&SSL_REQUEST)?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(b[0])
}

/// Sends a raw Redis inline command and reads one reply line.
pub fn redis_cmd(port: u16, cmd: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr(port), Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("{cmd}\r\n").as_bytes())?;
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while !out.ends_with(b"\r\n") {
        if s.read(&mut b)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        out.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&out).trim_end().to_string())
}

/// Whether a pid names a live, non-zombie process.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next());
            !matches!(state, Some('Z' | 'X'))
        })
        .unwrap_or(false)
}

/// `pids` plus all their descendants (the postmaster's backends and aux processes).
pub fn with_descendants(pids: &[u32]) -> Vec<u32> {
    let mut all: Vec<u32> = pids.to_vec();
    let mut grew = true;
    while grew {
        grew = false;
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if all.contains(&pid) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid.is_some_and(|p| all.contains(&p)) {
                all.push(pid);
                grew = true;
            }
        }
    }
    all
}

/// Pids of processes whose command line mentions `needle` (postmasters carry `-D <data dir>`).
pub fn procs_mentioning(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            (String::from_utf8_lossy(&cmd).contains(needle) && alive(pid)).then_some(pid)
        })
        .collect()
}

/// A scratch dir for tests that need their own base dir: on tmpfs when there is one (disk
/// writes are slow on this kind of VM).
pub fn scratch(name: &str) -> std::path::PathBuf {
    let parent = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    parent.join(format!("{name}-{}", std::process::id()))
}

/// A raw wire-protocol session (trust auth as `postgres`), for checks that must run within
/// milliseconds of each other: spawning psql costs ~10-50 ms on a busy machine.
pub struct RawSession(TcpStream);

impl RawSession {
    pub fn connect(port: u16) -> RawSession {
        let mut s = TcpStream::connect(addr(port)).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&startup("postgres")).unwrap();
        read_until_ready(&mut s).unwrap();
        RawSession(s)
    }

    /// Runs a simple query and returns the first column of the first row ("" if none).
    pub fn one(&mut self, sql: &str) -> String {
        self.0.write_all(&query(sql)).unwrap();
        let mut first = None;
        loop {
            let (t, body) = read_msg(&mut self.0).unwrap();
            match t {
                b'D' if first.is_none() => {
                    let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
                    first = Some(if len < 0 {
                        String::new()
                    } else {
                        String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned()
                    });
                }
                b'E' => panic!("error from server: {}", String::from_utf8_lossy(&body)),
                b'Z' => return first.unwrap_or_default(),
                _ => {}
            }
        }
    }
}
