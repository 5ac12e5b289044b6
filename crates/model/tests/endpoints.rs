//! EndpointSlices → endpoints, and the cluster/local choice (upstream's
//! topology.go CategorizeEndpoints).

mod common;

use common::*;
use kproxy_model::fixtures::*;
use kproxy_model::{IpFamily, Protocol, ServicePort, StateBuilder};
use std::sync::Arc;

fn cluster_svc() -> k8s_openapi::api::core::v1::Service {
    simple_service("ns", "s", "10.0.0.1", 80)
}

/// NodePort service with eTP Local: uses both cluster and local endpoints.
fn local_svc() -> k8s_openapi::api::core::v1::Service {
    SvcBuilder::new("ns", "s")
        .type_("NodePort")
        .cluster_ip("10.0.0.1")
        .node_port("", 80, "TCP", 30080)
        .external_traffic_policy("Local")
        .build()
}

fn slice(name: &str, eps: Vec<Ep>) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    let mut b = SliceBuilder::new("ns", name, "s", "IPv4").port("", 8080, "TCP");
    for ep in eps {
        b = b.endpoint(ep);
    }
    b.build()
}

fn run(
    svc: &k8s_openapi::api::core::v1::Service,
    slices: &[k8s_openapi::api::discovery::v1::EndpointSlice],
    zone: Option<&str>,
) -> Arc<ServicePort> {
    let mut b = StateBuilder::new(NODE);
    b.set_node(Some(&node(NODE, zone)));
    let up = update(&mut b, svc, slices);
    assert!(up.new_rejections.is_empty(), "{:?}", up.new_rejections);
    get(&b, IpFamily::V4, "ns", "s", "", Protocol::Tcp)
}

#[test]
fn conditions_default_as_upstream() {
    let sp = run(
        &cluster_svc(),
        &[slice(
            "s-1",
            vec![
                Ep::new("10.1.0.1"),                   // all nil: ready, serving, !terminating
                Ep::new("10.1.0.2").ready(false),      // serving nil → ready's value
                Ep::new("10.1.0.3").terminating(true), // explicit
            ],
        )],
        None,
    );
    let all = &sp.endpoints.all;
    assert_eq!(
        addrs(all),
        vec!["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"]
    );
    assert!(all[0].ready && all[0].serving && !all[0].terminating);
    assert!(!all[1].ready && !all[1].serving && !all[1].terminating);
    assert!(all[2].ready && all[2].serving && all[2].terminating);
    assert!(sp.endpoints.has_any);
}

#[test]
fn cluster_uses_ready_endpoints_only() {
    let sp = run(
        &cluster_svc(),
        &[slice(
            "s-1",
            vec![
                Ep::new("10.1.0.1"),
                Ep::new("10.1.0.2").terminating_serving(),
                Ep::new("10.1.0.3").ready(false),
            ],
        )],
        None,
    );
    assert_eq!(addrs(&sp.endpoints.cluster), vec!["10.1.0.1:8080"]);
    assert!(
        sp.endpoints.local.is_empty(),
        "Cluster-only port has no local set"
    );
}

#[test]
fn cluster_falls_back_to_serving_terminating() {
    let sp = run(
        &cluster_svc(),
        &[slice(
            "s-1",
            vec![
                Ep::new("10.1.0.1").terminating_serving(),
                Ep::new("10.1.0.2")
                    .ready(false)
                    .serving(false)
                    .terminating(true),
                Ep::new("10.1.0.3").ready(false),
                // Serving but not terminating: not ready for another reason.
                Ep::new("10.1.0.4").ready(false).serving(true),
            ],
        )],
        None,
    );
    assert_eq!(addrs(&sp.endpoints.cluster), vec!["10.1.0.1:8080"]);
    assert!(sp.endpoints.has_any);
}

#[test]
fn nothing_usable_means_no_endpoints() {
    let sp = run(
        &cluster_svc(),
        &[slice("s-1", vec![Ep::new("10.1.0.3").ready(false)])],
        None,
    );
    assert!(sp.endpoints.cluster.is_empty());
    assert!(!sp.endpoints.has_any);
    assert_eq!(sp.endpoints.all.len(), 1);
}

