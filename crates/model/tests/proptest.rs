//! Arbitrary (mostly plausible, partly garbage) Services and slices: the
//! builder never panics and the state always obeys the selection rules.

mod common;

use common::*;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_model::fixtures::*;
use kproxy_model::{validate, IpFamily, ProxyState, ServiceKey, StateBuilder};
use proptest::prelude::*;

fn pick<T: Clone + std::fmt::Debug + 'static>(items: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(items)
}

const IPS4: &[&str] = &[
    "10.0.0.1",
    "10.0.0.2",
    "10.1.0.1",
    "10.1.0.2",
    "10.1.0.3",
    "192.0.2.1",
];
const IPS6: &[&str] = &["fd00::1", "fd00::2", "fd01::1", "2001:db8::1"];
const GARBAGE: &[&str] = &[
    "",
    "None",
    "10.0.0.300",
    "x\n-j ACCEPT",
    "::ffff:10.0.0.1",
    "010.0.0.1",
    "1.2.3",
];
type Strs = &'static [&'static str];
const NAMES: &[&str] = &["", "a", "b", "Bad", "a\"b", "x\n-j ACCEPT"];
const SLICE_PROTOS: &[Option<&str>] = &[
    None,
    None,
    Some("TCP"),
    Some("TCP"),
    Some("TCP"),
    Some("UDP"),
    Some("tcp"),
];
const SLICE_PORT_NAMES: &[&str] = &["", "", "", "a", "a", "b", "Bad"];
const CLUSTER_IPS: &[Strs] = &[
    &["10.0.0.1"],
    &["10.0.0.2"],
    &["fd00::1"],
    &["10.0.0.1", "fd00::1"],
    &["fd00::2", "10.0.0.2"],
];
const PROTOS: &[Option<&str>] = &[
    None,
    None,
    None,
    Some("TCP"),
    Some("TCP"),
    Some("TCP"),
    Some("UDP"),
    Some("SCTP"),
    Some("tcp"),
];
const NODES: &[Option<&str>] = &[None, Some(NODE), Some("node-b")];
const ZONES: &[&str] = &["z1", "z2"];
const RANGES: &[Strs] = &[&[], &[], &["10.0.0.0/8"], &["fd00::/8", "bogus"]];
const ZONE_HINTS: &[Option<Strs>] = &[None, Some(&["z1"]), Some(&["z2"]), Some(&["z1", "z2"])];
const NODE_HINTS: &[Option<Strs>] = &[None, Some(&[NODE]), Some(&["node-b"])];

fn any_ip() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => pick(IPS4).prop_map(String::from),
        4 => pick(IPS6).prop_map(String::from),
        1 => pick(GARBAGE).prop_map(String::from),
    ]
}

fn port_num() -> impl Strategy<Value = i32> {
    prop_oneof![20 => 1..4i32, 1 => Just(0), 1 => Just(-1), 1 => Just(70000)]
}

