//! kube-proxy compatibility of what monitoring and DaemonSets see:
//! `/metrics` against upstream's metric list (tests/fixtures/upstream-metrics.txt),
//! the `/healthz` and `/livez` JSON against upstream's fields, and the
//! harmless kube-proxy flags existing DaemonSets pass.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{cluster_ip_service, slice_for, Cluster, NODE, REMOTE_NODE, WAIT};
use kproxy_testkit::apiserver::FakeApiServer;
use kproxy_testkit::kproxy::KproxyProcess;
use serde_json::Value;

/// Upstream metrics kproxy does not expose, and why. The test fails if one
/// of these shows up after all (then it must be checked instead).
const NOT_EXPOSED: &[(&str, &str)] = &[
    (
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
        "nftables mode only; kproxy implements iptables and ipvs",
    ),
    (
        "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
        "nftables mode only; kproxy implements iptables and ipvs",
    ),
    (
        "kubeproxy_iptables_ct_state_invalid_dropped_packets_total",
        "upstream counts these with an nfacct object its rules reference; kproxy's rules use no nfacct",
    ),
    (
        "kubeproxy_iptables_localhost_nodeports_accepted_packets_total",
        "upstream counts these with an nfacct object its rules reference; kproxy's rules use no nfacct",
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_last",
        "rules written by the last sync, per table: kproxy exports kproxy_sync_objects_written (all tables together) instead",
    ),
    (
        "kubeproxy_conntrack_reconciler_sync_duration_seconds",
        "upstream's periodic conntrack reconciler; kproxy deletes stale UDP entries per change and counts them in kproxy_conntrack_entries_deleted_total",
    ),
    (
        "kubeproxy_conntrack_reconciler_deleted_entries_total",
        "upstream's periodic conntrack reconciler; kproxy deletes stale UDP entries per change and counts them in kproxy_conntrack_entries_deleted_total",
    ),
];

/// Labels upstream has that kproxy's families may lack, and why. Every
/// other label must match exactly.
const LABELS_NOT_EXPOSED: &[(&str, &str)] = &[(
    "ip_family",
    "upstream (1.33+) runs one proxier per IP family and labels its metrics per family; kproxy syncs both families in one pass and reports one series (queries without ip_family, as in manifests/monitoring/, work on both)",
)];

/// The JSON fields of upstream's `ProxyHealth` (pkg/proxy/healthcheck/proxy_health.go).
const HEALTHZ_FIELDS: &[&str] = &[
    "lastUpdated",
    "currentTime",
    "nodeEligible",
    "healthy",
    "status",
];
/// `/livez` leaves `nodeEligible` unset (omitempty).
const LIVEZ_FIELDS: &[&str] = &["lastUpdated", "currentTime", "healthy", "status"];
/// Upstream's `ProxierHealth`, the values of `status` keyed by IP family.
const STATUS_FIELDS: &[&str] = &["lastUpdated", "healthy"];

/// `2026-01-02T03:04:05Z` (UTC, whole seconds), as the EndpointSlice
/// controller writes its trigger-time annotation.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|+hh:mm|-hh:mm)`, as Go marshals a time.Time.
fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if b.len() < 20
        || !(digits(0..4) && b[4] == b'-' && digits(5..7) && b[7] == b'-' && digits(8..10))
        || b[10] != b'T'
        || !(digits(11..13) && b[13] == b':' && digits(14..16) && b[16] == b':' && digits(17..19))
    {
        return false;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    rest == "Z"
        || (rest.len() == 6
            && (rest.starts_with('+') || rest.starts_with('-'))
            && rest.as_bytes()[3] == b':')
}

#[derive(Debug)]
struct Upstream {
    name: String,
    type_: String,
    labels: BTreeSet<String>,
    buckets: Option<Vec<f64>>,
}

fn upstream_metrics() -> Vec<Upstream> {
    let path = format!(
        "{}/tests/fixtures/upstream-metrics.txt",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("upstream-metrics.txt");
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(cols.len(), 5, "bad fixture line {l:?}");
            Upstream {
                name: cols[0].to_string(),
                type_: cols[1].to_string(),
                labels: match cols[2] {
                    "-" => BTreeSet::new(),
                    s => s.split(',').map(String::from).collect(),
                },
                buckets: (cols[3] != "-").then(|| buckets(cols[3])),
            }
        })
        .collect()
}

