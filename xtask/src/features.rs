//! The facade's promise: a feature that is off compiles none of its dependencies.

use std::path::Path;
use std::process::Stdio;

use crate::util::{Fail, cargo, run};

/// Each feature of `pg-routing`, the crates it brings, and the crates it must not bring. (bb8
/// is not listed: both backends pool with it.)
const FEATURES: &[(&str, &[&str])] = &[
    ("sqlx", &["routing-sqlx", "sqlx-postgres"]),
    ("diesel", &["routing-diesel", "diesel-async", "diesel"]),
    ("redis", &["routing-redis", "redis"]),
    ("axum", &["routing-axum", "axum"]),
    ("patroni", &["serde_json"]),
];

/// For each feature alone: its crates are in the dependency tree and every other feature's
/// crates are not; then it compiles. Then all together.
pub fn check(root: &Path) -> Result<(), Fail> {
    for &(feature, own) in FEATURES {
        let tree = tree(root, feature)?;
        for crate_name in own {
            if !tree.iter().any(|c| c == crate_name) {
                return Err(Fail(format!(
                    "feature `{feature}` does not bring `{crate_name}`"
                )));
            }
        }
        for &(other, theirs) in FEATURES.iter().filter(|(f, _)| *f != feature) {
            for crate_name in theirs {
                if tree.iter().any(|c| c == crate_name) {
                    return Err(Fail(format!(
                        "feature `{feature}` alone compiles `{crate_name}`, which belongs to `{other}`"
                    )));
                }
            }
        }
        println!("  {feature}: brings {own:?}, nothing of the other features");
        run(cargo()
            .args(["check", "-q", "-p", "pg-routing", "--no-default-features"])
            .args(["--features", feature])
            .current_dir(root))?;
    }
    run(cargo()
        .args(["check", "-q", "-p", "pg-routing", "--all-features"])
        .current_dir(root))
}

/// The names of the crates `pg-routing` builds with this feature alone (normal dependencies).
fn tree(root: &Path, feature: &str) -> Result<Vec<String>, Fail> {
    let out = cargo()
        .args(["tree", "-q", "-p", "pg-routing", "--no-default-features"])
        .args(["--features", feature])
        .args(["-e", "normal", "--prefix", "none", "--format", "{p}"])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Fail::io("cargo tree", e))?;
    if !out.status.success() {
        return Err(Fail(format!("cargo tree for feature `{feature}` failed")));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}
