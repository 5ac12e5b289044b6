//! Service → ServicePort conversion, through the StateBuilder.

mod common;

use common::*;
use kproxy_model::fixtures::*;
use kproxy_model::{IpFamily, Protocol, StateBuilder};

#[test]
fn cluster_ip_service_yields_one_port_per_service_port() {
    let mut b = StateBuilder::new(NODE);
    let svc = SvcBuilder::new("ns", "web")
        .cluster_ip("10.0.0.10")
        .port("http", 80, "TCP")
        .port("dns", 53, "UDP")
        .build();
    let up = update(&mut b, &svc, &[]);
    assert_eq!(up.changed_ports.len(), 2);
    assert!(up.new_rejections.is_empty());
    let http = get(&b, IpFamily::V4, "ns", "web", "http", Protocol::Tcp);
    assert_eq!(http.cluster_ip, ip("10.0.0.10"));
    assert_eq!(http.port, 80);
    assert_eq!(http.target_port, "80");
    assert_eq!(http.node_port, None);
    assert_eq!(http.session_affinity_seconds, None);
    assert!(!http.external_policy_local && !http.internal_policy_local);
    assert_eq!(http.health_check_node_port, None);
    let dns = get(&b, IpFamily::V4, "ns", "web", "dns", Protocol::Udp);
    assert_eq!(dns.port, 53);
    assert!(b.state().ipv6.is_empty());
    assert_eq!(http.name.to_string(), "ns/web:http");
}

#[test]
fn services_that_yield_nothing() {
    let mut b = StateBuilder::new(NODE);
    let cases = [
        SvcBuilder::new("ns", "ext")
            .type_("ExternalName")
            .cluster_ip("10.0.0.1")
            .port("", 80, "TCP")
            .build(),
        SvcBuilder::new("ns", "headless")
            .cluster_ip("None")
            .port("", 80, "TCP")
            .build(),
        SvcBuilder::new("ns", "empty").port("", 80, "TCP").build(),
        SvcBuilder::new("ns", "other-proxy")
            .cluster_ip("10.0.0.2")
            .port("", 80, "TCP")
            .label("service.kubernetes.io/service-proxy-name", "foo")
            .build(),
    ];
    for svc in &cases {
        let up = update(
            &mut b,
            svc,
            &[simple_slice("ns", "x", "x-1", 80, &["10.1.0.1"])],
        );
        assert!(up.changed_ports.is_empty() && up.new_rejections.is_empty());
    }
    assert_eq!(b.state().service_port_count(), 0);
    assert!(b.state().rejections.is_empty());
    // Known, so a node change recomputes them too.
    assert_eq!(b.service_keys().len(), 4);
}

#[test]
fn becoming_headless_removes_the_ports() {
    let mut b = StateBuilder::new(NODE);
    update(&mut b, &simple_service("ns", "a", "10.0.0.1", 80), &[]);
    assert_eq!(b.state().service_port_count(), 1);
    let headless = SvcBuilder::new("ns", "a")
        .cluster_ip("None")
        .port("", 80, "TCP")
        .build();
    let up = update(&mut b, &headless, &[]);
    assert_eq!(up.changed_ports.len(), 1);
    assert_eq!(b.state().service_port_count(), 0);
}

#[test]
fn dual_stack_yields_a_port_per_family_with_family_filtered_fields() {
    let mut b = StateBuilder::new(NODE);
    let svc = SvcBuilder::new("ns", "ds")
        .type_("LoadBalancer")
        .cluster_ips(&["fd00::10", "10.0.0.10"])
        .node_port("", 80, "TCP", 30080)
        .external_ips(&["192.0.2.1", "2001:db8::1"])
        .lb_ingress("198.51.100.1", None)
        .lb_ingress("2001:db8::2", Some("VIP"))
        .source_ranges(&["203.0.113.0/24", " 2001:db8:1::/48 "])
        .build();
    let slices = [
        SliceBuilder::new("ns", "ds-v4", "ds", "IPv4")
            .port("", 8080, "TCP")
            .ready_ips(&["10.1.0.1"])
            .build(),
        SliceBuilder::new("ns", "ds-v6", "ds", "IPv6")
            .port("", 8080, "TCP")
            .ready_ips(&["fd01::1"])
            .build(),
    ];
    let up = update(&mut b, &svc, &slices);
    assert!(up.new_rejections.is_empty(), "{:?}", up.new_rejections);
    assert_eq!(up.changed_ports.len(), 2);
    let v4 = get(&b, IpFamily::V4, "ns", "ds", "", Protocol::Tcp);
    let v6 = get(&b, IpFamily::V6, "ns", "ds", "", Protocol::Tcp);
    assert_eq!(v4.cluster_ip, ip("10.0.0.10"));
    assert_eq!(v6.cluster_ip, ip("fd00::10"));
    assert_eq!(v4.external_ips, vec![ip("192.0.2.1")]);
    assert_eq!(v6.external_ips, vec![ip("2001:db8::1")]);
    assert_eq!(v4.load_balancer_ips, vec![ip("198.51.100.1")]);
    assert_eq!(v6.load_balancer_ips, vec![ip("2001:db8::2")]);
    assert_eq!(
        v4.load_balancer_source_ranges,
        vec!["203.0.113.0/24".parse().unwrap()]
    );
    assert_eq!(
        v6.load_balancer_source_ranges,
        vec!["2001:db8:1::/48".parse().unwrap()]
    );
    assert_eq!(v4.node_port, Some(30080));
    assert_eq!(v6.node_port, Some(30080));
    assert_eq!(addrs(&v4.endpoints.all), vec!["10.1.0.1:8080"]);
    assert_eq!(addrs(&v6.endpoints.all), vec!["[fd01::1]:8080"]);
    assert_eq!(addrs(&v6.endpoints.cluster), vec!["[fd01::1]:8080"]);
}

