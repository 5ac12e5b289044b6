//! Scale benchmark of kproxy's iptables mode on the real kernel.
//!
//! For each iptables backend and each size N (services × E endpoints) it
//! creates a fresh network namespace (never touching the host's tables),
//! loads the objects into the fake API server, starts the real (release)
//! kproxy in the namespace and measures:
//!
//! * the first full sync (kproxy's `sync_full_proxy_rules_duration_seconds`
//!   and wall time from start to healthy), next to the floors:
//!   `iptables-restore` alone loading kproxy's own rules (`iptables-save`
//!   after the sync) into an empty namespace, and upstream kube-proxy's
//!   layout of the same services loaded the same way;
//! * one endpoint change: API update → the new endpoint receiving traffic,
//!   observed by connecting to the ClusterIP in a loop (the node namespace
//!   routes the endpoint range to itself, a listener reports which endpoint
//!   address a connection reached), and kproxy's own
//!   `network_programming_duration_seconds`; plus the floor: the restore of
//!   just that chain's delta with `--noflush`;
//! * churn at fixed rates of endpoint changes: programming latency from the
//!   histogram, CPU seconds, and whether kproxy keeps up (drain time after
//!   the churn stops);
//! * peak RSS (VmHWM) and new TCP connections per second through the last
//!   service's ClusterIP.
//!
//! Run through `benches/scale.sh`; prints one markdown table.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Parser;
use kproxy_testkit::apiserver::{FakeApiServer, Options};
use kproxy_testkit::kproxy::KproxyProcess;
use kproxy_testkit::netns::{is_root, Netns};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(name = "kproxy-scale-bench", about = "kproxy iptables mode at scale")]
struct Args {
    /// The kproxy binary (a release build).
    #[arg(long, default_value = "target/release/kproxy")]
    kproxy: PathBuf,
    /// Service counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    sizes: Vec<usize>,
    /// Also run 50k services.
    #[arg(long)]
    full: bool,
    /// Endpoints per service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// nft, legacy or all (the backends present).
    #[arg(long, default_value = "all")]
    iptables_backend: String,
    /// Single endpoint changes measured per size.
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// Idle time between two single changes, in ms (longer than kproxy's
    /// min-sync-period so each change meets an idle proxy).
    #[arg(long, default_value_t = 1100)]
    change_gap_ms: u64,
    /// Churn rates (endpoint changes per second), comma-separated; 0: none.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    churn_rates: Vec<u32>,
    /// Seconds of churn per rate.
    #[arg(long, default_value_t = 20)]
    churn_secs: u64,
    /// Seconds of connection-rate measurement.
    #[arg(long, default_value_t = 2.0)]
    cps_secs: f64,
    /// Extra kproxy flags (repeatable), e.g. --kproxy-arg=--iptables-min-sync-period=0s.
    #[arg(long = "kproxy-arg", allow_hyphen_values = true)]
    kproxy_args: Vec<String>,
    /// Skip loading upstream's layout (iptables-nft 1.8.9 needs minutes at
    /// 10k services: its restore time grows with the square of the chains).
    #[arg(long)]
    no_upstream: bool,
    /// Skip the restart onto the rules left by the first run.
    #[arg(long)]
    no_restart: bool,
    /// Keep kproxy's log of each run in this directory.
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

/// 172.16.0.0/12: cluster IPs.
fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from((172u32 << 24 | 16 << 16) + i as u32 + 1)
}

/// 10.64.0.0/10: endpoints (routed to the node namespace itself).
fn endpoint_ip(i: usize, e: usize, endpoints: usize) -> Ipv4Addr {
    Ipv4Addr::from((10u32 << 24 | 64 << 16) + (i * endpoints + e) as u32 + 1)
}

/// 10.120.0.0/13: fresh addresses for changes (still inside 10.64.0.0/10).
fn fresh_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::from((10u32 << 24 | 120 << 16) + k as u32 + 1)
}

