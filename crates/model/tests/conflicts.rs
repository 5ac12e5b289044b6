//! Services claiming the same NodePort or the same IP:port/protocol: the
//! older one (creationTimestamp, then namespace/name) keeps it, the newer
//! one loses only the contested part with a rejection naming both, and gets
//! it back when the older one goes away — whatever the order of updates.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;

use common::*;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kproxy_model::fixtures::*;
use kproxy_model::{IpFamily, Protocol, ProxyState, ServiceKey, StateBuilder};
use proptest::prelude::*;

/// A timestamp `secs` seconds after an arbitrary epoch.
fn at(secs: i64) -> Time {
    Time(jiff::Timestamp::from_second(1_700_000_000 + secs).unwrap())
}

fn created(b: SvcBuilder, secs: i64) -> SvcBuilder {
    b.with(|s| s.metadata.creation_timestamp = Some(at(secs)))
}

fn node_port_svc(name: &str, ip: &str, np: i32, secs: i64) -> Service {
    created(
        SvcBuilder::new("ns", name)
            .type_("NodePort")
            .cluster_ip(ip)
            .node_port("http", 80, "TCP", np),
        secs,
    )
    .build()
}

fn np_of(b: &StateBuilder, name: &str) -> Option<u16> {
    get(b, IpFamily::V4, "ns", name, "http", Protocol::Tcp).node_port
}

fn delete(b: &mut StateBuilder, name: &str) -> kproxy_model::ServiceUpdate {
    b.update_service(&key("ns", name), None, &[])
}

#[test]
fn older_service_keeps_the_node_port_newer_loses_only_it() {
    let mut b = StateBuilder::new(NODE);
    let old = node_port_svc("old", "10.0.0.1", 30080, 0);
    let new = node_port_svc("new", "10.0.0.2", 30080, 10);
    let up = update(&mut b, &old, &[]);
    assert!(up.new_rejections.is_empty());
    let up = update(&mut b, &new, &[]);
    assert_eq!(np_of(&b, "old"), Some(30080));
    // The newer one keeps its ClusterIP port, without the NodePort.
    assert_eq!(np_of(&b, "new"), None);
    let sp = get(&b, IpFamily::V4, "ns", "new", "http", Protocol::Tcp);
    assert_eq!(sp.cluster_ip, ip("10.0.0.2"));
    // Reported once, naming both services and the port.
    assert_eq!(up.new_rejections.len(), 1, "{:?}", up.new_rejections);
    let r = &up.new_rejections[0];
    assert_eq!((r.namespace.as_str(), r.name.as_str()), ("ns", "new"));
    assert!(r.reason.contains("nodePort 30080/TCP"), "{r}");
    assert!(r.reason.contains("ns/old"), "{r}");
    assert!(r.reason.contains("created earlier"), "{r}");
    assert_eq!(b.state().rejections, vec![r.clone()]);
    // A resync of either does not repeat it and changes nothing.
    let again = update(&mut b, &new, &[]);
    assert!(again.new_rejections.is_empty());
    assert!(again.changed_ports.is_empty());
    let again = update(&mut b, &old, &[]);
    assert!(again.new_rejections.is_empty());
    assert!(again.changed_ports.is_empty());

    // The older one goes away: the newer one gets the NodePort in the same
    // update, and the update says its port changed (partial syncs).
    let up = delete(&mut b, "old");
    assert_eq!(np_of(&b, "new"), Some(30080));
    assert!(up
        .changed_ports
        .contains(&(IpFamily::V4, spn("ns", "new", "http", Protocol::Tcp))));
    assert!(b.state().rejections.is_empty());
}

