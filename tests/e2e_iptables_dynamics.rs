//! The real kproxy binary in iptables mode: session affinity, terminating
//! endpoints, endpoint and service changes, stale UDP flows, dual-stack.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use kproxy_model::fixtures::{Ep, SvcBuilder};
use kproxy_testkit::netns::{
    tcp_peer_server, udp_peer_server, udp_request_from, Netns, NODE_IP_V6, REQUEST_TIMEOUT,
};

/// How long a change may take to show in traffic: one sync (min-sync-period
/// is 0, so the sync starts as soon as the watch delivers the change) plus
/// the watch delivery.
const ONE_SYNC: Duration = Duration::from_secs(2);

fn who(ns: &Netns, dst: SocketAddr) -> String {
    peer_request(ns, dst)
        .unwrap_or_else(|e| panic!("{dst}: {e:#}"))
        .0
}

fn web_service(name: &str, ip: &str) -> SvcBuilder {
    SvcBuilder::new("default", name)
        .cluster_ip(ip)
        .port_full(svc_port("http", 80, "TCP", 8080, None))
}

fn web_slice(service: &str, endpoints: Vec<Ep>) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    slice_with(service, "1", "IPv4", &[("http", 8080, "TCP")], endpoints)
}

#[test]
fn client_ip_affinity_sticks_then_expires() {
    let Some(c) = Cluster::new("client_ip_affinity_sticks_then_expires", 5, 0) else {
        return;
    };
    let _servers: Vec<_> = (1..5)
        .map(|i| tcp_peer_server(&c.topo.pod(i).ns, sock(c.topo.pod(i).ip(), 8080)).unwrap())
        .collect();
    c.apply_service(&web_service("sticky", "10.96.3.1").affinity(Some(2)).build());
    c.apply_slice(&web_slice(
        "sticky",
        (1..5).map(|i| ep_on(c.topo.pod(i).ip(), NODE)).collect(),
    ));
    let _k = c.start_kproxy(&[]);
    let client = &c.topo.pod(0).ns;
    let vip = sock([10, 96, 3, 1], 80);

    // 25 connections over 4 endpoints, all on the first one's endpoint
    // (by chance: 4^-24).
    let first = who(client, vip);
    for i in 0..24 {
        assert_eq!(who(client, vip), first, "connection {i} left the endpoint");
    }
    // After the 2 s timeout the client is load-balanced again: each try
    // moves with probability 3/4.
    let mut moved = false;
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(2600));
        if who(client, vip) != first {
            moved = true;
            break;
        }
    }
    assert!(
        moved,
        "the client never left {first} after the affinity timeout"
    );
}

#[test]
fn terminating_endpoints_only_as_fallback() {
    let Some(c) = Cluster::new("terminating_endpoints_only_as_fallback", 3, 0) else {
        return;
    };
    let (p1, p2) = (c.topo.pod(1), c.topo.pod(2));
    let _servers = [
        tcp_peer_server(&p1.ns, sock(p1.ip(), 8080)).unwrap(),
        tcp_peer_server(&p2.ns, sock(p2.ip(), 8080)).unwrap(),
    ];
    c.apply_service(&web_service("term", "10.96.3.2").build());
    c.apply_slice(&web_slice(
        "term",
        vec![
            ep_on(p1.ip(), NODE),
            ep_on(p2.ip(), NODE).terminating_serving(),
        ],
    ));
    let _k = c.start_kproxy(&[]);
    let client = &c.topo.pod(0).ns;
    let vip = sock([10, 96, 3, 2], 80);
    for _ in 0..20 {
        assert_eq!(who(client, vip), c.pod_name(1), "a ready endpoint exists");
    }

    // No ready endpoint left: the serving terminating one takes over; the
    // terminating one that stopped serving gets nothing.
    c.apply_slice(&web_slice(
        "term",
        vec![
            ep_on(p1.ip(), NODE)
                .ready(false)
                .serving(false)
                .terminating(true),
            ep_on(p2.ip(), NODE).terminating_serving(),
        ],
    ));
    within(
        ONE_SYNC,
        "traffic moves to the terminating endpoint",
        || who(client, vip) == c.pod_name(2),
    );
    for _ in 0..20 {
        assert_eq!(who(client, vip), c.pod_name(2));
    }

    // A ready endpoint is back: the terminating one is dropped again.
    c.apply_slice(&web_slice(
        "term",
        vec![
            ep_on(p1.ip(), NODE),
            ep_on(p2.ip(), NODE).terminating_serving(),
        ],
    ));
    within(ONE_SYNC, "traffic back on the ready endpoint", || {
        who(client, vip) == c.pod_name(1)
    });
    for _ in 0..20 {
        assert_eq!(who(client, vip), c.pod_name(1));
    }
}

