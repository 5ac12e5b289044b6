//! Golden tests of full plans. Regenerate with `UPDATE_GOLDEN=1 cargo test`.
//! Every golden text must also pass the structural checker.

mod planner_support;

use std::path::PathBuf;

use kproxy_iptables::planner::{
    ExistingChains, LocalDetector, NodePortAddresses, Planner, PlannerConfig, Table,
};
use kproxy_model::{FamilyState, IpFamily, Protocol};
use planner_support::*;

fn v4() -> PlannerConfig {
    let mut c = PlannerConfig::new(IpFamily::V4);
    c.local_detector = LocalDetector::Cidrs(vec![net("10.0.0.0/8")]);
    c.node_ip = Some(ip("192.168.0.2"));
    c
}

fn full(cfg: PlannerConfig, st: &FamilyState) -> String {
    full_with(cfg, st, &ExistingChains::default())
}

fn full_with(cfg: PlannerConfig, st: &FamilyState, existing: &ExistingChains) -> String {
    let planner = Planner::new(cfg).expect("valid config");
    let plan = planner.plan_full(st, existing);
    // The streamed plan writes the same text and records the same.
    let streamed = planner.plan_full_streamed(st, existing);
    assert_eq!(streamed.text(), plan.text);
    assert_eq!(streamed.text_len(), plan.text.len());
    assert_eq!(streamed.counts, plan.counts);
    let (mut a, mut b) = (None, None);
    plan.update.apply_to(&mut a);
    streamed.update.apply_to(&mut b);
    assert_eq!(a, b);
    plan.text
}

fn golden(name: &str, text: &str) {
    if let Err(e) = check_structure(text) {
        panic!("{name}: structural check failed: {e}\n{text}");
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, text).expect("write golden");
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    if want != text {
        let diff: Vec<String> = want
            .lines()
            .zip(text.lines())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .take(5)
            .map(|(i, (a, b))| format!("line {}:\n  want {a}\n  got  {b}", i + 1))
            .collect();
        panic!(
            "{name} differs from {} ({} vs {} lines):\n{}\n--- got ---\n{text}",
            path.display(),
            want.lines().count(),
            text.lines().count(),
            diff.join("\n")
        );
    }
}

