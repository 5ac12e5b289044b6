//! The real kproxy binary in iptables mode, in a node namespace, with real
//! traffic from pod and client namespaces.
//!
//! The iptables end-to-end suite: this file (ClusterIP from pods),
//! `e2e_iptables_external.rs` (NodePort, LoadBalancer, external IPs),
//! `e2e_iptables_dynamics.rs` (affinity, terminating endpoints, changes,
//! UDP conntrack, dual-stack) and `e2e_iptables_resilience.rs` (flushes,
//! restarts, partial syncs, `--cleanup`, refused restores). Helpers live in
//! `common/mod.rs`.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use kproxy_model::fixtures::SvcBuilder;
use kproxy_testkit::netns::{
    tcp_echo_server, tcp_peer_server, tcp_reply_server, tcp_request, udp_peer_server,
    udp_reply_server, udp_request_from, NODE_BRIDGE_V4,
};

#[test]
fn pod_reaches_cluster_ip_on_every_endpoint() {
    let Some(c) = Cluster::new("pod_reaches_cluster_ip_on_every_endpoint", 3, 0) else {
        return;
    };
    let backends: Vec<_> = (1..3)
        .map(|i| tcp_echo_server(&c.topo.pod(i).ns, sock(c.topo.pod(i).ip(), 8080)).unwrap())
        .collect();
    c.apply_service(&cluster_ip_service("web", "10.96.0.10", 80).build());
    c.apply_slice(&slice_for(
        "web",
        "IPv4",
        &[(c.topo.pod(1).ip(), NODE), (c.topo.pod(2).ip(), NODE)],
    ));
    let _k = c.start_kproxy(&[]);
    let client = &c.topo.pod(0).ns;
    let mut seen = BTreeSet::new();
    eventually("both endpoints answer through 10.96.0.10:80", || {
        if let Ok(who) = tcp_request(client, sock([10, 96, 0, 10], 80)) {
            seen.insert(who);
        }
        seen.len() == 2
    });
    drop(backends);
}

