//! Partial plans: unit checks of what they touch, and a property test that a
//! sequence of partial plans leaves the kernel exactly as a full plan of the
//! final state would.

mod planner_support;

use std::collections::{BTreeMap, BTreeSet};

use kproxy_iptables::planner::{
    Applied, ExistingChains, LocalDetector, Plan, Planner, PlannerConfig, Table, KUBE_SERVICES,
};
use kproxy_model::{FamilyState, IpFamily, Protocol, ServicePort, ServicePortName, SyncKind};
use planner_support::*;
use proptest::prelude::*;

fn cfg(threshold: usize) -> PlannerConfig {
    let mut c = PlannerConfig::new(IpFamily::V4);
    c.local_detector = LocalDetector::Cidrs(vec![net("10.0.0.0/8")]);
    c.node_ip = Some(ip("192.168.0.2"));
    c.large_cluster_endpoint_threshold = threshold;
    c
}

const DISPATCH: [(&str, &str); 6] = [
    ("nat", "KUBE-SERVICES"),
    ("nat", "KUBE-NODEPORTS"),
    ("filter", "KUBE-SERVICES"),
    ("filter", "KUBE-EXTERNAL-SERVICES"),
    ("filter", "KUBE-NODEPORTS"),
    ("filter", "KUBE-PROXY-FIREWALL"),
];

/// The kernel with dispatch chains sorted (their order is free), after
/// checking that nat KUBE-SERVICES still ends with the NodePort jump.
fn canonical(k: &Kernel) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut t = k.tables.clone();
    if let Some(last) = k.chain("nat", KUBE_SERVICES).and_then(|r| r.last()) {
        assert!(
            last.contains("-j KUBE-NODEPORTS"),
            "NodePort jump not last: {last}"
        );
    }
    for (table, chain) in DISPATCH {
        if let Some(rules) = t.get_mut(table).and_then(|c| c.get_mut(chain)) {
            rules.sort();
        }
    }
    t
}

fn apply(k: &mut Kernel, slot: &mut Option<Applied>, plan: Plan) {
    k.apply(&plan.text)
        .unwrap_or_else(|e| panic!("plan rejected: {e}\n{}", plan.text));
    plan.update.apply_to(slot);
}

fn web(endpoints: Vec<kproxy_model::Endpoint>) -> ServicePort {
    let mut sp = svc("ns", "web", "http", Protocol::Tcp, "172.30.0.1", 80);
    sp.node_port = Some(30001);
    with_endpoints(sp, endpoints)
}

fn other() -> ServicePort {
    with_endpoints(
        svc("ns", "other", "p", Protocol::Udp, "172.30.0.2", 53),
        vec![ep("10.1.0.9", 53, false)],
    )
}

#[test]
fn endpoint_change_touches_only_the_service_chain() {
    let planner = Planner::new(cfg(1000)).expect("config");
    let s1 = state(vec![
        web(vec![ep("10.1.0.1", 80, false), ep("10.1.0.2", 80, false)]),
        other(),
    ]);
    let s2 = state(vec![
        web(vec![ep("10.1.0.1", 80, false), ep("10.1.0.3", 80, false)]),
        other(),
    ]);
    let mut k = Kernel::default();
    let mut slot = None;
    apply(
        &mut k,
        &mut slot,
        planner.plan_full(&s1, &ExistingChains::default()),
    );
    let prev = slot.clone().expect("applied");
    let changed: BTreeSet<ServicePortName> = [spn("ns", "web", "http", Protocol::Tcp)].into();
    let plan = planner.plan_partial(&prev, &s2, &changed);
    assert_eq!(plan.kind, SyncKind::Partial);
    assert!(!plan.text.contains("*filter"), "{}", plan.text);
    assert!(!plan.text.contains("KUBE-SERVICES"), "{}", plan.text);
    assert!(
        !plan.text.contains("KUBE-EXT-"),
        "EXT chain unchanged: {}",
        plan.text
    );
    assert_eq!(plan.text.matches(":KUBE-SVC-").count(), 1);
    assert_eq!(plan.counts.chains_written, 1);
    assert_eq!(plan.counts.rules_written, 3);
    assert_eq!(plan.counts.nat_rules, prev.nat_rules());
    apply(&mut k, &mut slot, plan);
    let fresh =
        check_structure(&planner.plan_full(&s2, &ExistingChains::default()).text).expect("valid");
    assert_eq!(canonical(&k), canonical(&fresh));
}

