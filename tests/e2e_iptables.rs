//! The real kproxy binary in iptables mode, in a node namespace, with real
//! traffic from pod and client namespaces.

mod common;

use std::collections::BTreeSet;

use common::*;
use kproxy_testkit::netns::{tcp_echo_server, tcp_request};

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
