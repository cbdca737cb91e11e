//! Small helpers shared by the subcommands: steps, running commands, locating things.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// A failed step or command, with the one-line message shown to the user.
#[derive(Debug)]
pub struct Fail(pub String);

impl Fail {
    pub fn io(what: impl std::fmt::Display, err: std::io::Error) -> Self {
        Fail(format!("{what}: {err}"))
    }
}

/// Runs one step: prints its heading, then how it ended and how long it took.
pub fn step<T>(title: &str, body: impl FnOnce() -> Result<T, Fail>) -> Result<T, Fail> {
    println!("\n==> {title}");
    let started = Instant::now();
    let result = body();
    let secs = started.elapsed().as_secs_f64();
    match &result {
        Ok(_) => println!("==> ok ({secs:.1} s): {title}"),
        Err(Fail(msg)) => println!("==> FAILED ({secs:.1} s): {title}: {msg}"),
    }
    result
}

/// The workspace root: xtask lives in `<root>/xtask`.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Cargo's target directory for this workspace (honours CARGO_TARGET_DIR).
pub fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// The cargo that runs us (so a pinned toolchain stays pinned), else `cargo` from PATH.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn describe(cmd: &Command) -> String {
    let mut parts = vec![program_name(cmd.get_program())];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

fn program_name(program: &OsStr) -> String {
    // Show `cargo`, not the toolchain path that $CARGO holds.
    Path::new(program)
        .file_name()
        .unwrap_or(program)
        .to_string_lossy()
        .into_owned()
}

/// Runs a command with inherited stdio; a non-zero exit is a failure.
pub fn run(cmd: &mut Command) -> Result<(), Fail> {
    let shown = describe(cmd);
    println!("$ {shown}");
    let status = cmd
        .status()
        .map_err(|e| Fail::io(format!("cannot start `{shown}`"), e))?;
    if status.success() {
        Ok(())
    } else {
        Err(Fail(format!("`{shown}` failed ({status})")))
    }
}

/// Runs a command quietly and says whether it succeeded (false if it could not start).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a command and returns its stdout, or None if it could not start or failed.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An executable file named `name` on PATH or in `extra` directories.
pub fn find_executable(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

pub fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether the workspace has a member package called `name`.
pub fn has_package(root: &Path, name: &str) -> Result<bool, Fail> {
    let mut cmd = cargo();
    cmd.args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(root);
    let json = output(&mut cmd).ok_or_else(|| {
        Fail("`cargo metadata --no-deps` failed: is the workspace broken?".into())
    })?;
    // With --no-deps, "packages" holds the workspace members, each object opening with
    // "name" then "version" (dependency entries open with "name" then "source").
    Ok(json.contains(&format!("{{\"name\":\"{name}\",\"version\":")))
}

/// Test counts summed over every `test result:` line that cargo test printed.
#[derive(Debug, Default)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestCounts {
    /// Adds the counts of a libtest summary line such as
    /// `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s`.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result:") else {
            return;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        for pair in words.windows(2) {
            let Ok(n) = pair[0].parse::<u64>() else {
                continue;
            };
            match pair[1].trim_end_matches([';', '.', ',']) {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// `cargo test --workspace`, its stdout streamed through so the totals can be counted.
pub fn cargo_test(root: &Path) -> Result<TestCounts, Fail> {
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--all-features"])
        .current_dir(root);
    let shown = describe(&cmd);
    println!("$ {shown}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| Fail::io(format!("cannot start `{shown}`"), e))?;
    let mut counts = TestCounts::default();
    if let Some(stdout) = child.stdout.take() {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        let out = std::io::stdout();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {
                    let mut out = out.lock();
                    // Keep streaming even if our own stdout went away.
                    let _ = out.write_all(&line);
                    let _ = out.flush();
                    counts.add_line(&String::from_utf8_lossy(&line));
                }
                Err(e) => {
                    eprintln!("xtask: reading cargo test output: {e}");
                    break;
                }
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| Fail::io(format!("waiting for `{shown}`"), e))?;
    println!(
        "cargo test: {} passed, {} failed, {} ignored",
        counts.passed, counts.failed, counts.ignored
    );
    if status.success() {
        Ok(counts)
    } else {
        Err(Fail(format!("`{shown}` failed ({status})")))
    }
}

#[cfg(test)]
mod tests {
    use super::TestCounts;

    #[test]
    fn counts_libtest_summaries() {
        let mut c = TestCounts::default();
        c.add_line("test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s\n");
        c.add_line("test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 5 filtered out; finished in 1.20s");
        c.add_line("running 3 tests");
        c.add_line("test tests::passed ... ok");
        assert_eq!((c.passed, c.failed, c.ignored), (5, 1, 1));
    }
}