#[test]
fn zero_to_some_endpoints_touches_filter() {
    let planner = Planner::new(cfg(1000)).expect("config");
    let s1 = state(vec![web(vec![]), other()]);
    let s2 = state(vec![web(vec![ep("10.1.0.1", 80, false)]), other()]);
    let mut k = Kernel::default();
    let mut slot = None;
    apply(
        &mut k,
        &mut slot,
        planner.plan_full(&s1, &ExistingChains::default()),
    );
    let changed: BTreeSet<ServicePortName> = [spn("ns", "web", "http", Protocol::Tcp)].into();
    let plan = planner.plan_partial(slot.as_ref().expect("applied"), &s2, &changed);
    assert!(
        plan.text.contains("*filter\n-D KUBE-SERVICES "),
        "{}",
        plan.text
    );
    assert!(
        plan.text.contains("-D KUBE-EXTERNAL-SERVICES "),
        "{}",
        plan.text
    );
    assert!(plan.text.contains("-I KUBE-SERVICES 1 "), "{}", plan.text);
    assert!(plan.text.contains("-A KUBE-NODEPORTS "), "{}", plan.text);
    apply(&mut k, &mut slot, plan);
    assert!(k
        .chain("filter", "KUBE-SERVICES")
        .is_some_and(|r| r.is_empty()));
    // And back: the chains go, the REJECTs return.
    let plan = planner.plan_partial(slot.as_ref().expect("applied"), &s1, &changed);
    assert!(plan.text.contains("-X KUBE-SVC-"), "{}", plan.text);
    apply(&mut k, &mut slot, plan);
    let fresh =
        check_structure(&planner.plan_full(&s1, &ExistingChains::default()).text).expect("valid");
    assert_eq!(canonical(&k), canonical(&fresh));
}

#[test]
fn nothing_changed_means_empty_text() {
    let planner = Planner::new(cfg(1000)).expect("config");
    let s1 = state(vec![web(vec![ep("10.1.0.1", 80, false)]), other()]);
    let applied = match planner.plan_full(&s1, &ExistingChains::default()).update {
        kproxy_iptables::planner::AppliedUpdate::Replace(a) => *a,
        _ => panic!("full plan replaces"),
    };
    let changed: BTreeSet<ServicePortName> = s1.keys().cloned().collect();
    let plan = planner.plan_partial(&applied, &s1, &changed);
    assert_eq!(plan.kind, SyncKind::Partial);
    assert!(plan.text.is_empty(), "{}", plan.text);
}

#[test]
fn config_change_means_full() {
    let planner = Planner::new(cfg(1000)).expect("config");
    let s1 = state(vec![web(vec![ep("10.1.0.1", 80, false)])]);
    let mut slot = None;
    planner
        .plan_full(&s1, &ExistingChains::default())
        .update
        .apply_to(&mut slot);
    let mut c2 = cfg(1000);
    c2.masquerade_all = true;
    let p2 = Planner::new(c2).expect("config");
    let plan = p2.plan_partial(slot.as_ref().expect("applied"), &s1, &BTreeSet::new());
    assert_eq!(plan.kind, SyncKind::Full);
}