#[test]
fn single_cluster_ip_field_is_the_fallback() {
    let mut b = StateBuilder::new(NODE);
    let svc = SvcBuilder::new("ns", "old")
        .port("", 80, "TCP")
        .with(|s| s.spec.as_mut().unwrap().cluster_ip = Some("10.0.0.7".into()))
        .build();
    update(&mut b, &svc, &[]);
    assert_eq!(
        get(&b, IpFamily::V4, "ns", "old", "", Protocol::Tcp).cluster_ip,
        ip("10.0.0.7")
    );
}

#[test]
fn node_port_only_for_node_port_and_load_balancer_types() {
    let mut b = StateBuilder::new(NODE);
    // Distinct IPs and NodePorts: services sharing one are a conflict
    // (tests/conflicts.rs).
    for (name, t, ip, np, want) in [
        ("a", "ClusterIP", "10.0.0.1", 30001, None),
        ("b", "NodePort", "10.0.0.2", 30002, Some(30002)),
        ("c", "LoadBalancer", "10.0.0.3", 30003, Some(30003)),
    ] {
        let svc = SvcBuilder::new("ns", name)
            .type_(t)
            .cluster_ip(ip)
            .node_port("", 80, "TCP", np)
            .build();
        update(&mut b, &svc, &[]);
        assert_eq!(
            get(&b, IpFamily::V4, "ns", name, "", Protocol::Tcp).node_port,
            want,
            "{t}"
        );
    }
    // nodePort 0 means none.
    let svc = SvcBuilder::new("ns", "d")
        .type_("NodePort")
        .cluster_ip("10.0.0.4")
        .node_port("", 80, "TCP", 0)
        .build();
    update(&mut b, &svc, &[]);
    assert_eq!(
        get(&b, IpFamily::V4, "ns", "d", "", Protocol::Tcp).node_port,
        None
    );
}

#[test]
fn proxy_mode_load_balancer_ingress_is_skipped() {
    let mut b = StateBuilder::new(NODE);
    let svc = SvcBuilder::new("ns", "lb")
        .type_("LoadBalancer")
        .cluster_ip("10.0.0.1")
        .node_port("", 80, "TCP", 30000)
        .lb_ingress("198.51.100.1", Some("Proxy"))
        .lb_ingress("198.51.100.2", Some("VIP"))
        .lb_ingress("198.51.100.3", None)
        .with(|s| {
            // Hostname-only ingress (no IP) is ignored.
            s.status
                .as_mut()
                .unwrap()
                .load_balancer
                .as_mut()
                .unwrap()
                .ingress
                .as_mut()
                .unwrap()
                .push(Default::default())
        })
        .build();
    update(&mut b, &svc, &[]);
    let sp = get(&b, IpFamily::V4, "ns", "lb", "", Protocol::Tcp);
    assert_eq!(
        sp.load_balancer_ips,
        vec![ip("198.51.100.2"), ip("198.51.100.3")]
    );
}

