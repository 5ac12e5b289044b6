//! Rejected objects as Kubernetes Events and structured log lines: the
//! real binary (`--dry-run`, so no root and no kernel) against the fake API
//! server, which records every Event posted.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kproxy_model::fixtures::{Ep, SliceBuilder, SvcBuilder};
use kproxy_testkit::apiserver::{FakeApiServer, RecordedEvent};
use kproxy_testkit::kproxy::KproxyProcess;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn bad_service(ip: &str) -> Service {
    SvcBuilder::new("default", "bad")
        .cluster_ip(ip)
        .port("http", 80, "TCP")
        .build()
}

fn events_about(api: &FakeApiServer, name: &str) -> Vec<RecordedEvent> {
    api.events()
        .into_iter()
        .filter(|e| e.regarding_name == name)
        .collect()
}

/// JSON log lines of rejections.
fn rejection_lines(k: &KproxyProcess) -> Vec<Value> {
    k.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("object rejected"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_service_yields_one_event_and_a_structured_log_line() {
    let api = FakeApiServer::start().await.unwrap();
    let kubeconfig = api.kubeconfig_file().unwrap();
    api.create(&bad_service("10.96.0.300")).unwrap();
    api.create(
        &SvcBuilder::new("default", "web")
            .cluster_ip("10.96.0.10")
            .port("http", 80, "TCP")
            .build(),
    )
    .unwrap();
    api.create(
        &SliceBuilder::new("default", "web-1", "web", "IPv4")
            .port("http", 8080, "TCP")
            .endpoint(Ep::new("10.244.1.2").node("node-a"))
            .build(),
    )
    .unwrap();

    let args = vec![
        "--dry-run".to_string(),
        format!("--kubeconfig={}", kubeconfig.path().display()),
        "--hostname-override=node-a".to_string(),
        "--iptables-min-sync-period=0s".to_string(),
        // Frequent periodic resyncs: they must not repeat the Event.
        "--iptables-sync-period=1s".to_string(),
        "--log-format=json".to_string(),
    ];
    let binary = Path::new(env!("CARGO_BIN_EXE_kproxy"));
    let mut k = tokio::task::block_in_place(|| KproxyProcess::spawn(binary, None, &args)).unwrap();
    tokio::task::block_in_place(|| {
        k.wait_until(WAIT, "an Event about default/bad", |_| {
            Ok(!events_about(&api, "bad").is_empty())
        })
        .unwrap();
    });
    let events = events_about(&api, "bad");
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e.type_, "Warning");
    assert_eq!(e.reason, "Rejected");
    assert_eq!(e.regarding_kind, "Service");
    assert_eq!(e.namespace, "default");
    assert!(
        e.message.contains("spec.clusterIP") && e.message.contains("10.96.0.300"),
        "the Event names the field and the value: {}",
        e.message
    );
    assert!(e.message.contains("node-a"), "{}", e.message);

    // The log line carries service="default/bad" and the reason.
    let lines = rejection_lines(&k);
    assert_eq!(lines.len(), 1, "{}", k.log());
    assert_eq!(lines[0]["service"], "default/bad", "{}", lines[0]);
    assert_eq!(lines[0]["kind"], "Service");
    assert!(lines[0]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("10.96.0.300")));

    // Several periodic resyncs, and a new bad value: logged again, but no
    // second Event within the object's 10 minutes.
    api.update(&bad_service("10.96.0.301")).unwrap();
    let deadline = Instant::now() + WAIT;
    tokio::task::block_in_place(|| {
        k.wait_until(WAIT, "the second rejection logged", |k| {
            Ok(rejection_lines(k).len() >= 2)
        })
        .unwrap();
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(Instant::now() < deadline + WAIT);
    let lines = rejection_lines(&k);
    assert_eq!(lines.len(), 2, "{}", k.log());
    assert!(lines[1]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("10.96.0.301")));
    assert_eq!(
        events_about(&api, "bad").len(),
        1,
        "rate-limited: {:?}",
        api.events()
    );
    assert!(events_about(&api, "web").is_empty());
    tokio::task::block_in_place(|| {
        assert!(k.terminate(Duration::from_secs(10)).unwrap().success());
    });
}
