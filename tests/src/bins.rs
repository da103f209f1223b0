//! Builds `shoald` and `shoal` once per test process and finds them.
//!
//! `cargo build -p shoal-node -p shoal-cli --bins` runs in the workspace root
//! (`CARGO_MANIFEST_DIR/..`) with `$CARGO` (or `cargo`); the binaries are then taken from
//! `$CARGO_TARGET_DIR/debug` or `<root>/target/debug`. With `SHOAL_TESTS_NO_BUILD=1` the build
//! is skipped (the binaries must already exist).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Paths of the built binaries.
#[derive(Debug, Clone)]
pub struct Bins {
    pub shoald: PathBuf,
    pub shoal: PathBuf,
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() { d } else { workspace_root().join(d) }
        }
        None => workspace_root().join("target"),
    }
}

fn build() -> Result<Bins, String> {
    if std::env::var_os("SHOAL_TESTS_NO_BUILD").is_none() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(&cargo)
            .args(["build", "-p", "shoal-node", "-p", "shoal-cli", "--bins"])
            .current_dir(workspace_root())
            .output()
            .map_err(|e| format!("cannot run {cargo:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cargo build -p shoal-node -p shoal-cli --bins failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let dir = target_dir().join("debug");
    let bins = Bins { shoald: dir.join("shoald"), shoal: dir.join("shoal") };
    for p in [&bins.shoald, &bins.shoal] {
        if !p.is_file() {
            return Err(format!("{} does not exist after the build", p.display()));
        }
    }
    Ok(bins)
}

/// Builds (once per process) and returns the binaries; panics with cargo's output if the
/// build fails, since no test can run without them.
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Result<Bins, String>> = OnceLock::new();
    match BINS.get_or_init(build) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    }
}

/// Path of `shoald`.
pub fn shoald() -> &'static PathBuf {
    &bins().shoald
}

/// Path of `shoal`.
pub fn shoal() -> &'static PathBuf {
    &bins().shoal
}