#[test]
fn source_ranges_annotation_is_used_only_when_the_field_is_empty() {
    let mut b = StateBuilder::new(NODE);
    let ann = "service.beta.kubernetes.io/load-balancer-source-ranges";
    let svc = SvcBuilder::new("ns", "a")
        .type_("LoadBalancer")
        .cluster_ip("10.0.0.1")
        .node_port("", 80, "TCP", 30000)
        .annotation(ann, "10.0.0.0/8, 192.168.0.0/16,fd00::/8")
        .build();
    update(&mut b, &svc, &[]);
    assert_eq!(
        get(&b, IpFamily::V4, "ns", "a", "", Protocol::Tcp).load_balancer_source_ranges,
        vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.168.0.0/16".parse().unwrap()
        ]
    );
    let svc = SvcBuilder::new("ns", "b")
        .type_("LoadBalancer")
        .cluster_ip("10.0.0.2")
        .node_port("", 80, "TCP", 30000)
        .annotation(ann, "10.0.0.0/8")
        .source_ranges(&["172.16.0.0/12"])
        .build();
    update(&mut b, &svc, &[]);
    assert_eq!(
        get(&b, IpFamily::V4, "ns", "b", "", Protocol::Tcp).load_balancer_source_ranges,
        vec!["172.16.0.0/12".parse().unwrap()]
    );
}

#[test]
fn session_affinity_timeout_and_default() {
    let mut b = StateBuilder::new(NODE);
    let svc = SvcBuilder::new("ns", "a")
        .cluster_ip("10.0.0.1")
        .port("", 80, "TCP")
        .affinity(Some(600))
        .build();
    update(&mut b, &svc, &[]);
    assert_eq!(
        get(&b, IpFamily::V4, "ns", "a", "", Protocol::Tcp).session_affinity_seconds,
        Some(600)
    );
    let svc = SvcBuilder::new("ns", "b")
        .cluster_ip("10.0.0.2")
        .port("", 80, "TCP")
        .affinity(None)
        .build();
    update(&mut b, &svc, &[]);
    assert_eq!(
        get(&b, IpFamily::V4, "ns", "b", "", Protocol::Tcp).session_affinity_seconds,
        Some(10800)
    );
    let svc = SvcBuilder::new("ns", "c")
        .cluster_ip("10.0.0.3")
        .port("", 80, "TCP")
        .affinity(Some(86400))
        .with(|s| s.spec.as_mut().unwrap().session_affinity = Some("None".into()))
        .build();
    update(&mut b, &svc, &[]);
    assert_eq!(
        get(&b, IpFamily::V4, "ns", "c", "", Protocol::Tcp).session_affinity_seconds,
        None
    );
}

#[test]
fn traffic_policies_and_health_check_node_port() {
    let mut b = StateBuilder::new(NODE);
    // eTP Local on a LoadBalancer: local policy and health check port.
    let svc = SvcBuilder::new("ns", "lb")
        .type_("LoadBalancer")
        .cluster_ip("10.0.0.1")
        .node_port("", 80, "TCP", 30000)
        .external_traffic_policy("Local")
        .health_check_node_port(32000)
        .build();
    update(&mut b, &svc, &[]);
    let sp = get(&b, IpFamily::V4, "ns", "lb", "", Protocol::Tcp);
    assert!(sp.external_policy_local);
    assert_eq!(sp.health_check_node_port, Some(32000));

    // eTP Local on a NodePort: local policy, no health check port.
    let svc = SvcBuilder::new("ns", "np")
        .type_("NodePort")
        .cluster_ip("10.0.0.2")
        .node_port("", 80, "TCP", 30001)
        .external_traffic_policy("Local")
        .health_check_node_port(32001)
        .build();
    update(&mut b, &svc, &[]);
    let sp = get(&b, IpFamily::V4, "ns", "np", "", Protocol::Tcp);
    assert!(sp.external_policy_local);
    assert_eq!(sp.health_check_node_port, None);

    // eTP Local on a plain ClusterIP: not externally accessible → ignored.
    let svc = SvcBuilder::new("ns", "cip")
        .cluster_ip("10.0.0.3")
        .port("", 80, "TCP")
        .external_traffic_policy("Local")
        .build();
    update(&mut b, &svc, &[]);
    assert!(!get(&b, IpFamily::V4, "ns", "cip", "", Protocol::Tcp).external_policy_local);

    // ...unless it has external IPs.
    let svc = SvcBuilder::new("ns", "eip")
        .cluster_ip("10.0.0.4")
        .port("", 80, "TCP")
        .external_ips(&["192.0.2.1"])
        .external_traffic_policy("Local")
        .build();
    update(&mut b, &svc, &[]);
    assert!(get(&b, IpFamily::V4, "ns", "eip", "", Protocol::Tcp).external_policy_local);

    // iTP Local.
    let svc = SvcBuilder::new("ns", "itp")
        .cluster_ip("10.0.0.1")
        .port("", 80, "TCP")
        .internal_traffic_policy("Local")
        .build();
    update(&mut b, &svc, &[]);
    let sp = get(&b, IpFamily::V4, "ns", "itp", "", Protocol::Tcp);
    assert!(sp.internal_policy_local);
    assert!(!sp.uses_cluster_endpoints());
}