#[test]
fn local_set_prefers_local_ready() {
    let sp = run(
        &local_svc(),
        &[slice(
            "s-1",
            vec![
                Ep::new("10.1.0.1").node(NODE),
                Ep::new("10.1.0.2").node(NODE).terminating_serving(),
                Ep::new("10.1.0.3").node("node-b"),
            ],
        )],
        None,
    );
    assert_eq!(addrs(&sp.endpoints.local), vec!["10.1.0.1:8080"]);
    assert_eq!(
        addrs(&sp.endpoints.cluster),
        vec!["10.1.0.1:8080", "10.1.0.3:8080"]
    );
    assert!(sp.endpoints.has_any);
}

#[test]
fn local_set_falls_back_to_local_serving_terminating() {
    let sp = run(
        &local_svc(),
        &[slice(
            "s-1",
            vec![
                Ep::new("10.1.0.2").node(NODE).terminating_serving(),
                Ep::new("10.1.0.3").node("node-b"),
            ],
        )],
        None,
    );
    // Remote ready endpoint exists, but the local set falls back on its own.
    assert_eq!(addrs(&sp.endpoints.local), vec!["10.1.0.2:8080"]);
    assert_eq!(addrs(&sp.endpoints.cluster), vec!["10.1.0.3:8080"]);
}

#[test]
fn no_local_endpoints_but_some_elsewhere() {
    let sp = run(
        &local_svc(),
        &[slice("s-1", vec![Ep::new("10.1.0.3").node("node-b")])],
        None,
    );
    assert!(sp.endpoints.local.is_empty());
    assert!(sp.endpoints.has_any, "drop, not reject");
}

#[test]
fn internal_local_only_fills_local_set() {
    let svc = SvcBuilder::new("ns", "s")
        .cluster_ip("10.0.0.1")
        .port("", 80, "TCP")
        .internal_traffic_policy("Local")
        .build();
    let sp = run(
        &svc,
        &[slice(
            "s-1",
            vec![
                Ep::new("10.1.0.1").node(NODE),
                Ep::new("10.1.0.2").node("node-b"),
            ],
        )],
        None,
    );
    assert!(sp.endpoints.cluster.is_empty());
    assert_eq!(addrs(&sp.endpoints.local), vec!["10.1.0.1:8080"]);
    assert!(sp.endpoints.has_any);
    assert!(sp.endpoints.local.iter().all(|e| e.is_local));
}

#[test]
fn node_hints_prefer_same_node() {
    let sp = run(
        &cluster_svc(),
        &[slice(
            "s-1",
            vec![
                Ep::new("10.1.0.1").node_hints(&[NODE]).zone_hints(&["z1"]),
                Ep::new("10.1.0.2")
                    .node_hints(&["node-b"])
                    .zone_hints(&["z1"]),
            ],
        )],
        Some("z1"),
    );
    assert_eq!(addrs(&sp.endpoints.cluster), vec!["10.1.0.1:8080"]);
}

#[test]
fn node_hints_without_one_for_us_fall_to_zone_hints() {
    let sp = run(
        &cluster_svc(),
        &[slice(
            "s-1",
            vec![
                Ep::new("10.1.0.1")
                    .node_hints(&["node-c"])
                    .zone_hints(&["z1"]),
                Ep::new("10.1.0.2")
                    .node_hints(&["node-b"])
                    .zone_hints(&["z2"]),
            ],
        )],
        Some("z1"),
    );
    assert_eq!(addrs(&sp.endpoints.cluster), vec!["10.1.0.1:8080"]);
}

#[test]
fn zone_hints_filter_by_node_zone() {
    let eps = || {
        vec![
            Ep::new("10.1.0.1").zone_hints(&["z1"]),
            Ep::new("10.1.0.2").zone_hints(&["z2"]),
            Ep::new("10.1.0.3").zone_hints(&["z1", "z2"]),
        ]
    };
    let sp = run(&cluster_svc(), &[slice("s-1", eps())], Some("z2"));
    assert_eq!(
        addrs(&sp.endpoints.cluster),
        vec!["10.1.0.2:8080", "10.1.0.3:8080"]
    );
    // Node without a zone label, or a zone nobody hints for: no filtering.
    assert_eq!(
        run(&cluster_svc(), &[slice("s-1", eps())], None)
            .endpoints
            .cluster
            .len(),
        3
    );
    assert_eq!(
        run(&cluster_svc(), &[slice("s-1", eps())], Some("z9"))
            .endpoints
            .cluster
            .len(),
        3
    );
}

#[test]
fn mixed_hints_mean_no_filtering() {
    let sp = run(
        &cluster_svc(),
        &[slice(
            "s-1",
            vec![
                Ep::new("10.1.0.1").zone_hints(&["z1"]).node_hints(&[NODE]),
                Ep::new("10.1.0.2"), // no hints at all
            ],
        )],
        Some("z1"),
    );
    assert_eq!(sp.endpoints.cluster.len(), 2);
}

