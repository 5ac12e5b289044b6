//! `kproxy dump`, `kproxy diff` and `kproxy trace` end to end: the real
//! binary, its planner, the kernel of a node namespace and real traffic.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Service;
use kproxy_iptables::planner::{ExistingChains, LocalDetector, Planner, PlannerConfig};
use kproxy_model::fixtures::{Ep, SliceBuilder, SvcBuilder};
use kproxy_model::{IpFamily, ServiceKey, StateBuilder};
use kproxy_testkit::netns::{tcp_request, Netns, CLIENT_IP_V4, NODE_BRIDGE_V4, NODE_IP_V4};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_kproxy");

fn fixture() -> String {
    format!(
        "{}/tests/fixtures/tools/cluster.yaml",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dump_from_file_equals_the_planner() {
    let out = std::process::Command::new(BIN)
        .args(["dump", "--from-file", &fixture(), "--family=ipv4"])
        .args(["--hostname-override=node-a", "--cluster-cidr=10.244.0.0/16"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dumped: String = text(&out)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();

    // The same objects through the model and the planner crates directly.
    let yaml = std::fs::read_to_string(fixture()).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&yaml).unwrap();
    let mut builder = StateBuilder::new("node-a");
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for d in docs.into_iter().filter(|d| !d.is_null()) {
        let proxied = d
            .pointer("/metadata/labels/service.kubernetes.io~1service-proxy-name")
            .is_none();
        match d["kind"].as_str() {
            Some("Node") => {
                builder.set_node(Some(&serde_json::from_value(d).unwrap()));
            }
            Some("Service") if proxied => {
                services.push(serde_json::from_value::<Service>(d).unwrap())
            }
            Some("EndpointSlice") => slices.push(
                serde_json::from_value::<k8s_openapi::api::discovery::v1::EndpointSlice>(d)
                    .unwrap(),
            ),
            _ => {}
        }
    }
    for svc in &services {
        let key = ServiceKey::new(
            svc.metadata.namespace.clone().unwrap(),
            svc.metadata.name.clone().unwrap(),
        );
        let own: Vec<_> = slices
            .iter()
            .filter(|s| {
                s.metadata.labels.as_ref().unwrap()["kubernetes.io/service-name"] == key.name
            })
            .collect();
        builder.update_service(&key, Some(svc), &own);
    }
    let mut cfg = PlannerConfig::new(IpFamily::V4);
    cfg.local_detector = LocalDetector::Cidrs(vec!["10.244.0.0/16".parse().unwrap()]);
    cfg.node_pod_cidrs = vec!["10.244.1.0/24".parse().unwrap()];
    let plan = Planner::new(cfg)
        .unwrap()
        .plan_full(&builder.state().ipv4, &ExistingChains::default());
    assert_eq!(dumped, plan.text);

    // JSON carries the same restore text, and the rejected object.
    let out = std::process::Command::new(BIN)
        .args([
            "dump",
            "--from-file",
            &fixture(),
            "--family=ipv4",
            "-o",
            "json",
        ])
        .args(["--hostname-override=node-a", "--cluster-cidr=10.244.0.0/16"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["families"][0]["restore"], plan.text.as_str());
    assert_eq!(v["rejected"][0]["name"], "bad");
}

#[test]
fn tools_report_bad_input_with_exit_2() {
    for args in [
        &["dump", "--from-file=/nonexistent/objects.yaml"][..],
        &["dump", "--output=yaml", "--from-file=/dev/null"],
        &[
            "trace",
            "--src=10.0.0.1",
            "--dst=nope",
            "--from-file=/dev/null",
        ],
    ] {
        let out = std::process::Command::new(BIN)
            .args(args)
            .arg("--hostname-override=n")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("kproxy "), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}

/// The flags the proxy ran with, for the tools to resolve the same settings.
fn tool_args(c: &Cluster) -> Vec<String> {
    vec![
        format!("--kubeconfig={}", c.kubeconfig.path().display()),
        format!("--hostname-override={NODE}"),
        "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56".to_string(),
    ]
}

fn tool(c: &Cluster, sub: &[&str]) -> Output {
    let mut argv = vec![BIN.to_string()];
    argv.extend(sub.iter().map(|s| s.to_string()));
    argv.extend(tool_args(c));
    c.node().exec(&argv).unwrap()
}

#[test]
fn diff_is_empty_after_a_sync_and_shows_a_deleted_chain() {
    let Some(c) = Cluster::new("diff_is_empty_after_a_sync_and_shows_a_deleted_chain", 3, 0) else {
        return;
    };
    c.apply_service(&cluster_ip_service("web", "10.96.0.10", 80).build());
    c.apply_slice(&slice_for(
        "web",
        "IPv4",
        &[(c.topo.pod(1).ip(), NODE), (c.topo.pod(2).ip(), NODE)],
    ));
    c.apply_service(
        &SvcBuilder::new("default", "np")
            .cluster_ip("10.96.0.30")
            .type_("NodePort")
            .node_port("http", 80, "TCP", 30080)
            .affinity(Some(600))
            .build(),
    );
    c.apply_slice(
        &SliceBuilder::new("default", "np-1", "np", "IPv4")
            .port("http", 8080, "TCP")
            .endpoint(Ep::new("10.244.2.30").node(REMOTE_NODE))
            .endpoint(Ep::new("10.244.2.31").node(REMOTE_NODE))
            .build(),
    );
    c.apply_service(&cluster_ip_service("empty", "10.96.0.20", 80).build());
    let mut k = c.start_kproxy(&[]);
    // Stop it (rules stay): nothing may change the kernel behind the test.
    assert!(k.terminate(Duration::from_secs(10)).unwrap().success());

    let out = tool(&c, &["diff"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text(&out).contains("no differences"), "{}", text(&out));
    println!("{}", text(&out));

    // Someone deletes web's service chain (and the jump to it).
    let nat = c.iptables_save("nat");
    let jump = nat
        .lines()
        .find(|l| l.starts_with("-A KUBE-SERVICES") && l.contains("default/web:http cluster IP"))
        .expect("web's jump")
        .to_string();
    let svc = jump.rsplit(' ').next().unwrap().to_string();
    assert!(svc.starts_with("KUBE-SVC-"), "{jump}");
    let script = format!(
        "iptables -t nat {} && iptables -t nat -F {svc} && iptables -t nat -X {svc}",
        jump.replacen("-A ", "-D ", 1)
    );
    c.node().exec_ok(["sh", "-c", &script]).unwrap();

    let out = tool(&c, &["diff"]);
    let shown = text(&out);
    println!("{shown}");
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains(&format!("@@ nat {svc} (chain missing in the kernel) @@")),
        "{shown}"
    );
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("+-A KUBE-SERVICES") && l.contains(&svc)),
        "{shown}"
    );
    let out = tool(&c, &["diff", "--output=json", "--family=ipv4"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["equal"], false);
    let chains = v["families"][0]["chains"].as_array().unwrap();
    assert!(
        chains
            .iter()
            .any(|ch| ch["chain"] == svc.as_str() && ch["status"] == "missing"),
        "{v}"
    );
}

/// A TCP server in `ns` answering `"<ns name> <peer address>"`.
struct PeerServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeerServer {
    fn start(ns: &Netns, addr: SocketAddr) -> PeerServer {
        let listener = ns.run_in(move || TcpListener::bind(addr)).unwrap().unwrap();
        listener.set_nonblocking(true).unwrap();
        let name = ns.name().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.write_all(format!("{name} {peer}").as_bytes());
                        let _ = conn.shutdown(std::net::Shutdown::Write);
                        let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
                        let mut sink = [0u8; 64];
                        while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        PeerServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// (answering namespace, peer address it saw).
fn ask(ns: &Netns, dst: SocketAddr) -> anyhow::Result<(String, SocketAddr)> {
    let reply = tcp_request(ns, dst)?;
    let (name, peer) = reply
        .trim()
        .split_once(' ')
        .ok_or_else(|| anyhow::anyhow!("bad reply {reply:?}"))?;
    Ok((name.to_string(), peer.parse()?))
}

fn trace_json(c: &Cluster, src: &str, dst: &str, iface: &str) -> Value {
    let out = tool(
        c,
        &[
            "trace",
            &format!("--src={src}"),
            &format!("--dst={dst}"),
            &format!("--in-interface={iface}"),
            "--output=json",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text_out = tool(
        c,
        &[
            "trace",
            &format!("--src={src}"),
            &format!("--dst={dst}"),
            &format!("--in-interface={iface}"),
        ],
    );
    println!("{}", text(&text_out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn trace_agrees_with_real_traffic() {
    let Some(c) = Cluster::new("trace_agrees_with_real_traffic", 4, 0) else {
        return;
    };
    let servers: Vec<PeerServer> = (1..4)
        .map(|i| PeerServer::start(&c.topo.pod(i).ns, sock(c.topo.pod(i).ip(), 8080)))
        .collect();
    let backends: Vec<IpAddr> = (1..4).map(|i| c.topo.pod(i).ip()).collect();
    c.apply_service(&cluster_ip_service("web", "10.96.0.10", 80).build());
    c.apply_slice(&slice_for(
        "web",
        "IPv4",
        &backends.iter().map(|ip| (*ip, NODE)).collect::<Vec<_>>(),
    ));
    c.apply_service(&cluster_ip_service("empty", "10.96.0.20", 80).build());
    c.apply_service(
        &SvcBuilder::new("default", "np")
            .cluster_ip("10.96.0.30")
            .type_("NodePort")
            .node_port("http", 80, "TCP", 30080)
            .build(),
    );
    c.apply_slice(&slice_for("np", "IPv4", &[(backends[0], NODE)]));
    // A real node routes everything somewhere (here: towards the client),
    // so the filter table, not routing, decides for a service without endpoints.
    c.node()
        .sh(&format!("ip route add default via {CLIENT_IP_V4}"))
        .unwrap();
    let _k = c.start_kproxy(&[]);
    let client = c.topo.pod(0);

    // ClusterIP from a pod: three endpoints at 1/3 each, not masqueraded.
    let t = trace_json(&c, &client.ip().to_string(), "10.96.0.10:80/TCP", "br0");
    let outcomes = t["outcomes"].as_array().unwrap();
    let planned: BTreeSet<String> = outcomes
        .iter()
        .map(|o| o["endpoint"].as_str().unwrap().to_string())
        .collect();
    let want: BTreeSet<String> = backends.iter().map(|ip| format!("{ip}:8080")).collect();
    assert_eq!(planned, want, "{t}");
    for o in outcomes {
        assert_eq!(o["verdict"], "dnat");
        assert_eq!(o["fraction"], "1/3");
        assert_eq!(o["masqueraded"], false);
    }
    assert!(t["summary"].as_str().unwrap().contains("not masqueraded"));
    let mut reached = BTreeSet::new();
    for _ in 0..60 {
        let (name, peer) = ask(&client.ns, sock([10, 96, 0, 10], 80)).unwrap();
        assert_eq!(peer.ip(), client.ip(), "not masqueraded, as traced");
        reached.insert(name);
    }
    let names: BTreeSet<String> = (1..4)
        .map(|i| c.topo.pod(i).ns.name().to_string())
        .collect();
    assert_eq!(reached, names, "exactly the traced endpoints answer");

    // No endpoints: rejected, and the real connection is refused.
    let t = trace_json(&c, &client.ip().to_string(), "10.96.0.20:80/TCP", "br0");
    assert!(
        matches!(t["outcomes"].as_array().map(Vec::as_slice), Some([o]) if o["verdict"] == "reject"),
        "{t}"
    );
    let err = tcp_request(&client.ns, sock([10, 96, 0, 20], 80)).unwrap_err();
    let refused = err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    });
    assert!(refused, "{err:#}");

    // NodePort from the external client: masqueraded; the backend sees the node.
    let t = trace_json(
        &c,
        "192.168.50.2",
        &format!("{NODE_IP_V4}:30080/TCP"),
        "eth-client",
    );
    assert!(
        matches!(
            t["outcomes"].as_array().map(Vec::as_slice),
            Some([o]) if o["masqueraded"] == true && o["endpoint"] == format!("{}:8080", backends[0]).as_str()
        ),
        "{t}"
    );
    assert_eq!(t["via"], "NodePort");
    let (name, peer) = ask(&c.topo.client, sock(NODE_IP_V4, 30080)).unwrap();
    assert_eq!(name, c.topo.pod(1).ns.name());
    assert_eq!(peer.ip(), IpAddr::V4(NODE_BRIDGE_V4), "the node's address");
    drop(servers);
}
