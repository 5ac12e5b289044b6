//! The real kproxy binary in `--mode=ipvs` against the fake API server, with
//! real traffic, inside the IPVS VM (`scripts/test-ipvs-vm.sh`). Skips
//! without IPVS unless `KPROXY_REQUIRE_IPVS=1`, which turns that into a failure.
//!
//! Topology (testkit): node namespace with a pod bridge (pods 0,1 are
//! backends, pod 2 a client pod), an external client, a remote node with one
//! backend pod. kproxy runs inside the node namespace as `ip netns exec`.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ipvs::{
    dest_line, enable_br_netfilter, ipvs_args, ipvs_present, ipvs_table, kube_ipvs0, wait, WAIT,
};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_model::fixtures::{Ep, SliceBuilder, SvcBuilder};
use kproxy_testkit::apiserver::FakeApiServer;
use kproxy_testkit::kproxy::KproxyProcess;
use kproxy_testkit::netns::{Netns, Topology, CLIENT_IP_V4, NODE_IP_V4};

/// A TCP server in `ns` on :8080 that answers each connection with
/// "<name> <peer ip>\n" and then echoes lines until the client closes.
struct WhoServer {
    stop: Arc<AtomicBool>,
}

impl Drop for WhoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn who_server(ns: &Netns, name: &str) -> WhoServer {
    let listener = ns
        .run_in(|| TcpListener::bind("0.0.0.0:8080"))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let name = name.to_string();
    std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, peer)) => {
                    let name = name.clone();
                    std::thread::spawn(move || {
                        let _ = conn.set_nonblocking(false);
                        let mut w = conn.try_clone().unwrap();
                        let _ = writeln!(w, "{name} {}", peer.ip());
                        let mut r = BufReader::new(conn);
                        let mut line = String::new();
                        while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
                            let _ = w.write_all(line.as_bytes());
                            line.clear();
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    WhoServer { stop }
}

/// An open connection and the greeting it got.
struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    backend: String,
    peer: String,
}

fn connect(ns: &Netns, dst: SocketAddr) -> std::io::Result<Conn> {
    let stream = ns
        .run_in(move || TcpStream::connect_timeout(&dst, Duration::from_secs(3)))
        .map_err(std::io::Error::other)??;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut w = line.split_whitespace();
    let backend = w.next().unwrap_or_default().to_string();
    let peer = w.next().unwrap_or_default().to_string();
    Ok(Conn {
        stream,
        reader,
        backend,
        peer,
    })
}

impl Conn {
    fn echo(&mut self, msg: &str) -> std::io::Result<String> {
        writeln!(self.stream, "{msg}")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        Ok(line.trim().to_string())
    }

    /// Closes with a RST (SO_LINGER 0): IPVS forgets a reset connection
    /// after its 10 s CLOSE timeout, not the 2 min of TIME_WAIT.
    fn reset(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on a valid fd we own, with a pointer to a live
        // `linger` and its exact size; the kernel only reads it.
        let rc = unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_LINGER");
    }
}

/// (backend, peer) of one short request.
fn ask(ns: &Netns, dst: SocketAddr) -> (String, String) {
    let c = connect(ns, dst).unwrap_or_else(|e| panic!("{dst} from {}: {e}", ns.name()));
    (c.backend.clone(), c.peer.clone())
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn slice(svc: &str, eps: &[(&str, &str)]) -> EndpointSlice {
    let mut b =
        SliceBuilder::new("default", &format!("{svc}-1"), svc, "IPv4").port("", 8080, "TCP");
    for (ip, node) in eps {
        b = b.endpoint(Ep::new(ip).node(node));
    }
    b.build()
}

fn svc(name: &str, ip: &str) -> SvcBuilder {
    SvcBuilder::new("default", name).cluster_ip(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kproxy_ipvs_end_to_end() {
    if !ipvs_present() {
        return;
    }
    let topo = Topology::builder().pods(3).remote_pods(1).build().unwrap();
    let node = &topo.node;
    enable_br_netfilter(node);
    let (p0, p1, client_pod, r0) = (topo.pod(0), topo.pod(1), topo.pod(2), topo.remote_pod(0));
    let _servers = [
        who_server(&p0.ns, "pod0"),
        who_server(&p1.ns, "pod1"),
        who_server(&r0.ns, "rpod0"),
    ];
    let (ip0, ip1, ipr) = (
        p0.ip().to_string(),
        p1.ip().to_string(),
        r0.ip().to_string(),
    );

    let listener = node
        .run_in(|| TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let api = FakeApiServer::serve_on(listener).unwrap();
    let kubeconfig = api.kubeconfig_file().unwrap();

    api.create(
        &svc("web", "10.96.0.10")
            .type_("LoadBalancer")
            .node_port("", 80, "TCP", 30080)
            .lb_ingress("192.0.2.10", None)
            .build(),
    )
    .unwrap();
    api.create(&slice(
        "web",
        &[(&ip0, "node-a"), (&ip1, "node-a"), (&ipr, "node-b")],
    ))
    .unwrap();
    api.create(
        &svc("local", "10.96.0.11")
            .type_("LoadBalancer")
            .node_port("", 80, "TCP", 30081)
            .lb_ingress("192.0.2.11", None)
            .external_traffic_policy("Local")
            .build(),
    )
    .unwrap();
    api.create(&slice("local", &[(&ip0, "node-a"), (&ipr, "node-b")]))
        .unwrap();
    api.create(&svc("empty", "10.96.0.12").port("", 80, "TCP").build())
        .unwrap();
    api.create(
        &svc("aff", "10.96.0.13")
            .port("", 80, "TCP")
            .affinity(Some(600))
            .build(),
    )
    .unwrap();
    api.create(&slice(
        "aff",
        &[(&ip0, "node-a"), (&ip1, "node-a"), (&ipr, "node-b")],
    ))
    .unwrap();

    let binary = Path::new(env!("CARGO_BIN_EXE_kproxy"));
    let args = ipvs_args(kubeconfig.path());
    let mut k =
        tokio::task::block_in_place(|| KproxyProcess::spawn(binary, Some(node), &args)).unwrap();

    tokio::task::block_in_place(|| {
        k.wait_healthy(WAIT).unwrap();
        wait("web's three real servers", || {
            ipvs_table(node).get("TCP 10.96.0.10:80").map(|d| d.len()) == Some(3)
        });
        let table = ipvs_table(node);
        let node_ip = format!("TCP {NODE_IP_V4}:30080");
        assert_eq!(table.get(&node_ip).map(|d| d.len()), Some(3), "{table:#?}");
        assert_eq!(
            table.get("TCP 192.0.2.11:80").cloned().unwrap_or_default(),
            BTreeSet::from([format!("{ip0}:8080 1")]),
            "eTP=Local LB: only the local endpoint"
        );
        assert!(table.get("TCP 10.96.0.12:80").is_some_and(|d| d.is_empty()));
        for vip in [
            "10.96.0.10/32",
            "10.96.0.11/32",
            "10.96.0.12/32",
            "10.96.0.13/32",
            "192.0.2.10/32",
            "192.0.2.11/32",
        ] {
            assert!(kube_ipvs0(node).contains(vip), "{vip} on kube-ipvs0");
        }
        let ipvs_metric = k
            .metric("kubeproxy_sync_proxy_rules_iptables_total{table=\"ipvs\"}")
            .unwrap();
        assert!(
            ipvs_metric.unwrap_or(0.0) >= 6.0,
            "ipvs rule gauge: {ipvs_metric:?}"
        );

        // ClusterIP: rr spreads over all endpoints, from outside and from a pod.
        for (who, ns) in [
            ("external client", &topo.client),
            ("client pod", &client_pod.ns),
        ] {
            let seen: BTreeSet<String> = (0..9).map(|_| ask(ns, sa("10.96.0.10:80")).0).collect();
            assert_eq!(
                seen,
                BTreeSet::from(["pod0".into(), "pod1".into(), "rpod0".into()]),
                "{who}"
            );
        }
        // NodePort and LB IP under Cluster policy: reachable and masqueraded.
        for dst in [format!("{NODE_IP_V4}:30080"), "192.0.2.10:80".to_string()] {
            let mut seen = BTreeSet::new();
            for _ in 0..6 {
                let (backend, peer) = ask(&topo.client, sa(&dst));
                assert_ne!(
                    peer,
                    CLIENT_IP_V4.to_string(),
                    "{dst} via {backend} must be masqueraded"
                );
                seen.insert(backend);
            }
            assert_eq!(seen.len(), 3, "{dst}: {seen:?}");
        }
        // eTP=Local: only the local endpoint, client source preserved.
        for dst in [format!("{NODE_IP_V4}:30081"), "192.0.2.11:80".to_string()] {
            for _ in 0..4 {
                let (backend, peer) = ask(&topo.client, sa(&dst));
                assert_eq!(
                    (backend.as_str(), peer.as_str()),
                    ("pod0", CLIENT_IP_V4.to_string().as_str()),
                    "{dst}"
                );
            }
        }
        // No endpoints: refused at once, not a timeout.
        let t = Instant::now();
        let err = connect(&topo.client, sa("10.96.0.12:80"))
            .err()
            .expect("no-endpoint service must refuse");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        assert!(t.elapsed() < Duration::from_secs(2));
        // ClientIP affinity sticks.
        let first = ask(&topo.client, sa("10.96.0.13:80")).0;
        for _ in 0..6 {
            assert_eq!(ask(&topo.client, sa("10.96.0.13:80")).0, first, "affinity");
        }
    });

    // Graceful termination: the backend of an open connection is removed.
    let mut held =
        tokio::task::block_in_place(|| connect(&topo.client, sa("10.96.0.10:80")).unwrap());
    let gone_ip = match held.backend.as_str() {
        "pod0" => ip0.clone(),
        "pod1" => ip1.clone(),
        _ => ipr.clone(),
    };
    let keep: Vec<(&str, &str)> = [(&ip0, "node-a"), (&ip1, "node-a"), (&ipr, "node-b")]
        .into_iter()
        .filter(|(ip, _)| **ip != gone_ip)
        .map(|(ip, n)| (ip.as_str(), n))
        .collect();
    api.update(&slice("web", &keep)).unwrap();
    tokio::task::block_in_place(|| {
        let dest = format!("{gone_ip}:8080");
        wait("weight 0 while draining", || {
            dest_line(node, "TCP 10.96.0.10:80", &dest)
                .is_some_and(|l| l.split_whitespace().nth(3) == Some("0"))
        });
        for _ in 0..6 {
            assert_ne!(
                ask(&topo.client, sa("10.96.0.10:80")).0,
                held.backend,
                "no new connections to a draining server"
            );
        }
        assert_eq!(
            held.echo("still there").unwrap(),
            "still there",
            "the open connection keeps working"
        );
        held.reset();
        // The short connections to it made just before the drain stay in
        // IPVS's table (TIME_WAIT) for 120 s, as long as WAIT.
        let deadline = Instant::now() + WAIT + Duration::from_secs(30);
        while dest_line(node, "TCP 10.96.0.10:80", &dest).is_some() {
            assert!(
                Instant::now() < deadline,
                "drained real server not deleted:\n{}\n{}\nkproxy log:\n{}",
                node.sh("ipvsadm -Ln").unwrap(),
                node.sh("ipvsadm -Lnc").unwrap(),
                k.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    });

    // Add and remove a service: kube-ipvs0 and IPVS follow, nothing stale.
    api.create(&svc("new", "10.96.0.20").port("", 80, "TCP").build())
        .unwrap();
    api.create(&slice("new", &[(&ip1, "node-a")])).unwrap();
    tokio::task::block_in_place(|| {
        // The real server and the iptables part (no more REJECT) land in
        // one sync, IPVS first: wait for a connection, not just the table.
        wait("new service", || {
            dest_line(node, "TCP 10.96.0.20:80", &format!("{ip1}:8080")).is_some()
                && kube_ipvs0(node).contains("10.96.0.20/32")
                && connect(&topo.client, sa("10.96.0.20:80")).is_ok()
        });
        assert_eq!(ask(&topo.client, sa("10.96.0.20:80")).0, "pod1");
    });
    api.delete::<Service>("default", "new").unwrap();
    api.delete::<Service>("default", "aff").unwrap();
    tokio::task::block_in_place(|| {
        wait("services removed", || {
            let t = ipvs_table(node);
            !t.contains_key("TCP 10.96.0.20:80") && !t.contains_key("TCP 10.96.0.13:80")
        });
        wait("addresses removed", || {
            let a = kube_ipvs0(node);
            !a.contains("10.96.0.20/32") && !a.contains("10.96.0.13/32")
        });
        // The whole table is exactly what the remaining services want.
        let vs: BTreeSet<String> = ipvs_table(node).into_keys().collect();
        let mut want: BTreeSet<String> = [
            "TCP 10.96.0.10:80",
            "TCP 10.96.0.11:80",
            "TCP 10.96.0.12:80",
            "TCP 192.0.2.10:80",
            "TCP 192.0.2.11:80",
        ]
        .map(String::from)
        .into();
        // NodePorts on every node address (IPv4 and IPv6)
        let nodeports: Vec<&String> = vs
            .iter()
            .filter(|v| v.ends_with(":30080") || v.ends_with(":30081"))
            .collect();
        assert!(nodeports.len() >= 4, "{nodeports:?}");
        want.extend(nodeports.into_iter().cloned());
        assert_eq!(vs, want);
        assert_eq!(
            kube_ipvs0(node),
            [
                "10.96.0.10/32",
                "10.96.0.11/32",
                "10.96.0.12/32",
                "192.0.2.10/32",
                "192.0.2.11/32"
            ]
            .map(String::from)
            .into()
        );
    });

    // Restart: the table and an open connection survive.
    tokio::task::block_in_place(|| {
        let mut held = connect(&topo.client, sa("10.96.0.10:80")).unwrap();
        let before = ipvs_table(node);
        let status = k.terminate(Duration::from_secs(10)).unwrap();
        assert!(status.success(), "SIGTERM exits 0: {status}");
        assert_eq!(ipvs_table(node), before, "stopping kproxy keeps the table");
        assert_eq!(held.echo("after stop").unwrap(), "after stop");
        let mut k2 = KproxyProcess::spawn(binary, Some(node), &args).unwrap();
        k2.wait_healthy(WAIT).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(ipvs_table(node), before, "restarting adopts the table");
        assert_eq!(held.echo("after restart").unwrap(), "after restart");
        let log = k2.log();
        assert!(!log.contains("delete TCP 10.96.0.10:80"), "{log}");
        let status = k2.terminate(Duration::from_secs(10)).unwrap();
        assert!(status.success());
    });
}