#[test]
fn hints_on_non_ready_endpoints_do_not_count() {
    // The unhinted endpoint is not ready, so every *ready* one has a hint.
    let sp = run(
        &cluster_svc(),
        &[slice(
            "s-1",
            vec![
                Ep::new("10.1.0.1").zone_hints(&["z1"]),
                Ep::new("10.1.0.2").zone_hints(&["z2"]),
                Ep::new("10.1.0.3").ready(false),
            ],
        )],
        Some("z1"),
    );
    assert_eq!(addrs(&sp.endpoints.cluster), vec!["10.1.0.1:8080"]);
}

#[test]
fn slices_are_merged_and_duplicates_prefer_non_terminating() {
    let sp = run(
        &cluster_svc(),
        &[
            slice(
                "s-a",
                vec![
                    Ep::new("10.1.0.1").terminating_serving(),
                    Ep::new("10.1.0.2"),
                ],
            ),
            slice("s-b", vec![Ep::new("10.1.0.1"), Ep::new("10.1.0.3")]),
        ],
        None,
    );
    assert_eq!(
        addrs(&sp.endpoints.all),
        vec!["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"]
    );
    assert!(sp.endpoints.all[0].ready && !sp.endpoints.all[0].terminating);
    // Order of the slices does not matter.
    let sp2 = run(
        &cluster_svc(),
        &[
            slice("s-b", vec![Ep::new("10.1.0.1"), Ep::new("10.1.0.3")]),
            slice(
                "s-a",
                vec![
                    Ep::new("10.1.0.1").terminating_serving(),
                    Ep::new("10.1.0.2"),
                ],
            ),
        ],
        None,
    );
    assert_eq!(sp.endpoints, sp2.endpoints);
}

#[test]
fn ports_match_by_name_and_protocol() {
    let svc = SvcBuilder::new("ns", "s")
        .cluster_ip("10.0.0.1")
        .port("http", 80, "TCP")
        .port("dns", 53, "UDP")
        .build();
    let s = SliceBuilder::new("ns", "s-1", "s", "IPv4")
        .port("http", 8080, "TCP")
        .port("dns", 5353, "UDP")
        .port("dns", 5354, "TCP") // wrong protocol for the service's dns port
        .port("other", 9, "TCP")
        .ready_ips(&["10.1.0.1"])
        .build();
    let mut b = StateBuilder::new(NODE);
    update(&mut b, &svc, &[s]);
    assert_eq!(
        addrs(
            &get(&b, IpFamily::V4, "ns", "s", "http", Protocol::Tcp)
                .endpoints
                .all
        ),
        vec!["10.1.0.1:8080"]
    );
    assert_eq!(
        addrs(
            &get(&b, IpFamily::V4, "ns", "s", "dns", Protocol::Udp)
                .endpoints
                .all
        ),
        vec!["10.1.0.1:5353"]
    );
}

#[test]
fn unnamed_slice_port_matches_absent_name() {
    use k8s_openapi::api::discovery::v1::EndpointPort;
    let s = SliceBuilder::new("ns", "s-1", "s", "IPv4")
        .port_full(EndpointPort {
            name: None,
            port: Some(8080),
            protocol: None, // TCP
            app_protocol: None,
        })
        .ready_ips(&["10.1.0.1"])
        .build();
    let sp = run(&cluster_svc(), &[s], None);
    assert_eq!(addrs(&sp.endpoints.all), vec!["10.1.0.1:8080"]);
}

#[test]
fn slice_ports_without_number_and_empty_endpoints_are_skipped() {
    use k8s_openapi::api::discovery::v1::EndpointPort;
    let s = SliceBuilder::new("ns", "s-1", "s", "IPv4")
        .port_full(EndpointPort {
            name: Some(String::new()),
            port: None,
            protocol: Some("TCP".into()),
            app_protocol: None,
        })
        .ready_ips(&["10.1.0.1"])
        .build();
    let s2 = SliceBuilder::new("ns", "s-2", "s", "IPv4")
        .port("", 8080, "TCP")
        .endpoint(Ep::new("10.1.0.9").addresses(&[]))
        .endpoint(Ep::new("10.1.0.2").addresses(&["10.1.0.2", "10.1.0.3"]))
        .build();
    let sp = run(&cluster_svc(), &[s, s2], None);
    // Only the first of several (fungible) addresses is used, as upstream.
    assert_eq!(addrs(&sp.endpoints.all), vec!["10.1.0.2:8080"]);
}

