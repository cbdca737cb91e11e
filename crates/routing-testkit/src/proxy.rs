//! A TCP fault proxy: lets tests make a server slow or unreachable without touching the server,
//! the way a network partition or a congested link looks to a client.
//!
//! It runs on plain std threads so it keeps working whichever async runtime (if any) the test
//! uses, and it stops on `Drop`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::KitError;

/// What the proxy does with traffic; applies to new and existing connections alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward everything at once.
    Pass,
    /// Forward each chunk this long after it arrived (added one-way latency, so a request and
    /// its reply take 2x longer). A new connection also reaches the target one delay late, like
    /// a slow TCP handshake.
    Delay(Duration),
    /// Accept connections but forward nothing either way: clients hang until their own timeouts.
    /// Data is held, not dropped, so switching back to `Pass` lets it through like a healed
    /// partition (TCP would retransmit).
    Blackhole,
}

#[derive(Debug)]
struct Shared {
    target: Mutex<SocketAddr>,
    mode: Mutex<ProxyMode>,
    changed: Condvar,
    shutdown: AtomicBool,
    next_id: AtomicU64,
    /// Both sockets of each live connection, so `Drop` can cut them.
    conns: Mutex<HashMap<u64, Vec<TcpStream>>>,
}

impl Shared {
    fn mode(&self) -> MutexGuard<'_, ProxyMode> {
        self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn target(&self) -> SocketAddr {
        *self.target.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn is_shut(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Vec<TcpStream>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks until data that arrived at `since` may be forwarded; false on shutdown.
    fn wait_forwardable(&self, since: Instant) -> bool {
        let mut m = self.mode();
        loop {
            if self.is_shut() {
                return false;
            }
            let wait = match *m {
                ProxyMode::Pass => return true,
                ProxyMode::Delay(d) => {
                    let due = since + d;
                    let now = Instant::now();
                    if now >= due {
                        return true;
                    }
                    due - now
                }
                ProxyMode::Blackhole => Duration::from_millis(200),
            };
            m = self
                .changed
                .wait_timeout(m, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A TCP proxy on a free 127.0.0.1 port in front of one target address.
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy in [`ProxyMode::Pass`] in front of `target`.
    pub fn start(target: SocketAddr) -> Result<FaultProxy, KitError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            mode: Mutex::new(ProxyMode::Pass),
            changed: Condvar::new(),
            shutdown: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name(format!("fault-proxy-{port}"))
            .spawn(move || accept_loop(listener, s))?;
        Ok(FaultProxy {
            port,
            shared,
            accept: Some(accept),
        })
    }

    /// The port clients should connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The proxy's address (127.0.0.1:port).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Changes the mode; takes effect immediately, also for data already queued.
    pub fn set_mode(&self, mode: ProxyMode) {
        *self.shared.mode() = mode;
        self.shared.changed.notify_all();
    }

    /// Sends new connections to another address; existing ones stay with the old target, like a
    /// load balancer (HAProxy, a cloud endpoint) that follows a failover without cutting sessions.
    pub fn retarget(&self, target: SocketAddr) {
        *self.shared.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
    }

    /// The current mode.
    pub fn mode(&self) -> ProxyMode {
        *self.shared.mode()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        for socks in self.shared.conns().values() {
            for s in socks {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        // Wake the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let conn = listener.accept();
        if shared.is_shut() {
            return;
        }
        match conn {
            Ok((client, _)) => {
                let s = shared.clone();
                let _ = std::thread::Builder::new()
                    .name("fault-proxy-conn".into())
                    .spawn(move || handle(client, s));
            }
            // e.g. EMFILE: back off rather than spin.
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn handle(client: TcpStream, shared: Arc<Shared>) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    if let Ok(c) = client.try_clone() {
        shared.conns().insert(id, vec![c]);
    }
    // A blackholed new connection does not even reach the target.
    if shared.wait_forwardable(Instant::now())
        && let Ok(server) = TcpStream::connect_timeout(&shared.target(), Duration::from_secs(5))
    {
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        if let Ok(s) = server.try_clone()
            && let Some(v) = shared.conns().get_mut(&id)
        {
            v.push(s);
        }
        if !shared.is_shut() {
            pump_both(client, server, &shared);
        }
    }
    shared.conns().remove(&id);
}

fn pump_both(client: TcpStream, server: TcpStream, shared: &Arc<Shared>) {
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let s = shared.clone();
    let up = std::thread::spawn(move || pump(client, server, &s));
    pump(s2, c2, shared);
    let _ = up.join();
}

/// Copies `from` -> `to`: a reader thread timestamps chunks as they arrive, this thread forwards
/// each when the mode allows, so a delay is latency, not a throughput cap.
fn pump(from: TcpStream, mut to: TcpStream, shared: &Arc<Shared>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let ctl = from.try_clone().ok();
    let mut src = from;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match src.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    while let Ok((at, chunk)) = rx.recv() {
        if !shared.wait_forwardable(at) || to.write_all(&chunk).is_err() {
            // The far side is gone (or we are shutting down): unblock the reader too.
            if let Some(c) = &ctl {
                let _ = c.shutdown(Shutdown::Read);
            }
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