#[test]
fn scaling_and_deletion_apply_within_one_sync() {
    let Some(c) = Cluster::new("scaling_and_deletion_apply_within_one_sync", 4, 0) else {
        return;
    };
    c.route_node_default_to_client();
    let _servers: Vec<_> = (1..4)
        .map(|i| tcp_peer_server(&c.topo.pod(i).ns, sock(c.topo.pod(i).ip(), 8080)).unwrap())
        .collect();
    // A second service that must survive everything done to the first.
    c.apply_service(&web_service("keep", "10.96.3.4").build());
    c.apply_slice(&web_slice("keep", vec![ep_on(c.topo.pod(3).ip(), NODE)]));
    c.apply_service(&web_service("scale", "10.96.3.3").build());
    c.apply_slice(&web_slice("scale", vec![ep_on(c.topo.pod(1).ip(), NODE)]));
    let _k = c.start_kproxy(&[]);
    let client = &c.topo.pod(0).ns;
    let vip = sock([10, 96, 3, 3], 80);
    let keep = sock([10, 96, 3, 4], 80);
    for _ in 0..10 {
        assert_eq!(who(client, vip), c.pod_name(1));
    }

    // Up to three endpoints.
    c.apply_slice(&web_slice(
        "scale",
        (1..4).map(|i| ep_on(c.topo.pod(i).ip(), NODE)).collect(),
    ));
    let mut seen = BTreeSet::new();
    within(
        ONE_SYNC * 2,
        "all three endpoints answer after scaling up",
        || {
            seen.insert(who(client, vip));
            seen.len() == 3
        },
    );
    let up = c.iptables_save("nat");
    let chains_up = service_chains(&up, "default/scale");
    assert_eq!(
        chains_up
            .iter()
            .filter(|c| c.starts_with("KUBE-SEP-"))
            .count(),
        3,
        "one hairpin chain per local endpoint: {chains_up:?}"
    );

    // Down to one: the others' chains go.
    c.apply_slice(&web_slice("scale", vec![ep_on(c.topo.pod(3).ip(), NODE)]));
    within(ONE_SYNC, "only pod 3 answers after scaling down", || {
        (0..10).all(|_| who(client, vip) == c.pod_name(3))
    });
    let down = c.iptables_save("nat");
    let chains_down = service_chains(&down, "default/scale");
    let present = chains_of(&down);
    let gone: Vec<_> = chains_up.difference(&chains_down).collect();
    assert_eq!(gone.len(), 2, "two SEP chains removed: {gone:?}");
    for chain in gone {
        assert!(!present.contains(chain), "stale {chain} left:\n{down}");
    }

    // Deleted: not answered any more, nothing of it left in the kernel.
    c.api
        .delete::<k8s_openapi::api::core::v1::Service>("default", "scale")
        .expect("delete service");
    c.api
        .delete::<k8s_openapi::api::discovery::v1::EndpointSlice>("default", "scale-1")
        .expect("delete slice");
    within(ONE_SYNC, "the deleted service stops answering", || {
        !matches!(
            tcp_attempt(client, vip, Duration::from_millis(300)),
            Attempt::Answered(_)
        )
    });
    // Settled: every later attempt fails as well.
    for _ in 0..3 {
        let a = tcp_attempt(client, vip, Duration::from_millis(300));
        assert!(!matches!(a, Attempt::Answered(_)), "{a:?}");
    }
    let nat = c.iptables_save("nat");
    let filter = c.iptables_save("filter");
    let present = chains_of(&nat);
    for chain in &chains_down {
        assert!(!present.contains(chain), "stale {chain} left:\n{nat}");
    }
    for (table, save) in [("nat", &nat), ("filter", &filter)] {
        assert!(
            !save.contains("10.96.3.3") && !save.contains("default/scale"),
            "{table} still mentions the deleted service:\n{save}"
        );
    }
    assert_eq!(
        who(client, keep),
        c.pod_name(3),
        "the other service still works"
    );
}

