//! Two Services claiming one NodePort: the older one keeps it, the newer one
//! still serves on its ClusterIP, a warning names both, and the newer one
//! takes the NodePort within one sync once the older one is deleted.

mod common;
#[path = "fixtures/reliability/support.rs"]
mod support;

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Service;
use kproxy_model::fixtures::SvcBuilder;
use kproxy_testkit::netns::{tcp_echo_server, tcp_request, NODE_IP_V4};
use support::figure;

const NODE_PORT: u16 = 30090;

fn np_service(name: &str, ip: &str) -> Service {
    SvcBuilder::new("default", name)
        .type_("NodePort")
        .cluster_ip(ip)
        .port_full(svc_port(
            "http",
            80,
            "TCP",
            8080,
            Some(i32::from(NODE_PORT)),
        ))
        .build()
}

#[test]
fn reliability_conflicting_node_ports_older_service_wins() {
    const TEST: &str = "reliability_conflicting_node_ports_older_service_wins";
    let Some(c) = Cluster::new(TEST, 2, 0) else {
        return;
    };
    let (pod0, pod1) = (c.topo.pod(0).ip(), c.topo.pod(1).ip());
    let _s0 = tcp_echo_server(&c.topo.pod(0).ns, sock(pod0, 8080)).expect("server 0");
    let _s1 = tcp_echo_server(&c.topo.pod(1).ns, sock(pod1, 8080)).expect("server 1");
    // The newer one is named so that it would sort first: only age decides.
    c.apply_service(&np_service("zz-old", "10.96.0.40"));
    c.apply_slice(&slice_for("zz-old", "IPv4", &[(pod0, NODE)]));
    // creationTimestamp has a one-second resolution.
    std::thread::sleep(Duration::from_millis(1100));
    let mut k = c.start_kproxy(&[]);
    let client = &c.topo.client;
    let node_port = sock(NODE_IP_V4, NODE_PORT);
    eventually("the older service on the NodePort", || {
        tcp_request(client, node_port).ok() == Some(c.pod_name(0))
    });

    c.apply_service(&np_service("aa-new", "10.96.0.41"));
    c.apply_slice(&slice_for("aa-new", "IPv4", &[(pod1, NODE)]));
    eventually("the newer service on its ClusterIP", || {
        tcp_request(client, sock([10, 96, 0, 41], 80)).ok() == Some(c.pod_name(1))
    });
    // The NodePort stays with the older one, every time.
    for _ in 0..10 {
        assert_eq!(
            tcp_request(client, node_port).expect("NodePort"),
            c.pod_name(0)
        );
    }
    let nat = c.iptables_save("nat");
    let nodeport_rules = rules_of(&nat, "KUBE-NODEPORTS")
        .into_iter()
        .filter(|r| r.contains(&format!("--dport {NODE_PORT}")))
        .count();
    assert_eq!(nodeport_rules, 1, "one NodePort rule only:\n{nat}");
    eventually("a warning naming both services", || {
        k.log().lines().any(|l| {
            l.contains("WARN")
                && l.contains("default/aa-new")
                && l.contains("default/zz-old")
                && l.contains("nodePort 30090/TCP")
        })
    });
    let rejected = k
        .metric("kproxy_rejected_objects_total{kind=\"Service\"}")
        .expect("metrics");
    assert_eq!(rejected, Some(1.0));

    // The older one goes: the newer one takes the NodePort within a sync.
    c.api
        .delete::<Service>("default", "zz-old")
        .expect("delete the older service");
    let took = within(
        Duration::from_secs(2),
        "the newer service on the NodePort",
        || tcp_request(client, node_port).ok() == Some(c.pod_name(1)),
    );
    assert_eq!(
        tcp_request(client, sock([10, 96, 0, 41], 80)).expect("ClusterIP"),
        c.pod_name(1)
    );
    let state = k.debug_state().expect("debug state");
    assert_eq!(state["rejections"], serde_json::json!([]), "{state}");
    let _ = k.terminate(Duration::from_secs(10));
    figure(
        TEST,
        &format!(
            "older default/zz-old kept NodePort {NODE_PORT} (10/10 requests), newer default/aa-new served on its ClusterIP, one warning naming both, took the NodePort {:.0} ms after the older one was deleted",
            took.as_secs_f64() * 1e3
        ),
    );
}