#[test]
fn the_order_of_arrival_does_not_matter() {
    let old = node_port_svc("zzz-old", "10.0.0.1", 30080, 0);
    let new = node_port_svc("aaa-new", "10.0.0.2", 30080, 10);
    let mut b = StateBuilder::new(NODE);
    // The newer one first: it has the NodePort until the older one arrives.
    update(&mut b, &new, &[]);
    assert_eq!(np_of(&b, "aaa-new"), Some(30080));
    let up = update(&mut b, &old, &[]);
    assert_eq!(np_of(&b, "zzz-old"), Some(30080));
    assert_eq!(np_of(&b, "aaa-new"), None);
    // The older one's update reports the newer one's change and rejection.
    assert!(up
        .changed_ports
        .contains(&(IpFamily::V4, spn("ns", "aaa-new", "http", Protocol::Tcp))));
    assert_eq!(up.new_rejections.len(), 1);
    assert_eq!(up.new_rejections[0].name, "aaa-new");

    let mut fresh = StateBuilder::new(NODE);
    update(&mut fresh, &old, &[]);
    update(&mut fresh, &new, &[]);
    assert_eq!(b.state().ipv4, fresh.state().ipv4);
    assert_eq!(b.state().rejections, fresh.state().rejections);
}

#[test]
fn same_age_is_decided_by_namespace_and_name() {
    let mut b = StateBuilder::new(NODE);
    update(&mut b, &node_port_svc("b", "10.0.0.2", 30080, 5), &[]);
    let up = update(&mut b, &node_port_svc("a", "10.0.0.1", 30080, 5), &[]);
    assert_eq!(np_of(&b, "a"), Some(30080));
    assert_eq!(np_of(&b, "b"), None);
    assert!(up.new_rejections[0].reason.contains("same time"));
    // Without any timestamp the same rule applies.
    let mut b = StateBuilder::new(NODE);
    let plain = |n: &str, ip: &str| {
        SvcBuilder::new("ns", n)
            .type_("NodePort")
            .cluster_ip(ip)
            .node_port("http", 80, "TCP", 30080)
            .build()
    };
    update(&mut b, &plain("b", "10.0.0.2"), &[]);
    update(&mut b, &plain("a", "10.0.0.1"), &[]);
    assert_eq!(np_of(&b, "a"), Some(30080));
    assert_eq!(np_of(&b, "b"), None);
}

#[test]
fn other_protocols_and_ports_do_not_conflict() {
    let mut b = StateBuilder::new(NODE);
    let tcp = node_port_svc("tcp", "10.0.0.1", 30080, 0);
    let udp = created(
        SvcBuilder::new("ns", "udp")
            .type_("NodePort")
            .cluster_ip("10.0.0.2")
            .node_port("http", 80, "UDP", 30080),
        5,
    )
    .build();
    // Same ClusterIP, other port.
    let other_port = created(
        SvcBuilder::new("ns", "other")
            .cluster_ip("10.0.0.9")
            .port("http", 81, "TCP"),
        5,
    )
    .build();
    let same_ip = created(
        SvcBuilder::new("ns", "same-ip")
            .cluster_ip("10.0.0.9")
            .port("http", 82, "TCP"),
        6,
    )
    .build();
    for s in [&tcp, &udp, &other_port, &same_ip] {
        let up = update(&mut b, s, &[]);
        assert!(up.new_rejections.is_empty(), "{:?}", up.new_rejections);
    }
    assert_eq!(np_of(&b, "tcp"), Some(30080));
    assert_eq!(
        get(&b, IpFamily::V4, "ns", "udp", "http", Protocol::Udp).node_port,
        Some(30080)
    );
    assert_eq!(b.state().ipv4.len(), 4);
}

