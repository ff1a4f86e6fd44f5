//! Issue 4 points 3 and 4 with the real binary: SIGHUP reloads the config file (what changed is
//! logged and applied; a broken file keeps the running config), and chatd refuses unsafe state:
//! a group- or world-accessible state directory or identity key, a second daemon on a live
//! control socket; a stale socket left by a crash is replaced.
//!
//! Also: the control socket's directory must be private, and the daemon is non-dumpable (seen
//! from outside by running it as another uid: its /proc files then stay root's).

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

fn sighup(d: &Daemon) {
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(d.pid() as libc::pid_t, libc::SIGHUP);
    }
}

#[test]
fn sighup_applies_a_new_config_and_keeps_the_old_one_when_broken() {
    let cfg_dir = tempfile::tempdir().expect("tempdir");
    let cfg = cfg_dir.path().join("chatd.toml");
    fs::write(&cfg, "max_queue = 100\n").expect("write config");
    let cfg_s = cfg.display().to_string();
    let mut relay = Daemon::spawn(
        "relay",
        Role::Relay,
        &["--listen", "127.0.0.1:0", "-c", &cfg_s],
    );
    relay.wait_ready();
    let alice = Daemon::member("alice", &relay.addr());
    let mut bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);
    bob.kill();
    alice.wait_peer_online("bob", false);

    // A new limit: logged as a change, and in force at once.
    fs::write(&cfg, "max_queue = 1\nlog_level = \"debug\"\n").expect("write config");
    sighup(&relay);
    wait_until(DEADLINE, "the reload to be logged", || {
        relay.log().contains("reloaded config: ")
    });
    let log = relay.log();
    let line = log
        .lines()
        .find(|l| l.contains("reloaded config: "))
        .unwrap_or_default();
    assert!(line.contains("max_queue 100 -> 1"), "{line}");
    assert!(line.contains("log_level"), "{line}");
    let first = alice.ctl(&["send", "--wait", "relay", "bob", "one"]);
    assert_eq!(first.status.code(), Some(0), "{}", describe(&first));
    let second = alice.ctl(&["send", "--wait", "relay", "bob", "two"]);
    assert_eq!(second.status.code(), Some(1), "{}", describe(&second));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("queue"),
        "{}",
        describe(&second)
    );

    // A broken file: the reload is refused with the reason, the running config stays.
    fs::write(&cfg, "max_queue = \"lots\"\n").expect("write config");
    sighup(&relay);
    wait_until(DEADLINE, "the failed reload to be logged", || {
        relay
            .log()
            .contains("reload failed, keeping the running config")
    });
    let log = relay.log();
    let line = log
        .lines()
        .find(|l| l.contains("reload failed"))
        .unwrap_or_default();
    assert!(
        line.contains("max_queue") && line.contains("line 1"),
        "{line}"
    );
    assert!(
        relay.try_status().is_some(),
        "still serving after a bad reload"
    );
    let third = alice.ctl(&["send", "--wait", "relay", "bob", "three"]);
    assert_eq!(
        third.status.code(),
        Some(1),
        "max_queue 1 still in force: {}",
        describe(&third)
    );
}

/// Run chatd to completion (it must refuse to start), bounded.
fn refused(args: &[&str]) -> (i32, String) {
    let mut cmd = Command::new(CHATD);
    cmd.args(args).args(["--key-bits", "2048"]);
    let out = run_bounded(cmd, None, Duration::from_secs(30));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn refuses_an_open_state_directory_or_identity_key_and_says_how_to_fix_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
    let state = dir.path().join("state");
    let sock = dir.path().join("ctl.sock");
    let (state_s, sock_s) = (state.display().to_string(), sock.display().to_string());
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        state_s.as_str(),
        "--socket",
        sock_s.as_str(),
    ];

    fs::create_dir(&state).expect("mkdir");
    fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).expect("chmod");
    let (code, err) = refused(&args);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("accessible by group or others") && err.contains("chmod 700"),
        "{err}"
    );
    assert!(
        !state.join("identity.pem").exists(),
        "no key made in an open dir"
    );

    // Fixed directory: chatd makes a key; then an open key file is refused.
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).expect("chmod");
    let mut d = Daemon::spawn("relay", Role::Relay, &["--listen", "127.0.0.1:0"]);
    d.wait_ready();
    d.stop();
    let key = d.state_dir().join("identity.pem");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
    let (state2, sock2) = (
        d.state_dir().display().to_string(),
        d.socket().display().to_string(),
    );
    let (code, err) = refused(&[
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        &state2,
        "--socket",
        &sock2,
    ]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("identity key") && err.contains("chmod 600"),
        "{err}"
    );
}