/// The Applied record keeps only digests of a chain's rules: a change of
/// one rule's text that keeps the chain's name and rule count (an endpoint's
/// IP or port, in large-cluster mode where rules carry no comment naming the
/// endpoint) must still be found and the chain rewritten.
#[test]
fn a_changed_rule_in_a_kept_chain_is_rewritten_after_compaction() {
    let planner = Planner::new(cfg(1)).expect("config");
    let eps = |second: kproxy_model::Endpoint| vec![ep("10.1.0.1", 80, false), second];
    let s1 = state(vec![web(eps(ep("10.1.0.2", 80, false))), other()]);
    let name = spn("ns", "web", "http", Protocol::Tcp);
    let changed: BTreeSet<ServicePortName> = [name.clone()].into();
    for (what, second, new_target) in [
        ("endpoint IP", ep("10.1.0.3", 80, false), "10.1.0.3:80"),
        ("endpoint port", ep("10.1.0.2", 81, false), "10.1.0.2:81"),
    ] {
        let mut k = Kernel::default();
        let mut slot = None;
        apply(
            &mut k,
            &mut slot,
            planner.plan_full(&s1, &ExistingChains::default()),
        );
        let s2 = state(vec![web(eps(second)), other()]);
        let prev = slot.clone().expect("applied");
        let before = prev.port(&name).expect("web applied").chains().to_vec();
        let plan = planner.plan_partial(&prev, &s2, &changed);
        assert_eq!(plan.counts.chains_written, 1, "{what}: {}", plan.text);
        assert!(
            plan.text
                .contains(&format!("-j DNAT --to-destination {new_target}\n")),
            "{what}: {}",
            plan.text
        );
        assert_eq!(plan.counts.nat_rules, prev.nat_rules(), "{what}");
        apply(&mut k, &mut slot, plan);
        let after = slot.as_ref().and_then(|a| a.port(&name)).expect("web");
        assert_eq!(
            before
                .iter()
                .map(|c| (c.name(), c.rules()))
                .collect::<Vec<_>>(),
            after
                .chains()
                .iter()
                .map(|c| (c.name(), c.rules()))
                .collect::<Vec<_>>(),
            "{what}: same chains, same rule counts"
        );
        assert_ne!(before, after.chains(), "{what}: the digest changed");
        let full = planner.plan_full(&s2, &ExistingChains::default());
        let fresh = check_structure(&full.text).expect("valid");
        assert_eq!(canonical(&k), canonical(&fresh), "{what}");
        let mut fresh_slot = None;
        full.update.apply_to(&mut fresh_slot);
        assert_eq!(slot, fresh_slot, "{what}");
        // And nothing more to do.
        let again = planner.plan_partial(slot.as_ref().expect("applied"), &s2, &changed);
        assert!(again.text.is_empty(), "{what}: {}", again.text);
    }
}

/// A full plan's rules by chain, read back from its text, are the chains it
/// writes: the stale chains it deletes are not among them, every rule is.
#[test]
fn full_plan_rules_by_chain() {
    let planner = Planner::new(cfg(1000)).expect("config");
    let s1 = state(vec![
        web(vec![ep("10.1.0.1", 80, false), ep("10.1.0.2", 80, true)]),
        other(),
    ]);
    let mut existing = ExistingChains::default();
    existing
        .0
        .insert((Table::Nat, "KUBE-SVC-STALESTALESTALEX".to_string()));
    let plan = planner.plan_full(&s1, &existing);
    assert!(plan.text.contains("-X KUBE-SVC-STALESTALESTALEX\n"));
    let by_chain = plan.rules_by_chain();
    assert!(!by_chain.contains_key(&(Table::Nat, "KUBE-SVC-STALESTALESTALEX")));
    let kernel = check_structure(&plan.text).expect("valid");
    let mut listed = 0;
    for ((table, chain), rules) in &by_chain {
        assert_eq!(
            kernel.chain(table.as_str(), chain).map(|r| r.as_slice()),
            Some(
                rules
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .as_slice()
            ),
            "{table:?} {chain}"
        );
        listed += rules.len();
    }
    assert_eq!(listed, plan.counts.nat_rules + plan.counts.filter_rules);
    let declared: BTreeSet<(Table, String)> =
        by_chain.keys().map(|(t, c)| (*t, c.to_string())).collect();
    drop(by_chain);
    let mut slot = None;
    plan.update.apply_to(&mut slot);
    let applied = slot.expect("applied");
    assert_eq!(declared, applied.existing_chains().0);
}

// ---- property test ----

#[derive(Clone, Debug)]
struct PortSpec {
    proto: u8,
    node_port: bool,
    external_ip: bool,
    lb: bool,
    ranges: bool,
    etp_local: bool,
    itp_local: bool,
    affinity: bool,
    hc: bool,
    eps: Vec<(u8, bool, bool)>, // (host byte, local, ready)
}