/// Expands the fixture's bucket notation the way client_golang and
/// component-base do.
fn buckets(spec: &str) -> Vec<f64> {
    let args = |s: &str, f: &str| -> Vec<f64> {
        let inner = s
            .strip_prefix(f)
            .and_then(|s| s.strip_prefix('('))
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("bad bucket spec {s:?}"));
        inner
            .split(',')
            .map(|n| n.parse().unwrap_or_else(|_| panic!("bad number in {s:?}")))
            .collect()
    };
    if spec.starts_with("exponential") {
        let a = args(spec, "exponential");
        (0..a[2] as i32).map(|i| a[0] * a[1].powi(i)).collect()
    } else if let Some(parts) = spec
        .strip_prefix("merge(")
        .and_then(|s| s.strip_suffix(')'))
    {
        let mut out = vec![0.0];
        for part in parts.split('+') {
            let a = args(part, "linear");
            out.extend((0..a[2] as i32).map(|i| a[0] + a[1] * f64::from(i)));
        }
        out
    } else {
        panic!("unknown bucket spec {spec:?}")
    }
}

#[derive(Debug, Default)]
struct Family {
    type_: String,
    /// Label names seen on its samples, `le` excluded.
    labels: BTreeSet<String>,
    samples: usize,
    /// Bucket boundaries (without +Inf) of its first series.
    buckets: Vec<f64>,
    saw_inf: bool,
}

/// Label names and values of `{a="x",b="y"}` (the braces' content).
fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if name.is_empty() {
            break;
        }
        assert_eq!(chars.next(), Some('"'), "label {name} in {s:?}");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((name.trim_start_matches(',').to_string(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    out
}

/// Families of a classic text exposition.
fn parse_exposition(text: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE line");
            families.entry(name.to_string()).or_default().type_ = ty.to_string();
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, _value) = line.rsplit_once(' ').expect("sample line");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}').expect("}"))),
            None => (series, Vec::new()),
        };
        let family = [name, "_bucket", "_sum", "_count"]
            .iter()
            .enumerate()
            .find_map(|(i, suffix)| {
                let base = if i == 0 {
                    name
                } else {
                    name.strip_suffix(suffix)?
                };
                families.contains_key(base).then(|| base.to_string())
            })
            .unwrap_or_else(|| panic!("sample {name} has no # TYPE"));
        let f = families.get_mut(&family).expect("family");
        f.samples += 1;
        for (k, v) in &labels {
            if k == "le" {
                if f.saw_inf {
                    continue;
                }
                if v == "+Inf" {
                    f.saw_inf = true;
                } else {
                    f.buckets.push(v.parse().expect("le"));
                }
            } else {
                f.labels.insert(k.clone());
            }
        }
    }
    families
}

/// `promtool check metrics` (Debian's prometheus package) on an exposition
/// with every family populated.
fn promtool_check_metrics(text: &str) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (run scripts/setup.sh)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Upstream declares two gauges with a `_total` name; kproxy keeps
    // upstream's names, so promtool's lint about exactly those is expected.
    let upstream_total_gauges: Vec<String> = upstream_metrics()
        .into_iter()
        .filter(|u| u.type_ == "gauge" && u.name.ends_with("_total"))
        .map(|u| u.name)
        .collect();
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            !upstream_total_gauges.iter().any(|name| {
                *l == format!("{name} non-counter metrics should not have \"_total\" suffix")
            })
        })
        .collect();
    assert!(
        problems.is_empty() && (out.status.success() || !report.trim().is_empty()),
        "promtool check metrics:\n{report}"
    );
    if !report.trim().is_empty() {
        println!("promtool lint on upstream's own names (kept for compatibility):\n{report}");
    }
}

