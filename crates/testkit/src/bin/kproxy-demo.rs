//! `kproxy-demo`: kproxy's main job on a built-in demo, no cluster needed.
//!
//! Builds a small "cluster" of network namespaces (a node with three pods
//! on its bridge and a client pod, a remote node with one pod, an external
//! client), serves the Services and EndpointSlices of
//! `crates/testkit/demo/cluster.yaml` from the fake API server inside the
//! node namespace, runs the real kproxy there, sends real requests and
//! prints which backend answered each. Exits 0 only if every answer was the
//! expected one, so it doubles as a smoke test. Needs root.
//!
//! ```text
//! kproxy-demo target/debug/kproxy [--mode iptables] [--keep]
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_testkit::apiserver::FakeApiServer;
use kproxy_testkit::kproxy::KproxyProcess;
use kproxy_testkit::netns::{
    is_root, parse_http_response, tcp_reply_server, udp_reply_server, udp_request_from, Netns,
    ServerHandle, Topology, CLIENT_IP_V4, NODE_BRIDGE_V4, NODE_INTERNAL_V4, NODE_IP_V4,
    REMOTE_NODE_V4,
};

/// The demo's objects, also readable by operators in the source tree.
const DEMO_YAML: &str = include_str!("../../demo/cluster.yaml");
const DEMO_YAML_PATH: &str = "crates/testkit/demo/cluster.yaml";
const NODE: &str = "node-a";
const NS: &str = "default";
/// Every pod answers on these ports with its name.
const HTTP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
const WAIT: Duration = Duration::from_secs(20);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request that must be dropped is given.
const DROP_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Parser)]
#[command(
    name = "kproxy-demo",
    about = "Runs kproxy on a throwaway cluster of network namespaces and shows where requests go (needs root)"
)]
struct Args {
    /// Path of the kproxy binary.
    kproxy: PathBuf,
    /// Proxy mode to run kproxy in.
    #[arg(long, value_enum, default_value_t = Mode::Iptables)]
    mode: Mode,
    /// Leave the cluster and kproxy running after the demo until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Iptables,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
        }
    }
}

/// What an interrupted demo must clean up: it exits from the signal task,
/// so no destructor runs.
struct Cleanup {
    netns: Vec<String>,
    kproxy_pid: Option<u32>,
    files: Vec<PathBuf>,
}

static CLEANUP: Mutex<Cleanup> = Mutex::new(Cleanup {
    netns: Vec::new(),
    kproxy_pid: None,
    files: Vec::new(),
});
/// Set once a signal started [`emergency_cleanup`].
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Set while `--keep` waits for Ctrl-C: the signal then ends the wait and
/// the normal teardown runs.
static KEEPING: AtomicBool = AtomicBool::new(false);

fn cleanup_state() -> std::sync::MutexGuard<'static, Cleanup> {
    CLEANUP.lock().unwrap_or_else(PoisonError::into_inner)
}

