//! A small "cluster" for end-to-end tests: a node namespace running the real
//! kproxy binary, pods on the node's bridge (and optionally on a remote
//! node), an external client, and the fake API server listening on the
//! node namespace's loopback (so kproxy reaches it without any route).
#![allow(dead_code)]

pub mod ipvs;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_model::fixtures::{Ep, SliceBuilder, SvcBuilder};
use kproxy_testkit::apiserver::FakeApiServer;
use kproxy_testkit::kproxy::KproxyProcess;
use kproxy_testkit::netns::{skip_unless_root, Netns, Topology};

pub const NODE: &str = "node-a";
pub const REMOTE_NODE: &str = "node-b";
pub const WAIT: Duration = Duration::from_secs(20);
/// For kproxy's first sync: in the IPVS VM (emulated CPU, debug build) each
/// iptables command takes ≈ 0.4 s, and a first sync adds ~20 jumps.
pub const STARTUP_WAIT: Duration = Duration::from_secs(60);

pub struct Cluster {
    pub topo: Topology,
    pub api: FakeApiServer,
    pub kubeconfig: tempfile::NamedTempFile,
    // Declared last: the API server's tasks run on it.
    pub runtime: tokio::runtime::Runtime,
}

impl Cluster {
    /// `None` (after printing why) when not root.
    pub fn new(test: &str, pods: usize, remote_pods: usize) -> Option<Cluster> {
        if skip_unless_root(test) {
            return None;
        }
        let topo = Topology::builder()
            .pods(pods)
            .remote_pods(remote_pods)
            .build()
            .expect("topology");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = topo
            .node
            .run_in(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .expect("enter node ns")
            .expect("bind API listener in node ns");
        let api = {
            let _guard = runtime.enter();
            FakeApiServer::serve_on(listener).expect("fake API server")
        };
        let kubeconfig = api.kubeconfig_file().expect("kubeconfig");
        Some(Cluster {
            topo,
            api,
            kubeconfig,
            runtime,
        })
    }

    pub fn node(&self) -> &Netns {
        &self.topo.node
    }

    /// Starts kproxy in the node namespace with the usual flags plus `extra`
    /// and waits until it has synced once.
    pub fn start_kproxy(&self, extra: &[&str]) -> KproxyProcess<'_> {
        let mut args = vec![
            format!("--kubeconfig={}", self.kubeconfig.path().display()),
            format!("--hostname-override={NODE}"),
            "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56".to_string(),
            "--iptables-min-sync-period=0s".to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn_kproxy(&args)
    }

    /// Starts kproxy with exactly `args` in the node namespace and waits
    /// until it has synced once.
    pub fn spawn_kproxy(&self, args: &[String]) -> KproxyProcess<'_> {
        let mut k = KproxyProcess::spawn(
            Path::new(env!("CARGO_BIN_EXE_kproxy")),
            Some(&self.topo.node),
            args,
        )
        .expect("spawn kproxy");
        k.wait_healthy(STARTUP_WAIT).expect("kproxy healthy");
        k
    }

    pub fn apply_service(&self, svc: &Service) {
        self.api.apply(svc).expect("apply service");
    }

    pub fn apply_slice(&self, slice: &EndpointSlice) {
        self.api.apply(slice).expect("apply slice");
    }

    /// `iptables-save` of `table` in the node namespace.
    pub fn iptables_save(&self, table: &str) -> String {
        self.topo
            .node
            .exec_ok(["iptables-save", "-t", table])
            .expect("iptables-save")
    }
}

/// Waits until `f` returns true (polling every 20 ms), panicking with `what`.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

pub fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// A ClusterIP service `name` with one TCP port `port` → targetPort 8080.
pub fn cluster_ip_service(name: &str, ip: &str, port: i32) -> SvcBuilder {
    SvcBuilder::new("default", name)
        .cluster_ip(ip)
        .port("http", port, "TCP")
}

/// A slice for `service` with `(ip, node)` endpoints on port 8080/TCP "http".
pub fn slice_for(service: &str, family: &str, endpoints: &[(IpAddr, &str)]) -> EndpointSlice {
    let mut b = SliceBuilder::new("default", &format!("{service}-1"), service, family)
        .port("http", 8080, "TCP");
    for (ip, node) in endpoints {
        b = b.endpoint(Ep::new(&ip.to_string()).node(node));
    }
    b.build()
}

// ---------------------------------------------------------------------------
// Helpers of the iptables end-to-end suite (tests/e2e_iptables*.rs).
// ---------------------------------------------------------------------------

