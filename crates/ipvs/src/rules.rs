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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use kproxy_iptables::runner::{JumpRule, Position};
use kproxy_model::{IpFamily, ProxyState, ServicePort, ServicePortName};

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

/// One service port's rules (chain, rule) per table, and its local
/// endpoints' IPs for the hairpin rules (one per IP, however many ports
/// share it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortRules {
    nat: Vec<(&'static str, String)>,
    filter: Vec<(&'static str, String)>,
    hairpin: Vec<IpAddr>,
}

impl PortRules {
    fn is_empty(&self) -> bool {
        self.nat.is_empty() && self.filter.is_empty() && self.hairpin.is_empty()
    }
}

/// What one service port adds to the iptables part.
pub fn port_rules(cfg: &IpvsConfig, sp: &ServicePort, node_ips: &[IpAddr]) -> PortRules {
    let cidr = cfg.cluster_cidr(sp.family);
    let mut t = PortRules::default();
    let name = sp.name.to_string();
    t.hairpin
        .extend(sp.endpoints.all.iter().filter(|e| e.is_local).map(|e| e.ip));
    let mut nodeport_done = false;
    for (kind, vs, dests) in port_services(cfg, sp, node_ips) {
        let dst = format!("-d {} {}", host(&vs.addr), proto_match(sp, vs.port));
        match kind {
            VsKind::ClusterIp => {
                if cfg.masquerade_all {
                    t.nat.push((
                        KUBE_SERVICES,
                        format!(
                            "-m comment --comment \"{name} cluster IP\" {dst} -j {KUBE_MARK_MASQ}"
                        ),
                    ));
                } else if let Some(cidr) = cidr {
                    t.nat.push((KUBE_SERVICES, format!("-m comment --comment \"{name} cluster IP\" ! -s {cidr} {dst} -j {KUBE_MARK_MASQ}")));
                }
            }
            VsKind::NodePort => {
                if !nodeport_done && (cfg.masquerade_all || !sp.external_policy_local) {
                    t.nat.push((
                        KUBE_NODEPORTS,
                        format!(
                            "-m comment --comment \"{name} node port\" {} -j {KUBE_MARK_MASQ}",
                            proto_match(sp, vs.port)
                        ),
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
                    t.nat.push((
                        KUBE_SERVICES,
                        format!("-m comment --comment \"{name} {what}\" {dst} -j {KUBE_MARK_MASQ}"),
                    ));
                }
                if kind == VsKind::LoadBalancer && !sp.load_balancer_source_ranges.is_empty() {
                    for range in &sp.load_balancer_source_ranges {
                        t.filter.push((KUBE_PROXY_FIREWALL, format!("-m comment --comment \"{name} loadbalancer IP\" -s {range} {dst} -j RETURN")));
                    }
                    t.filter.push((KUBE_PROXY_FIREWALL, format!("-m comment --comment \"{name} traffic not accepted by KUBE-FW\" {dst} -j DROP")));
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
            t.filter.push((chain, rule));
        }
    }
    t
}

/// The iptables part of one family by service port. Kept between syncs,
/// so a partial sync regenerates only the changed ports' rules and renders
/// the whole text only when one of them changed (an endpoint change
/// usually changes none: endpoints live in IPVS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyRules {
    family: IpFamily,
    /// Only ports that add something; most add nothing without a cluster
    /// CIDR or masquerade-all.
    ports: BTreeMap<ServicePortName, PortRules>,
}

impl FamilyRules {
    pub fn new(
        state: &ProxyState,
        cfg: &IpvsConfig,
        family: IpFamily,
        node_ips: &[IpAddr],
    ) -> Self {
        let ports = state
            .family(family)
            .iter()
            .map(|(name, sp)| (name.clone(), port_rules(cfg, sp, node_ips)))
            .filter(|(_, r)| !r.is_empty())
            .collect();
        FamilyRules { family, ports }
    }

    /// Regenerates the `changed` ports of this family (added, changed or
    /// removed in `state`; every other port, `cfg` and `node_ips` as
    /// before). Returns whether any of their rules changed: if not, the
    /// rendered text is the same as before.
    pub fn update<'a>(
        &mut self,
        state: &ProxyState,
        cfg: &IpvsConfig,
        node_ips: &[IpAddr],
        changed: impl IntoIterator<Item = &'a ServicePortName>,
    ) -> bool {
        let mut any = false;
        for name in changed {
            let new = state
                .family(self.family)
                .get(name)
                .map(|sp| port_rules(cfg, sp, node_ips))
                .filter(|r| !r.is_empty());
            let same = match &new {
                Some(r) => self.ports.get(name) == Some(r),
                None => !self.ports.contains_key(name),
            };
            if same {
                continue;
            }
            any = true;
            match new {
                Some(r) => {
                    self.ports.insert(name.clone(), r);
                }
                None => {
                    self.ports.remove(name);
                }
            }
        }
        any
    }

    /// The restore input: every port's rules and the fixed ones.
    pub fn render(&self, cfg: &IpvsConfig) -> IptablesPlan {
        let mark = 1u32 << u32::from(cfg.masquerade_bit.min(31));
        let mut nat: Vec<(&str, &str)> = Vec::with_capacity(self.ports.len() + 8);
        let mut filter: Vec<(&str, &str)> = Vec::new();
        let mut hairpin: BTreeSet<IpAddr> = BTreeSet::new();
        for r in self.ports.values() {
            nat.extend(r.nat.iter().map(|(c, r)| (*c, r.as_str())));
            filter.extend(r.filter.iter().map(|(c, r)| (*c, r.as_str())));
            hairpin.extend(r.hairpin.iter().copied());
        }
        let nodeports = format!("-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j {KUBE_NODEPORTS}");
        let hairpin: Vec<String> = hairpin
            .iter()
            .map(|ip| {
                format!(
                    "-m comment --comment \"hairpin\" -s {h} -d {h} -j MASQUERADE",
                    h = host(ip)
                )
            })
            .collect();
        let postrouting = [
            format!("-m mark ! --mark {mark:#x}/{mark:#x} -j RETURN"),
            format!("-j MARK --xor-mark {mark:#x}"),
            "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE"
                .to_string(),
        ];
        let mark_masq = format!("-j MARK --or-mark {mark:#x}");
        let forward = [
            format!("-m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark:#x}/{mark:#x} -j ACCEPT"),
            "-m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_string(),
        ];
        nat.push((KUBE_SERVICES, &nodeports));
        nat.extend(hairpin.iter().map(|r| (KUBE_POSTROUTING, r.as_str())));
        nat.extend(postrouting.iter().map(|r| (KUBE_POSTROUTING, r.as_str())));
        nat.push((KUBE_MARK_MASQ, &mark_masq));
        filter.extend(forward.iter().map(|r| (KUBE_FORWARD, r.as_str())));

        let mut text = String::with_capacity(128 * (nat.len() + filter.len()) + 512);
        write_table(&mut text, "filter", FILTER_CHAINS, &filter);
        write_table(&mut text, "nat", NAT_CHAINS, &nat);
        IptablesPlan {
            text,
            nat_rules: nat.len(),
            filter_rules: filter.len(),
        }
    }
}

/// The iptables part of IPVS mode for `family`.
pub fn iptables_rules(
    state: &ProxyState,
    cfg: &IpvsConfig,
    family: IpFamily,
    node_ips: &[IpAddr],
) -> IptablesPlan {
    FamilyRules::new(state, cfg, family, node_ips).render(cfg)
}

fn write_table(out: &mut String, table: &str, chains: &[&str], rules: &[(&str, &str)]) {
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
    use crate::planner::tests::{ep, ip, port, state, worlds};
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

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// After every step of random changes, the updated rules equal
        /// fresh ones, and an update that reports no change leaves the
        /// rendered text as it was (so skipping the restore is safe).
        #[test]
        fn updated_rules_equal_fresh_rules(
            (first, steps) in worlds::history(),
            extra in prop::collection::vec(any::<bool>(), worlds::SLOTS),
            node_ips in worlds::node_ips(),
            masquerade_all in any::<bool>(),
        ) {
            let cfg = IpvsConfig { masquerade_all, ..cfg() };
            let mut world = first;
            let mut prev = worlds::build_state(&world);
            let mut rules: Vec<FamilyRules> = IpFamily::ALL
                .iter()
                .map(|f| FamilyRules::new(&prev, &cfg, *f, &node_ips))
                .collect();
            for step in steps {
                for (slot, spec) in step {
                    world[slot] = spec;
                }
                let next = worlds::build_state(&world);
                let changed = worlds::changed(&prev, &next, &extra);
                for (family, r) in IpFamily::ALL.iter().zip(&mut rules) {
                    let before = r.render(&cfg);
                    let names = changed.iter().filter(|(f, _)| f == family).map(|(_, n)| n);
                    let any = r.update(&next, &cfg, &node_ips, names);
                    prop_assert_eq!(&*r, &FamilyRules::new(&next, &cfg, *family, &node_ips));
                    let after = r.render(&cfg);
                    prop_assert_eq!(&after, &iptables_rules(&next, &cfg, *family, &node_ips));
                    if !any {
                        prop_assert_eq!(&before, &after);
                    }
                }
                prev = next;
            }
        }
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
