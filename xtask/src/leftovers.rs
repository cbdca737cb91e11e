//! After the tests: no PostgreSQL or Redis server started by the test kit may still run, and no
//! cluster directory may remain under its base dir. The same holds for the kit's HA stacks
//! (`ha-<pid>-<n>` dirs): etcd, Patroni (a python3 process) and HAProxy count as servers too.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::util::Fail;

/// How long servers get to go after the last test finished. Clusters that live for the whole
/// test process are stopped by the test kit's watchdog once that process has exited; it signals
/// the servers, waits for them and removes the directory, which usually takes well under 1 s.
const GRACE: Duration = Duration::from_secs(10);

/// Every place the test kit may put clusters: `$ROUTING_TESTKIT_DIR` if set, else
/// `/dev/shm/routing-testkit` or `$TMPDIR` (or /tmp) + `/routing-testkit`, depending on free
/// space. All are watched, so the check does not depend on which one the kit chose.
fn base_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("ROUTING_TESTKIT_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .chain([
            PathBuf::from("/dev/shm/routing-testkit"),
            std::env::temp_dir().join("routing-testkit"),
        ])
        .collect();
    // Also as resolved on disk (e.g. a symlinked /tmp), since that is what /proc shows.
    let resolved: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|d| {
            let name = d.file_name()?;
            Some(d.parent()?.canonicalize().ok()?.join(name))
        })
        .collect();
    for d in resolved {
        if !dirs.contains(&d) {
            dirs.push(d);
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
    /// The pid that owns the cluster dir the server runs in (see [`owner_of`]).
    owner: Option<u32>,
}

/// An entry of a base dir, told apart from a same-named later one by its inode.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    path: PathBuf,
    inode: u64,
    owner: Option<u32>,
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

    /// Splits off what belongs to a test process that is still running. Ours have all exited
    /// (cargo test waits for every test binary), so those are another run's on a shared machine.
    fn split_live_owners(self) -> (Snapshot, Snapshot) {
        let live = |owner: Option<u32>| owner.is_some_and(alive);
        let (others_s, ours_s) = self.servers.into_iter().partition(|s| live(s.owner));
        let (others_e, ours_e) = self.entries.into_iter().partition(|e| live(e.owner));
        (
            Snapshot {
                servers: ours_s,
                entries: ours_e,
            },
            Snapshot {
                servers: others_s,
                entries: others_e,
            },
        )
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
/// What was there before the tests, or belongs to another test process that is still running,
/// is only reported.
pub fn check(before: &Snapshot) -> Result<(), Fail> {
    let shown: Vec<String> = base_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    println!("test kit base dirs: {}", shown.join(", "));
    if !before.is_empty() {
        println!(
            "already there before the tests (not counted): {} process(es), {} path(s)",
            before.servers.len(),
            before.entries.len()
        );
    }
    let deadline = Instant::now() + GRACE;
    loop {
        let (ours, others) = Snapshot::take().minus(before).split_live_owners();
        if ours.is_empty() || Instant::now() >= deadline {
            if !others.is_empty() {
                println!(
                    "belonging to other test processes still running (not counted): {} process(es), {} path(s)",
                    others.servers.len(),
                    others.entries.len()
                );
            }
            if ours.is_empty() {
                println!("nothing left behind");
                return Ok(());
            }
            println!("left behind by the tests:");
            ours.print();
            return Err(Fail(format!(
                "the tests left {} server process(es) and {} path(s) of the test kit behind",
                ours.servers.len(),
                ours.entries.len()
            )));
        }
        sleep(Duration::from_millis(200));
    }
}

/// The test kit names a cluster dir `c-<pid>-<n>`, a template being built `t-<pid>-<n>` and an
/// HA stack `ha-<pid>-<n>`, after the process that owns it. Other names have no owner.
fn owner_of(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix("c-")
        .or_else(|| name.strip_prefix("t-"))
        .or_else(|| name.strip_prefix("ha-"))?;
    rest.split('-').next()?.parse().ok()
}

/// Whether a process runs (a zombie does not count).
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        !matches!(state, None | Some("Z" | "X"))
    })
}