/// A Service: valid (distinct port names, one cluster IP per family) unless
/// `garbage`, which lets every field take hostile or broken values.
fn service(name: &'static str) -> impl Strategy<Value = Service> {
    (
        proptest::bool::weighted(0.25),
        pick(&[
            "ClusterIP",
            "ClusterIP",
            "ClusterIP",
            "NodePort",
            "LoadBalancer",
            "LoadBalancer",
            "ExternalName",
            "Weird",
        ]),
        pick(CLUSTER_IPS),
        proptest::collection::vec(any_ip(), 1..3),
        proptest::collection::vec((pick(NAMES), port_num(), pick(PROTOS), 0..3i32), 1..3),
        proptest::collection::vec(any_ip(), 0..2),
        proptest::collection::vec((any_ip(), pick(&[None, Some("VIP"), Some("Proxy")])), 0..2),
        (
            pick(&[None, Some("Local"), Some("Cluster")]),
            pick(&[None, Some("Local"), Some("Cluster")]),
            pick(&[None, None, Some(10), Some(0), Some(100000)]),
            pick(RANGES),
        ),
    )
        .prop_map(
            move |(garbage, t, good_cips, bad_cips, ports, eips, ings, (etp, itp, aff, ranges))| {
                let ok = |v: &str| !garbage || v.is_empty() || !GARBAGE.contains(&v);
                let mut t = t;
                if !garbage && t == "Weird" {
                    t = "ClusterIP";
                }
                let cips: Vec<&str> = if garbage {
                    bad_cips.iter().map(String::as_str).collect()
                } else {
                    good_cips.to_vec()
                };
                let mut b = SvcBuilder::new("ns", name).type_(t).cluster_ips(&cips);
                let single = ports.len() == 1;
                for (i, (pname, port, proto, np)) in ports.into_iter().enumerate() {
                    let (pname, port, proto) = if garbage {
                        (pname.to_string(), port, proto)
                    } else {
                        // Valid: distinct names (unnamed only when alone), distinct ports.
                        let n = if single {
                            String::new()
                        } else {
                            ["a", "b", "c"][i].to_string()
                        };
                        (
                            n,
                            80 + i as i32,
                            proto.filter(|p| *p != "tcp" && *p != "SCTP"),
                        )
                    };
                    b = b.port_full(k8s_openapi::api::core::v1::ServicePort {
                        name: Some(pname),
                        port,
                        protocol: proto.map(String::from),
                        node_port: (np > 0).then_some(30000 + np),
                        ..Default::default()
                    });
                }
                let eips: Vec<&str> = eips
                    .iter()
                    .map(String::as_str)
                    .filter(|v| ok(v) || garbage)
                    .collect();
                let eips: Vec<&str> = if garbage {
                    eips
                } else {
                    eips.into_iter().filter(|v| !GARBAGE.contains(v)).collect()
                };
                b = b.external_ips(&eips);
                for (ip, mode) in &ings {
                    if garbage || !GARBAGE.contains(&ip.as_str()) {
                        b = b.lb_ingress(ip, *mode);
                    }
                }
                if let Some(p) = etp {
                    b = b.external_traffic_policy(p);
                }
                if let Some(p) = itp {
                    b = b.internal_traffic_policy(p);
                }
                match aff {
                    Some(a) if garbage || (1..=86400).contains(&a) => b = b.affinity(Some(a)),
                    Some(_) => b = b.affinity(None),
                    None => {}
                }
                if garbage || !ranges.contains(&"bogus") {
                    b = b.source_ranges(ranges);
                }
                b.health_check_node_port(31000).build()
            },
        )
}

/// Endpoint addresses: almost always of the slice's family.
fn ep_ip(family: &'static str) -> impl Strategy<Value = String> {
    let pool = if family == "IPv6" { IPS6 } else { IPS4 };
    prop_oneof![
        30 => pick(pool).prop_map(String::from),
        1 => any_ip(),
    ]
}

fn endpoint(family: &'static str) -> impl Strategy<Value = Ep> {
    (
        ep_ip(family),
        any::<(Option<bool>, Option<bool>, Option<bool>)>(),
        pick(NODES),
        pick(ZONE_HINTS),
        pick(NODE_HINTS),
    )
        .prop_map(|(ip, (r, s, t), node, zh, nh)| {
            let mut ep = Ep::new(&ip);
            if let Some(r) = r {
                ep = ep.ready(r);
            }
            if let Some(s) = s {
                ep = ep.serving(s);
            }
            if let Some(t) = t {
                ep = ep.terminating(t);
            }
            if let Some(n) = node {
                ep = ep.node(n);
            }
            if let Some(z) = zh {
                ep = ep.zone_hints(z);
            }
            if let Some(n) = nh {
                ep = ep.node_hints(n);
            }
            ep
        })
}

