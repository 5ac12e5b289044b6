//! Least privilege: metrics on loopback by default, `/debug/state` only on
//! the metrics address, kproxy works with only CAP_NET_ADMIN and CAP_NET_RAW
//! and says clearly what is missing without CAP_NET_ADMIN; a TLS failure
//! towards the API server is one clear log line, not a crash.

mod common;
#[path = "fixtures/reliability/support.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use kproxy_testkit::kproxy::KproxyProcess;
use kproxy_testkit::netns::{tcp_echo_server, tcp_request};
use support::*;

fn base_args(c: &Cluster) -> Vec<String> {
    vec![
        format!("--kubeconfig={}", c.kubeconfig.path().display()),
        format!("--hostname-override={NODE}"),
        "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56".to_string(),
        "--iptables-min-sync-period=0s".to_string(),
    ]
}

#[test]
fn reliability_default_bind_addresses_and_debug_state_placement() {
    let test = "reliability_default_bind_addresses_and_debug_state_placement";
    let Some(c) = Cluster::new(test, 1, 0) else {
        return;
    };
    // Without bind flags: metrics must listen on 127.0.0.1 only.
    let mut child = Command::new("ip")
        .args(["netns", "exec", c.node().name()])
        .arg(kproxy_bin())
        .args(base_args(&c))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let listening = poll(Duration::from_secs(20), || {
        c.node()
            .exec_ok(["ss", "-ltnH"])
            .unwrap_or_default()
            .contains(":10249")
    });
    let ss = c.node().exec_ok(["ss", "-ltnH"]).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        listening.is_some(),
        "metrics port 10249 never listened: {ss}"
    );
    let metrics: Vec<&str> = ss.lines().filter(|l| l.contains(":10249")).collect();
    assert!(
        metrics.iter().all(|l| l.contains("127.0.0.1:10249")),
        "metrics must listen on loopback only by default: {metrics:?}"
    );

    // /debug/state on the metrics address only.
    let k = c.start_kproxy(&[]);
    assert_eq!(k.get_metrics("/debug/state").unwrap().0, 200);
    let (code, _) = k.get_healthz("/debug/state").unwrap();
    assert_eq!(
        code, 404,
        "/debug/state must not be served on the healthz address"
    );
    figure(
        test,
        "metrics default 127.0.0.1:10249; /debug/state 200 on metrics, 404 on healthz",
    );
}

#[test]
fn reliability_only_net_admin_and_net_raw() {
    let test = "reliability_only_net_admin_and_net_raw";
    let Some(c) = Cluster::new(test, 2, 0) else {
        return;
    };
    let ip = c.topo.pod(1).ip();
    let _backend = tcp_echo_server(&c.topo.pod(1).ns, sock(ip, 8080)).unwrap();
    c.apply_service(&cluster_ip_service("web", "10.96.0.10", 80).build());
    c.apply_slice(&slice_for("web", "IPv4", &[(ip, NODE)]));
    let dir = tempfile::tempdir().unwrap();

    // Root with every capability but NET_ADMIN and NET_RAW dropped from the
    // bounding set (so neither kproxy nor iptables can regain them).
    let caps =
        "setpriv --bounding-set=-all,+net_admin,+net_raw --inh-caps=-all,+net_admin,+net_raw";
    let bin = wrapper(dir.path(), &[], caps);
    let mut k = KproxyProcess::spawn(Path::new(&bin), Some(c.node()), &base_args(&c)).unwrap();
    k.wait_healthy(WAIT).unwrap();
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child_pid(k.pid()))).unwrap_or_default();
    let bnd = status
        .lines()
        .find(|l| l.starts_with("CapBnd:"))
        .unwrap_or("CapBnd: ?")
        .to_string();
    assert!(
        bnd.ends_with("0000000000003000"),
        "kproxy must run with only NET_ADMIN|NET_RAW (0x3000): {bnd}"
    );
    let pod = &c.topo.pod(0).ns;
    eventually("web answers with a least-privileged kproxy", || {
        tcp_request(pod, sock([10, 96, 0, 10], 80)).is_ok()
    });
    drop(k);

    // Without NET_ADMIN: no crash loop, a clear error, unhealthy.
    let dir2 = tempfile::tempdir().unwrap();
    let bin = wrapper(
        dir2.path(),
        &[],
        "setpriv --bounding-set=-all,+net_raw --inh-caps=-all,+net_raw",
    );
    let mut k = KproxyProcess::spawn(Path::new(&bin), Some(c.node()), &base_args(&c)).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let log = k.log();
    let running = k.is_running();
    let healthy = matches!(k.get_healthz("/healthz"), Ok((200, _)));
    let mentions = log.contains("Permission denied")
        || log.contains("not permitted")
        || log.contains("permission");
    figure(
        test,
        &format!(
            "NET_ADMIN+NET_RAW only: rules programmed, traffic served; without NET_ADMIN: running={running} healthy={healthy} permission error logged={mentions}"
        ),
    );
    assert!(!healthy, "healthy without NET_ADMIN:\n{log}");
    assert!(mentions, "no clear permission error:\n{log}");
}

/// The pid of kproxy under `ip netns exec` + the wrapper (which `exec`s).
fn child_pid(pid: u32) -> u32 {
    // `ip netns exec` execs its command too, so the pid is kproxy's.
    pid
}

#[test]
fn reliability_untrusted_tls_and_bad_kubeconfig_are_one_line_errors() {
    let test = "reliability_untrusted_tls_and_bad_kubeconfig_are_one_line_errors";
    let Some(c) = Cluster::new(test, 1, 0) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "openssl req");
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            c.node().name(),
            "openssl",
            "s_server",
            "-quiet",
        ])
        .args(["-accept", "127.0.0.1:16443", "-cert"])
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:16443\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user: {}\n",
    )
    .unwrap();
    let args = vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--hostname-override={NODE}"),
    ];
    let mut k = KproxyProcess::spawn(&kproxy_bin(), Some(c.node()), &args).unwrap();
    let found = poll(Duration::from_secs(15), || {
        let log = k.log();
        log.lines()
            .any(|l| (l.contains("certificate") || l.contains("Certificate")) && l.contains("WARN"))
    });
    let log = k.log();
    let running = k.is_running();
    let _ = server.kill();
    let _ = server.wait();
    assert!(found.is_some(), "no clear TLS error line:\n{log}");
    assert!(running, "an untrusted server must not crash kproxy:\n{log}");
    let line = log
        .lines()
        .find(|l| l.contains("kproxy::run: watch failed") && l.contains("certificate"))
        .unwrap_or_default()
        .to_string();

    // A malformed kubeconfig: exit 1 with one line.
    std::fs::write(&kubeconfig, "apiVersion: v1\nclusters: [this is: not\n").unwrap();
    // Inside the node namespace: kproxy touches sysctls before it reads
    // the kubeconfig, and the host's must stay untouched.
    let out = Command::new("ip")
        .args(["netns", "exec", c.node().name()])
        .arg(kproxy_bin())
        .args(&args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    // Log lines come first; the error is the last line, whole.
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("kproxy: ") && last.contains("--kubeconfig"),
        "not a one-line error naming the flag: {stderr}"
    );
    figure(
        test,
        &format!("TLS: {}; malformed kubeconfig: {last}", line.trim()),
    );
}