#[test]
fn a_live_socket_is_not_taken_over_and_a_stale_one_is_replaced() {
    let mut first = Daemon::relay();
    let other = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(other.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
    let state = other.path().join("state").display().to_string();
    let sock = first.socket().display().to_string();
    let (code, err) = refused(&[
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        &state,
        "--socket",
        &sock,
    ]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("already serving"), "{err}");
    assert!(
        first.try_status().is_some(),
        "the first daemon keeps serving"
    );

    // A crash leaves the socket file behind; the next start replaces it.
    first.kill();
    assert!(first.socket().exists(), "SIGKILL leaves the socket file");
    first.start_stopped();
    assert!(
        first.log().contains("removed stale control socket"),
        "{}",
        first.log()
    );
    // A clean stop removes it.
    let status = first.stop();
    assert!(status.success(), "exit 0 on SIGTERM: {status}");
    assert!(!first.socket().exists(), "socket removed on clean exit");
}

#[test]
fn refuses_a_control_socket_directory_others_can_enter() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
    let run = dir.path().join("run");
    fs::create_dir(&run).expect("mkdir");
    fs::set_permissions(&run, fs::Permissions::from_mode(0o755)).expect("chmod");
    let state = dir.path().join("state").display().to_string();
    let sock = run.join("ctl.sock").display().to_string();
    let (code, err) = refused(&[
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        &state,
        "--socket",
        &sock,
    ]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("control socket directory") && err.contains("chmod 700"),
        "{err}"
    );
    assert!(
        !run.join("ctl.sock").exists(),
        "no socket in an open directory"
    );
}

/// A non-dumpable process's /proc/PID files belong to root whatever its uid, which is visible
/// from outside only when chatd runs as another user: so this runs chatd as uid 65534 through
/// `setpriv`, and skips (saying so) when the test is not root or setpriv is missing.
#[test]
fn the_daemon_is_not_dumpable() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: not root, cannot run chatd as another uid");
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIP: setpriv is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("nobody");
    fs::create_dir(&base).expect("mkdir");
    // SAFETY: chown on a path we own, with a valid C string.
    let c = std::ffi::CString::new(base.display().to_string()).expect("path");
    assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0, "chown");
    fs::set_permissions(&base, fs::Permissions::from_mode(0o700)).expect("chmod");
    // The temporary directory itself must let uid 65534 through to `nobody/`.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).expect("chmod");
    let sock = base.join("ctl.sock");
    let child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", CHATD])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--key-bits",
            "2048",
            "--state-dir",
        ])
        .arg(base.join("state"))
        .arg("--socket")
        .arg(&sock)
        .env("HOME", &base)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("CHATD_SOCKET")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn setpriv chatd");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = child.id();
    let mut guard = Kill(child);
    wait_until(DEADLINE, "chatd (as uid 65534) to bind its socket", || {
        if let Ok(Some(status)) = guard.0.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = guard.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            fail(&format!("chatd as uid 65534 exited {status}: {err}"));
        }
        sock.exists()
    });
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default();
    assert!(uid_line.contains("65534"), "runs as 65534: {uid_line}");
    let owner = std::os::unix::fs::MetadataExt::uid(
        &fs::metadata(format!("/proc/{pid}/status")).expect("stat"),
    );
    assert_eq!(
        owner, 0,
        "/proc/{pid} belongs to uid {owner}: the daemon is dumpable (PR_SET_DUMPABLE not cleared)"
    );
    drop(guard);
}
