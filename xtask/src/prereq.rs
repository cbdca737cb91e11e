//! Prerequisites of the test kit: PostgreSQL server binaries, redis-server, and pgpool-II (the
//! benchmark's peer, which the quick benchmark in the test suite starts too).
//!
//! Missing ones are installed with apt-get when we are root on Debian/Ubuntu; otherwise we stop
//! and name the package. System services that the packages may start are not used: the test
//! kit starts its own servers on free ports.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{Fail, find_executable, is_executable, run};

struct Prereq {
    /// What we look for.
    what: &'static str,
    /// The Debian package that provides it.
    package: &'static str,
    find: fn() -> Option<PathBuf>,
}

const PREREQS: [Prereq; 3] = [
    Prereq {
        what: "PostgreSQL server binaries (initdb)",
        package: "postgresql",
        find: find_initdb,
    },
    Prereq {
        what: "redis-server",
        package: "redis-server",
        find: find_redis_server,
    },
    Prereq {
        what: "pgpool-II",
        package: "pgpool2",
        find: || find_executable("pgpool", &["/usr/sbin"]),
    },
];

/// What `cargo xtask ha` needs on top of [`PREREQS`]: the HA stack's Debian packages.
const HA_PREREQS: [Prereq; 3] = [
    Prereq {
        what: "patroni",
        package: "patroni",
        find: || find_executable("patroni", &["/usr/bin", "/usr/local/bin"]),
    },
    Prereq {
        what: "etcd",
        package: "etcd-server",
        find: || find_executable("etcd", &["/usr/bin", "/usr/local/bin"]),
    },
    Prereq {
        what: "haproxy",
        package: "haproxy",
        find: || find_executable("haproxy", &["/usr/sbin", "/usr/bin", "/usr/local/sbin"]),
    },
];

/// Debian keeps the server binaries off PATH, under /usr/lib/postgresql/<major>/bin.
fn find_initdb() -> Option<PathBuf> {
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let initdb = entry.path().join("bin/initdb");
            is_executable(&initdb).then_some((major, initdb))
        })
        .collect();
    versioned.sort();
    versioned
        .pop()
        .map(|(_, p)| p)
        .or_else(|| find_executable("initdb", &[]))
}

fn find_redis_server() -> Option<PathBuf> {
    find_executable("redis-server", &["/usr/bin", "/usr/sbin", "/usr/local/bin"])
}

/// Makes sure every prerequisite is there, installing the missing ones if we may.
pub fn ensure() -> Result<(), Fail> {
    ensure_all(PREREQS.iter())
}

/// [`ensure`], plus Patroni, etcd and HAProxy for `cargo xtask ha`. The packages' own services
/// are not used (nor started, on a machine without systemd): the HA stack starts its own.
pub fn ensure_ha() -> Result<(), Fail> {
    ensure_all(PREREQS.iter().chain(HA_PREREQS.iter()))
}

fn ensure_all<'a>(prereqs: impl Iterator<Item = &'a Prereq>) -> Result<(), Fail> {
    let missing: Vec<&Prereq> = prereqs.filter(|p| report(p).is_none()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|p| p.package).collect();
    if !(is_root() && Path::new("/usr/bin/apt-get").exists()) {
        return Err(Fail(format!(
            "missing {}: install the Debian/Ubuntu package(s) `{}` (or your system's equivalent) and re-run",
            missing
                .iter()
                .map(|p| p.what)
                .collect::<Vec<_>>()
                .join(" and "),
            packages.join(" ")
        )));
    }
    println!("installing {} with apt-get", packages.join(" "));
    run(apt_get().arg("update"))?;
    run(apt_get().args(["install", "-y"]).args(&packages))?;
    for p in missing {
        if report(p).is_none() {
            return Err(Fail(format!(
                "{} still not found after installing `{}`",
                p.what, p.package
            )));
        }
    }
    Ok(())
}

/// Prints where a prerequisite was found (or that it is missing) and returns its path.
fn report(p: &Prereq) -> Option<PathBuf> {
    let found = (p.find)();
    match &found {
        Some(path) => println!("{}: {}", p.what, path.display()),
        None => println!("{}: not found (package `{}`)", p.what, p.package),
    }
    found
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// Effective uid 0, read from /proc (std only, no libc).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}