fn slice(service: &'static str) -> impl Strategy<Value = EndpointSlice> {
    pick(&[
        "IPv4", "IPv4", "IPv4", "IPv4", "IPv4", "IPv6", "IPv6", "FQDN", "IPv7",
    ])
    .prop_flat_map(|fam| {
        (
            pick(&["s-a", "s-b", "s-c"]),
            Just(fam),
            proptest::bool::weighted(0.2),
            proptest::collection::vec(
                (
                    pick(SLICE_PORT_NAMES),
                    pick(&[8080, 8080, 8080, 8081, 0, -1]),
                    pick(SLICE_PROTOS),
                ),
                1..4,
            ),
            proptest::collection::vec(endpoint(fam), 1..6),
        )
    })
    .prop_map(move |(name, fam, garbage, ports, eps)| {
        let mut b = SliceBuilder::new("ns", &format!("{service}-{name}"), service, fam);
        for (pname, port, proto) in ports {
            let (pname, port, proto) = if garbage {
                (pname, port, proto)
            } else {
                let pname = if pname == "Bad" { "" } else { pname };
                (pname, port.max(0), proto.filter(|p| *p != "tcp"))
            };
            b = b.port_full(k8s_openapi::api::discovery::v1::EndpointPort {
                name: Some(pname.to_string()),
                port: Some(port),
                protocol: proto.map(String::from),
                app_protocol: None,
            });
        }
        for ep in eps {
            b = b.endpoint(ep);
        }
        b.build()
    })
}

/// One round: for each of two services, maybe a Service and some slices.
fn round() -> impl Strategy<Value = Vec<(ServiceKey, Option<Service>, Vec<EndpointSlice>)>> {
    let one = |name: &'static str| {
        (
            proptest::option::weighted(0.85, service(name)),
            proptest::collection::vec(slice(name), 1..4),
        )
            .prop_map(move |(svc, slices)| (key("ns", name), svc, slices))
    };
    (one("s1"), one("s2")).prop_map(|(a, b)| vec![a, b])
}

