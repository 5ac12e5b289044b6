//! The iptables rules IPVS mode still needs, as `iptables-restore --noflush`
//! input (pure).
//!
//! IPVS does the load balancing; iptables only marks and masquerades, and
//! filters what IPVS would otherwise let through or time out on.
//!
//! # No ipsets
//! Upstream matches service addresses against ipsets (KUBE-CLUSTER-IP,
//! KUBE-NODE-PORT-TCP, KUBE-LOOP-BACK, …). kproxy writes plain rules, one per
//! virtual-server address that needs one, into its own chains:
//! - the nat rules are only traversed by the first packet of a connection
//!   (conntrack remembers the verdict), so a linear chain of ~10k rules
//!   costs a few microseconds per *new* connection, as in iptables mode;
//! - the filter rules are behind `--ctstate NEW` jumps for the same reason,
//!   and exist only for exceptional services (no endpoints, source ranges);
//! - the whole text is rewritten in one atomic restore only when it changed,
//!   which an endpoint change normally does not cause (endpoints live in
//!   IPVS, not here), so the common sync writes no iptables at all;
//! - no second tool (`ipset`), no set/rule ordering problems on restore.
//!
//! Rules per service port (addresses of one family):
//!
//! | what                                   | table  | rules                          |
//! |----------------------------------------|--------|--------------------------------|
//! | ClusterIP (cluster CIDR or masq-all)   | nat    | 1                              |
//! | NodePort, Cluster policy               | nat    | 1 (any node IP)                |
//! | LB / external IP, Cluster policy       | nat    | 1 per address                  |
//! | no endpoints / no local endpoints      | filter | 1 per virtual server           |
//! | loadBalancerSourceRanges               | filter | ranges + 1 per LB address      |
//! | hairpin                                | nat    | 1 per local endpoint IP        |
//!
//! plus 8 fixed rules. A typical ClusterIP service with endpoints costs 1
//! rule; 10k of them make a 10k-rule nat chain (~1 MB restore input).
//!
//! Chain names are kube-proxy's (nat KUBE-SERVICES, KUBE-NODEPORTS,
//! KUBE-POSTROUTING, KUBE-MARK-MASQ; filter KUBE-SERVICES,
//! KUBE-EXTERNAL-SERVICES, KUBE-PROXY-FIREWALL, KUBE-FORWARD), so switching
//! a node between kube-proxy/kproxy and between modes rewrites them, and
//! `kproxy --cleanup` of either mode removes them.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use kproxy_iptables::runner::{JumpRule, Position};
use kproxy_model::{IpFamily, ProxyState, ServicePort};

use crate::planner::{port_services, IpvsConfig, VsKind};

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";

/// Our chains per table, in declaration order.
pub const NAT_CHAINS: &[&str] = &[
    KUBE_SERVICES,
    KUBE_NODEPORTS,
    KUBE_POSTROUTING,
    KUBE_MARK_MASQ,
];
pub const FILTER_CHAINS: &[&str] = &[
    KUBE_SERVICES,
    KUBE_EXTERNAL_SERVICES,
    KUBE_PROXY_FIREWALL,
    KUBE_FORWARD,
];

/// The restore input of one family and how many rules it installs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IptablesPlan {
    pub text: String,
    pub nat_rules: usize,
    pub filter_rules: usize,
}

fn host(ip: &IpAddr) -> String {
    IpNet::from(*ip).to_string()
}

fn proto_match(sp: &ServicePort, port: u16) -> String {
    let p = sp.name.protocol.lower_name();
    format!("-p {p} -m {p} --dport {port}")
}

struct Tables {
    nat: Vec<(String, String)>,
    filter: Vec<(String, String)>,
}

impl Tables {
    fn nat(&mut self, chain: &str, rule: String) {
        self.nat.push((chain.to_string(), rule));
    }
    fn filter(&mut self, chain: &str, rule: String) {
        self.filter.push((chain.to_string(), rule));
    }
}