/// The name of the top-level entry of a base dir that `path` lies in.
fn kit_entry(path: &Path, bases: &[PathBuf]) -> Option<String> {
    bases.iter().find_map(|base| {
        let rest = path.strip_prefix(base).ok()?;
        Some(
            rest.components()
                .next()?
                .as_os_str()
                .to_string_lossy()
                .into_owned(),
        )
    })
}

/// Entries of the base dirs except the test kit's initdb template cache (`template-v<N>-<key>`),
/// which it keeps on purpose for later runs. Clusters, templates being built and anything else
/// count.
fn entries(bases: &[PathBuf]) -> BTreeSet<Entry> {
    use std::os::unix::fs::MetadataExt;
    bases
        .iter()
        .filter_map(|base| fs::read_dir(base).ok())
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("template-") {
                return None;
            }
            Some(Entry {
                path: entry.path(),
                inode: entry.metadata().ok()?.ino(),
                owner: owner_of(&name),
            })
        })
        .collect()
}

/// `postgres`, `redis-server`, `etcd`, `haproxy` and Patroni (`python3`/`patroni`) processes tied
/// to a base dir: by command line (postgres -D, Patroni's config, etcd's --data-dir, HAProxy's
/// -f), working directory (postgres runs in its data dir, redis-server in its --dir, the HA
/// stack's processes in the stack's dir) or an open file.
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
    if !matches!(
        comm.trim(),
        "postgres" | "postmaster" | "redis-server" | "etcd" | "haproxy" | "patroni" | "python3"
    ) {
        return None;
    }
    let raw = fs::read(dir.join("cmdline")).ok()?;
    let args: Vec<String> = String::from_utf8_lossy(&raw)
        .split('\0')
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    let cmdline = args.join(" ");
    let from_args = || {
        args.iter()
            .flat_map(|a| a.split_whitespace())
            .find_map(|a| kit_entry(Path::new(a), bases))
    };
    let from_cwd = || kit_entry(&fs::read_link(dir.join("cwd")).ok()?, bases);
    let from_fds = || {
        fs::read_dir(dir.join("fd"))
            .ok()?
            .flatten()
            .filter_map(|fd| fs::read_link(fd.path()).ok())
            .find_map(|target| kit_entry(&target, bases))
    };
    let entry = from_args().or_else(from_cwd).or_else(from_fds);
    let mentions_base = || {
        bases
            .iter()
            .any(|b| cmdline.contains(&*b.to_string_lossy()))
    };
    if entry.is_none() && !mentions_base() {
        return None;
    }
    Some(Server {
        pid,
        start_time: start_time(&dir)?,
        owner: entry.as_deref().and_then(owner_of),
        cmdline,
    })
}

/// Field 22 of `/proc/<pid>/stat` (clock ticks since boot), read after the `(comm)` field.
fn start_time(dir: &Path) -> Option<u64> {
    let stat = fs::read_to_string(dir.join("stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_come_from_kit_dir_names() {
        assert_eq!(owner_of("c-1234-0"), Some(1234));
        assert_eq!(owner_of("t-99-3"), Some(99));
        assert_eq!(owner_of("ha-77-0"), Some(77));
        assert_eq!(owner_of("template-v1-65ddc71cdf1a9813"), None);
        assert_eq!(owner_of("something"), None);
    }

    #[test]
    fn finds_the_kit_entry_of_a_path() {
        let bases = [PathBuf::from("/dev/shm/routing-testkit")];
        assert_eq!(
            kit_entry(Path::new("/dev/shm/routing-testkit/c-1-0/pg0"), &bases).as_deref(),
            Some("c-1-0")
        );
        assert_eq!(kit_entry(Path::new("/tmp/other"), &bases), None);
    }

    #[test]
    fn this_process_is_alive() {
        assert!(alive(std::process::id()));
    }
}