#[test]
fn named_target_port_is_kept_for_display() {
    use k8s_openapi::api::core::v1::ServicePort as P;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let mut b = StateBuilder::new(NODE);
    let svc = SvcBuilder::new("ns", "a")
        .cluster_ip("10.0.0.1")
        .port_full(P {
            name: Some("web".into()),
            port: 80,
            target_port: Some(IntOrString::String("http".into())),
            ..P::default()
        })
        .build();
    update(&mut b, &svc, &[]);
    let sp = get(&b, IpFamily::V4, "ns", "a", "web", Protocol::Tcp);
    assert_eq!(sp.target_port, "http");
}

#[test]
fn deletion_removes_ports_and_forgets_the_service() {
    let mut b = StateBuilder::new(NODE);
    update(
        &mut b,
        &simple_service("ns", "a", "10.0.0.1", 80),
        &[simple_slice("ns", "a", "a-1", 80, &["10.1.0.1"])],
    );
    update(&mut b, &simple_service("ns", "b", "10.0.0.2", 80), &[]);
    let up = b.update_service(&key("ns", "a"), None, &[]);
    assert_eq!(
        up.changed_ports.into_iter().collect::<Vec<_>>(),
        vec![(IpFamily::V4, spn("ns", "a", "", Protocol::Tcp))]
    );
    assert_eq!(b.state().service_port_count(), 1);
    assert_eq!(b.service_keys(), vec![key("ns", "b")]);
}

#[test]
fn changed_ports_only_lists_real_changes() {
    let mut b = StateBuilder::new(NODE);
    let svc = SvcBuilder::new("ns", "a")
        .cluster_ip("10.0.0.1")
        .port("a", 80, "TCP")
        .port("b", 81, "TCP")
        .build();
    let slice = SliceBuilder::new("ns", "a-1", "a", "IPv4")
        .port("a", 8080, "TCP")
        .port("b", 8081, "TCP")
        .ready_ips(&["10.1.0.1"])
        .build();
    assert_eq!(
        update(&mut b, &svc, std::slice::from_ref(&slice))
            .changed_ports
            .len(),
        2
    );
    // Same objects again: nothing changed.
    assert!(update(&mut b, &svc, std::slice::from_ref(&slice))
        .changed_ports
        .is_empty());
    // Only port b's endpoints change.
    let slice2 = SliceBuilder::new("ns", "a-1", "a", "IPv4")
        .port("a", 8080, "TCP")
        .port("b", 9999, "TCP")
        .ready_ips(&["10.1.0.1"])
        .build();
    let up = update(&mut b, &svc, &[slice2]);
    assert_eq!(
        up.changed_ports.into_iter().collect::<Vec<_>>(),
        vec![(IpFamily::V4, spn("ns", "a", "b", Protocol::Tcp))]
    );
    // Port a removed from the Service.
    let svc2 = SvcBuilder::new("ns", "a")
        .cluster_ip("10.0.0.1")
        .port("b", 81, "TCP")
        .build();
    let up = update(&mut b, &svc2, &[slice]);
    assert!(up
        .changed_ports
        .contains(&(IpFamily::V4, spn("ns", "a", "a", Protocol::Tcp))));
    assert!(!b
        .state()
        .ipv4
        .contains_key(&spn("ns", "a", "a", Protocol::Tcp)));
}

#[test]
fn the_same_objects_again_are_reselected_after_a_zone_change() {
    let mut b = StateBuilder::new(NODE);
    let svc = simple_service("ns", "a", "10.0.0.1", 80);
    let svc = SvcBuilder::new("ns", "a")
        .with(|s| *s = svc)
        .version("uid-1", "5")
        .build();
    let slice = SliceBuilder::new("ns", "a-1", "a", "IPv4")
        .port("", 80, "TCP")
        .endpoint(Ep::new("10.1.0.1").zone_hints(&["z1"]))
        .endpoint(Ep::new("10.1.0.2").zone_hints(&["z2"]))
        .version("uid-2", "7")
        .build();
    update(&mut b, &svc, std::slice::from_ref(&slice));
    assert_eq!(
        get(&b, IpFamily::V4, "ns", "a", "", Protocol::Tcp)
            .endpoints
            .cluster
            .len(),
        2
    );
    assert!(b.set_node(Some(&node(NODE, Some("z1")))));
    // Recompute with the same objects: selection follows the new zone.
    let up = update(&mut b, &svc, &[slice]);
    assert_eq!(up.changed_ports.len(), 1);
    assert_eq!(
        addrs(
            &get(&b, IpFamily::V4, "ns", "a", "", Protocol::Tcp)
                .endpoints
                .cluster
        ),
        vec!["10.1.0.1:80"]
    );
}