fn emergency_cleanup() {
    let state = cleanup_state();
    if let Some(pid) = state.kproxy_pid {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .output();
    }
    for name in &state.netns {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
    }
    for file in &state.files {
        let _ = std::fs::remove_file(file);
    }
    eprintln!(
        "\nkproxy-demo: interrupted; stopped kproxy and removed {} namespaces",
        state.netns.len()
    );
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !is_root() {
        eprintln!("kproxy-demo: needs root (it creates network namespaces and iptables rules)");
        return ExitCode::FAILURE;
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(_) if INTERRUPTED.load(Ordering::SeqCst) => {
            // Killing kproxy made the demo fail; the signal task is
            // cleaning up and exits with 130.
            std::thread::sleep(Duration::from_secs(30));
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("kproxy-demo: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Friendly names of the demo's machines.
struct Names(BTreeMap<IpAddr, &'static str>);

impl Names {
    fn of(&self, ip: &str) -> String {
        ip.parse::<IpAddr>()
            .ok()
            .and_then(|ip| self.0.get(&ip))
            .map(|n| n.to_string())
            .unwrap_or_else(|| ip.to_string())
    }
}

/// Counts checks and prints one row per request.
#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
}

enum Outcome {
    Answer(String),
    Refused(Duration),
    TimedOut,
    Failed(String),
}

impl Outcome {
    fn describe(&self) -> String {
        match self {
            Outcome::Answer(who) => who.clone(),
            Outcome::Refused(after) => format!("refused after {} ms", after.as_millis()),
            Outcome::TimedOut => "no answer (dropped)".to_string(),
            Outcome::Failed(why) => format!("error: {why}"),
        }
    }
}

/// What a request should get.
enum Expect<'a> {
    OneOf(&'a BTreeSet<String>),
    Refused,
    Dropped,
}

impl Tally {
    fn row(&mut self, client: &str, service: &str, addr: &str, got: &Outcome, want: Expect) {
        let ok = match (&want, got) {
            (Expect::OneOf(set), Outcome::Answer(who)) => set.contains(who),
            (Expect::Refused, Outcome::Refused(after)) => *after < Duration::from_millis(500),
            (Expect::Dropped, Outcome::TimedOut) => true,
            _ => false,
        };
        let verdict = if ok {
            self.passed += 1;
            "✓".to_string()
        } else {
            self.failed += 1;
            let wanted = match want {
                Expect::OneOf(set) => format!("one of {}", join(set)),
                Expect::Refused => "refused at once".to_string(),
                Expect::Dropped => "dropped".to_string(),
            };
            format!("✗ FAIL: expected {wanted}")
        };
        println!(
            "  {client:<10} → {service:<5} {addr:<21} → {:<22} {verdict}",
            got.describe()
        );
    }
}

fn join<'a>(items: impl IntoIterator<Item = &'a String>) -> String {
    items
        .into_iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(" ")
}

fn heading(text: &str) {
    println!("\n== {text}");
}

fn run(args: &Args) -> Result<bool> {
    let kproxy_bin = args
        .kproxy
        .canonicalize()
        .with_context(|| format!("kproxy binary {}", args.kproxy.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (keep_tx, keep_rx) = mpsc::channel::<()>();
    runtime.spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if KEEPING.swap(false, Ordering::SeqCst) {
                let _ = keep_tx.send(());
            } else {
                INTERRUPTED.store(true, Ordering::SeqCst);
                emergency_cleanup();
                std::process::exit(130);
            }
        }
    });

    println!(
        "kproxy demo: kproxy --mode={} on a throwaway cluster of network namespaces",
        args.mode.as_str()
    );

    // 1. The cluster.
    let topo = Topology::builder()
        .pods(4)
        .remote_pods(1)
        .build()
        .context("building the network namespaces")?;
    let remote_node = topo
        .remote_node
        .as_ref()
        .ok_or_else(|| anyhow!("the topology has no remote node"))?;
    {
        let mut state = cleanup_state();
        state.netns.push(topo.node.name().to_string());
        state.netns.push(topo.client.name().to_string());
        state.netns.push(remote_node.name().to_string());
        for pod in topo.pods.iter().chain(&topo.remote_pods) {
            state.netns.push(pod.ns.name().to_string());
        }
    }
    // A real node has a default route (its uplink). Without one, traffic
    // to addresses kproxy does not DNAT (a service with no endpoints, a
    // load balancer IP from a source outside loadBalancerSourceRanges)
    // fails routing with "network unreachable" before kproxy's REJECT and
    // DROP rules in the filter table see it.
    topo.node
        .sh(&format!("ip route add default via {CLIENT_IP_V4}"))
        .context("adding node-a's default route")?;
    let backends = [
        ("pod-a", topo.pod(0)),
        ("pod-b", topo.pod(1)),
        ("pod-c", topo.pod(2)),
        ("pod-r", topo.remote_pod(0)),
    ];
    let client_pod = &topo.pod(3).ns;
    let external = &topo.client;
    let mut names = Names(BTreeMap::new());
    for (name, pod) in &backends {
        names.0.insert(pod.ip(), name);
    }
    names.0.insert(topo.pod(3).ip(), "client-pod");

    heading("Cluster (network namespaces, removed at exit)");
    let row = |name: &str, ns: &Netns, addr: String, what: &str| {
        println!("  {name:<10} {:<18} {addr:<13} {what}", ns.name());
    };
    row(
        "node-a",
        &topo.node,
        NODE_IP_V4.to_string(),
        &format!("runs kproxy; pod bridge {NODE_BRIDGE_V4}/24, link to node-b {NODE_INTERNAL_V4}"),
    );
    for (name, pod) in &backends[..3] {
        row(name, &pod.ns, pod.ipv4.to_string(), "backend pod on node-a");
    }
    row(
        "client-pod",
        client_pod,
        topo.pod(3).ipv4.to_string(),
        "client pod on node-a",
    );
    row(
        "node-b",
        remote_node,
        REMOTE_NODE_V4.to_string(),
        "remote node (no kproxy), pods 10.244.2.0/24",
    );
    let (rname, rpod) = backends[3];
    row(
        rname,
        &rpod.ns,
        rpod.ipv4.to_string(),
        "backend pod on node-b",
    );
    row(
        "external",
        external,
        CLIENT_IP_V4.to_string(),
        "outside the cluster; node-a's uplink",
    );

    let _servers = start_backends(&backends)?;

    // 2. The fake API server in the node namespace, with the demo objects.
    let listener = topo
        .node
        .run_in(|| std::net::TcpListener::bind("127.0.0.1:0"))?
        .context("binding the API server's listener in node-a")?;
    let api = {
        let _guard = runtime.enter();
        FakeApiServer::serve_on(listener).context("starting the fake API server")?
    };
    api.load_yaml(DEMO_YAML)
        .with_context(|| format!("loading {DEMO_YAML_PATH}"))?;
    let kubeconfig = api.kubeconfig_file().context("writing a kubeconfig")?;
    cleanup_state().files.push(kubeconfig.path().to_path_buf());
    let services = ServiceTable::read(&api, &names)?;
    heading(&format!(
        "Services (from {DEMO_YAML_PATH}, served by a fake API server at {} in node-a)",
        api.url()
    ));
    services.print();

    // 3. kproxy.
    heading(&format!("kproxy --mode={} in node-a", args.mode.as_str()));
    let kproxy_args = vec![
        format!("--mode={}", args.mode.as_str()),
        format!("--kubeconfig={}", kubeconfig.path().display()),
        format!("--hostname-override={NODE}"),
        "--cluster-cidr=10.244.0.0/16".to_string(),
    ];
    let started = Instant::now();
    let mut kproxy = KproxyProcess::spawn(&kproxy_bin, Some(&topo.node), &kproxy_args)?;
    cleanup_state().kproxy_pid = Some(kproxy.pid());
    kproxy
        .wait_healthy(WAIT)
        .context("waiting for kproxy's /healthz")?;
    println!(
        "  /healthz is 200 after {} ms: the first sync has programmed the rules",
        started.elapsed().as_millis()
    );

    // 4. Requests.
    let mut tally = Tally::default();
    heading("Requests (client → service address → backend that answered)");
    let web = services.get("web")?;
    let web_addr = sock(&web.cluster_ip, web.port)?;
    let mut spread = BTreeMap::new();
    for _ in 0..6 {
        let got = tcp_ask(client_pod, web_addr, REQUEST_TIMEOUT)?;
        tally.row(
            "client-pod",
            "web",
            &web_addr.to_string(),
            &got,
            Expect::OneOf(&web.backends),
        );
        *spread.entry(got.describe()).or_insert(0) += 1;
    }
    print_spread(
        &spread,
        &web.backends,
        "kproxy picks an endpoint at random per connection",
    );
    let api_svc = services.get("api")?;
    let node_port = sock(&NODE_IP_V4.to_string(), api_svc.node_port)?;
    for _ in 0..3 {
        let got = tcp_ask(external, node_port, REQUEST_TIMEOUT)?;
        tally.row(
            "external",
            "api",
            &node_port.to_string(),
            &got,
            Expect::OneOf(&api_svc.backends),
        );
    }
    let shop = services.get("shop")?;
    let lb = sock(&shop.lb_ip, shop.port)?;
    let got = tcp_ask(external, lb, REQUEST_TIMEOUT)?;
    tally.row(
        "external",
        "shop",
        &lb.to_string(),
        &got,
        Expect::OneOf(&shop.backends),
    );
    let got = tcp_ask(client_pod, lb, DROP_TIMEOUT)?;
    tally.row("client-pod", "shop", &lb.to_string(), &got, Expect::Dropped);
    let dns = services.get("dns")?;
    let dns_addr = sock(&dns.cluster_ip, dns.port)?;
    let got = match udp_request_from(
        client_pod,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        dns_addr,
        REQUEST_TIMEOUT,
    ) {
        Ok(who) => Outcome::Answer(who),
        Err(_) => Outcome::TimedOut,
    };
    tally.row(
        "client-pod",
        "dns",
        &format!("{dns_addr}/udp"),
        &got,
        Expect::OneOf(&dns.backends),
    );
    let empty = services.get("empty")?;
    let empty_addr = sock(&empty.cluster_ip, empty.port)?;
    let got = tcp_ask(client_pod, empty_addr, REQUEST_TIMEOUT)?;
    tally.row(
        "client-pod",
        "empty",
        &empty_addr.to_string(),
        &got,
        Expect::Refused,
    );

    // Scale web down: kproxy follows within one sync.
    let gone = topo.pod(2).ipv4.to_string();
    heading(&format!(
        "Scale web to 2 endpoints (remove {} from EndpointSlice web-1)",
        names.of(&gone)
    ));
    let syncs_before = sync_count(&kproxy)?;
    let mut slice: EndpointSlice = api
        .get(NS, "web-1")?
        .ok_or_else(|| anyhow!("EndpointSlice {NS}/web-1 is missing"))?;
    if let Some(endpoints) = slice.endpoints.as_mut() {
        endpoints.retain(|e| !e.addresses.contains(&gone));
    }
    slice.metadata.resource_version = None;
    let changed = Instant::now();
    api.update(&slice).context("updating EndpointSlice web-1")?;
    kproxy
        .wait_until(WAIT, "a sync after the update", |k| {
            Ok(sync_count(k)? > syncs_before)
        })
        .context("waiting for kproxy to sync the change")?;
    let syncs = sync_count(&kproxy)? - syncs_before;
    println!(
        "  kproxy re-synced {} ms after the update ({syncs} sync{})",
        changed.elapsed().as_millis(),
        if syncs == 1.0 { "" } else { "s" }
    );
    let mut scaled = web.backends.clone();
    scaled.remove(&names.of(&gone));
    let mut spread = BTreeMap::new();
    for _ in 0..6 {
        let got = tcp_ask(client_pod, web_addr, REQUEST_TIMEOUT)?;
        tally.row(
            "client-pod",
            "web",
            &web_addr.to_string(),
            &got,
            Expect::OneOf(&scaled),
        );
        *spread.entry(got.describe()).or_insert(0) += 1;
    }
    print_spread(
        &spread,
        &web.backends,
        "the removed endpoint gets no new connections",
    );

    // kproxy's own view.
    heading("kproxy's view (/metrics and iptables-save -t nat in node-a)");
    let (_, metrics) = kproxy.get_metrics("/metrics")?;
    let sample = |name: &str| kproxy_testkit::kproxy::find_sample(&metrics, name);
    let count = sample("kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap_or(0.0);
    let sum = sample("kubeproxy_sync_proxy_rules_duration_seconds_sum").unwrap_or(0.0);
    println!(
        "  kubeproxy_sync_proxy_rules_duration_seconds: {count} syncs, {:.1} ms in total",
        sum * 1000.0
    );
    match sample("kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\"}") {
        Some(n) => println!(
            "  nat rules: {n} (kubeproxy_sync_proxy_rules_iptables_total{{table=\"nat\"}})"
        ),
        None => println!("  nat rules: (metric not reported)"),
    }
    let nat = topo
        .node
        .exec_ok(["iptables-save", "-t", "nat"])
        .context("iptables-save in node-a")?;
    println!("  KUBE-SERVICES chain:");
    for line in nat.lines().filter(|l| l.starts_with("-A KUBE-SERVICES ")) {
        println!("    {line}");
    }

    let all_ok = tally.failed == 0;
    if all_ok {
        println!(
            "\n== Result: PASS, all {} requests got the expected answer",
            tally.passed
        );
    } else {
        println!(
            "\n== Result: FAIL, {} of {} requests did not get the expected answer",
            tally.failed,
            tally.passed + tally.failed
        );
        eprintln!("--- kproxy log (last 40 lines) ---");
        let log = kproxy.log();
        let lines: Vec<&str> = log.lines().collect();
        for line in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("{line}");
        }
    }

    if args.keep {
        heading("Still running: explore, then press Ctrl-C to tear down");
        let exec = |ns: &Netns| format!("ip netns exec {}", ns.name());
        println!("  {} curl -s http://{web_addr}/", exec(client_pod));
        println!("  {} curl -s http://{node_port}/", exec(external));
        println!("  {} iptables-save -t nat", exec(&topo.node));
        println!(
            "  {} curl -s http://{}/metrics",
            exec(&topo.node),
            kproxy.metrics_addr
        );
        KEEPING.store(true, Ordering::SeqCst);
        let _ = keep_rx.recv();
        println!("\ntearing down");
    }

    let _ = kproxy.terminate(Duration::from_secs(10));
    drop(kproxy);
    cleanup_state().kproxy_pid = None;
    drop(api);
    drop(runtime);
    drop(topo);
    cleanup_state().netns.clear();
    Ok(all_ok)
}

/// Starts every backend's servers: an HTTP answer on TCP 8080 and a
/// datagram on UDP 5353, both naming the pod.
fn start_backends(backends: &[(&str, &kproxy_testkit::netns::Pod)]) -> Result<Vec<ServerHandle>> {
    let mut servers = Vec::new();
    for (name, pod) in backends {
        let body = format!("{name}\n");
        let http = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        servers.push(
            tcp_reply_server(
                &pod.ns,
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, HTTP_PORT)),
                http,
            )
            .with_context(|| format!("starting {name}'s TCP server"))?,
        );
        servers.push(
            udp_reply_server(
                &pod.ns,
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, UDP_PORT)),
                name.to_string(),
            )
            .with_context(|| format!("starting {name}'s UDP server"))?,
        );
    }
    Ok(servers)
}