fn three_endpoint_svc() -> FamilyState {
    state(vec![with_endpoints(
        svc("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80),
        vec![
            ep("10.180.0.1", 8080, false),
            ep("10.180.1.1", 8080, false),
            ep("10.180.2.1", 8080, false),
        ],
    )])
}

#[test]
fn clusterip_three_endpoints() {
    let text = full(v4(), &three_endpoint_svc());
    // Remote endpoints: direct DNAT from the service chain, no SEP chains.
    assert!(!text.contains(":KUBE-SEP-"));
    assert!(text.contains(
        "--probability 0.3333333333 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:8080"
    ));
    assert!(text.contains(
        "--probability 0.5000000000 -m tcp -p tcp -j DNAT --to-destination 10.180.1.1:8080"
    ));
    golden("clusterip_three_endpoints", &text);
}

#[test]
fn nodeport_cluster_policy() {
    let mut sp = svc("ns2", "svc2", "http", Protocol::Tcp, "172.30.0.42", 80);
    sp.node_port = Some(30080);
    let st = state(vec![with_endpoints(
        sp,
        vec![ep("10.180.0.2", 80, false), ep("10.180.0.3", 80, true)],
    )]);
    let text = full(v4(), &st);
    assert!(text.contains("-A KUBE-NODEPORTS -m comment --comment ns2/svc2:http -m tcp -p tcp --dport 30080 -j KUBE-EXT-"));
    golden("nodeport_cluster_policy", &text);
}

#[test]
fn loadbalancer_local_policy_with_source_ranges() {
    let mut sp = svc("ns3", "lb", "https", Protocol::Tcp, "172.30.0.43", 443);
    sp.node_port = Some(30443);
    sp.load_balancer_ips = vec![ip("203.0.113.10")];
    sp.load_balancer_source_ranges = vec![net("198.51.100.0/24"), net("192.168.0.0/16")];
    sp.external_policy_local = true;
    sp.health_check_node_port = Some(32000);
    let st = state(vec![with_endpoints(
        sp,
        vec![ep("10.180.0.4", 8443, true), ep("10.180.3.4", 8443, false)],
    )]);
    let text = full(v4(), &st);
    assert!(text.contains("-A KUBE-PROXY-FIREWALL"));
    assert!(
        text.contains("-j ACCEPT"),
        "health check node port accepted"
    );
    // The node IP is inside a source range: the VIP-as-source rule is there.
    assert!(text.contains("-s 203.0.113.10 -j KUBE-EXT-"));
    golden("loadbalancer_local_policy_with_source_ranges", &text);
}

#[test]
fn no_endpoints_reject() {
    let mut sp = svc("ns4", "empty", "p80", Protocol::Tcp, "172.30.0.44", 80);
    sp.node_port = Some(30044);
    sp.external_ips = vec![ip("192.168.99.44")];
    sp.load_balancer_ips = vec![ip("203.0.113.44")];
    let st = state(vec![sp]);
    let text = full(v4(), &st);
    assert_eq!(text.matches("-j REJECT").count(), 4);
    assert!(!text.contains(":KUBE-SVC-"));
    golden("no_endpoints_reject", &text);
}

#[test]
fn internal_local_without_local_endpoint_drops() {
    let mut sp = svc("ns5", "itp", "p80", Protocol::Tcp, "172.30.0.45", 80);
    sp.internal_policy_local = true;
    let st = state(vec![with_endpoints(sp, vec![ep("10.180.5.1", 80, false)])]);
    let planner = Planner::new(v4()).expect("config");
    let plan = planner.plan_full(&st, &ExistingChains::default());
    assert!(plan
        .text
        .contains("has no local endpoints\" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j DROP"));
    assert_eq!(plan.counts.no_local_internal, 1);
    assert_eq!(plan.counts.no_local_external, 0);
    golden("internal_local_without_local_endpoint_drops", &plan.text);
}

#[test]
fn session_affinity() {
    let mut sp = svc("ns6", "sticky", "p80", Protocol::Tcp, "172.30.0.46", 80);
    sp.session_affinity_seconds = Some(10800);
    let st = state(vec![with_endpoints(
        sp,
        vec![ep("10.180.0.6", 80, true), ep("10.180.6.6", 80, false)],
    )]);
    let text = full(v4(), &st);
    assert!(text.contains("--rcheck --seconds 10800 --reap -j KUBE-SEP-"));
    assert!(text.contains(
        "--update --seconds 10800 --reap -m tcp -p tcp -j DNAT --to-destination 10.180.6.6:80"
    ));
    assert!(text.contains("--set -m tcp -p tcp -j DNAT --to-destination 10.180.0.6:80"));
    golden("session_affinity", &text);
}

#[test]
fn hairpin_local_endpoint() {
    let mut cfg = v4();
    cfg.node_pod_cidrs = vec![net("10.180.7.0/24")];
    let st = state(vec![with_endpoints(
        svc("ns7", "hairpin", "p80", Protocol::Tcp, "172.30.0.47", 80),
        vec![
            ep("10.180.0.7", 80, true),
            // Not marked local, but inside the node's pod CIDR.
            ep("10.180.7.7", 80, false),
            ep("10.180.9.7", 80, false),
        ],
    )]);
    let text = full(cfg, &st);
    assert_eq!(
        text.matches("-j KUBE-MARK-MASQ\n").count(),
        3,
        "two hairpin rules and the cluster-IP masquerade rule"
    );
    assert!(text.contains("-s 10.180.0.7 -j KUBE-MARK-MASQ"));
    assert!(text.contains("-s 10.180.7.7 -j KUBE-MARK-MASQ"));
    assert!(!text.contains("-s 10.180.9.7"));
    golden("hairpin_local_endpoint", &text);
}

#[test]
fn masquerade_all() {
    let mut cfg = v4();
    cfg.masquerade_all = true;
    let text = full(cfg, &three_endpoint_svc());
    assert!(text.contains("--dport 80 -j KUBE-MARK-MASQ"));
    assert!(!text.contains("! -s 10.0.0.0/8"));
    golden("masquerade_all", &text);
}

fn local_policy_svc() -> FamilyState {
    let mut sp = svc("ns8", "detect", "p80", Protocol::Tcp, "172.30.0.48", 80);
    sp.external_ips = vec![ip("192.168.99.48")];
    sp.external_policy_local = true;
    state(vec![with_endpoints(
        sp,
        vec![ep("10.180.0.8", 80, true), ep("10.180.8.8", 80, false)],
    )])
}

#[test]
fn local_detect_modes() {
    for (name, det, local, not_local) in [
        (
            "local_detect_cidr",
            LocalDetector::Cidrs(vec![net("fd00::/64"), net("10.0.0.0/8")]),
            "-s 10.0.0.0/8",
            "! -s 10.0.0.0/8",
        ),
        (
            "local_detect_bridge",
            LocalDetector::Bridge("cbr0".into()),
            "-i cbr0",
            "! -i cbr0",
        ),
        (
            "local_detect_interface_prefix",
            LocalDetector::InterfacePrefix("veth".into()),
            "-i veth+",
            "! -i veth+",
        ),
    ] {
        let mut cfg = v4();
        cfg.local_detector = det;
        let text = full(cfg, &local_policy_svc());
        assert!(
            text.contains(&format!("external destinations\" {local} -j KUBE-SVC-")),
            "{name}"
        );
        assert!(
            text.contains(&format!("--dport 80 {not_local} -j KUBE-MARK-MASQ")),
            "{name}"
        );
        golden(name, &text);
    }
    let mut cfg = v4();
    cfg.local_detector = LocalDetector::None;
    let text = full(cfg, &local_policy_svc());
    assert!(!text.contains("pod traffic for"));
    assert!(
        !text.contains("cluster IP\" -m tcp -p tcp -d 172.30.0.48 --dport 80 -j KUBE-MARK-MASQ")
    );
    golden("local_detect_none", &text);
}

#[test]
fn ipv6() {
    let mut cfg = PlannerConfig::new(IpFamily::V6);
    cfg.local_detector = LocalDetector::Cidrs(vec![net("fd00:10:244::/56")]);
    let mut sp = svc("ns9", "v6", "p80", Protocol::Tcp, "fd00:10:96::9", 80);
    sp.node_port = Some(30009);
    let st = state(vec![with_endpoints(
        sp,
        vec![
            ep("fd00:10:244::9", 8080, true),
            ep("fd00:10:244:1::9", 8080, false),
        ],
    )]);
    let text = full(cfg, &st);
    assert!(text.contains("--to-destination [fd00:10:244:1::9]:8080"));
    assert!(text.contains("! -d ::1/128 -j KUBE-NODEPORTS"));
    assert!(!text.contains("KUBE-FIREWALL"));
    golden("ipv6", &text);
}

#[test]
fn sctp_udp_tcp_on_one_port() {
    let st = state(
        [
            ("dns-tcp", Protocol::Tcp),
            ("dns-udp", Protocol::Udp),
            ("dns-sctp", Protocol::Sctp),
        ]
        .into_iter()
        .map(|(pn, proto)| {
            with_endpoints(
                svc("kube-system", "dns", pn, proto, "172.30.0.10", 53),
                vec![ep("10.180.0.10", 53, false), ep("10.180.1.10", 53, false)],
            )
        })
        .collect(),
    );
    let text = full(v4(), &st);
    for p in ["tcp", "udp", "sctp"] {
        assert!(
            text.contains(&format!("-m {p} -p {p} -d 172.30.0.10 --dport 53")),
            "{p}"
        );
    }
    golden("sctp_udp_tcp_on_one_port", &text);
}

#[test]
fn large_cluster_drops_endpoint_comments() {
    let mut cfg = v4();
    cfg.large_cluster_endpoint_threshold = 3;
    let st = state(vec![with_endpoints(
        svc("ns10", "big", "p80", Protocol::Tcp, "172.30.0.50", 80),
        vec![
            ep("10.180.0.50", 80, true),
            ep("10.180.1.50", 80, false),
            ep("10.180.2.50", 80, false),
            ep("10.180.3.50", 80, false),
        ],
    )]);
    let text = full(cfg, &st);
    assert!(!text.contains(" -> "), "no per-endpoint comments");
    assert!(text.contains("-A KUBE-SVC-"));
    golden("large_cluster", &text);
}

#[test]
fn nodeport_addresses_and_stale_chains() {
    let mut cfg = v4();
    cfg.nodeport_addresses =
        NodePortAddresses::Ips(vec![ip("192.168.0.2"), ip("127.0.0.1"), ip("fd00::2")]);
    let mut sp = svc("ns11", "np", "p80", Protocol::Udp, "172.30.0.51", 80);
    sp.node_port = Some(30051);
    let st = state(vec![with_endpoints(sp, vec![ep("10.180.0.51", 80, false)])]);
    let mut existing = ExistingChains::default();
    existing.add_save(
        Table::Nat,
        ":KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]\n:KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]\n:KUBE-SVC-custom - [0:0]\n:CNI-FOO - [0:0]\n",
    );
    let text = full_with(cfg, &st, &existing);
    assert!(text.contains("-X KUBE-SVC-AAAAAAAAAAAAAAAA\n"));
    assert!(text.contains("-X KUBE-SEP-BBBBBBBBBBBBBBBB\n"));
    assert!(!text.contains("KUBE-SVC-custom"));
    assert!(!text.contains("CNI-FOO"));
    assert!(text.contains("-d 192.168.0.2 -j KUBE-NODEPORTS"));
    assert!(text.contains("-d 127.0.0.1 -j KUBE-NODEPORTS"));
    assert!(!text.contains("fd00::2"));
    // The structural check starts from an empty kernel: give it the stale chains.
    let mut k = Kernel::default();
    k.apply("*nat\n:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]\n:KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]\n-A KUBE-SVC-AAAAAAAAAAAAAAAA -j KUBE-SEP-BBBBBBBBBBBBBBBB\nCOMMIT\n")
        .expect("seed");
    k.apply(&text).expect("full plan deletes stale chains");
    assert!(k.chain("nat", "KUBE-SVC-AAAAAAAAAAAAAAAA").is_none());
    assert!(k.chain("nat", "KUBE-SEP-BBBBBBBBBBBBBBBB").is_none());
    let mut no_stale = text.clone();
    no_stale = no_stale
        .lines()
        .filter(|l| !l.contains("AAAAAAAAAAAAAAAA") && !l.contains("BBBBBBBBBBBBBBBB"))
        .map(|l| format!("{l}\n"))
        .collect();
    golden("nodeport_addresses", &no_stale);
}

#[test]
fn localhost_nodeports_off_blocks_loopback() {
    let mut cfg = v4();
    cfg.localhost_nodeports = false;
    let text = full(cfg, &three_endpoint_svc());
    assert!(text.contains("-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS"));
    assert!(!text.contains("KUBE-FIREWALL"));
    let text_on = full(v4(), &three_endpoint_svc());
    assert!(text_on.contains(":KUBE-FIREWALL - [0:0]"));
    assert!(text_on.contains("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"));
}

#[test]
fn structural_checker_rejects_bad_input() {
    for bad in [
        "*nat\n-A KUBE-NOPE -j ACCEPT\nCOMMIT\n",
        "*nat\n:KUBE-A - [0:0]\n-A KUBE-A -j KUBE-B\nCOMMIT\n",
        "*nat\n:KUBE-A - [0:0]\n",
        "*nat\n*filter\nCOMMIT\nCOMMIT\n",
        "*nat\n:KUBE-A - [0:0]\n-D KUBE-A -j ACCEPT\nCOMMIT\n",
        "*nat\n:KUBE-A - [0:0]\n:KUBE-B - [0:0]\n-A KUBE-A -j KUBE-B\n-X KUBE-B\nCOMMIT\n",
        "-A INPUT -j ACCEPT\n",
    ] {
        assert!(check_structure(bad).is_err(), "accepted: {bad}");
    }
}

#[test]
fn rule_counts_match_text() {
    let planner = Planner::new(v4()).expect("config");
    let plan = planner.plan_full(&three_endpoint_svc(), &ExistingChains::default());
    let k = check_structure(&plan.text).expect("valid");
    let count = |t: &str| -> usize {
        k.tables[t]
            .iter()
            .filter(|(c, _)| c.starts_with("KUBE-"))
            .map(|(_, r)| r.len())
            .sum()
    };
    assert_eq!(plan.counts.nat_rules, count("nat"));
    assert_eq!(plan.counts.filter_rules, count("filter"));
    assert_eq!(plan.counts.rules_written, count("nat") + count("filter"));
    // 1 dispatch + masq + 3 endpoints, + 3 POSTROUTING + 1 MARK-MASQ + 1 tail.
    assert_eq!(plan.counts.nat_rules, 5 + 5);
}