const ENDPOINT_RANGE: &str = "10.64.0.0/10";
const NODE: &str = "node-a";
const REMOTE: &str = "node-b";
const TRIGGER: &str = "endpoints.kubernetes.io/last-change-trigger-time";

fn ns_name(i: usize) -> String {
    format!("ns{}", i % 100)
}

fn service_json(i: usize) -> Value {
    let ip = cluster_ip(i).to_string();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns_name(i), "name": format!("svc{i}"), "labels": {"app": format!("svc{i}")}},
        "spec": {
            "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None", "selector": {"app": format!("svc{i}")},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
        },
        "status": {"loadBalancer": {}}
    })
}

/// A slice as the endpointslice controller writes it: with targetRefs,
/// owner reference and its labels, so that the memory measured is that of
/// real objects.
fn slice_json(i: usize, ips: &[Ipv4Addr], trigger: Option<SystemTime>) -> Value {
    let ns = ns_name(i);
    let endpoints: Vec<Value> = ips
        .iter()
        .enumerate()
        .map(|(k, ip)| {
            json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": REMOTE,
                "targetRef": {
                    "kind": "Pod", "namespace": ns, "name": format!("svc{i}-7d4b9c8f6-{k:05}"),
                    "uid": format!("00000000-0000-4000-8000-{:012x}", i * 100 + k)
                }
            })
        })
        .collect();
    let mut meta = json!({
        "namespace": ns, "name": format!("svc{i}-1"), "generateName": format!("svc{i}-"),
        "labels": {
            "kubernetes.io/service-name": format!("svc{i}"),
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            "app": format!("svc{i}")
        },
        "ownerReferences": [{
            "apiVersion": "v1", "kind": "Service", "name": format!("svc{i}"),
            "uid": format!("00000000-0000-4000-9000-{i:012x}"),
            "controller": true, "blockOwnerDeletion": true
        }]
    });
    if let Some(t) = trigger {
        if let Ok(ts) = jiff::Timestamp::try_from(t) {
            meta["annotations"] = json!({ TRIGGER: ts.to_string() });
        }
    }
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": meta, "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

fn endpoints_of(i: usize, e: usize) -> Vec<Ipv4Addr> {
    (0..e).map(|k| endpoint_ip(i, k, e)).collect()
}

// ---------------------------------------------------------------- iptables

fn restore_cmd(backend: &str) -> String {
    format!("iptables-{backend}-restore")
}

fn backend_present(backend: &str) -> bool {
    let Ok(ns) = Netns::create("probe") else {
        return false;
    };
    ns.exec([
        format!("iptables-{backend}"),
        "-t".into(),
        "nat".into(),
        "-S".into(),
    ])
    .map(|o| o.status.success())
    .unwrap_or(false)
}