#[test]
fn a_contested_external_ip_is_lost_alone() {
    let mut b = StateBuilder::new(NODE);
    let old = created(
        SvcBuilder::new("ns", "old")
            .cluster_ip("10.0.0.1")
            .port("http", 80, "TCP")
            .external_ips(&["192.0.2.10"]),
        0,
    )
    .build();
    let new = created(
        SvcBuilder::new("ns", "new")
            .cluster_ip("10.0.0.2")
            .port("http", 80, "TCP")
            .external_ips(&["192.0.2.10", "192.0.2.11"]),
        1,
    )
    .build();
    update(&mut b, &old, &[]);
    let up = update(&mut b, &new, &[]);
    let sp = get(&b, IpFamily::V4, "ns", "new", "http", Protocol::Tcp);
    assert_eq!(sp.external_ips, vec![ip("192.0.2.11")]);
    let r = &up.new_rejections[0];
    assert!(r.reason.contains("192.0.2.10:80/TCP"), "{r}");
    assert!(r.reason.contains("externalIPs"), "{r}");
    assert!(r.reason.contains("ns/old"), "{r}");
    // The older one drops the address: the newer one gets it back.
    let old2 = created(
        SvcBuilder::new("ns", "old")
            .cluster_ip("10.0.0.1")
            .port("http", 80, "TCP"),
        0,
    )
    .build();
    let up = update(&mut b, &old2, &[]);
    let sp = get(&b, IpFamily::V4, "ns", "new", "http", Protocol::Tcp);
    assert_eq!(sp.external_ips, vec![ip("192.0.2.10"), ip("192.0.2.11")]);
    assert!(up
        .changed_ports
        .contains(&(IpFamily::V4, spn("ns", "new", "http", Protocol::Tcp))));
    assert!(b.state().rejections.is_empty());
}

#[test]
fn a_contested_load_balancer_ip_is_lost_alone_even_against_an_external_ip() {
    let mut b = StateBuilder::new(NODE);
    let old = created(
        SvcBuilder::new("ns", "old")
            .cluster_ip("10.0.0.1")
            .port("http", 443, "TCP")
            .external_ips(&["198.51.100.7"]),
        0,
    )
    .build();
    let new = created(
        SvcBuilder::new("ns", "new")
            .type_("LoadBalancer")
            .cluster_ip("10.0.0.2")
            .node_port("http", 443, "TCP", 30443)
            .lb_ingress("198.51.100.7", None)
            .lb_ingress("198.51.100.8", None),
        1,
    )
    .build();
    update(&mut b, &old, &[]);
    let up = update(&mut b, &new, &[]);
    let sp = get(&b, IpFamily::V4, "ns", "new", "http", Protocol::Tcp);
    assert_eq!(sp.load_balancer_ips, vec![ip("198.51.100.8")]);
    assert_eq!(sp.node_port, Some(30443));
    assert!(up.new_rejections[0].reason.contains("loadBalancer"));
    delete(&mut b, "old");
    let sp = get(&b, IpFamily::V4, "ns", "new", "http", Protocol::Tcp);
    assert_eq!(sp.load_balancer_ips.len(), 2);
}

#[test]
fn a_duplicate_cluster_ip_port_leaves_out_the_newer_port_only() {
    let mut b = StateBuilder::new(NODE);
    let old = created(
        SvcBuilder::new("ns", "old")
            .cluster_ip("10.0.0.1")
            .port("http", 80, "TCP"),
        0,
    )
    .build();
    // A stale cache: the same ClusterIP, one port shared, one not.
    let new = created(
        SvcBuilder::new("ns", "new")
            .cluster_ip("10.0.0.1")
            .port("http", 80, "TCP")
            .port("dns", 53, "UDP"),
        1,
    )
    .build();
    update(&mut b, &old, &[]);
    let up = update(&mut b, &new, &[]);
    assert!(!b
        .state()
        .ipv4
        .contains_key(&spn("ns", "new", "http", Protocol::Tcp)));
    assert!(b
        .state()
        .ipv4
        .contains_key(&spn("ns", "new", "dns", Protocol::Udp)));
    assert_eq!(
        get(&b, IpFamily::V4, "ns", "old", "http", Protocol::Tcp).cluster_ip,
        ip("10.0.0.1")
    );
    assert!(up.new_rejections[0].reason.contains("clusterIP"));
    let up = delete(&mut b, "old");
    assert!(up
        .changed_ports
        .contains(&(IpFamily::V4, spn("ns", "new", "http", Protocol::Tcp))));
    get(&b, IpFamily::V4, "ns", "new", "http", Protocol::Tcp);
}

