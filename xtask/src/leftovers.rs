//! After the tests: no PostgreSQL or Redis server started by the test kit may still run, and no
//! cluster directory may remain under its base dir (`$TMPDIR` or /tmp, then `routing-testkit`).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::util::Fail;

/// How long servers get to exit after the last test finished.
const GRACE: Duration = Duration::from_secs(5);

/// The test kit's base directory, spelled as it is and, if it differs, as resolved on disk.
fn base_dirs() -> Vec<PathBuf> {
    let base = std::env::temp_dir().join("routing-testkit");
    let mut dirs = vec![base.clone()];
    if let Some(parent) = base.parent().and_then(|p| p.canonicalize().ok()) {
        let resolved = parent.join("routing-testkit");
        if resolved != base {
            dirs.push(resolved);
        }
    }
    dirs
}

/// A test-kit server process: pid, start time (so a reused pid is not mistaken) and command line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Server {
    pid: u32,
    start_time: u64,
    cmdline: String,
}

/// An entry of the base dir, told apart from a same-named later one by its inode.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    path: PathBuf,
    inode: u64,
}

/// What exists of the test kit at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    servers: BTreeSet<Server>,
    entries: BTreeSet<Entry>,
}

impl Snapshot {
    pub fn take() -> Self {
        let bases = base_dirs();
        Snapshot {
            servers: servers(&bases),
            entries: entries(&bases),
        }
    }

    fn is_empty(&self) -> bool {
        self.servers.is_empty() && self.entries.is_empty()
    }

    /// What is in `self` and was not in `before`.
    fn minus(&self, before: &Snapshot) -> Snapshot {
        Snapshot {
            servers: self.servers.difference(&before.servers).cloned().collect(),
            entries: self.entries.difference(&before.entries).cloned().collect(),
        }
    }

    fn print(&self) {
        for s in &self.servers {
            println!("  process {}: {}", s.pid, s.cmdline);
        }
        for e in &self.entries {
            println!("  path {}", e.path.display());
        }
    }
}

/// Fails if the tests left servers or cluster dirs behind (waiting up to GRACE for them to go).
/// Leftovers that were already there before the tests are only reported.
pub fn check(before: &Snapshot) -> Result<(), Fail> {
    println!("testkit base dir: {}", base_dirs()[0].display());
    if !before.is_empty() {
        println!("already there before the tests (not counted against this run):");
        before.print();
    }
    let deadline = Instant::now() + GRACE;
    loop {
        let left = Snapshot::take().minus(before);
        if left.is_empty() {
            println!("nothing left behind");
            return Ok(());
        }
        if Instant::now() >= deadline {
            println!("left behind by the tests:");
            left.print();
            return Err(Fail(format!(
                "the tests left {} server process(es) and {} path(s) of the test kit behind",
                left.servers.len(),
                left.entries.len()
            )));
        }
        sleep(Duration::from_millis(200));
    }
}

fn entries(bases: &[PathBuf]) -> BTreeSet<Entry> {
    use std::os::unix::fs::MetadataExt;
    bases
        .iter()
        .filter_map(|base| fs::read_dir(base).ok())
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let inode = entry.metadata().ok()?.ino();
            Some(Entry {
                path: entry.path(),
                inode,
            })
        })
        .collect()
}

/// `postgres` and `redis-server` processes tied to the base dir: by command line, working
/// directory (a postgres backend runs in its data dir) or an open file (logs, sockets, pid files).
fn servers(bases: &[PathBuf]) -> BTreeSet<Server> {
    let Ok(proc_dir) = fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    proc_dir
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| server(pid, bases))
        .collect()
}

fn server(pid: u32, bases: &[PathBuf]) -> Option<Server> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let comm = fs::read_to_string(dir.join("comm")).ok()?;
    if !matches!(comm.trim(), "postgres" | "postmaster" | "redis-server") {
        return None;
    }
    let raw = fs::read(dir.join("cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&raw)
        .split('\0')
        .filter(|a| !a.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let under_base = |p: &Path| bases.iter().any(|b| p.starts_with(b));
    let tied = bases
        .iter()
        .any(|b| cmdline.contains(&*b.to_string_lossy()))
        || fs::read_link(dir.join("cwd")).is_ok_and(|cwd| under_base(&cwd))
        || fs::read_dir(dir.join("fd")).is_ok_and(|fds| {
            fds.flatten()
                .filter_map(|fd| fs::read_link(fd.path()).ok())
                .any(|target| under_base(&target))
        });
    if !tied {
        return None;
    }
    Some(Server {
        pid,
        start_time: start_time(&dir)?,
        cmdline,
    })
}

/// Field 22 of /proc/<pid>/stat (clock ticks since boot), read after the `(comm)` field.
fn start_time(dir: &Path) -> Option<u64> {
    let stat = fs::read_to_string(dir.join("stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}