/// Runs `iptables-<b>-restore --noflush` with `text` in `ns`; returns the wall time.
fn timed_restore(ns: &Netns, backend: &str, text: &str) -> Result<Duration> {
    let start = Instant::now();
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            &restore_cmd(backend),
            "--noflush",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting iptables-restore")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            restore_cmd(backend),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

fn save(ns: &Netns, backend: &str) -> Result<String> {
    ns.exec_ok([format!("iptables-{backend}-save")])
}

/// A 16-character base32-alphabet tag, standing in for upstream's hash
/// (same length, so the same rule sizes).
fn tag(seed: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    const ALPHA: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(16);
    let mut x = h ^ (h >> 29);
    for k in 0..16 {
        if k == 12 {
            x = h.rotate_left(17);
        }
        out.push(ALPHA[(x & 31) as usize] as char);
        x >>= 5;
    }
    out
}

/// Upstream kube-proxy's iptables layout (pkg/proxy/iptables) for the same
/// services: KUBE-SERVICES dispatch, one KUBE-SVC per service (masquerade
/// rule + probability rules), one KUBE-SEP per endpoint (hairpin + DNAT),
/// per-endpoint comments dropped above 1000 endpoints as upstream.
fn upstream_layout(n: usize, e: usize) -> String {
    let large = n * e > 1000;
    let mut out = String::with_capacity(n * (e + 1) * 300);
    out.push_str("*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n:KUBE-PROXY-CANARY - [0:0]\n");
    out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n");
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    out.push_str("COMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-PROXY-CANARY - [0:0]\n");
    let names: Vec<(String, String, Vec<String>)> = (0..n)
        .map(|i| {
            let spn = format!("{}/svc{i}:http", ns_name(i));
            let svc = format!("KUBE-SVC-{}", tag(&format!("{spn}tcp")));
            let seps = (0..e)
                .map(|k| {
                    format!(
                        "KUBE-SEP-{}",
                        tag(&format!("{spn}tcp{}:8080", endpoint_ip(i, k, e)))
                    )
                })
                .collect();
            (spn, svc, seps)
        })
        .collect();
    for (_, svc, seps) in &names {
        out.push_str(&format!(":{svc} - [0:0]\n"));
        for s in seps {
            out.push_str(&format!(":{s} - [0:0]\n"));
        }
    }
    out.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    for (i, (spn, svc, _)) in names.iter().enumerate() {
        out.push_str(&format!(
            "-A KUBE-SERVICES -m comment --comment \"{spn} cluster IP\" -m tcp -p tcp -d {} --dport 80 -j {svc}\n",
            cluster_ip(i)
        ));
    }
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    for (i, (spn, svc, seps)) in names.iter().enumerate() {
        out.push_str(&format!(
            "-A {svc} -m comment --comment \"{spn} cluster IP\" -m tcp -p tcp -d {} --dport 80 ! -s {ENDPOINT_RANGE} -j KUBE-MARK-MASQ\n",
            cluster_ip(i)
        ));
        for (k, sep) in seps.iter().enumerate() {
            let ip = endpoint_ip(i, k, e);
            let c = if large {
                String::new()
            } else {
                format!("-m comment --comment \"{spn} -> {ip}:8080\" ")
            };
            let p = if k + 1 < e {
                format!(
                    "-m statistic --mode random --probability {:.10} ",
                    1.0 / (e - k) as f64
                )
            } else {
                String::new()
            };
            out.push_str(&format!("-A {svc} {c}{p}-j {sep}\n"));
        }
        for (k, sep) in seps.iter().enumerate() {
            let ip = endpoint_ip(i, k, e);
            let c = if large {
                String::new()
            } else {
                format!("-m comment --comment {spn} ")
            };
            out.push_str(&format!("-A {sep} {c}-s {ip} -j KUBE-MARK-MASQ\n"));
            out.push_str(&format!(
                "-A {sep} {c}-m tcp -p tcp -j DNAT --to-destination {ip}:8080\n"
            ));
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// `(nat, filter)` rule counts of an `iptables-save` text.
fn rule_counts(save: &str) -> (usize, usize) {
    let mut table = "";
    let (mut nat, mut filter) = (0, 0);
    for l in save.lines() {
        if let Some(t) = l.strip_prefix('*') {
            table = if t == "nat" {
                "nat"
            } else if t == "filter" {
                "filter"
            } else {
                ""
            };
        } else if l.starts_with("-A ") {
            match table {
                "nat" => nat += 1,
                "filter" => filter += 1,
                _ => {}
            }
        }
    }
    (nat, filter)
}

/// The nat chain whose rules DNAT to `ip:8080`, and its rules.
fn chain_with(save: &str, ip: Ipv4Addr) -> Option<(String, Vec<String>)> {
    let needle = format!("--to-destination {ip}:8080");
    let chain = save
        .lines()
        .find(|l| l.starts_with("-A ") && l.contains(&needle))?
        .split_whitespace()
        .nth(1)?
        .to_string();
    let prefix = format!("-A {chain} ");
    let rules = save
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    Some((chain, rules))
}

// ---------------------------------------------------------------- traffic

/// Accepts on 0.0.0.0:8080 in the node namespace and answers each
/// connection with the 4 bytes of the local (endpoint) address it reached.
struct Sink {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Sink {
    fn start(ns: &Netns) -> Result<Sink> {
        let stop = Arc::new(AtomicBool::new(false));
        let listener = ns.run_in(|| TcpListener::bind("0.0.0.0:8080"))??;
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> Result<()> {
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut s) = conn else { continue };
                if let Ok(SocketAddr::V4(local)) = s.local_addr() {
                    let _ = s.write_all(&local.ip().octets());
                }
            }
            Ok(())
        });
        Ok(Sink {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(&mut self, ns: &Netns) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = ns.run_in(|| TcpStream::connect(("10.64.0.1", 8080)));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One connection to `dst`: the endpoint address it reached.
fn probe(dst: SocketAddrV4) -> Option<Ipv4Addr> {
    let mut s = TcpStream::connect_timeout(&dst.into(), Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    let mut b = [0u8; 4];
    s.read_exact(&mut b).ok()?;
    Some(Ipv4Addr::from(b))
}

// ---------------------------------------------------------------- kproxy

fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces) start at state.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime are fields 14, 15 (1-based) = rest[11], rest[12].
    let ticks: f64 = f
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN)
        + f.get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

fn vm_hwm_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Cumulative `(le, count)` buckets of histogram `name`.
fn buckets(body: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    body.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, v) = rest.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, v.trim().parse().ok()?))
        })
        .collect()
}

