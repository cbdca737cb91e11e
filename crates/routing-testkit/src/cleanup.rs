//! Cleanup that survives the test process: a watchdog child per cluster and a sweep of leftovers.
//!
//! `Drop` covers normal ends and panics; it cannot cover SIGKILL, `process::exit`, or statics such
//! as [`crate::shared`] that are never dropped. For those a small `sh` loop started with the
//! cluster polls the test pid and, once it is gone, stops the servers and removes the directory.
//! Directory names carry the owning pid, so a later start can sweep what a dead run left.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::proc;

/// Shell functions: `cleanup` stops whatever server of directory `$D` still runs, then removes `$D`.
///
/// SIGQUIT is exactly what `pg_ctl stop -m immediate` sends; signalling directly needs neither
/// pg_ctl nor a switch to the postgres user. A pid is only signalled if its command line proves it
/// is ours (postgres mentions `$D`; redis-server rewrites its title), in case a stale pid file
/// names a recycled pid.
const CLEANUP: &str = r#"
# Zombies count as gone: orphans are reaped by PID 1, which may take its time.
running() {
  read -r l < "/proc/$1/stat" 2>/dev/null || return 1
  case "${l##*) }" in Z*|X*) return 1;; esac
  return 0
}
ours() { [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' < "/proc/$1/cmdline" | grep -qF -- "$2"; }
cleanup() {
  pids=""
  for f in "$D"/postmaster.pid "$D"/*/postmaster.pid; do
    [ -f "$f" ] || continue
    p=$(head -n1 "$f")
    case "$p" in ''|*[!0-9]*) continue;; esac
    ours "$p" "$D" && pids="$pids $p"
  done
  [ -n "$pids" ] && kill -QUIT $pids 2>/dev/null
  if [ -f "$D/pgpool/pgpool.pid" ]; then
    p=$(head -n1 "$D/pgpool/pgpool.pid")
    case "$p" in ''|*[!0-9]*) ;; *) ours "$p" pgpool && kill -KILL -- "-$p" 2>/dev/null;; esac
  fi
  if [ -f "$D/redis.pid" ]; then
    p=$(cat "$D/redis.pid")
    case "$p" in ''|*[!0-9]*) ;; *) ours "$p" redis && kill -KILL "$p" 2>/dev/null;; esac
  fi
  i=0
  while [ -n "$pids" ] && [ $i -lt 100 ]; do
    alive=""
    for p in $pids; do running "$p" && alive="$alive $p"; done
    pids="$alive"
    [ -n "$pids" ] && sleep 0.1
    i=$((i+1))
  done
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
  rm -rf "$D"
}
"#;

/// Starts the watchdog for `dir`, watching this process.
pub(crate) fn spawn_watchdog(dir: &Path) -> std::io::Result<Child> {
    let script = format!(
        r#"
{CLEANUP}
while running "$P"; do sleep 0.2; done
cleanup"#
    );
    Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .env("P", std::process::id().to_string())
        .env("D", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Own process group: a Ctrl-C to the test run must not kill the cleaner too.
        .process_group(0)
        .spawn()
}

/// Runs the cleanup synchronously (stale-cluster sweep).
pub(crate) fn cleanup_now(dir: &Path) {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!("{CLEANUP}\ncleanup"))
        .env("D", dir);
    let _ = proc::run(
        &mut cmd,
        None,
        Duration::from_secs(30),
        "stale cluster cleanup",
    );
}

/// The owning pid encoded in a kit directory name (`c-<pid>-<n>` clusters, `t-<pid>-<n>`
/// templates being built).
pub(crate) fn owner_pid(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix("c-")
        .or_else(|| name.strip_prefix("t-"))?;
    rest.split('-').next()?.parse().ok()
}

/// Removes directories under `base` whose owning process is dead.
pub(crate) fn sweep(base: &Path) {
    for d in orphaned_dirs(base, owner_pid) {
        cleanup_now(&d);
    }
}

/// Directories under `base` whose owner (read from the name by `owner`) is another process,
/// now dead.
pub(crate) fn orphaned_dirs(base: &Path, owner: fn(&str) -> Option<u32>) -> Vec<PathBuf> {
    let me = std::process::id();
    std::fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            matches!(owner(&name), Some(p) if p != me && !proc::pid_alive(p))
        })
        .map(|e| e.path())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn parses_owner() {
        assert_eq!(owner_pid("c-123-4"), Some(123));
        assert_eq!(owner_pid("t-9-0"), Some(9));
        assert_eq!(owner_pid("template-v1-0-abc"), None);
        assert_eq!(owner_pid("c-x-1"), None);
    }
}