/// ClusterIP semantics seen from pods: DNAT to the targetPort without
/// masquerading, spread over local and remote endpoints, TCP and UDP of one
/// port number to their own targets, no translation of a port the service
/// lacks, hairpin masquerading, REJECT without endpoints and DROP for
/// internalTrafficPolicy=Local without a local endpoint.
#[test]
fn cluster_ip_semantics_from_pods() {
    let Some(c) = Cluster::new("cluster_ip_semantics_from_pods", 3, 1) else {
        return;
    };
    c.route_node_default_to_client();
    c.enable_hairpin();
    let (p1, p2, r0) = (c.topo.pod(1), c.topo.pod(2), c.topo.remote_pod(0));
    let _servers = [
        tcp_peer_server(&p1.ns, sock(p1.ip(), 8080)).unwrap(),
        tcp_peer_server(&p2.ns, sock(p2.ip(), 8080)).unwrap(),
        tcp_peer_server(&r0.ns, sock(r0.ip(), 8080)).unwrap(),
        // The service port itself: a DNAT that kept the port would land here.
        tcp_reply_server(&p1.ns, sock(p1.ip(), 80), "wrong-port".into()).unwrap(),
        // DNS: UDP 53 -> 5353, TCP 53 -> 5354; the crossed ports answer "wrong".
        udp_peer_server(&p1.ns, sock(p1.ip(), 5353)).unwrap(),
        tcp_peer_server(&p1.ns, sock(p1.ip(), 5354)).unwrap(),
        udp_reply_server(&p1.ns, sock(p1.ip(), 5354), "wrong-udp".into()).unwrap(),
        tcp_reply_server(&p1.ns, sock(p1.ip(), 5353), "wrong-tcp".into()).unwrap(),
    ];
    c.apply_service(
        &SvcBuilder::new("default", "web")
            .cluster_ip("10.96.0.10")
            .port_full(svc_port("http", 80, "TCP", 8080, None))
            .build(),
    );
    c.apply_slice(&slice_with(
        "web",
        "1",
        "IPv4",
        &[("http", 8080, "TCP")],
        vec![
            ep_on(p1.ip(), NODE),
            ep_on(p2.ip(), NODE),
            ep_on(r0.ip(), REMOTE_NODE),
        ],
    ));
    c.apply_service(
        &SvcBuilder::new("default", "dns")
            .cluster_ip("10.96.0.53")
            .port_full(svc_port("dns-udp", 53, "UDP", 5353, None))
            .port_full(svc_port("dns-tcp", 53, "TCP", 5354, None))
            .build(),
    );
    c.apply_slice(&slice_with(
        "dns",
        "1",
        "IPv4",
        &[("dns-udp", 5353, "UDP"), ("dns-tcp", 5354, "TCP")],
        vec![ep_on(p1.ip(), NODE)],
    ));
    // No EndpointSlice at all.
    c.apply_service(
        &SvcBuilder::new("default", "empty")
            .cluster_ip("10.96.0.20")
            .port_full(svc_port("http", 80, "TCP", 8080, None))
            .build(),
    );
    // Only a remote endpoint, internalTrafficPolicy=Local.
    c.apply_service(
        &SvcBuilder::new("default", "itp")
            .cluster_ip("10.96.0.21")
            .port_full(svc_port("http", 80, "TCP", 8080, None))
            .internal_traffic_policy("Local")
            .build(),
    );
    c.apply_slice(&slice_with(
        "itp",
        "1",
        "IPv4",
        &[("http", 8080, "TCP")],
        vec![ep_on(r0.ip(), REMOTE_NODE)],
    ));
    let _k = c.start_kproxy(&[]);
    let client = c.topo.pod(0);
    let web = sock([10, 96, 0, 10], 80);

    // Spread over every endpoint, each seeing the pod's own address.
    let mut seen = BTreeSet::new();
    for _ in 0..45 {
        let (who, peer) = peer_request(&client.ns, web).expect("web answers");
        assert_eq!(peer.ip(), client.ip(), "{who} saw a masqueraded source");
        seen.insert(who);
    }
    let all: BTreeSet<String> = [c.pod_name(1), c.pod_name(2), c.remote_pod_name(0)].into();
    assert_eq!(seen, all, "45 requests reach every endpoint");

    // Same port number, two protocols, two target ports.
    let (who, peer) = udp_peer_request(&client.ns, sock([10, 96, 0, 53], 53)).expect("udp dns");
    assert_eq!(
        (who.as_str(), peer.ip()),
        (c.pod_name(1).as_str(), client.ip())
    );
    assert_eq!(
        peer_request(&client.ns, sock([10, 96, 0, 53], 53))
            .expect("tcp dns")
            .0,
        c.pod_name(1)
    );

    // A port the service does not have is not translated.
    let short = Duration::from_millis(800);
    let other = tcp_attempt(&client.ns, sock([10, 96, 0, 10], 81), short);
    assert!(
        !matches!(other, Attempt::Answered(_)),
        "port 81 answered: {other:?}"
    );
    let udp_other = udp_request_from(
        &client.ns,
        sock([0, 0, 0, 0], 0),
        sock([10, 96, 0, 53], 54),
        short,
    );
    assert!(udp_other.is_err(), "UDP port 54 answered: {udp_other:?}");

    // Hairpin: an endpoint reaching its own service is masqueraded to the
    // node's bridge address; reaching another endpoint it is not.
    let mut hairpin = false;
    let mut direct = false;
    for _ in 0..60 {
        let (who, peer) = peer_request(&p1.ns, web).expect("hairpin request");
        if who == c.pod_name(1) {
            assert_eq!(
                peer.ip(),
                IpAddr::from(NODE_BRIDGE_V4),
                "hairpin not masqueraded"
            );
            hairpin = true;
        } else {
            assert_eq!(peer.ip(), p1.ip(), "{who} saw a masqueraded source");
            direct = true;
        }
        if hairpin && direct {
            break;
        }
    }
    assert!(
        hairpin && direct,
        "pod 1 reached itself and another endpoint"
    );

    // No endpoints: rejected at once. (Without kproxy's REJECT the packet
    // would follow the node's default route and time out.)
    let start = Instant::now();
    let empty = tcp_attempt(
        &client.ns,
        sock([10, 96, 0, 20], 80),
        Duration::from_secs(3),
    );
    assert_eq!(empty, Attempt::Refused);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );

    // internalTrafficPolicy=Local without a local endpoint: dropped, not
    // sent to the remote endpoint (which the "web" service reaches).
    let itp = tcp_attempt(
        &client.ns,
        sock([10, 96, 0, 21], 80),
        Duration::from_secs(1),
    );
    assert_eq!(itp, Attempt::TimedOut);
}
