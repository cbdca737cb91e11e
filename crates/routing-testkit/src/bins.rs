//! Finding the server binaries: tests must use the machine's own PostgreSQL and Redis, and say
//! which package is missing instead of failing obscurely.

use std::path::{Path, PathBuf};

use crate::KitError;

/// The PostgreSQL executables the kit runs, all from one directory so versions never mix.
const PG_TOOLS: &[&str] = &["initdb", "postgres", "psql"];

/// Resolved PostgreSQL binaries.
#[derive(Debug, Clone)]
pub(crate) struct PgBins {
    pub(crate) dir: PathBuf,
}

impl PgBins {
    pub(crate) fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn path_dirs() -> Vec<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default()
}

/// Version-sorted `/usr/lib/postgresql/*/bin` (highest first), so the newest install wins.
pub(crate) fn versioned_dirs(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let key: Option<Vec<u64>> = name.split('.').map(|s| s.parse().ok()).collect();
            key.map(|k| (k, e.path().join("bin")))
        })
        .collect();
    v.sort_by(|a, b| b.0.cmp(&a.0));
    v.into_iter().map(|(_, p)| p).collect()
}

/// Finds a directory holding every tool in [`PG_TOOLS`].
///
/// A pinned dir is the only candidate. Otherwise PATH comes first (the user chose it; Debian's
/// PATH has only the psql wrapper, not initdb, so it is usually skipped), then
/// `/usr/lib/postgresql/<highest version>/bin`.
pub(crate) fn find_pg(pinned: Option<&Path>) -> Result<PgBins, KitError> {
    let candidates: Vec<PathBuf> = match pinned {
        Some(d) => vec![d.to_path_buf()],
        None => {
            let mut c = path_dirs();
            c.extend(versioned_dirs(Path::new("/usr/lib/postgresql")));
            c
        }
    };
    for d in &candidates {
        if PG_TOOLS.iter().all(|t| is_executable(&d.join(t))) {
            return Ok(PgBins { dir: d.clone() });
        }
    }
    // Name the first tool that is missing everywhere, or the first overall.
    let missing = PG_TOOLS
        .iter()
        .find(|t| !candidates.iter().any(|d| is_executable(&d.join(t))))
        .unwrap_or(&PG_TOOLS[0]);
    Err(KitError::MissingBinary {
        name: (*missing).to_string(),
        package: "postgresql".into(),
        searched: candidates,
    })
}

/// Finds `redis-server`: the pinned path, else PATH, else the usual install dirs.
pub(crate) fn find_redis(pinned: Option<&Path>) -> Result<PathBuf, KitError> {
    let candidates: Vec<PathBuf> = match pinned {
        Some(p) => vec![p.to_path_buf()],
        None => {
            let mut c: Vec<PathBuf> = path_dirs()
                .into_iter()
                .chain(["/usr/bin", "/usr/local/bin", "/usr/sbin"].map(PathBuf::from))
                .map(|d| d.join("redis-server"))
                .collect();
            c.dedup();
            c
        }
    };
    candidates
        .iter()
        .find(|p| is_executable(p))
        .cloned()
        .ok_or_else(|| KitError::MissingBinary {
            name: "redis-server".into(),
            package: "redis-server".into(),
            searched: candidates,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_version_first() {
        let root = std::env::temp_dir().join(format!("rtk-bins-test-{}", std::process::id()));
        for v in ["9.6", "15", "10", "notaversion"] {
            std::fs::create_dir_all(root.join(v).join("bin")).unwrap();
        }
        let got = versioned_dirs(&root);
        let names: Vec<_> = got
            .iter()
            .map(|p| {
                p.parent()
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(names, ["15", "10", "9.6"]);
    }

    #[test]
    fn pinned_missing_dir_names_package() {
        let err = find_pg(Some(Path::new("/nonexistent/pg/bin"))).unwrap_err();
        match &err {
            KitError::MissingBinary {
                name,
                package,
                searched,
            } => {
                assert_eq!(name, "initdb");
                assert_eq!(package, "postgresql");
                assert_eq!(searched, &[PathBuf::from("/nonexistent/pg/bin")]);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            err.to_string()
                .contains("install the Debian package `postgresql`")
        );
    }
}
