//! The real kproxy binary in iptables mode: traffic from outside the
//! cluster (NodePorts, LoadBalancer IPs, external IPs) from the client
//! namespace to the node's 192.168.50.1.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use common::*;
use kproxy_model::fixtures::SvcBuilder;
use kproxy_testkit::netns::{
    tcp_peer_server, CLIENT_IP_V4, NODE_BRIDGE_V4, NODE_INTERNAL_V4, NODE_IP_V4,
};

/// Requests `dst` from `ns` `n` times; returns every (endpoint, source seen).
fn sample(
    ns: &kproxy_testkit::netns::Netns,
    dst: std::net::SocketAddr,
    n: usize,
) -> Vec<(String, IpAddr)> {
    (0..n)
        .map(|_| {
            let (who, peer) = peer_request(ns, dst).unwrap_or_else(|e| panic!("{dst}: {e:#}"));
            (who, peer.ip())
        })
        .collect()
}

fn names(v: &[(String, IpAddr)]) -> BTreeSet<String> {
    v.iter().map(|(n, _)| n.clone()).collect()
}

/// NodePorts under both external traffic policies, with one local and
/// remote endpoints.
#[test]
fn node_ports_cluster_and_local_policy() {
    let Some(c) = Cluster::new("node_ports_cluster_and_local_policy", 2, 2) else {
        return;
    };
    let (p0, r0, r1) = (c.topo.pod(0), c.topo.remote_pod(0), c.topo.remote_pod(1));
    let _servers = [
        tcp_peer_server(&p0.ns, sock(p0.ip(), 8080)).unwrap(),
        tcp_peer_server(&r0.ns, sock(r0.ip(), 8080)).unwrap(),
        tcp_peer_server(&r1.ns, sock(r1.ip(), 8080)).unwrap(),
    ];
    let node_port_svc = |name: &str, ip: &str, np: i32, policy: &str| {
        SvcBuilder::new("default", name)
            .type_("NodePort")
            .cluster_ip(ip)
            .port_full(svc_port("http", 80, "TCP", 8080, Some(np)))
            .external_traffic_policy(policy)
            .build()
    };
    c.apply_service(&node_port_svc("npc", "10.96.1.1", 30080, "Cluster"));
    c.apply_slice(&slice_with(
        "npc",
        "1",
        "IPv4",
        &[("http", 8080, "TCP")],
        vec![ep_on(p0.ip(), NODE), ep_on(r0.ip(), REMOTE_NODE)],
    ));
    c.apply_service(&node_port_svc("npl", "10.96.1.2", 30081, "Local"));
    c.apply_slice(&slice_with(
        "npl",
        "1",
        "IPv4",
        &[("http", 8080, "TCP")],
        vec![ep_on(p0.ip(), NODE), ep_on(r1.ip(), REMOTE_NODE)],
    ));
    c.apply_service(&node_port_svc("npr", "10.96.1.3", 30082, "Local"));
    c.apply_slice(&slice_with(
        "npr",
        "1",
        "IPv4",
        &[("http", 8080, "TCP")],
        vec![ep_on(r0.ip(), REMOTE_NODE), ep_on(r1.ip(), REMOTE_NODE)],
    ));
    let _k = c.start_kproxy(&[]);
    let client = &c.topo.client;
    let client_ip = IpAddr::from(CLIENT_IP_V4);
    let pod = c.topo.pod(1);

    // Cluster policy: every endpoint, always masqueraded (to the node's
    // address on the way to the endpoint).
    let got = sample(client, sock(NODE_IP_V4, 30080), 30);
    assert_eq!(names(&got), [c.pod_name(0), c.remote_pod_name(0)].into());
    for (who, src) in &got {
        let expected: IpAddr = if *who == c.pod_name(0) {
            NODE_BRIDGE_V4.into()
        } else {
            NODE_INTERNAL_V4.into()
        };
        assert_eq!(*src, expected, "{who} saw {src}");
    }

    // Local policy: only the local endpoint, with the client's address.
    let got = sample(client, sock(NODE_IP_V4, 30081), 20);
    for (who, src) in &got {
        assert_eq!(*who, c.pod_name(0));
        assert_eq!(*src, client_ip, "source not preserved");
    }
    // Pods are not subject to the external policy: the cluster IP and
    // the NodePort both reach every endpoint from a pod.
    for dst in [sock([10, 96, 1, 2], 80), sock(NODE_IP_V4, 30081)] {
        let got = sample(&pod.ns, dst, 30);
        assert_eq!(
            names(&got),
            [c.pod_name(0), c.remote_pod_name(1)].into(),
            "{dst} from a pod"
        );
    }

    // Local policy without a local endpoint: external traffic is dropped,
    // pods still reach every endpoint.
    let none = tcp_attempt(client, sock(NODE_IP_V4, 30082), Duration::from_secs(1));
    assert_eq!(none, Attempt::TimedOut);
    let got = sample(&pod.ns, sock([10, 96, 1, 3], 80), 30);
    assert_eq!(
        names(&got),
        [c.remote_pod_name(0), c.remote_pod_name(1)].into()
    );
    for (who, src) in &got {
        assert_eq!(*src, pod.ip(), "{who}: pod traffic is not masqueraded");
    }
}

