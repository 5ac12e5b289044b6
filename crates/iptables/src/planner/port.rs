//! The rules of one service port: its own nat chains and its rules in the
//! shared dispatch chains. Pure; see the module doc of [`super`] for the layout.

use std::collections::hash_map::DefaultHasher;
use std::fmt::Write as _;
use std::hash::{Hash as _, Hasher as _};
use std::net::IpAddr;

use kproxy_model::{Endpoint, IpFamily, ServicePort};

use super::names::PortChains;
use super::{Dispatch, PlannerConfig, MARK_MASQ};

/// What one service port contributes to the kernel, as rendered (rule
/// texts included); kept between syncs only as an [`AppliedPort`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortRecord {
    /// Its nat chains with their rules (rulespecs without `-A CHAIN`), in
    /// the order they are written.
    pub chains: Vec<(String, Vec<String>)>,
    /// Its rules in the shared chains, each unique.
    pub dispatch: Vec<(Dispatch, String)>,
    /// Endpoints of the port (all conditions), for large-cluster mode.
    pub endpoints: usize,
    /// internalTrafficPolicy Local with no local endpoint (but some elsewhere).
    pub no_local_internal: bool,
    /// externalTrafficPolicy Local with no local endpoint (but some elsewhere).
    pub no_local_external: bool,
}

impl PortRecord {
    pub fn nat_rules(&self) -> usize {
        self.chains.iter().map(|(_, r)| r.len()).sum::<usize>()
            + self.dispatch.iter().filter(|(d, _)| d.is_nat()).count()
    }

    pub fn filter_rules(&self) -> usize {
        self.dispatch.iter().filter(|(d, _)| !d.is_nat()).count()
    }

    fn push_dispatch(&mut self, d: Dispatch, spec: String) {
        // A duplicate (e.g. an external IP listed twice) would make a later
        // `-D` leave one copy behind.
        if !self.dispatch.iter().any(|(od, os)| *od == d && *os == spec) {
            self.dispatch.push((d, spec));
        }
    }
}

/// A service-port chain as the [`super::Applied`] record keeps it: its name,
/// its rule count and a hash of its rules, instead of the rule texts (≈ 30 MB
/// at 10k services × 10 endpoints). Enough for a partial plan to tell whether
/// a freshly rendered chain differs from the one in the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainDigest {
    name: Box<str>,
    rules: usize,
    hash: u64,
}

impl ChainDigest {
    pub fn of(name: &str, rules: &[String]) -> ChainDigest {
        // SipHash-1-3 with fixed keys (`DefaultHasher::new`): the hash only
        // has to agree within one process. Each rule is hashed with str's
        // terminator (0xff, never in UTF-8), so rule boundaries count too;
        // two different rule lists of one chain collide with chance 2^-64,
        // and a collision would only keep that port's previous rules.
        let mut h = DefaultHasher::new();
        for r in rules {
            r.as_str().hash(&mut h);
        }
        ChainDigest {
            name: name.into(),
            rules: rules.len(),
            hash: h.finish(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many rules the chain holds.
    pub fn rules(&self) -> usize {
        self.rules
    }
}

/// What one service port contributes to the kernel, as the
/// [`super::Applied`] record keeps it between syncs: its chains as
/// [`ChainDigest`]s, its dispatch rules verbatim (a partial plan deletes them
/// with `-D`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppliedPort {
    chains: Box<[ChainDigest]>,
    dispatch: Box<[(Dispatch, Box<str>)]>,
    endpoints: usize,
    no_local_internal: bool,
    no_local_external: bool,
}

impl AppliedPort {
    pub fn of(rec: &PortRecord) -> AppliedPort {
        AppliedPort {
            chains: rec
                .chains
                .iter()
                .map(|(name, rules)| ChainDigest::of(name, rules))
                .collect(),
            dispatch: rec
                .dispatch
                .iter()
                .map(|(d, spec)| (*d, spec.as_str().into()))
                .collect(),
            endpoints: rec.endpoints,
            no_local_internal: rec.no_local_internal,
            no_local_external: rec.no_local_external,
        }
    }

    /// Its nat chains, in the order they are written.
    pub fn chains(&self) -> &[ChainDigest] {
        &self.chains
    }

    /// Its rules in the shared chains.
    pub fn dispatch(&self) -> impl Iterator<Item = (Dispatch, &str)> {
        self.dispatch.iter().map(|(d, spec)| (*d, &**spec))
    }

    pub fn has_dispatch(&self, d: Dispatch, spec: &str) -> bool {
        self.dispatch
            .iter()
            .any(|(od, os)| *od == d && **os == *spec)
    }

    pub fn endpoints(&self) -> usize {
        self.endpoints
    }

    pub fn no_local_internal(&self) -> bool {
        self.no_local_internal
    }

    pub fn no_local_external(&self) -> bool {
        self.no_local_external
    }

    pub fn nat_rules(&self) -> usize {
        self.chains.iter().map(|c| c.rules).sum::<usize>()
            + self.dispatch.iter().filter(|(d, _)| d.is_nat()).count()
    }

    pub fn filter_rules(&self) -> usize {
        self.dispatch.iter().filter(|(d, _)| !d.is_nat()).count()
    }
}

/// `-m comment --comment X`, quoted like upstream when X has spaces.
pub(super) fn comment(text: &str) -> String {
    if text.contains(' ') {
        format!("-m comment --comment \"{text}\"")
    } else {
        format!("-m comment --comment {text}")
    }
}

/// How local (pod) traffic is recognised, rendered for one family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Detect {
    None,
    Source(String),
    Interface(String),
}

impl Detect {
    pub(super) fn if_local(&self) -> Option<String> {
        match self {
            Detect::None => None,
            Detect::Source(c) => Some(format!("-s {c}")),
            Detect::Interface(i) => Some(format!("-i {i}")),
        }
    }

