//! The servers on real listeners, spoken to with raw HTTP/1.1.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kproxy_metrics::{
    serve_healthz, serve_metrics, DebugState, HealthState, ManualClock, Metrics,
    ServiceHealthError, ServiceHealthServers, ServiceHealthTarget,
};
use kproxy_model::IpFamily;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

async fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect(addr).await?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n{accept}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    assert_ne!(
        headers.get("transfer-encoding").map(String::as_str),
        Some("chunked"),
        "test client does not decode chunked bodies"
    );
    Ok(Resp {
        status,
        headers,
        body: body.to_string(),
    })
}

async fn must_get(addr: SocketAddr, path: &str) -> Resp {
    get(addr, path, None).await.expect("request")
}

async fn local_listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("bad JSON {body:?}: {e}"))
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    ))
}

#[tokio::test]
async fn metrics_server_routes() {
    let metrics = Metrics::new("1.2.3", "iptables");
    metrics.service_changed();
    let debug: DebugState = Arc::new(|| r#"{"services":3}"#.to_string());
    let (listener, addr) = local_listener().await;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve_metrics(listener, metrics, debug, async {
        let _ = stopped.await;
    }));

    let r = must_get(addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert!(r
        .body
        .contains("# TYPE kubeproxy_sync_proxy_rules_service_changes_total counter\n"));
    assert!(r
        .body
        .contains("kubeproxy_sync_proxy_rules_service_changes_total 1\n"));
    assert!(r
        .body
        .contains("kproxy_build_info{version=\"1.2.3\",mode=\"iptables\"} 1\n"));
    assert!(r.body.contains("process_resident_memory_bytes "));
    assert!(!r.body.contains("# EOF"));

    let r = get(
        addr,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
    )
    .await
    .expect("request");
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"].starts_with("application/openmetrics-text"));
    assert!(r.body.ends_with("# EOF\n"));

    let r = must_get(addr, "/debug/state").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(json(&r.body)["services"], 3);

    for path in ["/healthz", "/livez"] {
        let r = must_get(addr, path).await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok"), "{path}");
    }
    assert_eq!(must_get(addr, "/proxyMode").await.body, "iptables");
    assert_eq!(must_get(addr, "/nope").await.status, 404);

    stop.send(()).expect("server alive");
    let result = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server stops on shutdown")
        .expect("task");
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn healthz_server_codes_json_and_counters() {
    let clock = clock();
    let health =
        HealthState::with_clock(Duration::from_secs(60), vec![IpFamily::V4], clock.clone());
    let metrics = Metrics::new("v", "iptables");
    let (listener, addr) = local_listener().await;
    tokio::spawn(serve_healthz(
        listener,
        health.clone(),
        metrics.clone(),
        std::future::pending(),
    ));

    // Before the first sync.
    let r = must_get(addr, "/healthz").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    let v = json(&r.body);
    assert_eq!(v["healthy"], false);
    assert_eq!(v["nodeEligible"], true);
    assert_eq!(v["lastUpdated"], "0001-01-01T00:00:00Z");
    assert_eq!(v["currentTime"], "2023-11-14T22:13:20Z");
    assert_eq!(must_get(addr, "/livez").await.status, 200);

    health.updated();
    let r = must_get(addr, "/healthz").await;
    assert_eq!(r.status, 200);
    let v = json(&r.body);
    assert_eq!(v["healthy"], true);
    assert_eq!(v["status"]["IPv4"]["healthy"], true);
    let r = must_get(addr, "/livez").await;
    assert_eq!(r.status, 200);
    assert!(json(&r.body).get("nodeEligible").is_none());

    // Node being deleted: /healthz fails, /livez does not.
    health.set_node_eligible(false);
    let r = must_get(addr, "/healthz").await;
    assert_eq!(r.status, 503);
    assert_eq!(json(&r.body)["nodeEligible"], false);
    assert_eq!(must_get(addr, "/livez").await.status, 200);
    health.set_node_eligible(true);

    // A queued change left unapplied past the timeout fails both.
    health.queued_update();
    clock.advance(Duration::from_secs(61));
    assert_eq!(must_get(addr, "/healthz").await.status, 503);
    assert_eq!(must_get(addr, "/livez").await.status, 503);

    // Only the two probes live here.
    assert_eq!(must_get(addr, "/debug/state").await.status, 404);
    assert_eq!(must_get(addr, "/metrics").await.status, 404);

    let text = metrics.encode();
    for (line, n) in [
        ("kubeproxy_proxy_healthz_total{code=\"503\"}", 3),
        ("kubeproxy_proxy_healthz_total{code=\"200\"}", 1),
        ("kubeproxy_proxy_livez_total{code=\"200\"}", 3),
        ("kubeproxy_proxy_livez_total{code=\"503\"}", 1),
    ] {
        assert!(
            text.contains(&format!("{line} {n}\n")),
            "{line} {n} in\n{text}"
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn target(name: &str, local_endpoints: usize) -> ServiceHealthTarget {
    ServiceHealthTarget {
        namespace: "default".into(),
        name: name.into(),
        local_endpoints,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_health_servers_open_answer_update_and_close() {
    let clock = clock();
    let health =
        HealthState::with_clock(Duration::from_secs(60), vec![IpFamily::V4], clock.clone());
    let mut servers = ServiceHealthServers::new(
        vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        health.clone(),
        tokio::runtime::Handle::current(),
    );
    let port = free_port();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));

    let errors = servers.sync(&BTreeMap::from([(port, target("web", 0))]));
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(servers.ports(), vec![port]);
    assert_eq!(servers.local_addrs(port), &[addr]);

    // No local endpoints (and not synced yet): 503.
    let r = must_get(addr, "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["content-type"], "application/json");
    let v = json(&r.body);
    assert_eq!(v["service"]["namespace"], "default");
    assert_eq!(v["service"]["name"], "web");
    assert_eq!(v["localEndpoints"], 0);
    assert_eq!(v["serviceProxyHealthy"], false);

    // Endpoints appear, proxy synced: 200 on any path, same listener.
    health.updated();
    assert!(servers
        .sync(&BTreeMap::from([(port, target("web", 2))]))
        .is_empty());
    let r = must_get(addr, "/healthz").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-load-balancing-endpoint-weight"], "2");
    let v = json(&r.body);
    assert_eq!(v["localEndpoints"], 2);
    assert_eq!(v["serviceProxyHealthy"], true);

    // The Node's eligibility is /healthz's business, not the service's.
    health.set_node_eligible(false);
    assert_eq!(must_get(addr, "/").await.status, 200);

    // Endpoints but the proxy is stuck: 503.
    health.queued_update();
    clock.advance(Duration::from_secs(60));
    let r = must_get(addr, "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(json(&r.body)["serviceProxyHealthy"], false);

    // Closed when no longer wanted.
    assert!(servers.sync(&BTreeMap::new()).is_empty());
    assert!(servers.ports().is_empty());
    let mut closed = false;
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "port {port} still accepting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_health_port_errors_are_per_port() {
    let health = HealthState::with_clock(Duration::from_secs(60), vec![IpFamily::V4], clock());
    health.updated();
    let mut servers = ServiceHealthServers::new(
        vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        health,
        tokio::runtime::Handle::current(),
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = taken.local_addr().expect("addr").port();
    let good = free_port();

    let desired = BTreeMap::from([(busy, target("a", 1)), (good, target("b", 1))]);
    let errors = servers.sync(&desired);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].port, busy);
    assert_eq!(errors[0].target.name, "a");
    assert!(matches!(errors[0].error, ServiceHealthError::Listen { .. }));
    assert_eq!(servers.ports(), vec![good]);
    let r = must_get(SocketAddr::from((Ipv4Addr::LOCALHOST, good)), "/").await;
    assert_eq!(
        (r.status, json(&r.body)["service"]["name"].clone()),
        (200, "b".into())
    );

    // Retried on the next sync once the port is free.
    drop(taken);
    assert!(servers.sync(&desired).is_empty());
    let mut want = vec![busy, good];
    want.sort();
    assert_eq!(servers.ports(), want);

    let errors = servers.sync(&BTreeMap::from([(0, target("zero", 1))]));
    assert!(matches!(errors[0].error, ServiceHealthError::PortZero));
}