/// One Service as the demo needs it, read back from the API server.
struct SvcInfo {
    name: String,
    type_: String,
    cluster_ip: String,
    port: u16,
    protocol: String,
    node_port: u16,
    lb_ip: String,
    source_ranges: Vec<String>,
    /// Names of the pods in its EndpointSlices.
    backends: BTreeSet<String>,
}

struct ServiceTable(Vec<SvcInfo>);

impl ServiceTable {
    fn read(api: &FakeApiServer, names: &Names) -> Result<ServiceTable> {
        let slices: Vec<EndpointSlice> = api.list()?;
        let mut out = Vec::new();
        for svc in api.list::<Service>()? {
            let name = svc.metadata.name.clone().unwrap_or_default();
            let spec = svc.spec.clone().unwrap_or_default();
            let port = spec
                .ports
                .as_ref()
                .and_then(|p| p.first())
                .ok_or_else(|| anyhow!("Service {name} has no port"))?;
            let backends = slices
                .iter()
                .filter(|s| {
                    s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        == Some(&name)
                })
                .flat_map(|s| s.endpoints.iter().flatten())
                .flat_map(|e| &e.addresses)
                .map(|ip| names.of(ip))
                .collect();
            out.push(SvcInfo {
                type_: spec.type_.clone().unwrap_or_else(|| "ClusterIP".into()),
                cluster_ip: spec.cluster_ip.clone().unwrap_or_default(),
                port: u16::try_from(port.port).context("service port")?,
                protocol: port.protocol.clone().unwrap_or_else(|| "TCP".into()),
                node_port: port
                    .node_port
                    .map(u16::try_from)
                    .transpose()
                    .context("nodePort")?
                    .unwrap_or(0),
                lb_ip: svc
                    .status
                    .as_ref()
                    .and_then(|s| s.load_balancer.as_ref())
                    .and_then(|lb| lb.ingress.as_ref())
                    .and_then(|i| i.first())
                    .and_then(|i| i.ip.clone())
                    .unwrap_or_default(),
                source_ranges: spec.load_balancer_source_ranges.clone().unwrap_or_default(),
                backends,
                name,
            });
        }
        // In the YAML's order of interest.
        let order = ["web", "api", "shop", "dns", "empty"];
        out.sort_by_key(|s| {
            order
                .iter()
                .position(|o| *o == s.name)
                .unwrap_or(order.len())
        });
        Ok(ServiceTable(out))
    }