/// The iptables part of IPVS mode for `family`.
pub fn iptables_rules(
    state: &ProxyState,
    cfg: &IpvsConfig,
    family: IpFamily,
    node_ips: &[IpAddr],
) -> IptablesPlan {
    let mark = 1u32 << u32::from(cfg.masquerade_bit.min(31));
    let cidr = cfg.cluster_cidr(family);
    let mut t = Tables {
        nat: Vec::new(),
        filter: Vec::new(),
    };
    let mut nodeport_masq = Vec::new();
    let mut hairpin: BTreeSet<IpAddr> = BTreeSet::new();
    for sp in state.family(family).values() {
        let name = sp.name.to_string();
        hairpin.extend(sp.endpoints.all.iter().filter(|e| e.is_local).map(|e| e.ip));
        let mut nodeport_done = false;
        for (kind, vs, dests) in port_services(cfg, sp, node_ips) {
            let dst = format!("-d {} {}", host(&vs.addr), proto_match(sp, vs.port));
            match kind {
                VsKind::ClusterIp => {
                    if cfg.masquerade_all {
                        t.nat(KUBE_SERVICES, format!("-m comment --comment \"{name} cluster IP\" {dst} -j {KUBE_MARK_MASQ}"));
                    } else if let Some(cidr) = cidr {
                        t.nat(KUBE_SERVICES, format!("-m comment --comment \"{name} cluster IP\" ! -s {cidr} {dst} -j {KUBE_MARK_MASQ}"));
                    }
                }
                VsKind::NodePort => {
                    if !nodeport_done && (cfg.masquerade_all || !sp.external_policy_local) {
                        nodeport_masq.push(format!(
                            "-m comment --comment \"{name} node port\" {} -j {KUBE_MARK_MASQ}",
                            proto_match(sp, vs.port)
                        ));
                    }
                    nodeport_done = true;
                }
                VsKind::LoadBalancer | VsKind::ExternalIp => {
                    let what = if kind == VsKind::LoadBalancer {
                        "loadbalancer IP"
                    } else {
                        "external IP"
                    };
                    if cfg.masquerade_all || !sp.external_policy_local {
                        t.nat(
                            KUBE_SERVICES,
                            format!(
                                "-m comment --comment \"{name} {what}\" {dst} -j {KUBE_MARK_MASQ}"
                            ),
                        );
                    }
                    if kind == VsKind::LoadBalancer && !sp.load_balancer_source_ranges.is_empty() {
                        for range in &sp.load_balancer_source_ranges {
                            t.filter(KUBE_PROXY_FIREWALL, format!("-m comment --comment \"{name} loadbalancer IP\" -s {range} {dst} -j RETURN"));
                        }
                        t.filter(KUBE_PROXY_FIREWALL, format!("-m comment --comment \"{name} traffic not accepted by KUBE-FW\" {dst} -j DROP"));
                    }
                }
            }
            if dests.is_empty() {
                let chain = if kind == VsKind::ClusterIp {
                    KUBE_SERVICES
                } else {
                    KUBE_EXTERNAL_SERVICES
                };
                let rule = if sp.endpoints.has_any {
                    format!("-m comment --comment \"{name} has no local endpoints\" {dst} -j DROP")
                } else {
                    format!("-m comment --comment \"{name} has no endpoints\" {dst} -j REJECT")
                };
                t.filter(chain, rule);
            }
        }
    }
    if !nodeport_masq.is_empty() {
        for r in nodeport_masq {
            t.nat(KUBE_NODEPORTS, r);
        }
    }
    t.nat(
        KUBE_SERVICES,
        format!("-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j {KUBE_NODEPORTS}"),
    );
    for ip in &hairpin {
        t.nat(
            KUBE_POSTROUTING,
            format!(
                "-m comment --comment \"hairpin\" -s {h} -d {h} -j MASQUERADE",
                h = host(ip)
            ),
        );
    }
    t.nat(
        KUBE_POSTROUTING,
        format!("-m mark ! --mark {mark:#x}/{mark:#x} -j RETURN"),
    );
    t.nat(KUBE_POSTROUTING, format!("-j MARK --xor-mark {mark:#x}"));
    t.nat(
        KUBE_POSTROUTING,
        "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE"
            .to_string(),
    );
    t.nat(KUBE_MARK_MASQ, format!("-j MARK --or-mark {mark:#x}"));
    t.filter(
        KUBE_FORWARD,
        format!("-m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark:#x}/{mark:#x} -j ACCEPT"),
    );
    t.filter(
        KUBE_FORWARD,
        "-m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_string(),
    );

    let mut text = String::with_capacity(128 * (t.nat.len() + t.filter.len()) + 512);
    write_table(&mut text, "filter", FILTER_CHAINS, &t.filter);
    write_table(&mut text, "nat", NAT_CHAINS, &t.nat);
    IptablesPlan {
        text,
        nat_rules: t.nat.len(),
        filter_rules: t.filter.len(),
    }
}