/// A Service port with an explicit targetPort and an optional nodePort.
pub fn svc_port(
    name: &str,
    port: i32,
    protocol: &str,
    target: i32,
    node_port: Option<i32>,
) -> k8s_openapi::api::core::v1::ServicePort {
    k8s_openapi::api::core::v1::ServicePort {
        name: Some(name.to_string()),
        port,
        protocol: Some(protocol.to_string()),
        target_port: Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(target)),
        node_port,
        ..Default::default()
    }
}

/// A slice `<service>-<suffix>` of `family` with the given ports
/// `(name, port, protocol)` and endpoints.
pub fn slice_with(
    service: &str,
    suffix: &str,
    family: &str,
    ports: &[(&str, i32, &str)],
    endpoints: Vec<Ep>,
) -> EndpointSlice {
    let mut b = SliceBuilder::new("default", &format!("{service}-{suffix}"), service, family);
    for (name, port, proto) in ports {
        b = b.port(name, *port, proto);
    }
    for ep in endpoints {
        b = b.endpoint(ep);
    }
    b.build()
}

/// A ready endpoint at `ip` on `node`.
pub fn ep_on(ip: IpAddr, node: &str) -> Ep {
    Ep::new(&ip.to_string()).node(node)
}

/// How a TCP connection attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// A server answered (its reply).
    Answered(String),
    /// RST or ICMP port unreachable: ECONNREFUSED.
    Refused,
    /// No answer within the timeout (a DROP, or nobody there).
    TimedOut,
    /// Anything else (e.g. no route to host).
    Other(std::io::ErrorKind),
}

/// Connects from `ns` to `dst` and reads the server's reply, classifying
/// the outcome.
pub fn tcp_attempt(ns: &Netns, dst: SocketAddr, timeout: Duration) -> Attempt {
    use std::io::Read;
    let connected = ns
        .run_in(move || std::net::TcpStream::connect_timeout(&dst, timeout))
        .expect("enter namespace");
    let mut stream = match connected {
        Ok(s) => s,
        Err(e) => return classify(e.kind()),
    };
    stream.set_read_timeout(Some(timeout)).expect("timeout");
    let mut reply = String::new();
    match stream.read_to_string(&mut reply) {
        Ok(_) => Attempt::Answered(reply),
        Err(e) => classify(e.kind()),
    }
}

fn classify(kind: std::io::ErrorKind) -> Attempt {
    match kind {
        std::io::ErrorKind::ConnectionRefused => Attempt::Refused,
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Attempt::TimedOut,
        other => Attempt::Other(other),
    }
}

/// One request to a `tcp_peer_server` through `dst`: (answering namespace, peer seen).
pub fn peer_request(ns: &Netns, dst: SocketAddr) -> anyhow::Result<(String, SocketAddr)> {
    let reply = kproxy_testkit::netns::tcp_request(ns, dst)?;
    kproxy_testkit::netns::parse_peer_reply(&reply)
}

/// Like [`peer_request`] over UDP, from an ephemeral port.
pub fn udp_peer_request(ns: &Netns, dst: SocketAddr) -> anyhow::Result<(String, SocketAddr)> {
    let reply = kproxy_testkit::netns::udp_request(ns, dst)?;
    kproxy_testkit::netns::parse_peer_reply(&reply)
}