#[test]
fn dual_stack_node_port_is_one_claim() {
    let mut b = StateBuilder::new(NODE);
    let ds = created(
        SvcBuilder::new("ns", "ds")
            .type_("NodePort")
            .cluster_ips(&["10.0.0.1", "fd00::1"])
            .node_port("http", 80, "TCP", 30080),
        0,
    )
    .build();
    let up = update(&mut b, &ds, &[]);
    assert!(up.new_rejections.is_empty());
    for fam in IpFamily::ALL {
        assert_eq!(
            get(&b, fam, "ns", "ds", "http", Protocol::Tcp).node_port,
            Some(30080)
        );
    }
    // A newer v6-only service on the same NodePort loses it.
    let v6 = created(
        SvcBuilder::new("ns", "v6")
            .type_("NodePort")
            .cluster_ip("fd00::2")
            .node_port("http", 80, "TCP", 30080),
        1,
    )
    .build();
    update(&mut b, &v6, &[]);
    assert_eq!(
        get(&b, IpFamily::V6, "ns", "v6", "http", Protocol::Tcp).node_port,
        None
    );
}

#[test]
fn a_service_becoming_older_takes_over() {
    // creationTimestamp never changes in a real cluster, but a recreated
    // service (delete + create) is newer: the other one then wins.
    let mut b = StateBuilder::new(NODE);
    update(&mut b, &node_port_svc("a", "10.0.0.1", 30080, 0), &[]);
    update(&mut b, &node_port_svc("b", "10.0.0.2", 30080, 5), &[]);
    assert_eq!(np_of(&b, "a"), Some(30080));
    let up = update(&mut b, &node_port_svc("a", "10.0.0.1", 30080, 10), &[]);
    assert_eq!(np_of(&b, "a"), None);
    assert_eq!(np_of(&b, "b"), Some(30080));
    let changed: BTreeSet<_> = up.changed_ports.iter().map(|(_, n)| n.clone()).collect();
    assert!(changed.contains(&spn("ns", "a", "http", Protocol::Tcp)));
    assert!(changed.contains(&spn("ns", "b", "http", Protocol::Tcp)));
    assert_eq!(b.state().rejections.len(), 1);
    assert_eq!(b.state().rejections[0].name, "a");
}

// ---------------------------------------------------------------------------
// Properties: no two ports in the state share a NodePort or an address, the
// result does not depend on the order of updates, `changed_ports` is exact.
// ---------------------------------------------------------------------------

const NAMES: &[&str] = &["s0", "s1", "s2", "s3", "s4"];

