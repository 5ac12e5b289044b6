//! Hostile and malformed objects end to end: Services, EndpointSlices and
//! the Node whose names, port names, targetPorts, addresses, annotations,
//! labels, hints and zone labels carry quotes, newlines, spaces, `-j ACCEPT`,
//! `--comment "x" -j DROP`, `\n-A KUBE-SERVICES -j DROP`, 10k-character
//! strings, unicode and U+FFFD go through the fake API server to the real
//! kproxy in a node namespace. None of them changes any rule but its own,
//! each rejected one is logged by name and counted in
//! `kproxy_rejected_objects_total{kind}`, and the other services keep
//! serving real traffic.

mod common;
#[path = "fixtures/reliability/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::{Node, Service, ServicePort as ApiServicePort};
use k8s_openapi::api::discovery::v1::{EndpointHints, EndpointPort, EndpointSlice, ForZone};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kproxy_model::compat::ListField;
use kproxy_model::fixtures::{node, Ep, SliceBuilder, SvcBuilder};
use kproxy_model::{ObjectKind, ServiceKey, StateBuilder};
use kproxy_testkit::netns::{tcp_echo_server, tcp_request, NODE_IP_V4};
use support::{figure, owned_rules, RuleSet};

const INJECT: &str = "\n-A KUBE-SERVICES -j DROP";
const COMMENT: &str = "--comment \"x\" -j DROP";

fn long(n: usize) -> String {
    "a".repeat(n)
}

/// A ClusterIP service on `ip:80` → 8080, its single port named `port`.
fn svc(name: &str, ip: &str, port: &str) -> SvcBuilder {
    SvcBuilder::new("default", name)
        .cluster_ip(ip)
        .port_full(ApiServicePort {
            name: (!port.is_empty()).then(|| port.to_string()),
            port: 80,
            protocol: Some("TCP".into()),
            target_port: Some(IntOrString::Int(8080)),
            ..Default::default()
        })
}

/// The hostile Services (each with its own ClusterIP).
fn hostile_services() -> Vec<Service> {
    let mut out = Vec::new();
    let names = [
        "evil\"quote".to_string(),
        format!("x{INJECT}"),
        "with space".to_string(),
        "-j ACCEPT".to_string(),
        long(10_000),
        "ünïcødé-🚀".to_string(),
        // What a Go API server makes of a lone surrogate (\ud800).
        "bad\u{fffd}".to_string(),
    ];
    for (i, name) in names.iter().enumerate() {
        out.push(svc(name, &format!("10.96.0.{}", 100 + i), "http").build());
    }
    out.push(svc("hostile-portname", "10.96.0.120", "http\" -j ACCEPT").build());
    out.push(
        svc("hostile-target", "10.96.0.121", "http")
            .with(|s| {
                if let Some(p) = s
                    .spec
                    .as_mut()
                    .and_then(|sp| sp.ports.as_mut())
                    .and_then(|p| p.first_mut())
                {
                    p.target_port = Some(IntOrString::String(COMMENT.into()));
                }
            })
            .build(),
    );
    out.push(svc("hostile-cip", "10.96.0.122 -j ACCEPT", "http").build());
    out.push(
        svc("hostile-eip", "10.96.0.123", "http")
            .external_ips(&[&format!("192.0.2.1{INJECT}")])
            .build(),
    );
    out.push(
        svc("hostile-range", "10.96.0.124", "http")
            .type_("LoadBalancer")
            .source_ranges(&["10.0.0.0/8 -j ACCEPT"])
            .build(),
    );
    // Valid: hostile strings only where the API allows anything.
    let ok = svc("hostile-ok", "10.96.0.125", "http")
        .annotation("evil", COMMENT)
        .annotation("inject", INJECT)
        .annotation("long", &long(10_000))
        .annotation("unicode", "ünïcødé 🚀 \u{fffd}")
        .label("app", "a b\"c\n-j ACCEPT");
    out.push(ok.build());
    out
}

/// Hostile slices: two for the good service `good`, one for `hostile-ok`.
fn hostile_slices(pod0: &str, pod1: &str) -> Vec<EndpointSlice> {
    let bad_name = SliceBuilder::new("default", "good-\"evil", "good", "IPv4")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new(pod1).node(NODE))
        .build();
    let bad_port = SliceBuilder::new("default", "good-hostile", "good", "IPv4")
        .port_full(EndpointPort {
            name: Some(format!("http{INJECT}")),
            port: Some(8080),
            protocol: Some("TCP".into()),
            app_protocol: None,
        })
        .endpoint(Ep::new(&format!("{pod1} -j ACCEPT")).node(NODE))
        .build();
    let mut hints = SliceBuilder::new("default", "hostile-ok-1", "hostile-ok", "IPv4")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new(pod0).node(NODE))
        .build();
    for ep in hints.endpoints.items_mut() {
        ep.hostname = Some(format!("h\"{INJECT}"));
        ep.zone = Some(COMMENT.into());
        ep.hints = Some(EndpointHints {
            for_zones: Some(vec![ForZone {
                name: format!("z1{INJECT}"),
            }]),
            ..Default::default()
        });
    }
    vec![bad_name, bad_port, hints]
}

