//! The real kproxy binary in `--dry-run` against the fake API server: the
//! whole path from the API to the validated state, served and observable,
//! without touching the kernel (so it runs in the test's own namespace).

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_model::fixtures::{Ep, SliceBuilder, SvcBuilder};
use kproxy_testkit::apiserver::FakeApiServer;
use kproxy_testkit::kproxy::KproxyProcess;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn service(name: &str, ip: &str) -> Service {
    SvcBuilder::new("default", name)
        .cluster_ip(ip)
        .port("http", 80, "TCP")
        .build()
}

fn slice(service: &str, ips: &[&str]) -> EndpointSlice {
    let mut b = SliceBuilder::new("default", &format!("{service}-1"), service, "IPv4")
        .port("http", 8080, "TCP");
    for ip in ips {
        b = b.endpoint(Ep::new(ip).node("node-a"));
    }
    b.build()
}

/// `(name, endpoint ips)` of every IPv4 service port in `/debug/state`.
fn services_in(state: &Value) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = state["ipv4"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|sp| {
            let name = sp["name"]["service"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let eps = sp["endpoints"]["cluster"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| e["ip"].as_str().unwrap_or("").to_string())
                .collect();
            (name, eps)
        })
        .collect();
    out.sort();
    out
}

fn wait_for_services(k: &mut KproxyProcess, want: &[(&str, &[&str])]) {
    let want: Vec<(String, Vec<String>)> = want
        .iter()
        .map(|(n, eps)| (n.to_string(), eps.iter().map(|s| s.to_string()).collect()))
        .collect();
    k.wait_until(WAIT, &format!("state {want:?}"), |k| {
        Ok(services_in(&k.debug_state()?) == want)
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_follows_the_api_server_and_survives_an_outage() {
    let api = FakeApiServer::start().await.unwrap();
    let kubeconfig = api.kubeconfig_file().unwrap();
    api.create(&service("web", "10.96.0.10")).unwrap();
    api.create(&slice("web", &["10.244.1.2"])).unwrap();

    let binary = Path::new(env!("CARGO_BIN_EXE_kproxy"));
    let args = vec![
        "--dry-run".to_string(),
        format!("--kubeconfig={}", kubeconfig.path().display()),
        "--hostname-override=node-a".to_string(),
        "--iptables-min-sync-period=0s".to_string(),
    ];
    let mut k = tokio::task::block_in_place(|| KproxyProcess::spawn(binary, None, &args)).unwrap();

    tokio::task::block_in_place(|| {
        k.wait_healthy(WAIT).unwrap();
        wait_for_services(&mut k, &[("web", &["10.244.1.2"])]);
        let (code, body) = k.get_healthz("/healthz").unwrap();
        assert_eq!(code, 200, "{body}");
        let health: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(health["healthy"], true);
    });
    let service_changes = |k: &KproxyProcess| {
        k.metric("kubeproxy_sync_proxy_rules_service_changes_total")
            .unwrap()
            .unwrap_or(0.0)
    };
    let endpoint_changes = |k: &KproxyProcess| {
        k.metric("kubeproxy_sync_proxy_rules_endpoint_changes_total")
            .unwrap()
            .unwrap_or(0.0)
    };
    let (svc0, ep0) = (service_changes(&k), endpoint_changes(&k));

    // Create, change, delete: each shows up in the state and the counters.
    api.create(&service("db", "10.96.0.20")).unwrap();
    api.create(&slice("db", &["10.244.1.5"])).unwrap();
    api.update(&slice("web", &["10.244.1.2", "10.244.1.3"]))
        .unwrap();
    tokio::task::block_in_place(|| {
        wait_for_services(
            &mut k,
            &[
                ("db", &["10.244.1.5"]),
                ("web", &["10.244.1.2", "10.244.1.3"]),
            ],
        )
    });
    api.delete::<Service>("default", "db").unwrap();
    tokio::task::block_in_place(|| {
        wait_for_services(&mut k, &[("web", &["10.244.1.2", "10.244.1.3"])]);
        assert!(service_changes(&k) >= svc0 + 2.0, "service changes counted");
        assert!(
            endpoint_changes(&k) >= ep0 + 2.0,
            "endpoint changes counted"
        );
    });

    // Outage: kproxy keeps running and keeps its state; changes made while
    // the API server was away (including a deletion, and a history reset
    // that forces a relist) show up once it is back.
    api.stop().await;
    tokio::task::block_in_place(|| {
        std::thread::sleep(Duration::from_secs(3));
        assert!(k.is_running(), "kproxy must survive an API outage");
        wait_for_services(&mut k, &[("web", &["10.244.1.2", "10.244.1.3"])]);
        assert_eq!(k.get_healthz("/healthz").unwrap().0, 200);
    });
    api.create(&service("cache", "10.96.0.30")).unwrap();
    api.create(&slice("cache", &["10.244.1.9"])).unwrap();
    api.delete::<EndpointSlice>("default", "web-1").unwrap();
    api.reset_history();
    api.restart().await.unwrap();
    tokio::task::block_in_place(|| {
        wait_for_services(&mut k, &[("cache", &["10.244.1.9"]), ("web", &[])]);
        let status = k.terminate(Duration::from_secs(10)).unwrap();
        assert!(status.success(), "SIGTERM exits 0: {status}");
    });
}

#[test]
fn a_mode_without_a_usable_api_server_keeps_running_and_reports_unhealthy() {
    // No API server at all: kproxy must not crash-loop; it retries and
    // reports not-yet-healthy until the first sync.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:9\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user: {}\n",
    )
    .unwrap();
    let args = vec![
        "--dry-run".to_string(),
        format!("--kubeconfig={}", kubeconfig.display()),
        "--hostname-override=node-a".to_string(),
    ];
    let mut k = KproxyProcess::spawn(Path::new(env!("CARGO_BIN_EXE_kproxy")), None, &args).unwrap();
    k.wait_until(WAIT, "healthz server", |k| {
        Ok(k.get_healthz("/healthz").is_ok())
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(k.is_running());
    assert_eq!(k.get_healthz("/healthz").unwrap().0, 503);
    assert!(k.terminate(Duration::from_secs(10)).unwrap().success());
}

#[test]
fn a_malformed_kubeconfig_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, "this: [is not a kubeconfig").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .args(["--dry-run", "--hostname-override=n"])
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg("--metrics-bind-address=127.0.0.1:0")
        .arg("--healthz-bind-address=")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("kproxy: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].starts_with("kproxy: --kubeconfig")
            && errors[0].contains(&kubeconfig.display().to_string())
            && errors[0].contains("unclosed bracket"),
        "{stderr}"
    );
}