fn fields(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// kproxy in iptables mode on a namespace "node", after a few full and
/// partial syncs that populate every labelled family.
#[test]
fn metrics_and_health_match_upstream() {
    let Some(c) = Cluster::new("metrics_and_health_match_upstream", 1, 1) else {
        return;
    };
    let local = c.topo.pods[0].ip();
    let remote = c.topo.remote_pods[0].ip();
    c.apply_service(&cluster_ip_service("web", "10.96.0.10", 80).build());
    c.apply_slice(&slice_for("web", "IPv4", &[(local, NODE)]));
    // Local traffic policies without a local endpoint, for
    // sync_proxy_rules_no_local_endpoints_total{traffic_policy}.
    c.apply_service(
        &cluster_ip_service("remote-only", "10.96.0.11", 80)
            .type_("NodePort")
            .external_traffic_policy("Local")
            .internal_traffic_policy("Local")
            .build(),
    );
    c.apply_slice(&slice_for("remote-only", "IPv4", &[(remote, REMOTE_NODE)]));
    let mut k = c.start_kproxy(&[]);

    // More syncs: an endpoint change carrying the EndpointSlice controller's
    // trigger time (network programming latency), and a new service.
    let mut slice = slice_for("web", "IPv4", &[(local, NODE), (remote, REMOTE_NODE)]);
    slice.metadata.annotations = Some(
        [(
            "endpoints.kubernetes.io/last-change-trigger-time".to_string(),
            rfc3339(SystemTime::now()),
        )]
        .into(),
    );
    c.apply_slice(&slice);
    c.apply_service(&cluster_ip_service("db", "10.96.0.12", 5432).build());
    k.wait_until(WAIT, "a few syncs and a programming latency", |k| {
        Ok(
            k.metric("kubeproxy_network_programming_duration_seconds_count")?
                .unwrap_or(0.0)
                >= 1.0
                && k.metric("kubeproxy_sync_partial_proxy_rules_duration_seconds_count")?
                    .unwrap_or(0.0)
                    >= 1.0,
        )
    })
    .expect("syncs");
    for path in ["/healthz", "/livez"] {
        let (code, _) = k.get_healthz(path).expect(path);
        assert_eq!(code, 200, "{path}");
    }

    let (_, text) = k.get_metrics("/metrics").expect("/metrics");
    let ours = parse_exposition(&text);
    let mut problems = Vec::new();
    let mut checked = 0;
    for up in upstream_metrics() {
        if let Some((_, why)) = NOT_EXPOSED.iter().find(|(n, _)| *n == up.name) {
            println!("not exposed: {} ({why})", up.name);
            if ours.contains_key(&up.name) {
                problems.push(format!(
                    "{} is exposed after all: move it out of NOT_EXPOSED so it is checked",
                    up.name
                ));
            }
            continue;
        }
        let Some(f) = ours.get(&up.name) else {
            problems.push(format!("{} ({}) is missing", up.name, up.type_));
            continue;
        };
        checked += 1;
        if f.type_ != up.type_ {
            problems.push(format!(
                "{}: type {} (upstream {})",
                up.name, f.type_, up.type_
            ));
        }
        if f.samples == 0 {
            problems.push(format!(
                "{}: no samples, labels cannot be checked (the scenario must populate it)",
                up.name
            ));
            continue;
        }
        let missing: BTreeSet<&String> = up.labels.difference(&f.labels).collect();
        let extra: BTreeSet<&String> = f.labels.difference(&up.labels).collect();
        for label in &missing {
            match LABELS_NOT_EXPOSED.iter().find(|(l, _)| l == label) {
                Some((_, why)) => println!("deviation: {} lacks label {label} ({why})", up.name),
                None => problems.push(format!("{}: lacks label {label}", up.name)),
            }
        }
        if !extra.is_empty() {
            problems.push(format!(
                "{}: labels {extra:?} upstream does not have",
                up.name
            ));
        }
        if let Some(want) = &up.buckets {
            if &f.buckets != want || !f.saw_inf {
                problems.push(format!(
                    "{}: buckets {:?} (+Inf: {}), upstream {want:?}",
                    up.name, f.buckets, f.saw_inf
                ));
            }
        }
    }
    for (name, _) in NOT_EXPOSED {
        assert!(
            upstream_metrics().iter().any(|u| u.name == *name),
            "NOT_EXPOSED names {name}, which is not in the upstream list"
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked >= 14, "only {checked} upstream metrics checked");
    promtool_check_metrics(&text);

    // /healthz and /livez: upstream's JSON fields, status per IP family.
    for (path, want) in [("/healthz", HEALTHZ_FIELDS), ("/livez", LIVEZ_FIELDS)] {
        let (_, body) = k.get_healthz(path).expect(path);
        let json: Value = serde_json::from_str(&body).expect("health JSON");
        assert_eq!(fields(&json), set(want), "{path}: {body}");
        assert_eq!(json["healthy"], true, "{path}");
        for key in ["lastUpdated", "currentTime"] {
            let t = json[key].as_str().unwrap_or_default();
            assert!(is_rfc3339(t), "{path} {key} is not RFC 3339: {t:?}");
        }
        let status = json["status"].as_object().expect("status map");
        assert!(status.contains_key("IPv4"), "{path}: {body}");
        for (family, h) in status {
            assert!(family == "IPv4" || family == "IPv6", "{family}");
            assert_eq!(fields(h), set(STATUS_FIELDS), "{path} status.{family}");
        }
    }
}

/// Flags that kubeadm's and other common kube-proxy DaemonSets pass and
/// kproxy has no use for: accepted, each named in a warning, and kproxy
/// runs normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harmless_kube_proxy_flags_are_accepted_with_a_warning() {
    let api = FakeApiServer::start().await.expect("fake API server");
    let kubeconfig = api.kubeconfig_file().expect("kubeconfig");
    api.create(&cluster_ip_service("web", "10.96.0.10", 80).build())
        .expect("service");
    let ignored = [
        ("--oom-score-adj", "--oom-score-adj=-999"),
        (
            "--feature-gates",
            "--feature-gates=AllAlpha=false,TopologyAwareHints=true",
        ),
        ("--profiling", "--profiling=false"),
        ("--config-sync-period", "--config-sync-period=15m"),
        ("--kube-api-qps", "--kube-api-qps=5"),
        ("--kube-api-burst", "--kube-api-burst=10"),
        (
            "--kube-api-content-type",
            "--kube-api-content-type=application/vnd.kubernetes.protobuf",
        ),
        ("--bind-address-hard-fail", "--bind-address-hard-fail=false"),
        (
            "--show-hidden-metrics-for-version",
            "--show-hidden-metrics-for-version=1.30",
        ),
        // Upstream's logging flags besides -v and --logging-format.
        ("--vmodule", "--vmodule=proxier*=4"),
        ("--log-flush-frequency", "--log-flush-frequency=5s"),
        (
            "--log-json-info-buffer-size",
            "--log-json-info-buffer-size=0",
        ),
        ("--log-json-split-stream", "--log-json-split-stream"),
        (
            "--log-text-info-buffer-size",
            "--log-text-info-buffer-size=0",
        ),
        ("--log-text-split-stream", "--log-text-split-stream=false"),
        // klog's, from manifests older than Kubernetes 1.26.
        ("--logtostderr", "--logtostderr"),
        ("--alsologtostderr", "--alsologtostderr=false"),
    ];
    let mut args: Vec<String> = ignored.iter().map(|(_, a)| a.to_string()).collect();
    args.extend([
        // Acted on, in kube-proxy's spellings.
        "--v=2".to_string(),
        "--logging-format=text".to_string(),
        "--proxy-mode=iptables".to_string(),
        "--dry-run".to_string(),
        format!("--kubeconfig={}", kubeconfig.path().display()),
        "--hostname-override=node-a".to_string(),
    ]);
    let binary = Path::new(env!("CARGO_BIN_EXE_kproxy"));
    let mut k = tokio::task::block_in_place(|| KproxyProcess::spawn(binary, None, &args))
        .expect("spawn kproxy");
    tokio::task::block_in_place(|| {
        k.wait_healthy(WAIT)
            .expect("healthy despite the extra flags");
        let log = k.log();
        for (flag, _) in ignored {
            assert!(
                log.lines()
                    .any(|l| l.contains("WARN") && l.contains("not acted on") && l.contains(flag)),
                "no warning naming {flag}:\n{log}"
            );
        }
        assert!(k.is_running());
        let status = k.terminate(Duration::from_secs(10)).expect("terminate");
        assert!(status.success(), "{status}");
    });
}

#[test]
fn time_helpers() {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
    assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    assert!(is_rfc3339("2023-11-14T22:13:20.123456789Z"));
    assert!(is_rfc3339("2023-11-14T22:13:20+01:00"));
    assert!(!is_rfc3339("2023-11-14 22:13:20Z"));
    assert!(!is_rfc3339("0001-01-01"));
}

#[test]
fn bucket_notation_expands_like_upstream() {
    let exp = buckets("exponential(0.001,2,15)");
    assert_eq!(exp.len(), 15);
    assert!((exp[14] - 16.384).abs() < 1e-9);
    let merged =
        buckets("merge(linear(0.25,0.25,2)+linear(1,1,59)+linear(60,5,12)+linear(120,30,7))");
    assert_eq!(merged.len(), 81);
    assert_eq!(&merged[..4], &[0.0, 0.25, 0.5, 1.0]);
    assert_eq!(merged[80], 300.0);
    let f = parse_exposition(
        "# TYPE a histogram\na_bucket{x=\"1\",le=\"0.5\"} 1\na_bucket{x=\"1\",le=\"+Inf\"} 1\na_sum{x=\"1\"} 1\na_count{x=\"1\"} 1\n# TYPE b_total counter\nb_total{code=\"a\\\"b\"} 2\n",
    );
    assert_eq!(f["a"].buckets, [0.5]);
    assert!(f["a"].saw_inf);
    assert_eq!(f["a"].labels, set(&["x"]));
    assert_eq!(f["a"].samples, 4);
    assert_eq!(f["b_total"].labels, set(&["code"]));
}