#[derive(Clone, Debug)]
struct Spec {
    name: &'static str,
    age: Option<i64>,
    ty: &'static str,
    cluster_ip: u8,
    ports: Vec<(i32, &'static str, i32)>,
    external_ips: Vec<u8>,
    lb_ips: Vec<u8>,
}

fn spec(name: &'static str) -> impl Strategy<Value = Spec> {
    (
        proptest::option::weighted(0.9, 0..4i64),
        proptest::sample::select(&["ClusterIP", "NodePort", "LoadBalancer"][..]),
        1..4u8,
        proptest::collection::vec(
            (
                80..83i32,
                proptest::sample::select(&["TCP", "TCP", "UDP"][..]),
                30000..30003i32,
            ),
            1..3,
        ),
        proptest::collection::vec(1..4u8, 0..3),
        proptest::collection::vec(1..4u8, 0..2),
    )
        .prop_map(
            move |(age, ty, cluster_ip, ports, external_ips, lb_ips)| Spec {
                name,
                age,
                ty,
                cluster_ip,
                ports,
                external_ips,
                lb_ips,
            },
        )
}

fn build(s: &Spec) -> Service {
    let mut b = SvcBuilder::new("ns", s.name)
        .type_(s.ty)
        .cluster_ip(&format!("10.0.0.{}", s.cluster_ip));
    let mut seen = BTreeSet::new();
    for (i, (port, proto, np)) in s.ports.iter().enumerate() {
        if !seen.insert((*port, *proto)) {
            continue; // a Service's own ports are distinct (validated)
        }
        b = b.node_port(&format!("p{i}"), *port, proto, *np);
    }
    let eips: Vec<String> = s
        .external_ips
        .iter()
        .map(|i| format!("192.0.2.{i}"))
        .collect();
    let eips: Vec<&str> = eips.iter().map(String::as_str).collect();
    b = b.external_ips(&eips);
    for i in &s.lb_ips {
        // LB IPs overlap the external IPs on purpose.
        b = b.lb_ingress(&format!("192.0.2.{i}"), None);
    }
    if let Some(age) = s.age {
        b = created(b, age);
    }
    b.build()
}

/// No NodePort/protocol and no IP:port/protocol is programmed twice.
fn assert_no_conflicts(state: &ProxyState) -> Result<(), TestCaseError> {
    let mut node_ports = BTreeSet::new();
    let mut addrs: BTreeSet<(IpAddr, u16, Protocol)> = BTreeSet::new();
    for fam in IpFamily::ALL {
        for sp in state.family(fam).values() {
            let proto = sp.name.protocol;
            if let Some(np) = sp.node_port {
                // Both families of one port share it.
                let owner = (np, proto);
                let first = node_ports.iter().find(|(o, _)| *o == owner);
                if let Some((_, name)) = first {
                    prop_assert_eq!(name, &sp.name, "nodePort {:?} twice", owner);
                } else {
                    node_ports.insert((owner, sp.name.clone()));
                }
            }
            let mut mine = BTreeSet::new();
            mine.insert(sp.cluster_ip);
            mine.extend(sp.external_ips.iter().copied());
            mine.extend(sp.load_balancer_ips.iter().copied());
            for ip in mine {
                prop_assert!(
                    addrs.insert((ip, sp.port, proto)),
                    "{}:{}/{} twice",
                    ip,
                    sp.port,
                    proto
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn conflicts_resolve_by_age_whatever_the_history(
        steps in proptest::collection::vec(
            (0..NAMES.len(), proptest::option::weighted(0.8, spec("x"))),
            1..25,
        ),
        order_seed in any::<u64>(),
    ) {
        let mut b = StateBuilder::new(NODE);
        let mut current: Vec<Option<Service>> = vec![None; NAMES.len()];
        for (i, s) in &steps {
            let svc = s.clone().map(|mut s| { s.name = NAMES[*i]; build(&s) });
            let k = ServiceKey::new("ns", NAMES[*i]);
            let before = b.state().clone();
            let up = b.update_service(&k, svc.as_ref(), &[]);
            current[*i] = svc;
            // changed_ports is exactly what differs, other services included.
            for fam in IpFamily::ALL {
                let (old, new) = (before.family(fam), b.state().family(fam));
                let names: BTreeSet<_> = old.keys().chain(new.keys()).collect();
                for name in names {
                    let differs = old.get(name) != new.get(name);
                    prop_assert_eq!(
                        differs,
                        up.changed_ports.contains(&(fam, name.clone())),
                        "{} {}", fam, name
                    );
                }
            }
            for r in &up.new_rejections {
                prop_assert!(b.state().rejections.contains(r));
                prop_assert!(!before.rejections.contains(r));
            }
            assert_no_conflicts(b.state())?;
        }
        // The same objects fed in another order give the same state.
        let mut order: Vec<usize> = (0..NAMES.len()).collect();
        let mut seed = order_seed;
        for i in (1..order.len()).rev() {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            order.swap(i, (seed >> 33) as usize % (i + 1));
        }
        let mut fresh = StateBuilder::new(NODE);
        for i in order {
            if let Some(svc) = &current[i] {
                fresh.update_service(&ServiceKey::new("ns", NAMES[i]), Some(svc), &[]);
            }
        }
        prop_assert_eq!(&b.state().ipv4, &fresh.state().ipv4);
        prop_assert_eq!(&b.state().rejections, &fresh.state().rejections);
        // Deleting everything leaves nothing behind.
        for (i, name) in NAMES.iter().enumerate() {
            if current[i].is_some() {
                b.update_service(&ServiceKey::new("ns", *name), None, &[]);
            }
        }
        prop_assert_eq!(b.state().service_port_count(), 0);
        prop_assert!(b.state().rejections.is_empty());
        prop_assert!(b.service_keys().is_empty());
    }
}
