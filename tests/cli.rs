//! Runs the built binary: exit codes and the one-line `kproxy: <error>` contract.

use std::process::{Command, Output};

fn kproxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .args(args)
        // Keep the node name deterministic and independent of the test host.
        .env("NODE_NAME", "test-node")
        .output()
        .unwrap_or_else(|e| panic!("running kproxy: {e}"))
}

fn fixture(name: &str) -> String {
    format!(
        "{}/tests/fixtures/config/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Asserts exit code 2 and a single `kproxy: ` stderr line containing `needles`.
fn assert_fails(args: &[&str], needles: &[&str]) {
    let out = kproxy(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "args {args:?}, stderr {stderr}");
    assert!(out.stdout.is_empty(), "args {args:?}: stdout not empty");
    assert_eq!(
        stderr.lines().count(),
        1,
        "args {args:?}: not one line: {stderr}"
    );
    assert!(stderr.starts_with("kproxy: "), "args {args:?}: {stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "args {args:?}: {stderr:?} lacks {needle:?}"
        );
    }
}

#[test]
fn bad_flag_values_exit_2_with_one_line() {
    assert_fails(
        &["--cluster-cidr=10.0.0.0/33"],
        &["--cluster-cidr", "\"10.0.0.0/33\""],
    );
    assert_fails(
        &["--proxy-mode=nftables"],
        &["--mode", "\"nftables\"", "not supported"],
    );
    assert_fails(&["--mode", "bogus"], &["--mode", "\"bogus\""]);
    assert_fails(
        &["--iptables-sync-period=3x"],
        &["--iptables-sync-period", "\"3x\""],
    );
    assert_fails(
        &["--ipvs-scheduler=fifo"],
        &["--ipvs-scheduler", "\"fifo\""],
    );
    assert_fails(&["--v=99"], &["--v", "\"99\""]);
}

#[test]
fn clap_errors_are_one_line_too() {
    assert_fails(&["--no-such-flag"], &["--no-such-flag"]);
    assert_fails(&["--kubeconfig"], &["--kubeconfig"]);
}

#[test]
fn config_file_errors_exit_2() {
    assert_fails(
        &["--config=/nonexistent/kproxy.yaml"],
        &["/nonexistent/kproxy.yaml", "cannot read"],
    );
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nipvs:\n  strictArp: true\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let arg = format!("--config={}", path.display());
    assert_fails(&[&arg], &["ipvs.strictArp", "unknown field"]);
}

#[test]
fn kubeadm_config_is_accepted_and_used() {
    // A verbatim kubeadm config parses; the run then fails only because the
    // kubeconfig it names does not exist here — which proves the file's
    // settings were taken. --dry-run so nothing could touch this host's
    // kernel even if it got further.
    let out = kproxy(&[
        "--config",
        &fixture("kubeadm.yaml"),
        "--hostname-override=node-1",
        "--dry-run",
        "--metrics-bind-address=",
        "--healthz-bind-address=",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("kproxy: "))
        .collect();
    assert_eq!(errors.len(), 1, "stderr: {stderr}");
    assert!(
        errors[0].starts_with("kproxy: --kubeconfig /var/lib/kube-proxy/kubeconfig.conf"),
        "stderr: {stderr}"
    );
}

#[test]
fn help_and_version_exit_0_on_stdout() {
    let out = kproxy(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--iptables-sync-period"), "{text}");
    let out = kproxy(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}
