//! Runs the demo driver (`kproxy-demo`, what `scripts/demo.sh` runs) end to
//! end, so the demo keeps working: it must exit 0 (every request got the
//! expected answer) and leave no network namespace behind, also when
//! interrupted. Needs root and the kproxy binary (built by `cargo test
//! --workspace`; `cargo build -p kproxy` otherwise, or set KPROXY_BIN).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use kproxy_testkit::netns::skip_unless_root;

const DEMO: &str = env!("CARGO_BIN_EXE_kproxy-demo");

/// `$KPROXY_BIN`, or `kproxy` in this test's target directory
/// (`target/debug/deps/demo-HASH` → `target/debug/kproxy`).
fn kproxy_binary(test: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KPROXY_BIN") {
        return Some(PathBuf::from(path));
    }
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("kproxy");
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED {test}: no kproxy binary at {} (cargo build -p kproxy, or set KPROXY_BIN)",
            path.display()
        );
        None
    }
}

/// Namespaces the demo process `pid` left (the testkit names them
/// `kpt<pid>-...`).
fn leftover_namespaces(pid: u32) -> Vec<String> {
    let prefix = format!("kpt{pid}-");
    std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn demo_passes_end_to_end() {
    let test = "demo_passes_end_to_end";
    if skip_unless_root(test) {
        return;
    }
    let Some(kproxy) = kproxy_binary(test) else {
        return;
    };
    let child = Command::new(DEMO)
        .arg(&kproxy)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kproxy-demo");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for kproxy-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kproxy-demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for needle in [
        "== Requests",
        "== Scale web to 2 endpoints",
        "-A KUBE-SERVICES ",
        "== Result: PASS",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
    }
    assert_eq!(leftover_namespaces(pid), Vec::<String>::new());
}

#[test]
fn interrupted_demo_cleans_up() {
    let test = "interrupted_demo_cleans_up";
    if skip_unless_root(test) {
        return;
    }
    let Some(kproxy) = kproxy_binary(test) else {
        return;
    };
    let mut child = Command::new(DEMO)
        .arg(&kproxy)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kproxy-demo");
    let pid = child.id();
    // Interrupt once the namespaces exist and kproxy is starting.
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.expect("read demo output");
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("== kproxy --mode") {
            break;
        }
    }
    assert!(
        !leftover_namespaces(pid).is_empty(),
        "no namespaces while the demo runs:\n{seen}"
    );
    let status = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    for line in lines {
        let _ = line;
    }
    let status = child.wait().expect("wait for kproxy-demo");
    // 130 after the interrupt; 0 if the demo won the race and finished.
    assert!(
        status.code() == Some(130) || status.success(),
        "unexpected exit {status}:\n{seen}"
    );
    assert_eq!(leftover_namespaces(pid), Vec::<String>::new());
}