/// A LoadBalancer IP with source ranges, and external IPs.
#[test]
fn load_balancer_source_ranges_and_external_ips() {
    let Some(c) = Cluster::new("load_balancer_source_ranges_and_external_ips", 1, 0) else {
        return;
    };
    let p0 = c.topo.pod(0);
    let _server = tcp_peer_server(&p0.ns, sock(p0.ip(), 8080)).unwrap();
    // The VIP is announced by the node (as MetalLB's L2 mode does): traffic
    // the firewall does not accept would otherwise be answered by the
    // node's own stack with a RST.
    c.node()
        .sh("ip addr add 192.168.60.10/32 dev lo")
        .expect("VIP on the node");
    c.apply_service(
        &SvcBuilder::new("default", "lb")
            .type_("LoadBalancer")
            .cluster_ip("10.96.2.1")
            .port_full(svc_port("http", 80, "TCP", 8080, Some(30090)))
            .lb_ingress("192.168.60.10", None)
            .source_ranges(&["192.168.50.2/32", "203.0.113.0/24"])
            .external_ips(&["192.168.60.20"])
            .build(),
    );
    c.apply_slice(&slice_with(
        "lb",
        "1",
        "IPv4",
        &[("http", 8080, "TCP")],
        vec![ep_on(p0.ip(), NODE)],
    ));
    let _k = c.start_kproxy(&[]);
    let client = &c.topo.client;
    let lb = sock([192, 168, 60, 10], 80);
    let ext = sock([192, 168, 60, 20], 80);

    // From inside the allowed range.
    let (who, _) = peer_request(client, lb).expect("LB from an allowed source");
    assert_eq!(who, c.pod_name(0));
    let (who, _) = peer_request(client, ext).expect("external IP");
    assert_eq!(who, c.pod_name(0));

    // From outside every range: the client now uses 192.168.50.3 for both
    // addresses.
    client
        .sh("ip addr add 192.168.50.3/24 dev eth0")
        .expect("second client address");
    for vip in ["192.168.60.10", "192.168.60.20"] {
        client
            .sh(&format!(
                "ip route add {vip}/32 via {NODE_IP_V4} src 192.168.50.3"
            ))
            .expect("source route");
    }
    let denied = tcp_attempt(client, lb, Duration::from_secs(1));
    assert_eq!(
        denied,
        Attempt::TimedOut,
        "LB from outside the source ranges"
    );
    // External IPs have no source ranges.
    let (who, peer) = peer_request(client, ext).expect("external IP from anywhere");
    assert_eq!(who, c.pod_name(0));
    assert_ne!(
        peer.ip(),
        IpAddr::from([192, 168, 50, 3]),
        "Cluster policy masquerades"
    );
}