/// The bucket bound holding quantile `q` of the observations between two
/// scrapes (an upper bound of the true quantile).
fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let base: BTreeMap<u64, f64> = before.iter().map(|(le, c)| (le.to_bits(), *c)).collect();
    let deltas: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| (*le, c - base.get(&le.to_bits()).copied().unwrap_or(0.0)))
        .collect();
    let total = deltas.last()?.1;
    if total <= 0.0 {
        return None;
    }
    deltas
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

/// The share of the observations between two scrapes at most `le`.
fn share_within(before: &[(f64, f64)], after: &[(f64, f64)], le: f64) -> Option<f64> {
    let delta = |le: f64| {
        let at = |h: &[(f64, f64)]| h.iter().find(|(b, _)| *b == le).map(|(_, c)| *c);
        Some(at(after)? - at(before).unwrap_or(0.0))
    };
    let total = delta(f64::INFINITY)?;
    (total > 0.0).then(|| delta(le).map(|c| c / total))?
}

fn metric_body(k: &KproxyProcess) -> String {
    k.get_metrics("/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

fn sample(body: &str, name: &str) -> f64 {
    kproxy_testkit::kproxy::find_sample(body, name).unwrap_or(f64::NAN)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

// ---------------------------------------------------------------- one run

#[derive(Default, Clone)]
struct Churn {
    rate: u32,
    sent: usize,
    p99_bucket: Option<f64>,
    cpu: f64,
    drain: Option<f64>,
    syncs: f64,
}

#[derive(Default, Clone)]
struct Row {
    backend: String,
    n: usize,
    nat_rules: usize,
    filter_rules: usize,
    load_s: f64,
    full_sync_s: f64,
    healthy_s: f64,
    floor_s: f64,
    upstream_s: f64,
    upstream_rules: usize,
    change_p50_ms: f64,
    change_p99_ms: f64,
    change_metric_p99: Option<f64>,
    delta_floor_ms: f64,
    churn: Vec<Churn>,
    hwm_mib: f64,
    cps: f64,
    /// A second kproxy started on the rules the first left (SIGTERM, then
    /// start): its first sync, its peak RSS, and whether traffic flowed.
    restart: Option<Restart>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Restart {
    full_sync_s: f64,
    hwm_mib: f64,
    rules_written: f64,
}

fn run_one(args: &Args, backend: &str, n: usize, baseline_only: bool) -> Result<Row> {
    let e = args.endpoints;
    let mut row = Row {
        backend: backend.to_string(),
        n,
        ..Row::default()
    };
    // The node reaches every endpoint (and, by default route, every
    // ClusterIP) over a veth to a namespace that holds the whole endpoint
    // range as local addresses.
    let node = Netns::create("scale")?;
    let eps_ns = Netns::create("eps")?;
    let link = Command::new("ip")
        .args(["link", "add", "sb0", "netns", node.name(), "type", "veth"])
        .args(["peer", "name", "sb1", "netns", eps_ns.name()])
        .status()?;
    if !link.success() {
        bail!("cannot create the veth pair");
    }
    node.sh("ip link set sb0 up")?;
    node.sh("ip addr add 192.168.77.1/30 dev sb0")?;
    node.sh("ip route add default via 192.168.77.2")?;
    eps_ns.sh("ip link set sb1 up")?;
    eps_ns.sh("ip addr add 192.168.77.2/30 dev sb1")?;
    eps_ns.sh(&format!("ip route add local {ENDPOINT_RANGE} dev lo"))?;
    node.exec_ok(["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"])?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = node.run_in(|| TcpListener::bind("127.0.0.1:0"))??;
    let api = {
        let _g = runtime.enter();
        FakeApiServer::serve_on_with(
            listener,
            Options {
                event_window: 1_000_000,
                bookmark_interval: Duration::from_secs(60),
            },
        )?
    };
    let t = Instant::now();
    for i in 0..n {
        api.apply_json(service_json(i))?;
        api.apply_json(slice_json(i, &endpoints_of(i, e), None))?;
    }
    row.load_s = t.elapsed().as_secs_f64();
    let kubeconfig = api.kubeconfig_file()?;

    let mut kargs = vec![
        format!("--kubeconfig={}", kubeconfig.path().display()),
        format!("--hostname-override={NODE}"),
        format!("--cluster-cidr={ENDPOINT_RANGE}"),
        format!("--iptables-backend={backend}"),
    ];
    kargs.extend(args.kproxy_args.iter().cloned());
    // Info logging, as in production (the test default is debug), unless
    // asked for, e.g. KPROXY_TEST_LOG=info,kproxy=debug for each sync.
    if std::env::var_os("KPROXY_TEST_LOG").is_none() {
        std::env::set_var("KPROXY_TEST_LOG", "info");
    }
    let t = Instant::now();
    let mut k = KproxyProcess::spawn(&args.kproxy, Some(&node), &kargs)?;
    k.wait_healthy(Duration::from_secs(1800))?;
    row.healthy_s = t.elapsed().as_secs_f64();
    let pid = k.pid();
    let body = metric_body(&k);
    row.full_sync_s = sample(
        &body,
        "kubeproxy_sync_full_proxy_rules_duration_seconds_sum",
    );

    let ours = save(&node, backend)?;
    (row.nat_rules, row.filter_rules) = rule_counts(&ours);

    // Traffic through the last service.
    let mut sink = Sink::start(&eps_ns)?;
    let last = n - 1;
    let dst = SocketAddrV4::new(cluster_ip(last), 80);
    let cps_secs = args.cps_secs;
    row.cps = node.run_in(move || {
        // Warm up, and make sure traffic flows at all.
        let ok = (0..20).filter(|_| probe(dst).is_some()).count();
        if ok == 0 {
            return f64::NAN;
        }
        let t = Instant::now();
        let mut count = 0u64;
        while t.elapsed().as_secs_f64() < cps_secs {
            if probe(dst).is_some() {
                count += 1;
            }
        }
        count as f64 / t.elapsed().as_secs_f64()
    })?;
    if row.cps.is_nan() {
        eprintln!(
            "warning: no traffic reaches {dst}; kproxy log:\n{}",
            k.log()
        );
    }

    if !baseline_only {
        // Floors: our rules and upstream's layout loaded into empty namespaces.
        let floor_ns = Netns::create("floor")?;
        row.floor_s = timed_restore(&floor_ns, backend, &ours)?.as_secs_f64();
        let up = upstream_layout(n, e);
        row.upstream_rules = up.lines().filter(|l| l.starts_with("-A ")).count();
        if !args.no_upstream {
            let up_ns = Netns::create("upstream")?;
            row.upstream_s = timed_restore(&up_ns, backend, &up)?.as_secs_f64();
        }
        // Delta floor: rewrite the last service's chain on top of our rules.
        if let Some((chain, rules)) = chain_with(&ours, endpoint_ip(last, 1, e)) {
            let mut delta = format!("*nat\n:{chain} - [0:0]\n");
            for r in &rules {
                delta.push_str(r);
                delta.push('\n');
            }
            delta.push_str("COMMIT\n");
            let mut times: Vec<f64> = (0..5)
                .filter_map(|_| timed_restore(&floor_ns, backend, &delta).ok())
                .map(|d| d.as_secs_f64() * 1e3)
                .collect();
            times.sort_by(f64::total_cmp);
            row.delta_floor_ms = quantile(&times, 0.5);
        }
        drop(floor_ns);

        // Single endpoint changes of the last service, each after idle.
        let before = buckets(
            &metric_body(&k),
            "kubeproxy_network_programming_duration_seconds",
        );
        let gap = Duration::from_millis(args.change_gap_ms);
        let changes = args.changes;
        let api_ref = &api;
        let lat: Vec<f64> = node.run_in(move || {
            let mut ips = endpoints_of(last, e);
            let mut out = Vec::with_capacity(changes);
            for c in 0..changes {
                std::thread::sleep(gap);
                let new = fresh_ip(c);
                ips[c % e] = new;
                let t0 = Instant::now();
                if api_ref
                    .apply_json(slice_json(last, &ips, Some(SystemTime::now())))
                    .is_err()
                {
                    continue;
                }
                loop {
                    if probe(dst) == Some(new) {
                        out.push(t0.elapsed().as_secs_f64() * 1e3);
                        break;
                    }
                    if t0.elapsed() > Duration::from_secs(30) {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            out
        })?;
        let mut lat = lat;
        lat.sort_by(f64::total_cmp);
        row.change_p50_ms = quantile(&lat, 0.5);
        row.change_p99_ms = quantile(&lat, 0.99);
        let after = buckets(
            &metric_body(&k),
            "kubeproxy_network_programming_duration_seconds",
        );
        row.change_metric_p99 = bucket_quantile(&before, &after, 0.99);

        // Churn: random services (never the probe one) at fixed rates.
        let mut seq = changes;
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        for &rate in &args.churn_rates {
            if rate == 0 || n < 2 {
                continue;
            }
            std::thread::sleep(Duration::from_millis(1500));
            let body = metric_body(&k);
            let h0 = buckets(&body, "kubeproxy_network_programming_duration_seconds");
            let count0 = sample(
                &body,
                "kubeproxy_network_programming_duration_seconds_count",
            );
            let syncs0 = sample(&body, "kubeproxy_sync_proxy_rules_duration_seconds_count");
            let sync_s0 = sample(&body, "kubeproxy_sync_proxy_rules_duration_seconds_sum");
            let cpu0 = cpu_seconds(pid);
            let start = Instant::now();
            let total = rate as usize * args.churn_secs as usize;
            let mut sent = 0usize;
            while sent < total {
                let due = ((start.elapsed().as_secs_f64() * f64::from(rate)) as usize).min(total);
                while sent < due {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let i = (rng % (n as u64 - 1)) as usize;
                    let mut ips = endpoints_of(i, e);
                    ips[seq % e] = fresh_ip(seq);
                    seq += 1;
                    api.apply_json(slice_json(i, &ips, Some(SystemTime::now())))?;
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let end = Instant::now();
            // Drained when every change has been observed as programmed.
            let mut drain = None;
            while end.elapsed() < Duration::from_secs(120) {
                let c = sample(
                    &metric_body(&k),
                    "kubeproxy_network_programming_duration_seconds_count",
                );
                if c - count0 >= sent as f64 {
                    drain = Some(end.elapsed().as_secs_f64());
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let body = metric_body(&k);
            let h1 = buckets(&body, "kubeproxy_network_programming_duration_seconds");
            let syncs = sample(&body, "kubeproxy_sync_proxy_rules_duration_seconds_count") - syncs0;
            // Beside the table: how close the p99 bucket is to its bound.
            eprintln!(
                "   churn {rate}/s: {:.2}% programmed within 1 s, {syncs} syncs of {:.3} s mean",
                share_within(&h0, &h1, 1.0).unwrap_or(f64::NAN) * 100.0,
                (sample(&body, "kubeproxy_sync_proxy_rules_duration_seconds_sum") - sync_s0)
                    / syncs
            );
            row.churn.push(Churn {
                rate,
                sent,
                p99_bucket: bucket_quantile(&h0, &h1, 0.99),
                cpu: cpu_seconds(pid) - cpu0,
                drain,
                syncs,
            });
        }
    }
    row.hwm_mib = vm_hwm_mib(pid);
    if let Some(dir) = &args.log_dir {
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::write(dir.join(format!("kproxy-{backend}-{n}.log")), k.log());
    }
    k.terminate(Duration::from_secs(30))?;
    if !baseline_only && !args.no_restart {
        // A restart (upgrade, rollout) onto the rules the first run left:
        // the first sync adopts the unchanged chains in place.
        let mut k2 = KproxyProcess::spawn(&args.kproxy, Some(&node), &kargs)?;
        k2.wait_healthy(Duration::from_secs(1800))?;
        let body = metric_body(&k2);
        let flows = node.run_in(move || (0..20).any(|_| probe(dst).is_some()))?;
        if !flows {
            eprintln!("warning: no traffic reaches {dst} after the restart");
        }
        row.restart = Some(Restart {
            full_sync_s: sample(
                &body,
                "kubeproxy_sync_full_proxy_rules_duration_seconds_sum",
            ),
            hwm_mib: vm_hwm_mib(k2.pid()),
            rules_written: sample(&body, "kproxy_sync_objects_written"),
        });
        k2.terminate(Duration::from_secs(30))?;
    }
    sink.stop(&eps_ns);
    drop(api);
    drop(runtime);
    Ok(row)
}

// ---------------------------------------------------------------- report

fn fmt_s(v: f64) -> String {
    if v.is_nan() || v == 0.0 {
        "–".into()
    } else if v < 1.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.2}")
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_infinite() => "> 300 s".into(),
        Some(x) => format!("≤ {x} s"),
        None => "–".into(),
    }
}

fn print_report(args: &Args, rows: &[Row]) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "### kproxy iptables scale benchmark\n\n{} × {} endpoints, kernel {}, {} CPUs, host {}; {} single changes {} ms apart; churn {} s per rate.\n",
        rows.iter().filter(|r| r.floor_s > 0.0).map(|r| r.n.to_string()).collect::<Vec<_>>().join("/"),
        args.endpoints,
        kernel.trim(),
        cpus,
        host.trim(),
        args.changes,
        args.change_gap_ms,
        args.churn_secs
    );
    let mut header = String::from("| backend | services | nat / filter rules | full sync s (kproxy) | start→healthy s | floor: restore of ours s | upstream layout restore s (rules) | 1 change p50 / p99 ms (kernel) | 1 change p99 (metric) | delta floor ms |");
    let mut sep = String::from("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &args.churn_rates {
        header.push_str(&format!(" churn {r}/s: p99 (metric), CPU s, drain s |"));
        sep.push_str("---:|");
    }
    header.push_str(
        " VmHWM MiB | new conns/s to last svc | restart: full sync s, rules written, VmHWM MiB |",
    );
    sep.push_str("---:|---:|---:|");
    println!("{header}\n{sep}");
    for r in rows {
        let mut line = if r.floor_s > 0.0 {
            format!(
                "| {} | {} | {} / {} | {} | {} | {} | {} ({}) | {:.1} / {:.1} | {} | {:.1} |",
                r.backend,
                r.n,
                r.nat_rules,
                r.filter_rules,
                fmt_s(r.full_sync_s),
                fmt_s(r.healthy_s),
                fmt_s(r.floor_s),
                fmt_s(r.upstream_s),
                r.upstream_rules,
                r.change_p50_ms,
                r.change_p99_ms,
                fmt_opt(r.change_metric_p99),
                r.delta_floor_ms
            )
        } else {
            format!(
                "| {} | {} | {} / {} | {} | {} | – | – | – | – | – |",
                r.backend,
                r.n,
                r.nat_rules,
                r.filter_rules,
                fmt_s(r.full_sync_s),
                fmt_s(r.healthy_s)
            )
        };
        for rate in &args.churn_rates {
            match r.churn.iter().find(|c| c.rate == *rate) {
                Some(c) => line.push_str(&format!(
                    " {}, {:.1}, {} ({} changes, {} syncs) |",
                    fmt_opt(c.p99_bucket),
                    c.cpu,
                    c.drain.map_or("no (> 120)".into(), |d| format!("{d:.2}")),
                    c.sent,
                    c.syncs
                )),
                None => line.push_str(" – |"),
            }
        }
        line.push_str(&format!(" {:.1} | {:.0} |", r.hwm_mib, r.cps));
        match r.restart {
            Some(re) => line.push_str(&format!(
                " {}, {}, {:.1} |",
                fmt_s(re.full_sync_s),
                re.rules_written,
                re.hwm_mib
            )),
            None => line.push_str(" – |"),
        }
        println!("{line}");
    }
    println!("\nRatios:\n");
    for r in rows.iter().filter(|r| r.floor_s > 0.0) {
        let base = rows
            .iter()
            .find(|b| b.backend == r.backend && b.n == 1)
            .map_or(f64::NAN, |b| b.cps);
        println!(
            "- {} {}: full sync / floor of ours = {:.2}; full sync / upstream layout restore = {:.2}; our floor / upstream floor = {:.2}; change p99 / delta floor = {:.1}; conns/s vs 1 service = {:.2}",
            r.backend,
            r.n,
            r.full_sync_s / r.floor_s,
            r.full_sync_s / r.upstream_s,
            r.floor_s / r.upstream_s,
            r.change_p99_ms / r.delta_floor_ms,
            r.cps / base
        );
    }
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if !is_root() {
        bail!("needs root (network namespaces)");
    }
    if !Path::new(&args.kproxy).exists() {
        bail!(
            "{} not found: build it with cargo build --release",
            args.kproxy.display()
        );
    }
    if args.full && !args.sizes.contains(&50_000) {
        args.sizes.push(50_000);
    }
    args.churn_rates.retain(|r| *r > 0);
    let backends: Vec<String> = match args.iptables_backend.as_str() {
        "all" => ["nft", "legacy"]
            .into_iter()
            .filter(|b| backend_present(b))
            .map(String::from)
            .collect(),
        b @ ("nft" | "legacy") => vec![b.to_string()],
        other => bail!("--iptables-backend {other}: expected nft, legacy or all"),
    };
    let mut rows = Vec::new();
    for b in &backends {
        eprintln!("== {b}: baseline, 1 service");
        rows.push(run_one(&args, b, 1, true)?);
        for &n in &args.sizes {
            eprintln!("== {b}: {n} services × {} endpoints", args.endpoints);
            let t = Instant::now();
            let row = run_one(&args, b, n, false)?;
            eprintln!("   done in {:.0} s", t.elapsed().as_secs_f64());
            rows.push(row);
        }
    }
    print_report(&args, &rows);
    Ok(())
}
