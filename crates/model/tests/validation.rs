//! Invalid objects: rejected whole with a reason naming field and value,
//! others unaffected, previous valid version kept, reported once, cleared
//! by a valid version or deletion.

mod common;

use common::*;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_model::fixtures::*;
use kproxy_model::{IpFamily, ObjectKind, Protocol, StateBuilder};

fn good() -> Service {
    SvcBuilder::new("ns", "s")
        .cluster_ip("10.0.0.1")
        .port("http", 80, "TCP")
        .build()
}

/// Each case: a mutation of the good Service and a fragment the reason must contain.
fn bad_services() -> Vec<(&'static str, Service)> {
    let b = || {
        SvcBuilder::new("ns", "s")
            .cluster_ip("10.0.0.1")
            .port("http", 80, "TCP")
    };
    vec![
        (
            r#"spec.clusterIPs[0] "10.0.0.300" is not an IP address"#,
            SvcBuilder::new("ns", "s")
                .cluster_ip("10.0.0.300")
                .port("http", 80, "TCP")
                .build(),
        ),
        (
            r#"spec.clusterIPs[1] "10.0.0.2" is a second IPv4 address"#,
            SvcBuilder::new("ns", "s")
                .cluster_ips(&["10.0.0.1", "10.0.0.2"])
                .port("http", 80, "TCP")
                .build(),
        ),
        (
            r#"spec.externalIPs[0] "1.2.3""#,
            b().external_ips(&["1.2.3"]).build(),
        ),
        (
            r#"status.loadBalancer.ingress[0].ip "x\n-j ACCEPT""#,
            b().lb_ingress("x\n-j ACCEPT", None).build(),
        ),
        (
            "spec.ports[1].port 70000",
            b().port("big", 70000, "TCP").build(),
        ),
        ("spec.ports[1].port 0", b().port("zero", 0, "TCP").build()),
        (
            r#"spec.ports[1].protocol "ICMP""#,
            b().port("p", 81, "ICMP").build(),
        ),
        (
            r#"spec.ports[1].port "80/TCP" is used by another port"#,
            b().port("other", 80, "TCP").build(),
        ),
        (
            r#"spec.ports[1].name "http" is used by another port"#,
            b().port("http", 81, "UDP").build(),
        ),
        (
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds 0",
            b().affinity(Some(0)).build(),
        ),
        (
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds 86401",
            b().affinity(Some(86401)).build(),
        ),
        (
            r#"spec.loadBalancerSourceRanges[0] "10.0.0.0/33" is not a CIDR"#,
            b().source_ranges(&["10.0.0.0/33"]).build(),
        ),
        (
            r#"metadata.annotations[service.beta.kubernetes.io/load-balancer-source-ranges] "bogus""#,
            b().annotation(
                "service.beta.kubernetes.io/load-balancer-source-ranges",
                "bogus",
            )
            .build(),
        ),
        (
            r#"spec.ports[1].name "Bad Name""#,
            b().port("Bad Name", 81, "TCP").build(),
        ),
        (
            r#"spec.ports[1].name "a\"-j ACCEPT""#,
            b().port("a\"-j ACCEPT", 81, "TCP").build(),
        ),
        (
            r#"spec.ports[0].nodePort 70000"#,
            SvcBuilder::new("ns", "s")
                .type_("NodePort")
                .cluster_ip("10.0.0.1")
                .node_port("http", 80, "TCP", 70000)
                .build(),
        ),
        (r#"spec.type "Weird""#, b().type_("Weird").build()),
    ]
}

#[test]
fn each_bad_service_is_rejected_and_the_previous_version_kept() {
    for (want, bad) in bad_services() {
        let mut b = StateBuilder::new(NODE);
        update(
            &mut b,
            &good(),
            &[simple_slice("ns", "s", "s-1", 8080, &["10.1.0.1"])],
        );
        update(&mut b, &simple_service("ns", "other", "10.0.0.9", 80), &[]);
        let before = b.state().ipv4.clone();

        let up = update(
            &mut b,
            &bad,
            &[simple_slice("ns", "s", "s-1", 8080, &["10.1.0.1"])],
        );
        assert_eq!(up.new_rejections.len(), 1, "{want}");
        let r = &up.new_rejections[0];
        assert_eq!(
            (r.kind, r.namespace.as_str(), r.name.as_str()),
            (ObjectKind::Service, "ns", "s")
        );
        assert!(
            r.reason.contains(want),
            "reason {:?} lacks {want:?}",
            r.reason
        );
        assert!(
            !r.reason.contains('\n'),
            "reason must be one line: {:?}",
            r.reason
        );
        assert!(up.changed_ports.is_empty(), "{want}: previous version kept");
        assert_eq!(b.state().ipv4, before, "{want}");
        assert_eq!(b.state().rejections, vec![r.clone()]);

        // Reported once.
        let up = update(
            &mut b,
            &bad,
            &[simple_slice("ns", "s", "s-1", 8080, &["10.1.0.1"])],
        );
        assert!(up.new_rejections.is_empty(), "{want}");
        assert_eq!(b.state().rejections.len(), 1);

        // Valid again: rejection cleared.
        let up = update(
            &mut b,
            &good(),
            &[simple_slice("ns", "s", "s-1", 8080, &["10.1.0.1"])],
        );
        assert!(up.new_rejections.is_empty());
        assert!(b.state().rejections.is_empty(), "{want}");
    }
}

#[test]
fn bad_service_without_previous_version_yields_nothing() {
    for (want, bad) in bad_services() {
        let mut b = StateBuilder::new(NODE);
        let up = update(&mut b, &bad, &[]);
        assert_eq!(up.new_rejections.len(), 1, "{want}");
        assert!(up.changed_ports.is_empty());
        assert_eq!(b.state().service_port_count(), 0);
        // Deletion clears the rejection.
        let up = b.update_service(&key("ns", "s"), None, &[]);
        assert!(up.changed_ports.is_empty());
        assert!(b.state().rejections.is_empty());
        assert!(b.service_keys().is_empty());
    }
}

#[test]
fn deleting_a_rejected_service_deletes_its_kept_version() {
    let mut b = StateBuilder::new(NODE);
    update(&mut b, &good(), &[]);
    update(&mut b, &bad_services()[0].1, &[]);
    assert_eq!(b.state().service_port_count(), 1);
    let up = b.update_service(&key("ns", "s"), None, &[]);
    assert_eq!(up.changed_ports.len(), 1);
    assert_eq!(b.state().service_port_count(), 0);
    assert!(b.state().rejections.is_empty());
    // Re-adding the same bad version reports it again.
    let up = update(&mut b, &bad_services()[0].1, &[]);
    assert_eq!(up.new_rejections.len(), 1);
}

#[test]
fn a_different_reason_is_reported_again() {
    let mut b = StateBuilder::new(NODE);
    let bad = bad_services();
    assert_eq!(update(&mut b, &bad[0].1, &[]).new_rejections.len(), 1);
    let up = update(&mut b, &bad[2].1, &[]);
    assert_eq!(up.new_rejections.len(), 1);
    assert_eq!(b.state().rejections.len(), 1, "old reason replaced");
    assert!(b.state().rejections[0].reason.contains("externalIPs"));
}

#[test]
fn hostile_names_are_rejected() {
    for (ns, name) in [
        ("ns", "a b"),
        ("ns", "UPPER"),
        ("n\"s", "s"),
        ("ns", "x\n-A KUBE-SERVICES -j ACCEPT"),
        ("ns", &*"a".repeat(64)),
        ("", "s"),
    ] {
        let mut b = StateBuilder::new(NODE);
        let svc = simple_service(ns, name, "10.0.0.1", 80);
        let up = b.update_service(&key(ns, name), Some(&svc), &[]);
        assert_eq!(up.new_rejections.len(), 1, "{ns:?}/{name:?}");
        let r = &up.new_rejections[0];
        assert!(!r.name.contains('\n') && !r.namespace.contains('\n'));
        assert!(!r.to_string().contains('\n'));
        assert_eq!(b.state().service_port_count(), 0);
    }
}

#[test]
fn long_service_port_names_up_to_63_are_accepted() {
    // The API server validates Service port names as DNS-1123 labels.
    let mut b = StateBuilder::new(NODE);
    let name = "a-very-long-port-name-that-is-still-valid";
    let svc = SvcBuilder::new("ns", "s")
        .cluster_ip("10.0.0.1")
        .port(name, 80, "TCP")
        .build();
    let up = update(&mut b, &svc, &[]);
    assert!(up.new_rejections.is_empty(), "{:?}", up.new_rejections);
    assert_eq!(b.state().service_port_count(), 1);
}

#[test]
fn rejections_do_not_affect_other_services() {
    let mut b = StateBuilder::new(NODE);
    for i in 0..5 {
        update(
            &mut b,
            &simple_service("ns", &format!("s{i}"), &format!("10.0.0.{i}"), 80),
            &[],
        );
    }
    for (_, bad) in bad_services() {
        let svc = SvcBuilder::new("ns", "zz").with(|s| {
            *s = bad;
            s.metadata.name = Some("zz".into());
        });
        b.update_service(&key("ns", "zz"), Some(&svc.build()), &[]);
    }
    assert_eq!(b.state().service_port_count(), 5);
}

fn bad_slices() -> Vec<(&'static str, EndpointSlice)> {
    let s = || SliceBuilder::new("ns", "s-1", "s", "IPv4").port("http", 8080, "TCP");
    vec![
        (
            r#"endpoints[0].addresses[0] "10.1.0.300" is not an IP address"#,
            s().ready_ips(&["10.1.0.300"]).build(),
        ),
        (
            r#"endpoints[1].addresses[0] "fd00::1" is not an IPv4 address"#,
            s().ready_ips(&["10.1.0.1", "fd00::1"]).build(),
        ),
        (
            r#"endpoints[0].addresses[1] "nope""#,
            s().endpoint(Ep::new("10.1.0.1").addresses(&["10.1.0.1", "nope"]))
                .build(),
        ),
        (
            "ports[1].port 70000",
            s().port("x", 70000, "TCP").ready_ips(&["10.1.0.1"]).build(),
        ),
        (
            "ports[1].port -1",
            s().port("x", -1, "TCP").ready_ips(&["10.1.0.1"]).build(),
        ),
        (
            r#"ports[1].protocol "tcp""#,
            s().port("x", 81, "tcp").ready_ips(&["10.1.0.1"]).build(),
        ),
        (
            r#"ports[1].name "x y""#,
            s().port("x y", 81, "TCP").ready_ips(&["10.1.0.1"]).build(),
        ),
        (
            r#"addressType "IPv5""#,
            s().ready_ips(&["10.1.0.1"])
                .with(|s| s.address_type = "IPv5".into())
                .build(),
        ),
        (
            r#"metadata.namespace "other""#,
            s().ready_ips(&["10.1.0.1"])
                .with(|s| s.metadata.namespace = Some("other".into()))
                .build(),
        ),
    ]
}

#[test]
fn each_bad_slice_is_rejected_and_its_previous_version_kept() {
    for (want, bad) in bad_slices() {
        let mut b = StateBuilder::new(NODE);
        let good_slice = SliceBuilder::new("ns", "s-1", "s", "IPv4")
            .port("http", 8080, "TCP")
            .ready_ips(&["10.1.0.1"])
            .build();
        let other_slice = SliceBuilder::new("ns", "s-2", "s", "IPv4")
            .port("http", 8080, "TCP")
            .ready_ips(&["10.1.0.2"])
            .build();
        update(&mut b, &good(), &[good_slice.clone(), other_slice.clone()]);
        let before = get(&b, IpFamily::V4, "ns", "s", "http", Protocol::Tcp);

        // The bad slice replaces s-1; s-2 changes at the same time and is used.
        let other_slice2 = SliceBuilder::new("ns", "s-2", "s", "IPv4")
            .port("http", 8080, "TCP")
            .ready_ips(&["10.1.0.3"])
            .build();
        let up = update(&mut b, &good(), &[bad.clone(), other_slice2.clone()]);
        assert_eq!(up.new_rejections.len(), 1, "{want}");
        let r = &up.new_rejections[0];
        assert_eq!(r.kind, ObjectKind::EndpointSlice);
        assert_eq!(r.name, "s-1");
        assert!(
            r.reason.contains(want),
            "reason {:?} lacks {want:?}",
            r.reason
        );
        let after = get(&b, IpFamily::V4, "ns", "s", "http", Protocol::Tcp);
        assert_ne!(before, after);
        assert_eq!(
            addrs(&after.endpoints.all),
            vec!["10.1.0.1:8080", "10.1.0.3:8080"],
            "{want}"
        );

        // Reported once.
        assert!(
            update(&mut b, &good(), &[bad.clone(), other_slice2.clone()])
                .new_rejections
                .is_empty()
        );
        assert_eq!(b.state().rejections.len(), 1);

        // Deleting the slice deletes its kept version and the rejection.
        let up = update(&mut b, &good(), std::slice::from_ref(&other_slice2));
        assert_eq!(up.changed_ports.len(), 1);
        assert!(b.state().rejections.is_empty(), "{want}");
        assert_eq!(
            addrs(
                &get(&b, IpFamily::V4, "ns", "s", "http", Protocol::Tcp)
                    .endpoints
                    .all
            ),
            vec!["10.1.0.3:8080"]
        );

        // A bad slice never seen valid contributes nothing.
        let up = update(&mut b, &good(), &[bad.clone(), other_slice2.clone()]);
        assert_eq!(up.new_rejections.len(), 1);
        assert!(up.changed_ports.is_empty());
        // A valid version clears the rejection.
        update(&mut b, &good(), &[good_slice, other_slice2]);
        assert!(b.state().rejections.is_empty());
    }
}

#[test]
fn rejections_are_sorted() {
    let mut b = StateBuilder::new(NODE);
    for name in ["c", "a", "b"] {
        let svc = SvcBuilder::new("ns", name)
            .cluster_ip("bad")
            .port("", 80, "TCP")
            .build();
        b.update_service(&key("ns", name), Some(&svc), &[]);
    }
    let names: Vec<_> = b
        .state()
        .rejections
        .iter()
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(names, vec!["a", "b", "c"]);
}
