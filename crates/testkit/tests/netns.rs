//! The test topology routes, bridges and NATs: the base every traffic test
//! builds on.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use kproxy_testkit::netns::{
    http_get, skip_unless_root, tcp_echo_server, tcp_reply_server, tcp_request, udp_echo_server,
    udp_request, Netns, Topology, CLIENT_IP_V4, NODE_IP_V4,
};

#[test]
fn netns_is_isolated_and_deleted_on_drop() {
    if skip_unless_root("netns_is_isolated_and_deleted_on_drop") {
        return;
    }
    let ns = Netns::create("iso").unwrap();
    let path = ns.path();
    assert!(path.exists());
    // Only lo inside, and it is up.
    let links = ns.exec_ok(["ip", "-o", "link"]).unwrap();
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo:") && links.contains("UP"), "{links}");
    // run_in really is inside: a fresh namespace has ip_forward 0 and sees
    // only its own interfaces.
    let ifaces = ns
        .run_in(|| std::fs::read_to_string("/proc/thread-self/net/dev").unwrap())
        .unwrap();
    assert_eq!(
        ifaces.lines().filter(|l| l.contains(':')).count(),
        1,
        "{ifaces}"
    );
    ns.set_sysctl("net/ipv4/ip_forward", "1").unwrap();
    assert_eq!(ns.sysctl("net.ipv4.ip_forward").unwrap(), "1");
    let other = Netns::create("iso").unwrap();
    assert_ne!(other.name(), ns.name());
    assert_eq!(other.sysctl("net.ipv4.ip_forward").unwrap(), "0");
    drop(ns);
    assert!(!path.exists());
}

#[test]
fn topology_routes_and_a_dnat_rule_reaches_a_pod() {
    if skip_unless_root("topology_routes_and_a_dnat_rule_reaches_a_pod") {
        return;
    }
    let topo = Topology::builder().pods(2).remote_pods(1).build().unwrap();
    let pod0 = topo.pod(0);
    let pod1 = topo.pod(1);
    let rpod = topo.remote_pod(0);
    assert_eq!(pod0.ip(), IpAddr::V4(Ipv4Addr::new(10, 244, 1, 10)));
    assert_eq!(pod1.ip6().to_string(), "fd00:10:244:1::11");
    let _s0 = tcp_echo_server(&pod0.ns, SocketAddr::new(pod0.ip(), 8080)).unwrap();
    let _s1 = tcp_echo_server(&pod1.ns, SocketAddr::new(pod1.ip(), 8080)).unwrap();
    let _s1v6 = tcp_echo_server(&pod1.ns, SocketAddr::new(pod1.ip6(), 8080)).unwrap();
    let _r0 = tcp_echo_server(&rpod.ns, SocketAddr::new(rpod.ip(), 8080)).unwrap();
    let _u0 = udp_echo_server(&pod0.ns, SocketAddr::new(pod0.ip(), 5353)).unwrap();

    // Plain routing: client → pod (through the node), pod → pod (bridge),
    // pod → remote pod (node → remote node), IPv6 too.
    let to = |ns: &Netns, ip: IpAddr| tcp_request(ns, SocketAddr::new(ip, 8080)).unwrap();
    assert_eq!(to(&topo.client, pod0.ip()), pod0.ns.name());
    assert_eq!(to(&pod0.ns, pod1.ip()), pod1.ns.name());
    assert_eq!(to(&topo.client, pod1.ip6()), pod1.ns.name());
    assert_eq!(to(&pod0.ns, rpod.ip()), rpod.ns.name());
    assert_eq!(to(&topo.client, rpod.ip()), rpod.ns.name());
    assert_eq!(
        udp_request(&topo.client, SocketAddr::new(pod0.ip(), 5353)).unwrap(),
        pod0.ns.name()
    );

    // Nothing answers on the "service IP" before the rule.
    let vip = SocketAddr::from(([10, 96, 0, 10], 80));
    assert!(tcp_request(&topo.client, vip).is_err());

    // A hand-written DNAT rule in the node makes the service IP reach pod 1.
    topo.node
        .exec_ok([
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            "10.96.0.10/32",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            "10.244.1.11:8080",
        ])
        .unwrap();
    assert_eq!(tcp_request(&topo.client, vip).unwrap(), pod1.ns.name());
    // conntrack in the node saw the NATed flow.
    let ct = topo
        .node
        .exec_ok(["conntrack", "-L", "-p", "tcp"])
        .unwrap_or_default();
    assert!(
        ct.contains("dst=10.96.0.10") && ct.contains(&format!("src={CLIENT_IP_V4}")),
        "{ct}"
    );
}

#[test]
fn http_get_from_a_namespace() {
    if skip_unless_root("http_get_from_a_namespace") {
        return;
    }
    let topo = Topology::builder().pods(0).build().unwrap();
    let response =
        "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 7\r\n\r\nnot yet".to_string();
    let server = tcp_reply_server(
        &topo.node,
        SocketAddr::new(IpAddr::V4(NODE_IP_V4), 0),
        response,
    )
    .unwrap();
    let url = format!("http://{}/healthz", server.addr());
    assert_eq!(
        http_get(&topo.client, &url).unwrap(),
        (503, "not yet".to_string())
    );
}