fn write_table(out: &mut String, table: &str, chains: &[&str], rules: &[(String, String)]) {
    let _ = writeln!(out, "*{table}");
    // Declaring a chain in a --noflush restore flushes it: a full rewrite.
    for c in chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    // Group by chain in declaration order, keeping each chain's rule order.
    for c in chains {
        for (chain, rule) in rules.iter().filter(|(ch, _)| ch == c) {
            let _ = writeln!(out, "-A {chain} {rule}");
        }
    }
    out.push_str("COMMIT\n");
}

fn jump(table: &str, chain: &str, extra: &[&str], comment: &str, to: &str) -> JumpRule {
    let mut rulespec: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    rulespec.extend(["-m", "comment", "--comment", comment, "-j", to].map(String::from));
    JumpRule {
        table: table.to_string(),
        chain: chain.to_string(),
        position: Position::Prepend,
        rulespec,
    }
}

/// The jumps from built-in chains into ours, ensured on full syncs.
pub fn jump_rules() -> Vec<JumpRule> {
    let new = ["-m", "conntrack", "--ctstate", "NEW"];
    vec![
        jump(
            "nat",
            "PREROUTING",
            &[],
            "kubernetes service portals",
            KUBE_SERVICES,
        ),
        jump(
            "nat",
            "OUTPUT",
            &[],
            "kubernetes service portals",
            KUBE_SERVICES,
        ),
        jump(
            "nat",
            "POSTROUTING",
            &[],
            "kubernetes postrouting rules",
            KUBE_POSTROUTING,
        ),
        jump(
            "filter",
            "INPUT",
            &new,
            "kubernetes service portals",
            KUBE_SERVICES,
        ),
        jump(
            "filter",
            "OUTPUT",
            &new,
            "kubernetes service portals",
            KUBE_SERVICES,
        ),
        jump(
            "filter",
            "INPUT",
            &new,
            "kubernetes externally-visible service portals",
            KUBE_EXTERNAL_SERVICES,
        ),
        jump(
            "filter",
            "OUTPUT",
            &new,
            "kubernetes externally-visible service portals",
            KUBE_EXTERNAL_SERVICES,
        ),
        jump(
            "filter",
            "INPUT",
            &new,
            "kubernetes load balancer firewall",
            KUBE_PROXY_FIREWALL,
        ),
        jump(
            "filter",
            "FORWARD",
            &[],
            "kubernetes forwarding rules",
            KUBE_FORWARD,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::tests::{ep, ip, port, state};
    use kproxy_model::Protocol;

    fn rules_of(text: &str, table: &str) -> Vec<String> {
        let mut cur = "";
        let mut out = Vec::new();
        for l in text.lines() {
            if let Some(t) = l.strip_prefix('*') {
                cur = if t == table { table } else { "" };
            } else if !cur.is_empty() && l.starts_with("-A ") {
                out.push(l.to_string());
            }
        }
        out
    }

    fn cfg() -> IpvsConfig {
        IpvsConfig {
            cluster_cidrs: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:10:244::/56".parse().unwrap(),
            ],
            ..IpvsConfig::default()
        }
    }

    #[test]
    fn plain_cluster_ip_costs_one_rule_and_fixed_chains() {
        let sp = port(
            "web",
            "10.96.0.10",
            80,
            Protocol::Tcp,
            vec![ep("10.244.2.2", 8080, false)],
        );
        let p = iptables_rules(&state(vec![sp]), &cfg(), IpFamily::V4, &[]);
        let nat = rules_of(&p.text, "nat");
        assert_eq!(
            nat,
            vec![
                "-A KUBE-SERVICES -m comment --comment \"default/web:p cluster IP\" ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-MARK-MASQ",
                "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
                "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
                "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
                "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE",
                "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
            ]
        );
        assert_eq!(p.nat_rules, 6);
        assert_eq!(p.filter_rules, 2, "only KUBE-FORWARD");
        assert!(p.text.starts_with("*filter\n:KUBE-SERVICES - [0:0]\n"));
        assert_eq!(p.text.matches("COMMIT\n").count(), 2);
        // the v6 family sees nothing of the v4 service
        let v6 = iptables_rules(&state(vec![]), &cfg(), IpFamily::V6, &[]);
        assert!(!v6.text.contains("10.96.0.10"));
    }

    #[test]
    fn no_endpoints_reject_and_local_policy_drop() {
        let empty = port("empty", "10.96.0.20", 80, Protocol::Tcp, vec![]);
        let mut local = port(
            "local",
            "10.96.0.21",
            53,
            Protocol::Udp,
            vec![ep("10.244.2.2", 53, false)],
        );
        local.node_port = Some(30053);
        local.load_balancer_ips = vec![ip("192.0.2.21")];
        local.external_policy_local = true;
        let p = iptables_rules(
            &state(vec![empty, local]),
            &cfg(),
            IpFamily::V4,
            &[ip("172.18.0.2")],
        );
        let filter = rules_of(&p.text, "filter");
        assert!(filter.contains(&"-A KUBE-SERVICES -m comment --comment \"default/empty:p has no endpoints\" -d 10.96.0.20/32 -p tcp -m tcp --dport 80 -j REJECT".to_string()), "{filter:#?}");
        assert!(filter.contains(&"-A KUBE-EXTERNAL-SERVICES -m comment --comment \"default/local:p has no local endpoints\" -d 172.18.0.2/32 -p udp -m udp --dport 30053 -j DROP".to_string()), "{filter:#?}");
        assert!(filter.contains(&"-A KUBE-EXTERNAL-SERVICES -m comment --comment \"default/local:p has no local endpoints\" -d 192.0.2.21/32 -p udp -m udp --dport 53 -j DROP".to_string()), "{filter:#?}");
        // the ClusterIP of the Local service has endpoints: no filter rule
        assert!(!filter.iter().any(|r| r.contains("10.96.0.21")));
        // Local policy: no NodePort / LB masquerade
        let nat = rules_of(&p.text, "nat");
        assert!(
            !nat.iter()
                .any(|r| r.contains("KUBE-NODEPORTS -m") || r.contains("192.0.2.21")),
            "{nat:#?}"
        );
    }

    #[test]
    fn cluster_policy_masquerades_external_and_source_ranges_filter() {
        let mut sp = port(
            "lb",
            "10.96.0.30",
            80,
            Protocol::Tcp,
            vec![ep("10.244.1.5", 8080, true)],
        );
        sp.node_port = Some(30080);
        sp.load_balancer_ips = vec![ip("192.0.2.30")];
        sp.external_ips = vec![ip("198.51.100.30")];
        sp.load_balancer_source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
        let p = iptables_rules(
            &state(vec![sp]),
            &cfg(),
            IpFamily::V4,
            &[ip("172.18.0.2"), ip("172.19.0.2")],
        );
        let nat = rules_of(&p.text, "nat");
        let has = |v: &[String], s: &str| v.iter().any(|r| r == s);
        assert!(has(&nat, "-A KUBE-NODEPORTS -m comment --comment \"default/lb:p node port\" -p tcp -m tcp --dport 30080 -j KUBE-MARK-MASQ"), "{nat:#?}");
        assert_eq!(
            nat.iter()
                .filter(|r| r.starts_with("-A KUBE-NODEPORTS"))
                .count(),
            1,
            "one rule for all node IPs"
        );
        assert!(has(&nat, "-A KUBE-SERVICES -m comment --comment \"default/lb:p loadbalancer IP\" -d 192.0.2.30/32 -p tcp -m tcp --dport 80 -j KUBE-MARK-MASQ"));
        assert!(has(&nat, "-A KUBE-SERVICES -m comment --comment \"default/lb:p external IP\" -d 198.51.100.30/32 -p tcp -m tcp --dport 80 -j KUBE-MARK-MASQ"));
        assert!(has(&nat, "-A KUBE-POSTROUTING -m comment --comment \"hairpin\" -s 10.244.1.5/32 -d 10.244.1.5/32 -j MASQUERADE"));
        // NodePort jump is the last KUBE-SERVICES rule
        let last_svc = nat
            .iter()
            .rev()
            .find(|r| r.starts_with("-A KUBE-SERVICES"))
            .unwrap();
        assert!(last_svc.ends_with("-j KUBE-NODEPORTS"));
        let filter = rules_of(&p.text, "filter");
        assert_eq!(
            filter.iter().filter(|r| r.starts_with("-A KUBE-PROXY-FIREWALL")).cloned().collect::<Vec<_>>(),
            vec![
                "-A KUBE-PROXY-FIREWALL -m comment --comment \"default/lb:p loadbalancer IP\" -s 203.0.113.0/24 -d 192.0.2.30/32 -p tcp -m tcp --dport 80 -j RETURN",
                "-A KUBE-PROXY-FIREWALL -m comment --comment \"default/lb:p traffic not accepted by KUBE-FW\" -d 192.0.2.30/32 -p tcp -m tcp --dport 80 -j DROP",
            ]
        );
    }

    #[test]
    fn masquerade_all_and_no_cidr() {
        let sp = port(
            "web",
            "10.96.0.10",
            80,
            Protocol::Sctp,
            vec![ep("10.244.2.2", 80, false)],
        );
        let st = state(vec![sp]);
        let none = iptables_rules(&st, &IpvsConfig::default(), IpFamily::V4, &[]);
        assert!(
            !none.text.contains("10.96.0.10"),
            "no CIDR, no masquerade-all: no ClusterIP rule"
        );
        let all = iptables_rules(
            &st,
            &IpvsConfig {
                masquerade_all: true,
                masquerade_bit: 4,
                ..IpvsConfig::default()
            },
            IpFamily::V4,
            &[],
        );
        assert!(all.text.contains("-A KUBE-SERVICES -m comment --comment \"default/web:p cluster IP\" -d 10.96.0.10/32 -p sctp -m sctp --dport 80 -j KUBE-MARK-MASQ"));
        assert!(all
            .text
            .contains("-A KUBE-MARK-MASQ -j MARK --or-mark 0x10"));
    }

    #[test]
    fn jumps_cover_the_hooks() {
        let j = jump_rules();
        assert!(j.iter().any(|r| r.table == "nat"
            && r.chain == "PREROUTING"
            && r.rulespec.last().map(String::as_str) == Some("KUBE-SERVICES")));
        assert!(j
            .iter()
            .any(|r| r.table == "nat" && r.chain == "POSTROUTING"));
        assert!(j.iter().any(|r| r.table == "filter"
            && r.chain == "INPUT"
            && r.rulespec.last().map(String::as_str) == Some("KUBE-PROXY-FIREWALL")));
    }
}
