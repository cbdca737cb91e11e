//! Process helpers: bounded command runs (the kit must never hang), signals via `kill(1)` (the
//! workspace denies unsafe code, so no libc), and the unprivileged user PostgreSQL needs under root.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::KitError;

/// The OS identity servers run as: PostgreSQL refuses euid 0, so under root it is `postgres`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunAs {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

/// `None` when not root (servers run as ourselves); the `postgres` user's ids under root.
pub(crate) fn server_user() -> Result<Option<RunAs>, KitError> {
    // /proc/self is owned by the effective uid: this avoids a libc call.
    let euid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1);
    if euid != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4
            && f[0] == "postgres"
            && let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse())
        {
            return Ok(Some(RunAs { uid, gid }));
        }
    }
    Err(KitError::NoServerUser {
        user: "postgres".into(),
    })
}

/// Applies the run-as identity and a clean environment to a server-side command.
pub(crate) fn as_server(cmd: &mut Command, run_as: Option<RunAs>) -> &mut Command {
    if let Some(r) = run_as {
        cmd.uid(r.uid).gid(r.gid);
        cmd.env("HOME", "/var/lib/postgresql");
    }
    clean_env(cmd)
}

/// Drops inherited `PG*` variables (PGSSLMODE, PGHOST, ...) that would redirect our connections,
/// and pins the C locale so initdb and servers behave the same everywhere.
pub(crate) fn clean_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PG") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("LC_ALL", "C").env("LANG", "C")
}

/// Changes ownership to the server user (no-op when not root), so servers can use what root made.
pub(crate) fn chown(path: &Path, run_as: Option<RunAs>) -> Result<(), KitError> {
    if let Some(r) = run_as {
        std::os::unix::fs::chown(path, Some(r.uid), Some(r.gid)).map_err(|source| {
            KitError::DataDir {
                path: path.to_path_buf(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Writes a file and hands it to the server user.
pub(crate) fn write_owned(
    path: &Path,
    content: &str,
    run_as: Option<RunAs>,
) -> Result<(), KitError> {
    std::fs::write(path, content).map_err(|source| KitError::DataDir {
        path: path.to_path_buf(),
        source,
    })?;
    chown(path, run_as)
}

/// Output of a finished command.
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) stdout: String,
}

/// Runs `cmd` to completion with a deadline; on timeout the child is killed and
/// [`KitError::Timeout`] returned. Non-zero exit becomes [`KitError::Command`] with the stderr tail.
pub(crate) fn run(
    cmd: &mut Command,
    stdin: Option<&str>,
    timeout: Duration,
    what: &str,
) -> Result<Output, KitError> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| KitError::Command {
        what: what.to_string(),
        status: "could not spawn".into(),
        stderr: e.to_string(),
    })?;
    if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
        let input = input.to_string();
        // A thread so a child that does not read its stdin cannot block us.
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = w.write_all(input.as_bytes());
        });
    }
    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    for (is_out, pipe) in [
        (
            true,
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
        (
            false,
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            let _ = tx.send((is_out, buf));
        });
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((true, b)) => out = b,
            Ok((false, b)) => err = b,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(KitError::Timeout {
                    what: format!("{what} (after {timeout:?})"),
                });
            }
        }
    }
    // Both pipes are closed, so the child has exited or is about to.
    let status = wait_timeout(
        &mut child,
        deadline.saturating_duration_since(Instant::now()),
    )?
    .ok_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        KitError::Timeout {
            what: format!("{what} (after {timeout:?})"),
        }
    })?;
    let stdout = String::from_utf8_lossy(&out).into_owned();
    if !status.success() {
        return Err(KitError::Command {
            what: what.to_string(),
            status: status.to_string(),
            stderr: tail(&String::from_utf8_lossy(&err), 20),
        });
    }
    Ok(Output { stdout })
}

/// Waits for a child up to `timeout`; `Ok(None)` if it is still running.
pub(crate) fn wait_timeout(
    child: &mut Child,
    timeout: Duration,
) -> Result<Option<std::process::ExitStatus>, KitError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends a signal (`QUIT`, `KILL`, ...) to pids via the shell's `kill` builtin. Errors are ignored:
/// a process that is already gone is what the caller wants anyway.
pub(crate) fn signal(pids: &[u32], sig: &str) {
    if pids.is_empty() {
        return;
    }
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!("kill -{sig} \"$@\" 2>/dev/null; exit 0"))
        .arg("sh");
    for p in pids {
        cmd.arg(p.to_string());
    }
    let _ = run(&mut cmd, None, Duration::from_secs(5), "kill");
}

/// Whether a pid names a live (non-zombie) process.
pub(crate) fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain ')'.
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// The last `n` lines of a text.
pub(crate) fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Spawns a long-lived server in its own process group, so a Ctrl-C aimed at the test run does
/// not race the kit's own shutdown.
pub(crate) fn spawn_detached(cmd: &mut Command, log: &Path) -> Result<Child, KitError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| KitError::DataDir {
            path: log.to_path_buf(),
            source,
        })?;
    let file2 = file.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(file2))
        .process_group(0);
    Ok(cmd.spawn()?)
}
