//! Free 127.0.0.1 ports. The kernel picks one (bind :0, release); a process-wide set keeps two
//! clusters of the same test binary from being handed the same port, and keeps a killed node's
//! port for its restart.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, OnceLock};

use crate::KitError;

fn reserved() -> &'static Mutex<HashSet<u16>> {
    static R: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Picks a port nobody listens on now and that this process has not handed out.
pub(crate) fn pick() -> Result<u16, KitError> {
    for _ in 0..64 {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        if reserved()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port)
        {
            return Ok(port);
        }
    }
    Err(KitError::Timeout {
        what: "finding a free port".into(),
    })
}

/// Checks that a caller-pinned port is free right now, and reserves it.
pub(crate) fn claim(port: u16) -> Result<u16, KitError> {
    if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err() {
        return Err(KitError::PortInUse { port });
    }
    reserved()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(port);
    Ok(port)
}

/// Gives ports back when their cluster is gone.
pub(crate) fn release(ports: impl IntoIterator<Item = u16>) {
    let mut r = reserved().lock().unwrap_or_else(|e| e.into_inner());
    for p in ports {
        r.remove(&p);
    }
}