fn port_spec() -> impl Strategy<Value = PortSpec> {
    (
        (
            0u8..3,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        prop::collection::vec((1u8..6, any::<bool>(), prop::bool::weighted(0.8)), 0..4),
    )
        .prop_map(
            |(
                (proto, node_port, external_ip, lb, ranges),
                (etp_local, itp_local, affinity, hc),
                eps,
            )| PortSpec {
                proto,
                node_port,
                external_ip,
                lb,
                ranges,
                etp_local,
                itp_local,
                affinity,
                hc,
                eps,
            },
        )
}

const NAMES: usize = 5;

fn build(i: usize, spec: &PortSpec) -> ServicePort {
    let proto = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][spec.proto as usize];
    let mut sp = svc(
        "ns",
        &format!("s{i}"),
        "p",
        proto,
        &format!("172.30.0.{}", i + 1),
        80,
    );
    if spec.node_port {
        sp.node_port = Some(30000 + i as u16);
    }
    if spec.external_ip {
        sp.external_ips = vec![ip(&format!("192.168.99.{}", i + 1))];
    }
    if spec.lb {
        sp.load_balancer_ips = vec![ip(&format!("203.0.113.{}", i + 1))];
        if spec.ranges {
            sp.load_balancer_source_ranges = vec![net("198.51.100.0/24")];
        }
    }
    sp.external_policy_local = spec.etp_local;
    sp.internal_policy_local = spec.itp_local;
    if spec.affinity {
        sp.session_affinity_seconds = Some(300);
    }
    if spec.hc && spec.etp_local {
        sp.health_check_node_port = Some(31000 + i as u16);
    }
    let mut eps: Vec<_> = spec
        .eps
        .iter()
        .map(|(h, local, ready)| {
            let mut e = ep(&format!("10.1.{i}.{h}"), 8080, *local);
            e.ready = *ready;
            e
        })
        .collect();
    eps.sort();
    eps.dedup_by_key(|e| e.ip);
    with_endpoints(sp, eps)
}

fn build_state(specs: &[Option<PortSpec>]) -> FamilyState {
    state(
        specs
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| build(i, s)))
            .collect(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn partial_plans_converge_to_full(
        states in prop::collection::vec(prop::collection::vec(prop::option::weighted(0.8, port_spec()), NAMES), 2..7),
        extra_changed in prop::collection::vec(any::<bool>(), NAMES),
        threshold in prop::sample::select(vec![3usize, 8, 1000]),
    ) {
        let planner = Planner::new(cfg(threshold)).expect("config");
        let mut k = Kernel::default();
        let mut slot: Option<Applied> = None;
        let first = build_state(&states[0]);
        apply(&mut k, &mut slot, planner.plan_full(&first, &ExistingChains::default()));
        let mut prev_state = first;
        for specs in &states[1..] {
            let next = build_state(specs);
            // Every port that differs, plus some that do not (harmless).
            let mut changed = BTreeSet::new();
            let names: BTreeSet<&ServicePortName> = prev_state.keys().chain(next.keys()).collect();
            for (i, name) in names.into_iter().enumerate() {
                if prev_state.get(name) != next.get(name) || extra_changed.get(i).copied().unwrap_or(false) {
                    changed.insert(name.clone());
                }
            }
            let prev = slot.clone().expect("applied");
            let plan = planner.plan_partial(&prev, &next, &changed);
            apply(&mut k, &mut slot, plan);
            prev_state = next;
        }
        let final_full = planner.plan_full(&prev_state, &ExistingChains::default());
        let fresh = check_structure(&final_full.text).map_err(TestCaseError::fail)?;
        prop_assert_eq!(canonical(&k), canonical(&fresh));
        let applied = slot.clone().expect("applied");
        let mut fresh_slot = None;
        let full_counts = final_full.counts;
        final_full.update.apply_to(&mut fresh_slot);
        let fresh_applied = fresh_slot.expect("applied");
        // Equal records: the same chains with the same rules (digests), the
        // same dispatch rules per port, the same totals.
        prop_assert_eq!(&applied, &fresh_applied);
        prop_assert_eq!(applied.nat_rules(), full_counts.nat_rules);
        prop_assert_eq!(applied.filter_rules(), full_counts.filter_rules);
        // A full resync over the partially-built kernel lands in the same place
        // (and deletes nothing it should keep).
        let resync = planner.plan_full(&prev_state, &applied.existing_chains());
        let streamed = planner.plan_full_streamed(&prev_state, &applied.existing_chains());
        let mut written = Vec::new();
        streamed.write_to(&mut written).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(String::from_utf8_lossy(&written), resync.text.as_str());
        k.apply(&resync.text).map_err(TestCaseError::fail)?;
        prop_assert_eq!(canonical(&k), canonical(&fresh));
    }
}