    pub(super) fn if_not_local(&self) -> Option<String> {
        match self {
            Detect::None => None,
            Detect::Source(c) => Some(format!("! -s {c}")),
            Detect::Interface(i) => Some(format!("! -i {i}")),
        }
    }
}

/// Everything [`render`] needs besides the port.
pub(super) struct Ctx<'a> {
    pub cfg: &'a PlannerConfig,
    pub detect: &'a Detect,
    pub probabilities: &'a [String],
    /// Large-cluster mode: no comments on per-endpoint rules.
    pub large: bool,
}

impl Ctx<'_> {
    fn push_probability(&self, out: &mut String, n: usize) {
        match self.probabilities.get(n) {
            Some(p) => out.push_str(p),
            None => {
                let _ = write!(out, "{:.10}", 1.0 / n as f64);
            }
        }
    }

    /// Only an endpoint on this node can be its own client (a packet is
    /// DNATed on its client's node), so only those need the hairpin rule and
    /// hence a KUBE-SEP chain.
    fn needs_sep(&self, ep: &Endpoint) -> bool {
        ep.is_local || self.cfg.node_pod_cidrs.iter().any(|c| c.contains(&ep.ip))
    }
}

fn family_ok(family: IpFamily, ip: &IpAddr) -> bool {
    IpFamily::of(ip) == family
}