/// Waits until `f` returns true, polling every 20 ms, for at most `limit`;
/// returns how long it took. Panics with `what` when the time runs out.
pub fn within(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = std::time::Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        if start.elapsed() > limit {
            panic!("not within {limit:?}: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Cluster {
    /// The namespace name of local pod `i` (what echo/peer servers answer).
    pub fn pod_name(&self, i: usize) -> String {
        self.topo.pod(i).ns.name().to_string()
    }

    /// The namespace name of remote pod `i`.
    pub fn remote_pod_name(&self, i: usize) -> String {
        self.topo.remote_pod(i).ns.name().to_string()
    }

    /// Gives the node a default route towards the external client, as a
    /// real node has one: traffic kproxy does not translate is then
    /// forwarded (and silently dropped by the client, which does not
    /// forward) instead of being answered by "network unreachable". A
    /// REJECT then really comes from kproxy's rules.
    pub fn route_node_default_to_client(&self) {
        self.node()
            .sh(&format!(
                "ip route add default via {}",
                kproxy_testkit::netns::CLIENT_IP_V4
            ))
            .expect("node default route");
    }

    /// Turns on hairpin mode on every pod's bridge port, as the CNI bridge
    /// plugin does (`hairpinMode: true`): with br_netfilter a pod's packet
    /// DNATed back to itself must leave through the port it came in.
    pub fn enable_hairpin(&self) {
        for i in 0..self.topo.pods.len() {
            self.node()
                .sh(&format!("bridge link set dev veth-p{i} hairpin on"))
                .expect("hairpin mode");
        }
    }

    /// Runs `iptables ARGS` (or `ip6tables`) in the node namespace.
    pub fn iptables(&self, args: &str) -> anyhow::Result<String> {
        self.node().sh(&format!("iptables {args}"))
    }

    /// `iptables-save -c -t table` in the node namespace (with counters).
    pub fn iptables_save_counters(&self, table: &str) -> String {
        self.node()
            .exec_ok(["iptables-save", "-c", "-t", table])
            .expect("iptables-save -c")
    }

    /// `ip6tables-save -t table` in the node namespace.
    pub fn ip6tables_save(&self, table: &str) -> String {
        self.node()
            .exec_ok(["ip6tables-save", "-t", table])
            .expect("ip6tables-save")
    }
}

/// The chains declared in an `iptables-save` dump.
pub fn chains_of(save: &str) -> BTreeSet<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The `-A CHAIN ...` rules of `chain` in an `iptables-save` dump (with or
/// without `[p:b]` counter prefixes), counters kept.
pub fn rules_of<'a>(save: &'a str, chain: &str) -> Vec<&'a str> {
    let prefix = format!("-A {chain} ");
    save.lines()
        .filter(|l| {
            let rule = strip_counters(l);
            rule.starts_with(&prefix)
        })
        .collect()
}

/// A rule line without its `[packets:bytes] ` prefix.
pub fn strip_counters(line: &str) -> &str {
    match line.strip_prefix('[') {
        Some(rest) => rest.split_once("] ").map_or(line, |(_, r)| r),
        None => line,
    }
}

/// The packet counter of an `iptables-save -c` rule line.
pub fn packets(line: &str) -> u64 {
    line.strip_prefix('[')
        .and_then(|r| r.split(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no counters in {line:?}"))
}

/// The service chains (KUBE-SVC/SVL/EXT/FW/SEP) a dump holds for the
/// service `ns/name`, found through the comments of its rules.
pub fn service_chains(save: &str, ns_name: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in save.lines() {
        let rule = strip_counters(line);
        if !rule.contains(&format!("\"{ns_name}:")) && !rule.contains(&format!(" {ns_name}:")) {
            continue;
        }
        let words: Vec<&str> = rule.split_whitespace().collect();
        for w in words.windows(2) {
            for name in [w[1]] {
                if (w[0] == "-A" || w[0] == "-j")
                    && [
                        "KUBE-SVC-",
                        "KUBE-SVL-",
                        "KUBE-EXT-",
                        "KUBE-FW-",
                        "KUBE-SEP-",
                    ]
                    .iter()
                    .any(|p| name.starts_with(p))
                {
                    out.insert(name.to_string());
                }
            }
        }
    }
    out
}

/// A TCP server in `ns` on `addr` that keeps each connection open and
/// answers every line with `"<ns name> <line>"`: an established connection
/// through a service can be exercised again later. Stops when dropped.
pub struct LineEchoServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LineEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn tcp_line_echo_server(ns: &Netns, addr: SocketAddr) -> LineEchoServer {
    use std::io::{BufRead, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = ns
        .run_in(move || std::net::TcpListener::bind(addr))
        .expect("enter namespace")
        .expect("bind line echo server");
    listener.set_nonblocking(true).expect("nonblocking");
    let name = ns.name().to_string();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut conns = Vec::new();
        while !stop2.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    let name = name.clone();
                    let stop3 = stop2.clone();
                    conns.push(std::thread::spawn(move || {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_millis(50)));
                        let Ok(mut writer) = conn.try_clone() else {
                            return;
                        };
                        let mut reader = std::io::BufReader::new(conn);
                        let mut line = String::new();
                        while !stop3.load(Ordering::Relaxed) {
                            match reader.read_line(&mut line) {
                                Ok(0) => return,
                                Ok(_) => {
                                    if writer
                                        .write_all(format!("{name} {}", line).as_bytes())
                                        .is_err()
                                    {
                                        return;
                                    }
                                    line.clear();
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => return,
                            }
                        }
                    }));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        for c in conns {
            let _ = c.join();
        }
    });
    LineEchoServer {
        stop,
        thread: Some(thread),
    }
}
