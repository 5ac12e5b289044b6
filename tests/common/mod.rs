//! A small "cluster" for end-to-end tests: a node namespace running the real
//! kproxy binary, pods on the node's bridge (and optionally on a remote
//! node), an external client, and the fake API server listening on the
//! node namespace's loopback (so kproxy reaches it without any route).
#![allow(dead_code)]

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
        let mut k = KproxyProcess::spawn(
            Path::new(env!("CARGO_BIN_EXE_kproxy")),
            Some(&self.topo.node),
            &args,
        )
        .expect("spawn kproxy");
        k.wait_healthy(WAIT).expect("kproxy healthy");
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
    SvcBuilder::new("default", name).cluster_ip(ip).port("http", port, "TCP")
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
