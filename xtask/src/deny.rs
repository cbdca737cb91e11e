//! cargo-deny: installed on demand, then bans/licenses/sources against deny.toml, and
//! advisories against an offline copy of the RustSec database.

use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{Fail, cargo, output, run, succeeds, target_dir};

/// The version installed when cargo-deny is missing or too old: builds with the project's
/// toolchain (needs rustc >= 1.88) and reads every key deny.toml uses.
const PINNED_VERSION: &str = "0.20.2";
const MIN_MINOR: u32 = 20;

/// The folder name cargo-deny expects under `db-path` for the default advisory-db URL.
const ADVISORY_DB_DIR: &str = "advisory-db-3157b0e258782691";

/// Environment variable naming an offline advisory-db copy (overrides ../shared/advisory-db).
const ADVISORY_DB_ENV: &str = "ROUTING_ADVISORY_DB";

pub fn ensure_installed() -> Result<(), Fail> {
    let version = output(cargo().args(["deny", "--version"]));
    match version.as_deref().map(str::trim) {
        Some(v) if minor_version(v).is_some_and(|m| m >= MIN_MINOR) => {
            println!("{v}");
            return Ok(());
        }
        Some(v) => {
            println!("{v} is older than 0.{MIN_MINOR}: installing cargo-deny {PINNED_VERSION}")
        }
        None => println!(
            "cargo-deny not found: installing cargo-deny {PINNED_VERSION} (a few minutes, once)"
        ),
    }
    run(cargo().args([
        "install",
        "cargo-deny",
        "--locked",
        "--version",
        PINNED_VERSION,
    ]))?;
    if succeeds(cargo().args(["deny", "--version"])) {
        Ok(())
    } else {
        Err(Fail("cargo-deny was installed but `cargo deny --version` still fails: is ~/.cargo/bin on PATH?".into()))
    }
}

/// `cargo-deny 0.20.2` -> 20.
fn minor_version(version_line: &str) -> Option<u32> {
    let version = version_line.split_whitespace().nth(1)?;
    let mut parts = version.split('.');
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    // A 1.x would be newer than any 0.x.
    Some(if major > 0 { u32::MAX } else { minor })
}

pub fn check_bans_licenses_sources(root: &Path) -> Result<(), Fail> {
    run(cargo()
        .args(["deny", "check", "bans", "licenses", "sources"])
        .current_dir(root))
}

/// Runs the advisories check against an offline database copy, or says why it is skipped.
/// `--offline` also keeps cargo from fetching crates: run it after the online bans/licenses
/// check, which downloads any that are missing.
pub fn check_advisories(root: &Path) -> Result<(), Fail> {
    let Some(source) = advisory_db_source(root)? else {
        return Ok(());
    };
    let cache = target_dir(root).join("advisory-cache");
    prepare_db(&source, &cache.join(ADVISORY_DB_DIR))?;

    let config = cache.join("deny.toml");
    let base =
        fs::read_to_string(root.join("deny.toml")).map_err(|e| Fail::io("reading deny.toml", e))?;
    fs::write(&config, with_db_path(&base, &cache))
        .map_err(|e| Fail::io(format!("writing {}", config.display()), e))?;

    run(cargo()
        .arg("deny")
        .arg("--offline")
        .arg("--config")
        .arg(&config)
        .args(["check", "advisories"])
        .current_dir(root))
}

/// Where the offline database copy is: $ROUTING_ADVISORY_DB, else ../shared/advisory-db.
/// None (after saying so) when there is none: advisories are then skipped, not failed.
fn advisory_db_source(root: &Path) -> Result<Option<PathBuf>, Fail> {
    if let Some(dir) = std::env::var_os(ADVISORY_DB_ENV).filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if dir.is_dir() {
            println!(
                "advisory database: {} (from {ADVISORY_DB_ENV})",
                dir.display()
            );
            Ok(Some(dir))
        } else {
            Err(Fail(format!(
                "{ADVISORY_DB_ENV}={} is not a directory",
                dir.display()
            )))
        };
    }
    let default = root.join("../shared/advisory-db");
    if default.is_dir() {
        let shown = default.canonicalize().unwrap_or(default.clone());
        println!("advisory database: {}", shown.display());
        Ok(Some(default))
    } else {
        println!(
            "advisories: SKIPPED: no offline advisory database at {} and {ADVISORY_DB_ENV} is not set \
             (the RustSec database cannot be fetched from this network)",
            default.display()
        );
        Ok(None)
    }
}