#[test]
fn stale_udp_conntrack_entries_are_deleted() {
    let Some(c) = Cluster::new("stale_udp_conntrack_entries_are_deleted", 3, 0) else {
        return;
    };
    let (p1, p2) = (c.topo.pod(1), c.topo.pod(2));
    let _servers = [
        udp_peer_server(&p1.ns, sock(p1.ip(), 5353)).unwrap(),
        udp_peer_server(&p2.ns, sock(p2.ip(), 5353)).unwrap(),
    ];
    let dns = |eps: Vec<Ep>| slice_with("dns", "1", "IPv4", &[("dns", 5353, "UDP")], eps);
    c.apply_service(
        &SvcBuilder::new("default", "dns")
            .cluster_ip("10.96.4.10")
            .port_full(svc_port("dns", 53, "UDP", 5353, None))
            .build(),
    );
    c.apply_slice(&dns(vec![ep_on(p1.ip(), NODE), ep_on(p2.ip(), NODE)]));
    let _k = c.start_kproxy(&[]);
    let client = c.topo.pod(0);
    let src = sock(client.ipv4, 40053);
    let vip = sock([10, 96, 4, 10], 53);
    let ask = || {
        let reply = udp_request_from(&client.ns, src, vip, REQUEST_TIMEOUT).expect("UDP reply");
        kproxy_testkit::netns::parse_peer_reply(&reply)
            .expect("peer reply")
            .0
    };
    let first = ask();
    // The flow is pinned by conntrack: the same source port keeps its endpoint.
    for _ in 0..5 {
        assert_eq!(ask(), first);
    }
    let (gone, stays) = if first == c.pod_name(1) {
        (p1, p2)
    } else {
        (p2, p1)
    };
    let flows = |ip: IpAddr| -> usize {
        let out = c
            .node()
            .exec_ok(["conntrack", "-L", "-p", "udp", "--orig-dst", "10.96.4.10"])
            .expect("conntrack -L");
        out.lines()
            .filter(|l| l.contains(&format!("src={ip} ")) && l.contains("sport=5353"))
            .count()
    };
    assert_eq!(flows(gone.ip()), 1, "the flow to {first} is tracked");

    // The endpoint goes away (its server keeps running: a stale flow would
    // still get answers from it).
    c.apply_slice(&dns(vec![ep_on(stays.ip(), NODE)]));
    within(ONE_SYNC, "the stale flow is deleted", || {
        flows(gone.ip()) == 0
    });
    assert_eq!(
        ask(),
        stays.ns.name(),
        "the same client flow reaches the live endpoint"
    );
}

#[test]
fn dual_stack_service_alongside_ipv4() {
    let Some(c) = Cluster::new("dual_stack_service_alongside_ipv4", 3, 0) else {
        return;
    };
    let (p1, p2) = (c.topo.pod(1), c.topo.pod(2));
    let _servers = [
        tcp_peer_server(&p1.ns, sock(p1.ip(), 8080)).unwrap(),
        tcp_peer_server(&p1.ns, sock(p1.ip6(), 8080)).unwrap(),
        tcp_peer_server(&p2.ns, sock(p2.ip(), 8080)).unwrap(),
        tcp_peer_server(&p2.ns, sock(p2.ip6(), 8080)).unwrap(),
    ];
    c.apply_service(
        &SvcBuilder::new("default", "dual")
            .type_("NodePort")
            .cluster_ips(&["10.96.6.1", "fd00:96::6:1"])
            .port_full(svc_port("http", 80, "TCP", 8080, Some(30100)))
            .with(|s| {
                let spec = s.spec.as_mut().expect("spec");
                spec.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
                spec.ip_family_policy = Some("RequireDualStack".into());
            })
            .build(),
    );
    let eps = |v6: bool| -> Vec<Ep> {
        [p1, p2]
            .iter()
            .map(|p| ep_on(if v6 { p.ip6() } else { p.ip() }, NODE))
            .collect()
    };
    c.apply_slice(&slice_with(
        "dual",
        "v4",
        "IPv4",
        &[("http", 8080, "TCP")],
        eps(false),
    ));
    c.apply_slice(&slice_with(
        "dual",
        "v6",
        "IPv6",
        &[("http", 8080, "TCP")],
        eps(true),
    ));
    c.apply_service(&web_service("v4only", "10.96.6.2").build());
    c.apply_slice(&web_slice("v4only", vec![ep_on(p2.ip(), NODE)]));
    let _k = c.start_kproxy(&[]);
    let client = c.topo.pod(0);
    let both: BTreeSet<String> = [c.pod_name(1), c.pod_name(2)].into();

    for (dst, src) in [
        (sock([10, 96, 6, 1], 80), client.ip()),
        (
            sock("fd00:96::6:1".parse::<IpAddr>().unwrap(), 80),
            client.ip6(),
        ),
    ] {
        let mut seen = BTreeSet::new();
        for _ in 0..30 {
            let (who, peer) =
                peer_request(&client.ns, dst).unwrap_or_else(|e| panic!("{dst}: {e:#}"));
            assert_eq!(peer.ip(), src, "{dst}: source not preserved");
            seen.insert(who);
        }
        assert_eq!(seen, both, "{dst} spreads over both endpoints");
    }
    assert_eq!(who(&client.ns, sock([10, 96, 6, 2], 80)), c.pod_name(2));
    // IPv6 NodePort from outside, masqueraded.
    let (who6, peer6) = peer_request(&c.topo.client, sock(NODE_IP_V6, 30100)).expect("v6 NodePort");
    assert!(both.contains(&who6));
    assert_ne!(
        peer6.ip(),
        IpAddr::from(kproxy_testkit::netns::CLIENT_IP_V6)
    );
    // Each family in its own tables; the IPv4-only service only in iptables.
    let v6 = c.ip6tables_save("nat");
    assert!(v6.contains("fd00:96::6:1/128"), "{v6}");
    assert!(!v6.contains("default/v4only"), "{v6}");
    let v4 = c.iptables_save("nat");
    assert!(v4.contains("10.96.6.1/32") && v4.contains("default/v4only"));
}
