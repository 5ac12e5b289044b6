//! A real Prometheus (Debian's `prometheus` package, installed by
//! scripts/setup.sh) scraping the real kproxy: the sync and network
//! programming histograms are queryable the way dashboards query them, the
//! shipped alert rules and dashboard queries load and evaluate, and
//! `promtool` accepts kproxy's exposition and the alert rules.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_model::fixtures::{Ep, SliceBuilder, SvcBuilder};
use kproxy_testkit::apiserver::FakeApiServer;
use kproxy_testkit::kproxy::KproxyProcess;
use kproxy_testkit::netns::parse_http_response;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/monitoring")
}

fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{name} not found on PATH: run scripts/setup.sh (installs Debian's prometheus package)"
        )
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_http_response(&raw).map_err(|e| std::io::Error::other(e.to_string()))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server on a free loopback port, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(scrape_target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: kproxy\n    static_configs:\n      - targets: ['{scrape_target}']\n",
                rules = monitoring_dir().join("kproxy-alerts.yaml").display()
            ),
        )
        .expect("prometheus.yml");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        let mut p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        p.wait("ready", |p| {
            Ok(matches!(http_get(p.addr, "/-/ready"), Ok((200, _))))
        });
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn wait(&mut self, what: &str, mut f: impl FnMut(&Prometheus) -> Result<bool, String>) {
        let deadline = Instant::now() + WAIT;
        let mut last = String::new();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            match f(self) {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => last = e,
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what} ({last}); prometheus log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `/api/v1/query`: the `data` of a successful answer, or the error.
    fn query(&self, promql: &str) -> Result<Value, String> {
        let (code, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", url_encode(promql)),
        )
        .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if code != 200 || v["status"] != "success" {
            return Err(format!("{promql}: {code} {body}"));
        }
        Ok(v["data"].clone())
    }

    /// The values of an instant-vector query's result.
    fn values(&self, promql: &str) -> Result<Vec<f64>, String> {
        let data = self.query(promql)?;
        Ok(data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["value"][1].as_str()?.parse().ok())
            .collect())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rfc3339_now() -> String {
    // The EndpointSlice controller's format; whole seconds are enough here.
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn slice(n: usize) -> EndpointSlice {
    let mut b = SliceBuilder::new("default", "web-1", "web", "IPv4").port("http", 8080, "TCP");
    for i in 0..n {
        b = b.endpoint(Ep::new(&format!("10.244.1.{}", 10 + i)).node("node-a"));
    }
    let mut s = b.build();
    s.metadata.annotations = Some(
        [(
            "endpoints.kubernetes.io/last-change-trigger-time".to_string(),
            rfc3339_now(),
        )]
        .into(),
    );
    s
}

/// Every PromQL expression of the shipped Grafana dashboard, with its
/// variables replaced as Grafana would for job "kproxy" and all nodes.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(monitoring_dir().join("kproxy-dashboard.json"))
        .expect("kproxy-dashboard.json");
    let dash: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("expr");
            out.push((
                panel["title"].as_str().unwrap_or_default().to_string(),
                expr.replace("$__rate_interval", "1m")
                    .replace("$job", "kproxy")
                    .replace("$instance", ".*"),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_kproxy_and_the_dashboard_and_alerts_evaluate() {
    let api = FakeApiServer::start().await.expect("fake API server");
    let kubeconfig = api.kubeconfig_file().expect("kubeconfig");
    api.create(
        &SvcBuilder::new("default", "web")
            .cluster_ip("10.96.0.10")
            .port("http", 80, "TCP")
            .build(),
    )
    .expect("service");
    api.create(&slice(1)).expect("slice");
    let args = vec![
        "--dry-run".to_string(),
        format!("--kubeconfig={}", kubeconfig.path().display()),
        "--hostname-override=node-a".to_string(),
        "--iptables-min-sync-period=0s".to_string(),
    ];
    let binary = Path::new(env!("CARGO_BIN_EXE_kproxy"));
    let mut k = tokio::task::block_in_place(|| KproxyProcess::spawn(binary, None, &args))
        .expect("spawn kproxy");
    tokio::task::block_in_place(|| k.wait_healthy(Duration::from_secs(20)))
        .expect("kproxy healthy");
    let metrics_addr = k.metrics_addr;

    let mut prom = tokio::task::block_in_place(|| Prometheus::start(metrics_addr));

    // Syncs while Prometheus scrapes every second: an endpoint change (with
    // the controller's trigger time) every 300 ms, until the p99 is a number.
    let sync_p99 =
        "histogram_quantile(0.99, rate(kubeproxy_sync_proxy_rules_duration_seconds_bucket[1m]))";
    let mut n = 1;
    let deadline = Instant::now() + WAIT;
    let p99 = loop {
        n = n % 20 + 1;
        api.apply(&slice(n)).expect("update slice");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let values = tokio::task::block_in_place(|| prom.values(sync_p99)).unwrap_or_default();
        if let Some(v) = values.into_iter().find(|v| v.is_finite()) {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "{sync_p99} never became a number; prometheus log:\n{}",
            prom.log()
        );
    };
    println!("sync p99: {p99} s");
    assert!(p99 > 0.0 && p99 <= 16.384, "p99 {p99}");

    tokio::task::block_in_place(|| {
        // The network programming histogram has samples.
        let count = prom
            .values("sum(kubeproxy_network_programming_duration_seconds_count)")
            .expect("query");
        assert!(
            count.first().is_some_and(|c| *c >= 1.0),
            "network programming latency has no samples: {count:?}"
        );
        let p99 = prom
            .values("histogram_quantile(0.99, sum by (le) (rate(kubeproxy_network_programming_duration_seconds_bucket[1m])))")
            .expect("query");
        assert!(
            p99.iter().any(|v| v.is_finite()),
            "programming p99: {p99:?}"
        );

        // Every dashboard query is valid PromQL; the latency and change
        // panels show data.
        for (title, expr) in dashboard_queries() {
            let data = prom
                .query(&expr)
                .unwrap_or_else(|e| panic!("panel {title:?}: {e}"));
            if title.starts_with("Sync latency") || title.starts_with("Changes per second") {
                assert!(
                    data["result"].as_array().is_some_and(|r| !r.is_empty()),
                    "panel {title:?} shows nothing: {expr}"
                );
            }
        }

        // The alert rules loaded and evaluate; a healthy kproxy fires nothing.
        prom.wait("alert rules evaluated", |p| {
            let (_, body) = http_get(p.addr, "/api/v1/rules").map_err(|e| e.to_string())?;
            let v: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
            let rules: Vec<&Value> = v["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            if rules.len() != 5 {
                return Err(format!("{} rules loaded: {body}", rules.len()));
            }
            for r in &rules {
                if r["health"] != "ok" {
                    return Err(format!(
                        "rule {} is {}: {}",
                        r["name"], r["health"], r["lastError"]
                    ));
                }
                if r["state"] != "inactive" {
                    return Err(format!("rule {} is {}", r["name"], r["state"]));
                }
            }
            Ok(true)
        });
        let up = prom.values("up{job=\"kproxy\"}").expect("up");
        assert_eq!(up, [1.0]);
    });

    // promtool accepts kproxy's exposition as scraped.
    let (_, text) = tokio::task::block_in_place(|| k.get_metrics("/metrics")).expect("/metrics");
    let mut check = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = check.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Upstream's two `_total` gauges keep their names (tests/metrics_compat.rs).
    let unexpected: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            ![
                "kubeproxy_sync_proxy_rules_iptables_total",
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            ]
            .iter()
            .any(|n| *l == format!("{n} non-counter metrics should not have \"_total\" suffix"))
        })
        .collect();
    assert!(
        unexpected.is_empty() && (out.status.success() || !report.trim().is_empty()),
        "promtool check metrics:\n{report}"
    );
    drop(prom);
    let status =
        tokio::task::block_in_place(|| k.terminate(Duration::from_secs(10))).expect("terminate");
    assert!(status.success());
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let promtool = tool("promtool");
    let dir = monitoring_dir();
    let out = Command::new(&promtool)
        .args(["check", "rules", "kproxy-alerts.yaml"])
        .current_dir(&dir)
        .output()
        .expect("promtool check rules");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("SUCCESS: 5 rules found"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&promtool)
        .args(["test", "rules", "kproxy-alerts.test.yaml"])
        .current_dir(&dir)
        .output()
        .expect("promtool test rules");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The unit test does catch a wrong expectation.
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        dir.join("kproxy-alerts.yaml"),
        tmp.path().join("kproxy-alerts.yaml"),
    )
    .expect("copy");
    let test = std::fs::read_to_string(dir.join("kproxy-alerts.test.yaml")).expect("test");
    // Claim the stall alert already fires at 2 minutes: it must not.
    let wrong = test.replacen("eval_time: 2m", "eval_time: 9m", 1);
    assert_ne!(wrong, test);
    std::fs::write(tmp.path().join("wrong.test.yaml"), wrong).expect("write");
    let out = Command::new(&promtool)
        .args(["test", "rules", "wrong.test.yaml"])
        .current_dir(tmp.path())
        .output()
        .expect("promtool test rules");
    assert!(!out.status.success(), "a wrong expectation passed");
}