/// The rules of one service port. Returns `None` for a port of the wrong
/// family (the state is per family; this is only a guard).
pub(super) fn render(ctx: &Ctx<'_>, sp: &ServicePort) -> Option<PortRecord> {
    let family = ctx.cfg.family;
    if !family_ok(family, &sp.cluster_ip) {
        return None;
    }
    let chains = PortChains::new(&sp.name);
    let proto = sp.name.protocol.lower_name();
    let spn = sp.name.to_string();
    let eps = &sp.endpoints;
    let external_ips: Vec<&IpAddr> = sp
        .external_ips
        .iter()
        .filter(|ip| family_ok(family, ip))
        .collect();
    let lb_ips: Vec<&IpAddr> = sp
        .load_balancer_ips
        .iter()
        .filter(|ip| family_ok(family, ip))
        .collect();
    let source_ranges: Vec<_> = sp
        .load_balancer_source_ranges
        .iter()
        .filter(|n| IpFamily::of_net(n) == family)
        .collect();
    let externally_accessible =
        sp.node_port.is_some() || !external_ips.is_empty() || !lb_ips.is_empty();
    let internal_local = sp.internal_policy_local;
    let external_local = sp.external_policy_local && externally_accessible;

    let has_any = eps.has_any;
    let uses_cluster_chain = has_any && !eps.cluster.is_empty();
    let uses_local_chain = has_any && !eps.local.is_empty();
    let (internal_chain, has_internal) = if internal_local {
        (&chains.svl, uses_local_chain)
    } else {
        (&chains.svc, uses_cluster_chain)
    };
    let (external_policy_chain, has_external) = if external_local {
        (&chains.svl, uses_local_chain)
    } else {
        (&chains.svc, uses_cluster_chain)
    };
    let uses_ext = has_any && externally_accessible;
    let uses_fw = has_any && !lb_ips.is_empty() && !source_ranges.is_empty();
    let lb_chain = if uses_fw { &chains.fw } else { &chains.ext };

    let mut rec = PortRecord {
        endpoints: eps.all.len(),
        ..PortRecord::default()
    };

    // What the filter table does with traffic that has nowhere to go. The
    // comments are built only when a rule needs them (most ports need none).
    let no_endpoints = || comment(&format!("{spn} has no endpoints"));
    let no_local = || comment(&format!("{spn} has no local endpoints"));
    let internal_local_drop = has_any && internal_local;
    let internal_target = if internal_local_drop {
        "DROP"
    } else {
        "REJECT"
    };
    let internal_comment = || {
        if internal_local_drop {
            no_local()
        } else {
            no_endpoints()
        }
    };
    let external_local_drop = has_any && external_local;
    let external_target = if external_local_drop {
        "DROP"
    } else {
        "REJECT"
    };
    let external_comment = || {
        if external_local_drop {
            no_local()
        } else {
            no_endpoints()
        }
    };
    rec.no_local_internal = has_any && internal_local && !has_internal;
    rec.no_local_external = has_any && external_local && !has_external;

    let port = sp.port;
    let pmatch = format!("-m {proto} -p {proto}");

    // Cluster IP.
    let cluster_ip_comment = comment(&format!("{spn} cluster IP"));
    let cluster_ip_match = format!(
        "{cluster_ip_comment} {pmatch} -d {} --dport {port}",
        sp.cluster_ip
    );
    if has_internal {
        rec.push_dispatch(
            Dispatch::NatServices,
            format!("{cluster_ip_match} -j {internal_chain}"),
        );
    } else {
        rec.push_dispatch(
            Dispatch::FilterServices,
            format!(
                "{} {pmatch} -d {} --dport {port} -j {internal_target}",
                internal_comment(),
                sp.cluster_ip
            ),
        );
    }

    // External IPs.
    let ext_ip_comment = if external_ips.is_empty() {
        String::new()
    } else {
        comment(&format!("{spn} external IP"))
    };
    for ip in &external_ips {
        if has_any {
            rec.push_dispatch(
                Dispatch::NatServices,
                format!(
                    "{ext_ip_comment} {pmatch} -d {ip} --dport {port} -j {}",
                    chains.ext
                ),
            );
        }
        if !has_external {
            rec.push_dispatch(
                Dispatch::FilterExternalServices,
                format!(
                    "{} {pmatch} -d {ip} --dport {port} -j {external_target}",
                    external_comment()
                ),
            );
        }
    }

    // Load-balancer IPs.
    let (lb_comment, fw_drop_comment) = if lb_ips.is_empty() {
        (String::new(), String::new())
    } else {
        (
            comment(&format!("{spn} loadbalancer IP")),
            comment(&format!("{spn} traffic not accepted by {}", chains.fw)),
        )
    };
    for ip in &lb_ips {
        if has_any {
            rec.push_dispatch(
                Dispatch::NatServices,
                format!("{lb_comment} {pmatch} -d {ip} --dport {port} -j {lb_chain}"),
            );
        }
        if uses_fw {
            rec.push_dispatch(
                Dispatch::FilterFirewall,
                format!("{fw_drop_comment} {pmatch} -d {ip} --dport {port} -j DROP"),
            );
        }
        if !has_external {
            rec.push_dispatch(
                Dispatch::FilterExternalServices,
                format!(
                    "{} {pmatch} -d {ip} --dport {port} -j {external_target}",
                    external_comment()
                ),
            );
        }
    }

    // NodePort.
    if let Some(np) = sp.node_port {
        if has_any {
            rec.push_dispatch(
                Dispatch::NatNodePorts,
                format!("{} {pmatch} --dport {np} -j {}", comment(&spn), chains.ext),
            );
        }
        if !has_external {
            rec.push_dispatch(
                Dispatch::FilterExternalServices,
                format!(
                    "{} -m addrtype --dst-type LOCAL {pmatch} --dport {np} -j {external_target}",
                    external_comment()
                ),
            );
        }
    }

    // Health-check NodePort: accepted whether or not there are local endpoints.
    if let Some(hc) = sp.health_check_node_port {
        rec.push_dispatch(
            Dispatch::FilterNodePorts,
            format!(
                "{} -m tcp -p tcp --dport {hc} -j ACCEPT",
                comment(&format!("{spn} health check node port"))
            ),
        );
    }

    // Per-port chains: EXT, FW, SVC, SVL, SEPs.
    let masq_internal = if !has_internal {
        None
    } else if ctx.cfg.masquerade_all {
        Some(format!("{cluster_ip_match} -j {MARK_MASQ}"))
    } else {
        ctx.detect
            .if_not_local()
            .map(|m| format!("{cluster_ip_match} {m} -j {MARK_MASQ}"))
    };

    if uses_ext {
        let mut rules = Vec::with_capacity(4);
        if !external_local {
            rules.push(format!(
                "{} -j {MARK_MASQ}",
                comment(&format!(
                    "masquerade traffic for {spn} external destinations"
                ))
            ));
        } else {
            // Short-circuit: pod and host traffic to an external address is
            // not subject to the Local policy (as if it went out to the LB and
            // came back). Needs the cluster chain; without cluster endpoints
            // there is nothing to short-circuit to.
            if uses_cluster_chain {
                if let Some(m) = ctx.detect.if_local() {
                    rules.push(format!(
                        "{} {m} -j {}",
                        comment(&format!("pod traffic for {spn} external destinations")),
                        chains.svc
                    ));
                }
            }
            rules.push(format!(
                "{} -m addrtype --src-type LOCAL -j {MARK_MASQ}",
                comment(&format!(
                    "masquerade LOCAL traffic for {spn} external destinations"
                ))
            ));
            if uses_cluster_chain {
                rules.push(format!(
                    "{} -m addrtype --src-type LOCAL -j {}",
                    comment(&format!(
                        "route LOCAL traffic for {spn} external destinations"
                    )),
                    chains.svc
                ));
            }
        }
        if has_external {
            rules.push(format!("-j {external_policy_chain}"));
        }
        rec.chains.push((chains.ext.clone(), rules));
    }

    if uses_fw {
        let mut rules = Vec::with_capacity(source_ranges.len() + 2);
        for cidr in &source_ranges {
            rules.push(format!("{lb_comment} -s {cidr} -j {}", chains.ext));
        }
        // A VIP often is a local address: a request from the node itself then
        // loops back with the VIP as source.
        let allow_from_node = ctx
            .cfg
            .node_ip
            .is_some_and(|node| source_ranges.iter().any(|c| c.contains(&node)));
        if allow_from_node {
            for ip in &lb_ips {
                rules.push(format!("{lb_comment} -s {ip} -j {}", chains.ext));
            }
        }
        rules.push(comment(&format!(
            "other traffic to {spn} will be dropped by KUBE-PROXY-FIREWALL"
        )));
        rec.chains.push((chains.fw.clone(), rules));
    }

    let affinity = sp.session_affinity_seconds;
    let mut seps: Vec<&Endpoint> = Vec::new();
    for (used, chain, list) in [
        (uses_cluster_chain, &chains.svc, &eps.cluster),
        (uses_local_chain, &chains.svl, &eps.local),
    ] {
        if !used {
            continue;
        }
        let mut rules = Vec::with_capacity(list.len() * if affinity.is_some() { 2 } else { 1 } + 1);
        if chain == internal_chain {
            if let Some(m) = &masq_internal {
                rules.push(m.clone());
            }
        }
        endpoint_rules(ctx, &chains, &spn, &pmatch, affinity, list, &mut rules);
        rec.chains.push((chain.clone(), rules));
        for ep in list.iter() {
            if ctx.needs_sep(ep) && !seps.iter().any(|s| s.ip == ep.ip && s.port == ep.port) {
                seps.push(ep);
            }
        }
    }
    seps.sort_by_key(|e| (e.ip, e.port));
    for ep in seps {
        let addr = ep.addr_string();
        let name = chains.sep(&addr);
        let c = if ctx.large {
            String::new()
        } else {
            format!("{} ", comment(&spn))
        };
        let set = if affinity.is_some() {
            format!("-m recent --name {name} --set ")
        } else {
            String::new()
        };
        let rules = vec![
            format!("{c}-s {} -j {MARK_MASQ}", ep.ip),
            format!("{c}{set}{pmatch} -j DNAT --to-destination {addr}"),
        ];
        rec.chains.push((name, rules));
    }
    Some(rec)
}