    fn get(&self, name: &str) -> Result<&SvcInfo> {
        self.0
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| anyhow!("the demo YAML has no Service {name}"))
    }

    fn print(&self) {
        for s in &self.0 {
            let mut addrs = format!("{}:{}/{}", s.cluster_ip, s.port, s.protocol);
            if s.node_port != 0 {
                addrs.push_str(&format!(", node:{}", s.node_port));
            }
            if !s.lb_ip.is_empty() {
                addrs.push_str(&format!(", LB {}:{}", s.lb_ip, s.port));
            }
            let backends = if s.backends.is_empty() {
                "(no endpoints)".to_string()
            } else {
                join(&s.backends)
            };
            println!("  {:<6} {:<13} {addrs:<52} → {backends}", s.name, s.type_);
            if !s.source_ranges.is_empty() {
                println!(
                    "  {:<6} {:<13} loadBalancerSourceRanges: {}",
                    "",
                    "",
                    s.source_ranges.join(", ")
                );
            }
        }
    }
}

fn sock(ip: &str, port: u16) -> Result<SocketAddr> {
    let ip: IpAddr = ip
        .parse()
        .with_context(|| format!("{ip:?} is not an IP address"))?;
    if port == 0 {
        bail!("no port for {ip}");
    }
    Ok(SocketAddr::new(ip, port))
}

