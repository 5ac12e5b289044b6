//! Stale UDP conntrack cleanup against real flows: client → DNAT in the
//! node → pod, in a namespace topology. Also the netlink address listing
//! and sysctl helpers it relies on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use kproxy_iptables::conntrack::{ConntrackCleaner, UdpServiceTarget};
use kproxy_iptables::netutil::{local_addresses, read_sysctl, write_sysctl};
use kproxy_model::IpFamily;
use kproxy_testkit::netns::{
    skip_unless_root, udp_echo_server, udp_request, udp_request_from, Netns, Topology,
    NODE_BRIDGE_V4, NODE_IP_V4, REQUEST_TIMEOUT,
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Sends one datagram from `ns` without waiting for an answer.
fn send_udp(ns: &Netns, dst: SocketAddr) {
    let src: SocketAddr = match dst {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = ns.run_in(move || UdpSocket::bind(src)).unwrap().unwrap();
    socket.send_to(b"ping", dst).unwrap();
}

/// The node's UDP conntrack entries as `conntrack -L` prints them.
fn conntrack_udp(node: &Netns, family: &str) -> Vec<String> {
    node.exec_ok(["conntrack", "-L", "-f", family, "-p", "udp"])
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn has_flow(entries: &[String], orig_dst: &str, dport: u16) -> bool {
    entries
        .iter()
        .any(|e| e.contains(&format!("dst={orig_dst} ")) && e.contains(&format!("dport={dport} ")))
}

#[test]
fn deletes_exactly_the_stale_udp_flows() {
    if skip_unless_root("deletes_exactly_the_stale_udp_flows") {
        return;
    }
    let topo = Topology::builder().pods(2).build().unwrap();
    let (pod0, pod1) = (topo.pod(0), topo.pod(1));
    let _s0 = udp_echo_server(&pod0.ns, SocketAddr::new(pod0.ip(), 5353)).unwrap();
    let _s1 = udp_echo_server(&pod1.ns, SocketAddr::new(pod1.ip(), 5353)).unwrap();
    let _s1v6 = udp_echo_server(&pod1.ns, SocketAddr::new(pod1.ip6(), 5353)).unwrap();
    let _t1 =
        kproxy_testkit::netns::tcp_echo_server(&pod1.ns, SocketAddr::new(pod1.ip(), 5353)).unwrap();

    let node = &topo.node;
    let rules = [
        // svc A 10.96.0.53:53 and its NodePort 30054 → pod0 (serving).
        "-t nat -A PREROUTING -d 10.96.0.53/32 -p udp --dport 53 -j DNAT --to-destination 10.244.1.10:5353",
        "-t nat -A PREROUTING -d 192.168.50.1/32 -p udp --dport 30054 -j DNAT --to-destination 10.244.1.10:5353",
        // svc B 10.96.0.54:53 and its NodePort 30053 → pod1 (no longer serving).
        "-t nat -A PREROUTING -d 10.96.0.54/32 -p udp --dport 53 -j DNAT --to-destination 10.244.1.11:5353",
        "-t nat -A PREROUTING -d 192.168.50.1/32 -p udp --dport 30053 -j DNAT --to-destination 10.244.1.11:5353",
        "-t nat -A PREROUTING -d 10.96.0.54/32 -p tcp --dport 53 -j DNAT --to-destination 10.244.1.11:5353",
    ];
    for rule in rules {
        node.exec_ok(std::iter::once("iptables").chain(rule.split_whitespace()))
            .unwrap();
    }
    node.exec_ok([
        "ip6tables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        "fd00:96::54/128",
        "-p",
        "udp",
        "--dport",
        "53",
        "-j",
        "DNAT",
        "--to-destination",
        "[fd00:10:244:1::11]:5353",
    ])
    .unwrap();
    // svc C 10.96.0.55 has no endpoints and no rule: its packets follow the
    // node's route (to pod1, which drops them), so the flow is confirmed
    // un-NATed, as with a service that had no endpoints.
    node.sh(&format!("ip route add 10.96.0.55/32 via {}", pod1.ipv4))
        .unwrap();

    let client = &topo.client;
    assert_eq!(
        udp_request(client, sa("10.96.0.53:53")).unwrap(),
        pod0.ns.name()
    );
    assert_eq!(
        udp_request(client, sa("192.168.50.1:30054")).unwrap(),
        pod0.ns.name()
    );
    // A fixed source port, so the last check below reuses this exact flow.
    let b_src = sa("0.0.0.0:40054");
    assert_eq!(
        udp_request_from(client, b_src, sa("10.96.0.54:53"), REQUEST_TIMEOUT).unwrap(),
        pod1.ns.name()
    );
    assert_eq!(
        udp_request(client, sa("192.168.50.1:30053")).unwrap(),
        pod1.ns.name()
    );
    assert_eq!(
        udp_request(client, sa("[fd00:96::54]:53")).unwrap(),
        pod1.ns.name()
    );
    // Direct to the pod, no service involved.
    assert_eq!(
        udp_request(client, SocketAddr::new(pod1.ip(), 5353)).unwrap(),
        pod1.ns.name()
    );
    send_udp(client, sa("10.96.0.55:53"));
    kproxy_testkit::netns::tcp_request(client, sa("10.96.0.54:53")).unwrap();

    let before = conntrack_udp(node, "ipv4");
    for (dst, port) in [
        ("10.96.0.53", 53),
        ("192.168.50.1", 30054),
        ("10.96.0.54", 53),
        ("192.168.50.1", 30053),
        ("10.96.0.55", 53),
        ("10.244.1.11", 5353),
    ] {
        assert!(
            has_flow(&before, dst, port),
            "no flow to {dst}:{port} in {before:#?}"
        );
    }
    assert!(has_flow(&conntrack_udp(node, "ipv6"), "fd00:96::54", 53));

    let serving = vec![sa("10.244.1.10:5353")];
    let targets = vec![
        UdpServiceTarget {
            service_addrs: vec!["10.96.0.53".parse().unwrap()],
            port: 53,
            node_port: Some(30054),
            serving: serving.clone(),
        },
        UdpServiceTarget {
            service_addrs: vec!["10.96.0.54".parse().unwrap()],
            port: 53,
            node_port: Some(30053),
            serving: serving.clone(),
        },
        UdpServiceTarget {
            service_addrs: vec!["10.96.0.55".parse().unwrap()],
            port: 53,
            node_port: None,
            serving: serving.clone(),
        },
    ];
    let cleaner = ConntrackCleaner::new();
    let deleted = node
        .run_in(|| cleaner.delete_stale_udp(IpFamily::V4, &targets))
        .unwrap()
        .unwrap();
    assert_eq!(deleted, 3);

    let after = conntrack_udp(node, "ipv4");
    assert!(has_flow(&after, "10.96.0.53", 53), "{after:#?}");
    assert!(has_flow(&after, "192.168.50.1", 30054), "{after:#?}");
    assert!(has_flow(&after, "10.244.1.11", 5353), "{after:#?}");
    assert!(!has_flow(&after, "10.96.0.54", 53), "{after:#?}");
    assert!(!has_flow(&after, "192.168.50.1", 30053), "{after:#?}");
    assert!(!has_flow(&after, "10.96.0.55", 53), "{after:#?}");
    // TCP flows are never touched.
    let tcp = node.exec_ok(["conntrack", "-L", "-p", "tcp"]).unwrap();
    assert!(tcp.contains("dst=10.96.0.54"), "{tcp}");
    // The IPv4 run left IPv6 alone; the IPv6 run removes the stale v6 flow.
    assert!(has_flow(&conntrack_udp(node, "ipv6"), "fd00:96::54", 53));
    let v6 = [UdpServiceTarget {
        service_addrs: vec!["fd00:96::54".parse().unwrap()],
        port: 53,
        node_port: None,
        serving: vec![sa("[fd00:10:244:1::10]:5353")],
    }];
    let deleted = node
        .run_in(|| cleaner.delete_stale_udp(IpFamily::V6, &v6))
        .unwrap()
        .unwrap();
    assert_eq!(deleted, 1);
    assert!(!has_flow(&conntrack_udp(node, "ipv6"), "fd00:96::54", 53));

    // Idempotent: nothing stale is left.
    let deleted = node
        .run_in(|| cleaner.delete_stale_udp(IpFamily::V4, &targets))
        .unwrap()
        .unwrap();
    assert_eq!(deleted, 0);

    // After the cleanup the service is NATed afresh: with the rule for B now
    // pointing at pod0, the same 5-tuple as before reaches pod0 (a surviving
    // entry would still send it to pod1).
    node.exec_ok([
        "iptables",
        "-t",
        "nat",
        "-R",
        "PREROUTING",
        "3",
        "-d",
        "10.96.0.54/32",
        "-p",
        "udp",
        "--dport",
        "53",
        "-j",
        "DNAT",
        "--to-destination",
        "10.244.1.10:5353",
    ])
    .unwrap();
    assert_eq!(
        udp_request_from(client, b_src, sa("10.96.0.54:53"), REQUEST_TIMEOUT).unwrap(),
        pod0.ns.name()
    );
}

#[test]
fn local_addresses_and_sysctls_of_the_namespace() {
    if skip_unless_root("local_addresses_and_sysctls_of_the_namespace") {
        return;
    }
    let topo = Topology::builder().pods(1).build().unwrap();
    let addrs = topo.node.run_in(local_addresses).unwrap().unwrap();
    let has = |name: &str, net: &str| addrs.iter().any(|(n, a)| n == name && a.to_string() == net);
    assert!(has("lo", "127.0.0.1/8"), "{addrs:?}");
    assert!(has("eth-client", &format!("{NODE_IP_V4}/24")), "{addrs:?}");
    assert!(has("br0", &format!("{NODE_BRIDGE_V4}/24")), "{addrs:?}");
    assert!(has("br0", "fd00:10:244:1::1/64"), "{addrs:?}");
    // Nothing from the root namespace or the pods.
    assert!(
        !addrs.iter().any(|(_, a)| a.addr() == topo.pod(0).ip()),
        "{addrs:?}"
    );
    let pod_addrs = topo.pod(0).ns.run_in(local_addresses).unwrap().unwrap();
    assert!(pod_addrs
        .iter()
        .any(|(n, a)| n == "eth0" && a.addr() == IpAddr::V4(topo.pod(0).ipv4)));

    let node = &topo.node;
    assert_eq!(
        node.run_in(|| read_sysctl("net.ipv4.ip_forward"))
            .unwrap()
            .unwrap(),
        "1"
    );
    assert_eq!(
        node.run_in(|| read_sysctl("net/ipv4/conf/all/route_localnet"))
            .unwrap()
            .unwrap(),
        "0"
    );
    assert!(node
        .run_in(kproxy_iptables::netutil::ensure_route_localnet)
        .unwrap()
        .unwrap());
    assert!(!node
        .run_in(kproxy_iptables::netutil::ensure_route_localnet)
        .unwrap()
        .unwrap());
    assert_eq!(
        node.sysctl("net.ipv4.conf.all.route_localnet").unwrap(),
        "1"
    );
    // Written in the node namespace only.
    assert_eq!(
        topo.client
            .sysctl("net.ipv4.conf.all.route_localnet")
            .unwrap(),
        "0"
    );
    assert!(node
        .run_in(|| write_sysctl("net.ipv4.no_such_key", "1"))
        .unwrap()
        .is_err());
}