/// The endpoint-choosing rules of a SVC or SVL chain: affinity checks first,
/// then one rule per endpoint with probability 1/(n-i), the last without.
/// An endpoint with a SEP chain is jumped to; any other is DNATed here.
fn endpoint_rules(
    ctx: &Ctx<'_>,
    chains: &PortChains,
    spn: &str,
    pmatch: &str,
    affinity: Option<u32>,
    list: &[Endpoint],
    rules: &mut Vec<String>,
) {
    let n = list.len();
    // The address string and the SEP name (a SHA-256 per endpoint) are
    // needed only for comments, SEP chains and affinity lists: the common
    // large-cluster case (remote endpoints, no affinity) builds neither and
    // writes the address straight into the rule.
    let simple = ctx.large && affinity.is_none();
    let named: Vec<(String, String, bool)> = list
        .iter()
        .map(|ep| {
            let has_chain = ctx.needs_sep(ep);
            if simple && !has_chain {
                return (String::new(), String::new(), false);
            }
            let addr = ep.addr_string();
            let sep = if has_chain || affinity.is_some() {
                chains.sep(&addr)
            } else {
                String::new()
            };
            (addr, sep, has_chain)
        })
        .collect();
    let prefix = |addr: &str| -> String {
        if ctx.large {
            String::with_capacity(96)
        } else {
            format!("{} ", comment(&format!("{spn} -> {addr}")))
        }
    };
    if let Some(seconds) = affinity {
        for (addr, sep, has_chain) in &named {
            let c = prefix(addr);
            if *has_chain {
                rules.push(format!(
                    "{c}-m recent --name {sep} --rcheck --seconds {seconds} --reap -j {sep}"
                ));
            } else {
                // `--update` is `--rcheck` that also refreshes the entry, which
                // the SEP chain's `--set` does upstream.
                rules.push(format!(
                    "{c}-m recent --name {sep} --update --seconds {seconds} --reap {pmatch} -j DNAT --to-destination {addr}"
                ));
            }
        }
    }
    for (i, ((addr, sep, has_chain), ep)) in named.iter().zip(list).enumerate() {
        let mut r = prefix(addr);
        if i + 1 < n {
            r.push_str("-m statistic --mode random --probability ");
            ctx.push_probability(&mut r, n - i);
            r.push(' ');
        }
        if *has_chain {
            r.push_str("-j ");
            r.push_str(sep);
        } else {
            if affinity.is_some() {
                r.push_str("-m recent --name ");
                r.push_str(sep);
                r.push_str(" --set ");
            }
            r.push_str(pmatch);
            r.push_str(" -j DNAT --to-destination ");
            if addr.is_empty() {
                let _ = write!(r, "{}", std::net::SocketAddr::new(ep.ip, ep.port));
            } else {
                r.push_str(addr);
            }
        }
        rules.push(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(name: &str, rules: &[&str]) -> ChainDigest {
        let rules: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
        ChainDigest::of(name, &rules)
    }

    #[test]
    fn chain_digest_tells_rule_lists_apart() {
        let base = digest("KUBE-SVC-A", &["-j X", "-j Y"]);
        assert_eq!(base, digest("KUBE-SVC-A", &["-j X", "-j Y"]));
        assert_eq!(base.rules(), 2);
        for other in [
            digest("KUBE-SVC-A", &["-j Y", "-j X"]),
            digest("KUBE-SVC-A", &["-j X", "-j Z"]),
            digest("KUBE-SVC-A", &["-j X -j Y"]),
            digest("KUBE-SVC-A", &["-j X", "-j Y", ""]),
            digest("KUBE-SVC-A", &["-j X", "-j", "Y"]),
            digest("KUBE-SVC-B", &["-j X", "-j Y"]),
        ] {
            assert_ne!(base, other, "{other:?}");
        }
        // Rule boundaries count, not only the concatenated text.
        assert_ne!(
            digest("C", &["ab", "c"]).hash,
            digest("C", &["a", "bc"]).hash
        );
        assert_ne!(digest("C", &[]).hash, digest("C", &[""]).hash);
    }
}