#[test]
fn fqdn_and_other_family_slices_are_ignored() {
    let fqdn = SliceBuilder::new("ns", "s-fqdn", "s", "FQDN")
        .port("", 8080, "TCP")
        .endpoint(Ep::new("example.com"))
        .build();
    let v6 = SliceBuilder::new("ns", "s-v6", "s", "IPv6")
        .port("", 8080, "TCP")
        .ready_ips(&["fd00::1"])
        .build();
    let sp = run(
        &cluster_svc(),
        &[fqdn, v6, slice("s-1", vec![Ep::new("10.1.0.1")])],
        None,
    );
    assert_eq!(addrs(&sp.endpoints.all), vec!["10.1.0.1:8080"]);
}

#[test]
fn is_local_follows_node_name() {
    let sp = run(
        &local_svc(),
        &[slice(
            "s-1",
            vec![
                Ep::new("10.1.0.1").node(NODE),
                Ep::new("10.1.0.2").node("node-b"),
                Ep::new("10.1.0.3"),
            ],
        )],
        None,
    );
    let local: Vec<bool> = sp.endpoints.all.iter().map(|e| e.is_local).collect();
    assert_eq!(local, vec![true, false, false]);
}

#[test]
fn zone_change_needs_reselect() {
    let mut b = StateBuilder::new(NODE);
    update(
        &mut b,
        &cluster_svc(),
        &[slice(
            "s-1",
            vec![
                Ep::new("10.1.0.1").zone_hints(&["z1"]),
                Ep::new("10.1.0.2").zone_hints(&["z2"]),
            ],
        )],
    );
    assert!(b.set_node(Some(&node(NODE, Some("z2")))));
    assert!(
        !b.set_node(Some(&node(NODE, Some("z2")))),
        "no change, no recompute"
    );
    let changed = b.reselect_all();
    assert_eq!(changed.len(), 1);
    assert_eq!(
        addrs(
            &get(&b, IpFamily::V4, "ns", "s", "", Protocol::Tcp)
                .endpoints
                .cluster
        ),
        vec!["10.1.0.2:8080"]
    );
    assert!(b.reselect_all().is_empty());
}

#[test]
fn node_info_fields() {
    let mut b = StateBuilder::new(NODE);
    assert!(!b.set_node(None));
    let n = with_pod_cidrs(
        deleting(node(NODE, Some("z1"))),
        &["10.244.1.0/24", "fd00:10:244:1::/64"],
    );
    assert!(b.set_node(Some(&n)));
    let info = &b.state().node;
    assert_eq!(info.name, NODE);
    assert_eq!(info.zone.as_deref(), Some("z1"));
    assert!(info.deleting);
    assert_eq!(info.pod_cidrs.len(), 2);
    assert!(b.state().rejections.is_empty());
    // A bad podCIDR is skipped and noted; the rest is used.
    let n = with_pod_cidrs(node(NODE, Some("z1")), &["10.244.1.0/24", "garbage"]);
    assert!(!b.set_node(Some(&n)));
    assert_eq!(b.state().node.pod_cidrs.len(), 1);
    assert!(!b.state().node.deleting);
    assert_eq!(b.state().rejections.len(), 1);
    assert!(b.state().rejections[0].reason.contains("spec.podCIDRs[1]"));
    // Node gone: zone gone too.
    assert!(b.set_node(None));
    assert!(b.state().rejections.is_empty());
}

#[test]
fn externally_accessible_local_policies_still_select_cluster_endpoints() {
    // Pods reaching a NodePort are short-circuited to the cluster endpoints
    // even when both policies are Local (upstream's UsesClusterEndpoints).
    let svc = SvcBuilder::new("ns", "s")
        .cluster_ip("10.0.0.1")
        .type_("NodePort")
        .node_port("", 80, "TCP", 30080)
        .internal_traffic_policy("Local")
        .external_traffic_policy("Local")
        .build();
    let sp = run(
        &svc,
        &[slice(
            "s-1",
            vec![
                Ep::new("10.1.0.1").node(NODE),
                Ep::new("10.1.0.2").node("node-b"),
            ],
        )],
        None,
    );
    assert_eq!(
        addrs(&sp.endpoints.cluster),
        vec!["10.1.0.1:8080", "10.1.0.2:8080"]
    );
    assert_eq!(addrs(&sp.endpoints.local), vec!["10.1.0.1:8080"]);
}