fn hostile_node() -> Node {
    node(NODE, Some(&format!("z1\" {COMMENT}{INJECT}")))
}

/// Owned rules without everything that mentions `default/hostile-ok` and
/// without its chains.
fn without_service(save: &str, rules: &RuleSet, ns_name: &str) -> RuleSet {
    let chains = service_chains(save, ns_name);
    rules
        .iter()
        .filter(|(chain, _)| !chains.iter().any(|c| chain.ends_with(&format!("/{c}"))))
        .map(|(chain, rules)| {
            let kept = rules
                .iter()
                .filter(|r| !r.contains(ns_name) && !chains.iter().any(|c| r.contains(c.as_str())))
                .cloned()
                .collect();
            (chain.clone(), kept)
        })
        .collect()
}

#[test]
fn reliability_hostile_objects_change_only_their_own_rules() {
    const TEST: &str = "reliability_hostile_objects_change_only_their_own_rules";
    let Some(c) = Cluster::new(TEST, 2, 0) else {
        return;
    };
    let (pod0, pod1) = (c.topo.pod(0).ip(), c.topo.pod(1).ip());
    let _s0 = tcp_echo_server(&c.topo.pod(0).ns, sock(pod0, 8080)).expect("server 0");
    let _s1 = tcp_echo_server(&c.topo.pod(1).ns, sock(pod1, 8080)).expect("server 1");

    // The good services: a ClusterIP one and a NodePort one.
    c.apply_service(&cluster_ip_service("good", "10.96.0.10", 80).build());
    c.apply_slice(&slice_for("good", "IPv4", &[(pod0, NODE)]));
    c.apply_service(
        &SvcBuilder::new("default", "good-np")
            .type_("NodePort")
            .cluster_ip("10.96.0.11")
            .port_full(svc_port("http", 80, "TCP", 8080, Some(30080)))
            .build(),
    );
    c.apply_slice(&slice_for("good-np", "IPv4", &[(pod1, NODE)]));
    c.api.apply(&node(NODE, Some("z1"))).expect("node");
    let k = c.start_kproxy(&[]);
    let client = &c.topo.client;
    let serves = || {
        tcp_request(client, sock([10, 96, 0, 10], 80)).ok() == Some(c.pod_name(0))
            && tcp_request(client, sock(NODE_IP_V4, 30080)).ok() == Some(c.pod_name(1))
    };
    eventually("the good services serve", serves);
    let before_v4 = owned_rules(&support::save(c.node(), "iptables-save"));
    let before_v6 = owned_rules(&support::save(c.node(), "ip6tables-save"));

    // What the model makes of them, to know what must be rejected.
    let services = hostile_services();
    let slices = hostile_slices(&pod0.to_string(), &pod1.to_string());
    let mut model = StateBuilder::new(NODE);
    model.set_node(Some(&hostile_node()));
    let mut by_service: BTreeMap<String, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in &slices {
        let owner = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
            .cloned()
            .unwrap_or_default();
        by_service.entry(owner).or_default().push(s);
    }
    let good = cluster_ip_service("good", "10.96.0.10", 80).build();
    let good_slice = slice_for("good", "IPv4", &[(pod0, NODE)]);
    let mut good_slices = vec![&good_slice];
    good_slices.extend(by_service.get("good").into_iter().flatten().copied());
    model.update_service(
        &ServiceKey::new("default", "good"),
        Some(&good),
        &good_slices,
    );
    for s in &services {
        let name = s.metadata.name.clone().unwrap_or_default();
        let sl: Vec<&EndpointSlice> = by_service.get(&name).cloned().unwrap_or_default();
        model.update_service(&ServiceKey::new("default", &name), Some(s), &sl);
    }
    let rejected = model.state().rejections.clone();
    let count = |kind: ObjectKind| rejected.iter().filter(|r| r.kind == kind).count();
    // Every hostile Service but hostile-ok is refused, and both hostile
    // slices of "good"; hostile-ok and its slice (hostile hints) are valid.
    assert_eq!(
        count(ObjectKind::Service),
        services.len() - 1,
        "{rejected:#?}"
    );
    assert_eq!(count(ObjectKind::EndpointSlice), 2, "{rejected:#?}");
    assert!(!rejected.iter().any(|r| r.name == "hostile-ok"));

    let base_svc = k
        .metric("kproxy_rejected_objects_total{kind=\"Service\"}")
        .expect("metrics")
        .unwrap_or(0.0);
    let base_slice = k
        .metric("kproxy_rejected_objects_total{kind=\"EndpointSlice\"}")
        .expect("metrics")
        .unwrap_or(0.0);
    c.api.apply(&hostile_node()).expect("hostile node");
    for s in &services {
        c.apply_service(s);
    }
    for s in &slices {
        c.apply_slice(s);
    }
    let want_svc = base_svc + count(ObjectKind::Service) as f64;
    let want_slice = base_slice + count(ObjectKind::EndpointSlice) as f64;
    eventually("every rejection counted", || {
        k.metric("kproxy_rejected_objects_total{kind=\"Service\"}")
            .ok()
            .flatten()
            == Some(want_svc)
            && k.metric("kproxy_rejected_objects_total{kind=\"EndpointSlice\"}")
                .ok()
                .flatten()
                == Some(want_slice)
    });
    eventually("hostile-ok programmed", || {
        c.iptables_save("nat").contains("default/hostile-ok:http")
    });
    // One more round trip: nothing else is pending.
    std::thread::sleep(Duration::from_millis(500));

    // Each rejected object has a warning naming it.
    let log = k.log();
    for r in &rejected {
        let object = format!("{}/{}", r.namespace, r.name);
        assert!(
            log.lines().any(|l| l.contains("WARN")
                && l.contains("object rejected")
                && l.contains(&object)),
            "no warning for {object}:\n{log}"
        );
    }
    // No raw newline from an object reached the log: every log line is
    // one record.
    for l in log.lines().filter(|l| l.contains("object rejected")) {
        assert!(l.contains("WARN"), "a log record was split: {l:?}");
    }

    // Rules: the only difference is hostile-ok's own; no hostile string
    // appears anywhere.
    let save_v4 = support::save(c.node(), "iptables-save");
    let after_v4 = owned_rules(&save_v4);
    let after_v6 = owned_rules(&support::save(c.node(), "ip6tables-save"));
    let own = service_chains(&save_v4, "default/hostile-ok");
    assert!(!own.is_empty(), "hostile-ok has no chains:\n{save_v4}");
    assert_eq!(
        without_service(&save_v4, &after_v4, "default/hostile-ok"),
        before_v4,
        "rules other than hostile-ok's changed:\n{}",
        support::diff(&after_v4, &before_v4)
    );
    assert_eq!(after_v6, before_v6, "IPv6 rules changed");
    for needle in [
        "evil",
        "ACCEPT\"",
        "-j DROP\"",
        "ünï",
        "hostile-portname",
        "hostile-target",
        "hostile-cip",
        "hostile-eip",
        "hostile-range",
        "good-\"",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ] {
        assert!(!save_v4.contains(needle), "{needle:?} reached the rules");
    }

    // Real traffic: the good services and hostile-ok all serve.
    for _ in 0..5 {
        assert_eq!(
            tcp_request(client, sock([10, 96, 0, 10], 80)).expect("good"),
            c.pod_name(0)
        );
        assert_eq!(
            tcp_request(client, sock(NODE_IP_V4, 30080)).expect("good-np"),
            c.pod_name(1)
        );
        assert_eq!(
            tcp_request(client, sock([10, 96, 0, 125], 80)).expect("hostile-ok"),
            c.pod_name(0)
        );
    }
    let summary: Vec<String> = rejected
        .iter()
        .map(|r| format!("{} {}/{}", r.kind, r.namespace, r.name))
        .collect();
    figure(
        TEST,
        &format!(
            "{} hostile Services, {} hostile slices, a hostile Node zone: {} Services and {} slices rejected (logged, counted), hostile-ok (hostile annotations/labels/hints) accepted with only its own rules; rejected: {}",
            services.len(),
            slices.len(),
            count(ObjectKind::Service),
            count(ObjectKind::EndpointSlice),
            summary.join(", ")
        ),
    );
}