fn check_invariants(state: &ProxyState) -> Result<(), TestCaseError> {
    for fam in IpFamily::ALL {
        for (name, sp) in state.family(fam) {
            prop_assert_eq!(&sp.name, name);
            prop_assert_eq!(sp.family, fam);
            prop_assert_eq!(IpFamily::of(&sp.cluster_ip), fam);
            prop_assert!(validate::is_dns1123_label(&sp.name.service.namespace));
            prop_assert!(validate::is_dns1123_label(&sp.name.service.name));
            prop_assert!(sp.name.port.is_empty() || validate::is_dns1123_label(&sp.name.port));
            prop_assert!(sp.port != 0);
            for ip in sp.external_ips.iter().chain(&sp.load_balancer_ips) {
                prop_assert_eq!(IpFamily::of(ip), fam);
            }
            for net in &sp.load_balancer_source_ranges {
                prop_assert_eq!(IpFamily::of_net(net), fam);
            }
            let eps = &sp.endpoints;
            // Sorted, unique by ip:port, right family.
            for w in eps.all.windows(2) {
                prop_assert!((w[0].ip, w[0].port) < (w[1].ip, w[1].port));
            }
            for e in &eps.all {
                prop_assert_eq!(IpFamily::of(&e.ip), fam);
                prop_assert!(e.port != 0);
            }
            for e in eps.cluster.iter().chain(&eps.local) {
                prop_assert!(eps.all.contains(e));
            }
            // The fallback rule: a non-ready endpoint is only used when no
            // endpoint (local ones, for the local set) is ready.
            let any_ready = eps.all.iter().any(|e| e.ready);
            for e in &eps.cluster {
                prop_assert!(
                    e.ready || (!any_ready && e.serving && e.terminating),
                    "{:?}",
                    eps
                );
            }
            let any_local_ready = eps.all.iter().any(|e| e.ready && e.is_local);
            for e in &eps.local {
                prop_assert!(e.is_local, "non-local endpoint in local set: {:?}", eps);
                prop_assert!(e.ready || (!any_local_ready && e.serving && e.terminating));
            }
            if !sp.uses_cluster_endpoints() {
                prop_assert!(eps.cluster.is_empty());
            }
            if !sp.uses_local_endpoints() {
                prop_assert!(eps.local.is_empty());
            }
            if !eps.cluster.is_empty() || !eps.local.is_empty() {
                prop_assert!(eps.has_any);
            }
            if sp.uses_cluster_endpoints() && any_ready {
                prop_assert!(!eps.cluster.is_empty());
            }
        }
    }
    for w in state.rejections.windows(2) {
        prop_assert!(w[0] < w[1]);
    }
    for r in &state.rejections {
        prop_assert!(!r.to_string().contains('\n'));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn never_panics_and_state_obeys_selection_rules(
        rounds in proptest::collection::vec(round(), 1..5),
        zone in proptest::option::of(pick(ZONES)),
    ) {
        let mut b = StateBuilder::new(NODE);
        b.set_node(Some(&node(NODE, zone)));
        for round in &rounds {
            for (key, svc, slices) in round {
                let refs: Vec<&EndpointSlice> = slices.iter().collect();
                let before = b.state().clone();
                let up = b.update_service(key, svc.as_ref(), &refs);
                // changed_ports is exactly the set of ports that differ.
                for fam in IpFamily::ALL {
                    let (old, new) = (before.family(fam), b.state().family(fam));
                    for (name, sp) in new {
                        if old.get(name) != Some(sp) {
                            prop_assert!(up.changed_ports.contains(&(fam, name.clone())));
                        }
                    }
                    for name in old.keys() {
                        if !new.contains_key(name) {
                            prop_assert!(up.changed_ports.contains(&(fam, name.clone())));
                        }
                    }
                }
                for (fam, name) in &up.changed_ports {
                    prop_assert!(before.family(*fam).get(name) != b.state().family(*fam).get(name));
                }
                // New rejections are in the state and were not there before.
                for r in &up.new_rejections {
                    prop_assert!(b.state().rejections.contains(r));
                    prop_assert!(!before.rejections.contains(r));
                }
                check_invariants(b.state())?;
            }
        }
        // Zone change + reselect keeps the invariants.
        b.set_node(Some(&node(NODE, Some("z2"))));
        b.reselect_all();
        check_invariants(b.state())?;
        // Deleting everything leaves nothing behind.
        for k in b.service_keys() {
            b.update_service(&k, None, &[]);
        }
        prop_assert_eq!(b.state().service_port_count(), 0);
        prop_assert!(b.state().rejections.is_empty());
        prop_assert!(b.service_keys().is_empty());
    }

    /// A sequence ending with valid objects gives the same state as
    /// building from those objects alone: nothing stale survives.
    #[test]
    fn final_valid_objects_determine_the_state(
        rounds in proptest::collection::vec(round(), 1..4),
        last in round(),
    ) {
        let mut inc = StateBuilder::new(NODE);
        for round in rounds.iter().chain(std::iter::once(&last)) {
            for (key, svc, slices) in round {
                let refs: Vec<&EndpointSlice> = slices.iter().collect();
                inc.update_service(key, svc.as_ref(), &refs);
            }
        }
        let mut fresh = StateBuilder::new(NODE);
        for (key, svc, slices) in &last {
            let refs: Vec<&EndpointSlice> = slices.iter().collect();
            fresh.update_service(key, svc.as_ref(), &refs);
        }
        if inc.state().rejections.is_empty() {
            prop_assert_eq!(&inc.state().ipv4, &fresh.state().ipv4);
            prop_assert_eq!(&inc.state().ipv6, &fresh.state().ipv6);
        }
    }
}

/// The generators must often produce valid services with endpoints, or the
/// properties above would only ever test rejections.
#[test]
fn generators_reach_valid_services() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::default();
    let mut with_endpoints = 0;
    for _ in 0..200 {
        let tree = round().new_tree(&mut runner).expect("strategy");
        let mut b = StateBuilder::new(NODE);
        for (key, svc, slices) in tree.current() {
            let refs: Vec<&EndpointSlice> = slices.iter().collect();
            b.update_service(&key, svc.as_ref(), &refs);
        }
        if b.state()
            .ipv4
            .values()
            .chain(b.state().ipv6.values())
            .any(|sp| !sp.endpoints.cluster.is_empty())
        {
            with_endpoints += 1;
        }
    }
    assert!(
        with_endpoints >= 25,
        "only {with_endpoints}/200 rounds produced endpoints"
    );
}