/// Copies the database to `dest` and commits it: cargo-deny reads it as a git repository.
/// Skipped when `dest` already holds a commit of the same source (same files, sizes, mtimes).
fn prepare_db(source: &Path, dest: &Path) -> Result<(), Fail> {
    let stamp_file = dest.with_extension("stamp");
    let stamp = format!("{}\n{:016x}\n", source.display(), fingerprint(source));
    if dest.join(".git").is_dir() && fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp) {
        println!("advisory cache up to date: {}", dest.display());
        return Ok(());
    }
    let _ = fs::remove_file(&stamp_file);
    if dest.exists() {
        fs::remove_dir_all(dest)
            .map_err(|e| Fail::io(format!("removing {}", dest.display()), e))?;
    }
    copy_tree(source, dest)?;
    let git = |args: &[&str]| {
        let mut cmd = Command::new("git");
        // No user hooks, signing or identity needed for this throwaway repository.
        cmd.args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "commit.gpgsign=false",
        ])
        .args([
            "-c",
            "user.name=offline",
            "-c",
            "user.email=offline@localhost",
        ])
        .arg("-C")
        .arg(dest)
        .args(args);
        if succeeds(&mut cmd) {
            Ok(())
        } else {
            Err(Fail(format!(
                "`git {}` failed in {} (is git installed?)",
                args.join(" "),
                dest.display()
            )))
        }
    };
    git(&["init", "-q"])?;
    git(&["add", "-A"])?;
    git(&["commit", "-q", "--no-verify", "-m", "offline advisory db"])?;
    fs::write(&stamp_file, stamp)
        .map_err(|e| Fail::io(format!("writing {}", stamp_file.display()), e))
}

/// A hash of every file's relative path, size and modification time under `dir`.
fn fingerprint(dir: &Path) -> u64 {
    fn walk(dir: &Path, hasher: &mut DefaultHasher) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            entry.file_name().hash(hasher);
            if meta.is_dir() {
                walk(&path, hasher);
            } else {
                (meta.len(), meta.modified().ok()).hash(hasher);
            }
        }
    }
    let mut hasher = DefaultHasher::new();
    walk(dir, &mut hasher);
    hasher.finish()
}

/// Recursive copy that leaves the copy writable (the source may be read-only).
fn copy_tree(source: &Path, dest: &Path) -> Result<(), Fail> {
    fs::create_dir_all(dest).map_err(|e| Fail::io(format!("creating {}", dest.display()), e))?;
    let entries =
        fs::read_dir(source).map_err(|e| Fail::io(format!("reading {}", source.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Fail::io(format!("reading {}", source.display()), e))?;
        let from = entry.path();
        let to = dest.join(entry.file_name());
        if from.is_dir() {
            copy_tree(&from, &to)?;
        } else {
            let data =
                fs::read(&from).map_err(|e| Fail::io(format!("reading {}", from.display()), e))?;
            fs::write(&to, data).map_err(|e| Fail::io(format!("writing {}", to.display()), e))?;
        }
    }
    Ok(())
}

/// deny.toml with `db-path` set under `[advisories]` (the section is added if absent).
fn with_db_path(deny_toml: &str, db_path: &Path) -> String {
    let escaped = db_path
        .display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    let setting = format!("db-path = \"{escaped}\"");
    let mut out = String::with_capacity(deny_toml.len() + setting.len() + 16);
    let mut inserted = false;
    for line in deny_toml.lines() {
        out.push_str(line);
        out.push('\n');
        if !inserted && line.trim() == "[advisories]" {
            out.push_str(&setting);
            out.push('\n');
            inserted = true;
        }
    }
    if !inserted {
        out.push_str("\n[advisories]\n");
        out.push_str(&setting);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_path_goes_under_advisories() {
        let toml = "[graph]\ntargets = []\n\n[advisories]\nignore = []\n";
        let out = with_db_path(toml, Path::new("/x/target/advisory-cache"));
        assert_eq!(
            out,
            "[graph]\ntargets = []\n\n[advisories]\ndb-path = \"/x/target/advisory-cache\"\nignore = []\n"
        );
        let out = with_db_path("[bans]\n", Path::new("/a\"b"));
        assert!(
            out.ends_with("[advisories]\ndb-path = \"/a\\\"b\"\n"),
            "{out}"
        );
    }

    #[test]
    fn parses_cargo_deny_versions() {
        assert_eq!(minor_version("cargo-deny 0.20.2"), Some(20));
        assert_eq!(minor_version("cargo-deny 0.14.0"), Some(14));
        assert_eq!(minor_version("cargo-deny 1.0.0"), Some(u32::MAX));
        assert_eq!(minor_version("garbage"), None);
    }
}