/// JSON can carry lone surrogates (`"\ud800"`), which are not Unicode:
/// serde refuses the document. A Go API server never sends one (its JSON
/// decoder turns them into U+FFFD, its encoder writes invalid UTF-8 as
/// `\ufffd`); U+FFFD in a name is then an ordinary invalid name, rejected
/// per object (above).
#[test]
fn reliability_hostile_lone_surrogates_are_refused_by_serde() {
    let doc = |name: &str| {
        format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"default"}},"spec":{{"clusterIP":"10.96.0.1","ports":[{{"port":80}}]}}}}"#
        )
    };
    assert!(serde_json::from_str::<Service>(&doc(r"bad\ud800")).is_err());
    assert!(serde_json::from_str::<Service>(&doc(r"bad\udc00x")).is_err());
    let pair = serde_json::from_str::<Service>(&doc(r"ok\ud83d\ude80")).expect("a valid pair");
    assert_eq!(pair.metadata.name.as_deref(), Some("ok🚀"));
    let fffd = serde_json::from_str::<Service>(&doc(r"bad\ufffd")).expect("U+FFFD");
    let mut b = StateBuilder::new(NODE);
    let name = fffd.metadata.name.clone().unwrap_or_default();
    let up = b.update_service(&ServiceKey::new("default", &name), Some(&fffd), &[]);
    assert_eq!(up.new_rejections.len(), 1);
    assert_eq!(b.state().service_port_count(), 0);
}
