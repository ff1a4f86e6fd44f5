//! chatd under a real systemd (issue 13 point 3): `tests/systemd_real.sh` boots systemd 252 as
//! PID 1 in `systemd-nspawn` (this machine's / under a tmpfs overlay, `--private-network`),
//! installs the Debian package and checks socket activation, `STATUS=`, reload, the watchdog,
//! lingering users' members chatting through the relay, a broken config and its documented
//! recovery, the `systemd-analyze security` score, an upgrade and a purge; then, in a second
//! container, runs docs/SERVICE.md's install commands as written. About a minute on 2 cores.
//!
//! It needs root, `systemd-nspawn` (apt-get install systemd-container) and a current package:
//!
//! ```sh
//! cargo deb && cargo test --test systemd_real -- --nocapture
//! ```
//!
//! Without them it prints SKIP and passes, unless `CHATD_SYSTEMD_REAL=1` (as `.ci/run` sets),
//! which turns a missing prerequisite into a failure. `CHATD_DEB=PATH` picks another package.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Skip (or, when CHATD_SYSTEMD_REAL=1, fail) for a missing prerequisite.
fn unavailable(why: &str) {
    if std::env::var_os("CHATD_SYSTEMD_REAL").is_some_and(|v| v == "1") {
        panic!("CHATD_SYSTEMD_REAL=1 but {why}");
    }
    println!("SKIP: systemd_real: {why}");
}

/// The newest modification time under `path` (a file, or a directory walked recursively).
fn newest(path: &Path) -> SystemTime {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(_) => return SystemTime::UNIX_EPOCH,
    };
    let mut t = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
            t = t.max(newest(&entry.path()));
        }
    }
    t
}

fn default_deb() -> Option<PathBuf> {
    let arch = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .ok()?;
    let arch = String::from_utf8(arch.stdout).ok()?.trim().to_string();
    // CARGO_BIN_EXE_chatd is <target>/debug/chatd; cargo deb writes <target>/debian/.
    let target = Path::new(env!("CARGO_BIN_EXE_chatd")).parent()?.parent()?;
    Some(
        target
            .join("debian")
            .join(format!("chatd_{}-1_{arch}.deb", env!("CARGO_PKG_VERSION"))),
    )
}

#[test]
fn units_and_package_under_real_systemd() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return unavailable("not root (systemd-nspawn needs root)");
    }
    if Command::new("systemd-nspawn")
        .arg("--version")
        .output()
        .is_err()
    {
        return unavailable("no systemd-nspawn (apt-get install systemd-container)");
    }
    let deb = match std::env::var_os("CHATD_DEB") {
        Some(p) => PathBuf::from(p),
        None => match default_deb() {
            Some(p) => p,
            None => return unavailable("cannot name the package (no dpkg?)"),
        },
    };
    let built = match std::fs::metadata(&deb).and_then(|m| m.modified()) {
        Ok(t) => t,
        Err(_) => return unavailable(&format!("no package {} (run cargo deb)", deb.display())),
    };
    // A package older than what goes into it would test yesterday's units.
    let inputs = ["src", "contrib", "man", "docs/SERVICE.md", "Cargo.toml"];
    if let Some(newer) = inputs.iter().find(|p| newest(&root().join(p)) > built) {
        return unavailable(&format!(
            "{} is older than {newer} (run cargo deb)",
            deb.display()
        ));
    }

    let start = std::time::Instant::now();
    // The script bounds each container (300 s) and every wait in it; this is a backstop.
    // `2>&1` keeps the script's progress lines and the commands' errors in order.
    let out = Command::new("timeout")
        .args([
            "--kill-after=30",
            "900",
            "bash",
            "-c",
            r#"exec bash "$0" "$@" 2>&1"#,
        ])
        .arg(root().join("tests/systemd_real.sh"))
        .arg(&deb)
        .output()
        .expect("run tests/systemd_real.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    println!("systemd_real: {} s", start.elapsed().as_secs());
    assert!(
        out.status.success(),
        "tests/systemd_real.sh {} failed ({}); its output is above",
        deb.display(),
        out.status
    );
    assert!(text.contains("deb: all checks passed") && text.contains("manual: all checks passed"));
}