/// One TCP connection from `ns` to `dst`; the backend's HTTP answer names it.
fn tcp_ask(ns: &Netns, dst: SocketAddr, timeout: Duration) -> Result<Outcome> {
    let start = Instant::now();
    let mut stream = match ns.run_in(move || TcpStream::connect_timeout(&dst, timeout))? {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            return Ok(Outcome::Refused(start.elapsed()))
        }
        Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
            return Ok(Outcome::TimedOut)
        }
        Err(e) => return Ok(Outcome::Failed(e.to_string())),
    };
    stream.set_read_timeout(Some(timeout))?;
    let mut raw = Vec::new();
    if let Err(e) = stream.read_to_end(&mut raw) {
        return Ok(Outcome::Failed(format!("reading: {e}")));
    }
    Ok(match parse_http_response(&raw) {
        Ok((200, body)) => Outcome::Answer(body.trim().to_string()),
        Ok((status, _)) => Outcome::Failed(format!("HTTP {status}")),
        Err(e) => Outcome::Failed(e.to_string()),
    })
}

/// One line: how many of web's requests each backend answered.
fn print_spread(spread: &BTreeMap<String, usize>, backends: &BTreeSet<String>, note: &str) {
    let counts: Vec<String> = backends
        .iter()
        .map(|b| format!("{b} {}", spread.get(b).copied().unwrap_or(0)))
        .collect();
    println!("  web spread: {} ({note})", counts.join(", "));
}

fn sync_count(k: &KproxyProcess) -> Result<f64> {
    Ok(
        k.metric("kubeproxy_sync_proxy_rules_duration_seconds_count")?
            .unwrap_or(0.0),
    )
}
