//! The iptables rule planner: pure functions from a family's service ports to
//! `iptables-restore --noflush` input, and the diff against what was applied.
//!
//! # Layout
//!
//! Semantics are upstream kube-proxy's (`pkg/proxy/iptables`), with one
//! leaner layout: upstream gives every endpoint a `KUBE-SEP-…` chain holding
//! a hairpin rule (`-s <ep> -j KUBE-MARK-MASQ`) and the DNAT. A packet is
//! DNATed on its client's node, so only an endpoint on *this* node (its
//! `is_local` flag, or its IP inside the node's pod CIDRs) can ever be its own
//! client. Only such endpoints get a SEP chain; for every other endpoint the
//! service chain's rule DNATs directly:
//!
//! ```text
//! -A KUBE-SVC-X -m comment --comment "ns/s:p -> 10.1.2.3:80" -m statistic --mode random --probability 0.5000000000 -m tcp -p tcp -j DNAT --to-destination 10.1.2.3:80
//! ```
//!
//! With ClientIP affinity the same rule carries `-m recent --name KUBE-SEP-… --set`
//! and the affinity check DNATs directly with `--update` (an `--rcheck` that
//! refreshes the entry, as the SEP chain's `--set` does upstream). Chain and
//! recent-list names stay upstream's hashes, so a node can switch between
//! kube-proxy and kproxy and each cleans up the other's chains.
//!
//! Caveat of the lean layout: a *remote* pod that reaches this node's
//! external address with `externalTrafficPolicy: Local`, is recognised as pod
//! traffic, and is then load-balanced to itself, is not hairpin-masqueraded
//! here (upstream's SEP chain would). Traffic from remote nodes to a
//! Cluster-policy external address is always masqueraded, so this case needs
//! all three conditions.
//!
//! Rules per service port with E endpoints of which L need a SEP chain:
//!
//! | service                         | nat chains | nat rules           | upstream nat rules |
//! |---------------------------------|-----------:|---------------------|--------------------|
//! | ClusterIP                        | 1 + L      | 2 + E + 2L          | 2 + 3E             |
//! | + NodePort / external IP (Cluster)| +1 (EXT)  | +1 dispatch, +2 EXT | same               |
//! | + ClientIP affinity             |            | +E                  | +E                 |
//!
//! The filter table holds only dispatch rules: REJECT/DROP for ports without
//! (local) endpoints, the firewall drops, the health-check ACCEPTs, plus
//! KUBE-FORWARD.
//!
//! Large clusters (more endpoints than `large_cluster_endpoint_threshold`):
//! the per-endpoint rules (SVC/SVL endpoint rules and SEP chains) carry no
//! comment, as upstream; dispatch-chain rules keep theirs (they must stay
//! unique for rule-level deletes).
//!
//! # Full and partial plans
//!
//! A full plan declares (`:CHAIN - [0:0]`, which flushes) and fills every
//! chain kproxy owns and deletes owned service chains that are no longer
//! wanted. A partial plan touches only the changed service ports: it
//! rewrites those of their chains whose rules differ, deletes their gone
//! chains, and edits the shared chains (nat `KUBE-SERVICES`/`KUBE-NODEPORTS`,
//! filter `KUBE-SERVICES`/`KUBE-EXTERNAL-SERVICES`/`KUBE-NODEPORTS`/
//! `KUBE-PROXY-FIREWALL`) rule by rule with `-D`/`-A`, and `-I KUBE-SERVICES 1`
//! in nat so the NodePort jump stays last. A table with nothing to change is
//! left out of the input (legacy iptables-restore re-uploads every table it
//! touches).
//!
//! The [`Applied`] record keeps of each service-port chain only its name,
//! rule count and a hash of its rules ([`ChainDigest`]), and the dispatch
//! rules verbatim (for `-D`): a partial plan renders the changed ports
//! afresh and rewrites the chains whose digest differs.

mod names;
mod port;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use kproxy_model::{FamilyState, IpFamily, ServicePortName, SyncKind};

pub use names::{is_service_chain, PortChains};
pub use port::{AppliedPort, ChainDigest, PortRecord};

use port::{comment, Ctx, Detect};

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const CANARY: &str = "KUBE-PROXY-CANARY";
/// kubelet's chain; kproxy refills it (as upstream) but never deletes it.
pub const KUBELET_FIREWALL: &str = "KUBE-FIREWALL";

/// Endpoint probabilities 1/n precomputed up to this n.
const PRECOMPUTED_PROBABILITIES: usize = 256;

/// An iptables table the planner writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Filter,
    Nat,
}

impl Table {
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
        }
    }
}

/// The shared chains every service port writes rules into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dispatch {
    NatServices,
    NatNodePorts,
    FilterServices,
    FilterExternalServices,
    FilterNodePorts,
    FilterFirewall,
}

impl Dispatch {
    pub const ALL: [Dispatch; 6] = [
        Dispatch::NatServices,
        Dispatch::NatNodePorts,
        Dispatch::FilterServices,
        Dispatch::FilterExternalServices,
        Dispatch::FilterNodePorts,
        Dispatch::FilterFirewall,
    ];

    pub fn table(self) -> Table {
        if self.is_nat() {
            Table::Nat
        } else {
            Table::Filter
        }
    }

    pub fn is_nat(self) -> bool {
        matches!(self, Dispatch::NatServices | Dispatch::NatNodePorts)
    }

    pub fn chain(self) -> &'static str {
        match self {
            Dispatch::NatServices | Dispatch::FilterServices => KUBE_SERVICES,
            Dispatch::NatNodePorts | Dispatch::FilterNodePorts => KUBE_NODEPORTS,
            Dispatch::FilterExternalServices => KUBE_EXTERNAL_SERVICES,
            Dispatch::FilterFirewall => KUBE_PROXY_FIREWALL,
        }
    }
}

/// How traffic from local pods is recognised (`--detect-local-mode`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum LocalDetector {
    /// Not implemented: no pod/non-pod distinction.
    #[default]
    None,
    /// ClusterCIDR / NodeCIDR: source address in the CIDR. The first CIDR of
    /// the planned family is used (upstream takes one per family).
    Cidrs(Vec<IpNet>),
    /// BridgeInterface: arrives on this bridge.
    Bridge(String),
    /// InterfaceNamePrefix: arrives on an interface starting with this.
    InterfacePrefix(String),
}

/// Where NodePorts are served (`--nodeport-addresses`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum NodePortAddresses {
    /// Every local address (`-m addrtype --dst-type LOCAL`).
    #[default]
    AllLocal,
    /// These node addresses only (already resolved from CIDRs or `primary`).
    Ips(Vec<IpAddr>),
}

/// Family-wide settings. Any change means a full sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannerConfig {
    pub family: IpFamily,
    /// `--iptables-masquerade-bit`, 0..=31.
    pub masquerade_bit: u8,
    pub masquerade_all: bool,
    pub local_detector: LocalDetector,
    pub nodeport_addresses: NodePortAddresses,
    /// `--iptables-localhost-nodeports` (IPv4 only; needs route_localnet=1).
    pub localhost_nodeports: bool,
    /// Above this many endpoints, per-endpoint rules carry no comment.
    pub large_cluster_endpoint_threshold: usize,
    /// Append `--random-fully` to the MASQUERADE rule.
    pub random_fully: bool,
    /// `nf_conntrack_tcp_be_liberal` is set: no DROP of INVALID packets.
    pub conntrack_tcp_be_liberal: bool,
    /// The node's address in this family, for the LB firewall's
    /// "allow from the node itself" rules.
    pub node_ip: Option<IpAddr>,
    /// The node's pod CIDRs: an endpoint inside them is on this node and
    /// gets a hairpin SEP chain even if its slice does not say so.
    pub node_pod_cidrs: Vec<IpNet>,
}

impl PlannerConfig {
    /// Upstream's defaults for `family`.
    pub fn new(family: IpFamily) -> Self {
        PlannerConfig {
            family,
            masquerade_bit: 14,
            masquerade_all: false,
            local_detector: LocalDetector::None,
            nodeport_addresses: NodePortAddresses::AllLocal,
            localhost_nodeports: true,
            large_cluster_endpoint_threshold: 1000,
            random_fully: true,
            conntrack_tcp_be_liberal: false,
            node_ip: None,
            node_pod_cidrs: Vec::new(),
        }
    }

    /// Localhost NodePorts are possible only on IPv4 and only when the NodePort
    /// addresses include 127.0.0.0/8 (upstream's rule).
    pub fn effective_localhost_nodeports(&self) -> bool {
        self.family == IpFamily::V4
            && self.localhost_nodeports
            && match &self.nodeport_addresses {
                NodePortAddresses::AllLocal => true,
                NodePortAddresses::Ips(ips) => {
                    ips.iter().any(|ip| ip.is_ipv4() && ip.is_loopback())
                }
            }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("masquerade bit {0} is out of range 0..=31")]
    MasqueradeBit(u8),
    #[error("local-traffic interface {0:?} is not a valid interface name")]
    Interface(String),
}

/// A jump from a built-in chain to one of ours, ensured outside the restore
/// (kproxy does not own the built-in chains).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JumpSpec {
    pub table: Table,
    /// The built-in chain, e.g. `PREROUTING`.
    pub from: &'static str,
    /// Our chain, e.g. `KUBE-SERVICES`.
    pub to: &'static str,
    /// Matches before the jump, e.g. `-m conntrack --ctstate NEW`.
    pub extra_args: Vec<String>,
    /// Upstream's comment; empty for kubelet's chains.
    pub comment: &'static str,
}

/// Chains present in the kernel, for a full plan to delete stale ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExistingChains(pub BTreeSet<(Table, String)>);

impl ExistingChains {
    /// Adds the chains of an `iptables-save -t <table>` dump.
    pub fn add_save(&mut self, table: Table, save: &str) {
        for line in save.lines() {
            if let Some(rest) = line.strip_prefix(':') {
                if let Some(name) = rest.split_whitespace().next() {
                    self.0.insert((table, name.to_string()));
                }
            }
        }
    }
}

/// What a plan writes, and what the kernel holds after it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanCounts {
    /// Rules installed in nat / filter after the plan.
    pub nat_rules: usize,
    pub filter_rules: usize,
    /// Chains declared (created or flushed and refilled), not counting
    /// chains flushed only to be deleted.
    pub chains_written: usize,
    pub chains_deleted: usize,
    /// `-A` / `-I` lines.
    pub rules_written: usize,
    /// `-D` lines.
    pub rules_deleted: usize,
    pub no_local_internal: usize,
    pub no_local_external: usize,
}

/// A restore transaction and how to update the [`Applied`] record once it
/// has succeeded.
#[derive(Debug)]
pub struct Plan {
    pub kind: SyncKind,
    /// `iptables-restore --noflush` input; empty when nothing changes.
    pub text: String,
    pub counts: PlanCounts,
    pub update: AppliedUpdate,
}

impl Plan {
    /// The chains a full plan writes, per table, with their rules (rulespecs
    /// without `-A CHAIN`), borrowed from its text: dispatch chains list
    /// service-port rules in service-port order, then nat KUBE-SERVICES'
    /// tail. Chains it flushes only to delete them (`-X`) are left out. The
    /// [`Applied`] record keeps no rule texts, so this is where the first sync
    /// after a restart finds the rules to compare with the kernel's.
    pub fn rules_by_chain(&self) -> BTreeMap<(Table, &str), Vec<&str>> {
        let mut out: BTreeMap<(Table, &str), Vec<&str>> = BTreeMap::new();
        let mut deleted = Vec::new();
        let mut table = None;
        for line in self.text.lines() {
            if let Some(name) = line.strip_prefix('*') {
                table = match name {
                    "nat" => Some(Table::Nat),
                    "filter" => Some(Table::Filter),
                    _ => None,
                };
                continue;
            }
            let Some(t) = table else { continue };
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(chain) = decl.split(' ').next() {
                    out.entry((t, chain)).or_default();
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
                out.entry((t, chain)).or_default().push(spec);
            } else if let Some(chain) = line.strip_prefix("-X ") {
                deleted.push((t, chain));
            }
        }
        for key in deleted {
            out.remove(&key);
        }
        out
    }
}

/// The change to the [`Applied`] record a successful plan makes.
#[derive(Debug)]
pub enum AppliedUpdate {
    Replace(Box<Applied>),
    Patch(AppliedPatch),
}

#[derive(Debug)]
pub struct AppliedPatch {
    ports: Vec<(ServicePortName, Option<AppliedPort>)>,
    totals: Totals,
}

impl AppliedUpdate {
    /// Records a successful apply. A patch needs the record it was planned
    /// against; without one the slot stays empty (forcing a full sync).
    pub fn apply_to(self, slot: &mut Option<Applied>) {
        match self {
            AppliedUpdate::Replace(a) => *slot = Some(*a),
            AppliedUpdate::Patch(p) => {
                if let Some(applied) = slot.as_mut() {
                    for (name, rec) in p.ports {
                        match rec {
                            Some(r) => applied.ports.insert(name, r),
                            None => applied.ports.remove(&name),
                        };
                    }
                    applied.totals = p.totals;
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Totals {
    endpoints: usize,
    nat_rules: usize,
    filter_rules: usize,
    no_local_internal: usize,
    no_local_external: usize,
}

/// What is in the kernel after a successful plan: the fixed chains with
/// their rules, and per service port its chains (as digests of their rules)
/// and dispatch rules. Equal records mean equal rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    config: PlannerConfig,
    large_cluster: bool,
    /// Fixed chains other than the dispatch chains, with their rules.
    fixed: Vec<(Table, &'static str, Vec<String>)>,
    /// The last rules of nat KUBE-SERVICES (the NodePort jump).
    tail: Vec<String>,
    ports: BTreeMap<ServicePortName, AppliedPort>,
    totals: Totals,
}

impl Applied {
    pub fn config(&self) -> &PlannerConfig {
        &self.config
    }

    pub fn large_cluster(&self) -> bool {
        self.large_cluster
    }

    pub fn port(&self, name: &ServicePortName) -> Option<&AppliedPort> {
        self.ports.get(name)
    }

    pub fn nat_rules(&self) -> usize {
        self.totals.nat_rules
    }

    pub fn filter_rules(&self) -> usize {
        self.totals.filter_rules
    }

    /// The chains this record says exist, for a full plan's stale-chain scan.
    pub fn existing_chains(&self) -> ExistingChains {
        let mut set = BTreeSet::new();
        for (t, c, _) in &self.fixed {
            set.insert((*t, (*c).to_string()));
        }
        for d in Dispatch::ALL {
            set.insert((d.table(), d.chain().to_string()));
        }
        for rec in self.ports.values() {
            for c in rec.chains() {
                set.insert((Table::Nat, c.name().to_string()));
            }
        }
        ExistingChains(set)
    }
}

/// A full plan in parts: its text is `head`, then the chain rules of every
/// service port (`body_len` bytes), then `end` (stale chains' `-X`, the
/// last `COMMIT`).
struct FullParts {
    large: bool,
    head: String,
    body_len: usize,
    end: String,
    counts: PlanCounts,
    applied: Applied,
}

/// A full plan that does not hold its text: the chain rules of the service
/// ports, nearly all of it, are rendered again while it is written
/// ([`StreamedPlan::write_to`], straight into iptables-restore's stdin).
/// The same bytes as [`Planner::plan_full`]'s text without a buffer of them
/// (≈ 17 MB at 10k services × 10 endpoints), for a second rendering of
/// every port (≈ 40 ms there).
#[derive(Debug)]
pub struct StreamedPlan<'a> {
    planner: &'a Planner,
    ports: &'a FamilyState,
    large: bool,
    head: String,
    body_len: usize,
    end: String,
    pub counts: PlanCounts,
    pub update: AppliedUpdate,
}

impl StreamedPlan<'_> {
    /// The length of the text in bytes.
    pub fn text_len(&self) -> usize {
        self.head.len() + self.body_len + self.end.len()
    }

    pub fn write_to(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        self.write_with(|s| w.write_all(s.as_bytes()))
    }

    /// The whole text, as [`Planner::plan_full`] would hold it.
    pub fn text(&self) -> String {
        let mut out = String::with_capacity(self.text_len());
        let _ = self.write_with(|s| {
            out.push_str(s);
            Ok(())
        });
        out
    }

    /// Adds `lines` (rules, each ending in a newline) to `table`'s
    /// section, as [`add_table_rules`] does to a text.
    pub fn add_table_rules(&mut self, table: Table, lines: &str) {
        if lines.is_empty() {
            return;
        }
        // The nat section starts in the head and ends in `end`.
        match table {
            Table::Nat => self.end.insert_str(0, lines),
            Table::Filter => add_table_rules(&mut self.head, table, lines),
        }
    }

    fn write_with(&self, mut put: impl FnMut(&str) -> std::io::Result<()>) -> std::io::Result<()> {
        put(&self.head)?;
        let ctx = self.planner.ctx(self.large);
        let mut buf = String::new();
        for sp in self.ports.values() {
            let Some(rec) = port::render(&ctx, sp) else {
                continue;
            };
            buf.clear();
            push_chain_rules(&rec, &mut buf);
            put(&buf)?;
        }
        put(&self.end)
    }
}

/// Adds `lines` (rules, each ending in a newline) at the end of `table`'s
/// section of a restore text, before its `COMMIT`; adds the section if the
/// text has none. For jumps from built-in chains, which may go anywhere
/// after the declarations.
pub fn add_table_rules(text: &mut String, table: Table, lines: &str) {
    if lines.is_empty() {
        return;
    }
    let header = format!("*{}\n", table.as_str());
    let section = if text.starts_with(&header) {
        Some(0)
    } else {
        text.find(&format!("\n{header}")).map(|at| at + 1)
    };
    let commit = section.and_then(|start| {
        let from = start + header.len();
        if text[from..].starts_with("COMMIT\n") {
            return Some(from);
        }
        text[from..].find("\nCOMMIT\n").map(|at| from + at + 1)
    });
    match commit {
        Some(at) => text.insert_str(at, lines),
        None => {
            text.push_str(&header);
            text.push_str(lines);
            text.push_str("COMMIT\n");
        }
    }
}

/// The bytes [`push_chain_rules`] writes for `rec`.
fn chain_rules_len(rec: &PortRecord) -> usize {
    rec.chains
        .iter()
        .map(|(c, rules)| {
            rules
                .iter()
                .map(|r| "-A ".len() + c.len() + 1 + r.len() + 1)
                .sum::<usize>()
        })
        .sum()
}

/// `-A CHAIN rule` lines of a service port's own chains.
fn push_chain_rules(rec: &PortRecord, out: &mut String) {
    for (chain, rules) in &rec.chains {
        for r in rules {
            out.push_str("-A ");
            out.push_str(chain);
            out.push(' ');
            out.push_str(r);
            out.push('\n');
        }
    }
}

/// Makes room for `need` more bytes in `buf`, which holds the text of `done`
/// of `total` items: once the first items show their size, by what the rest
/// needs at the average so far (at least a quarter more, for uneven items),
/// not by doubling, whose slack would be up to half of the largest
/// allocation of a sync.
fn reserve_by_average(buf: &mut String, need: usize, done: usize, total: usize) {
    if buf.capacity() - buf.len() >= need {
        return;
    }
    let additional = if done < 16 {
        need.max(buf.len())
    } else {
        let rest = buf.len() / done * total.saturating_sub(done);
        need.max(rest + rest / 32).max(buf.len() / 4)
    };
    buf.reserve_exact(additional);
}

/// Plans the rules of one IP family.
#[derive(Clone, Debug)]
pub struct Planner {
    cfg: PlannerConfig,
    detect: Detect,
    mark: String,
    probabilities: Vec<String>,
}

impl Planner {
    pub fn new(cfg: PlannerConfig) -> Result<Planner, PlanError> {
        if cfg.masquerade_bit > 31 {
            return Err(PlanError::MasqueradeBit(cfg.masquerade_bit));
        }
        let valid_iface = |s: &str| {
            !s.is_empty()
                && s.len() <= 15
                && s.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'/')
        };
        let detect = match &cfg.local_detector {
            LocalDetector::None => Detect::None,
            LocalDetector::Cidrs(cidrs) => cidrs
                .iter()
                .find(|c| IpFamily::of_net(c) == cfg.family)
                .map(|c| Detect::Source(c.trunc().to_string()))
                .unwrap_or(Detect::None),
            LocalDetector::Bridge(name) => {
                if !valid_iface(name) {
                    return Err(PlanError::Interface(name.clone()));
                }
                Detect::Interface(name.clone())
            }
            LocalDetector::InterfacePrefix(prefix) => {
                // The `+` wildcard makes the name one character longer.
                if !valid_iface(prefix) || prefix.len() > 14 {
                    return Err(PlanError::Interface(prefix.clone()));
                }
                Detect::Interface(format!("{prefix}+"))
            }
        };
        let mark = format!("{:#x}", 1u32 << cfg.masquerade_bit);
        let probabilities = (0..=PRECOMPUTED_PROBABILITIES)
            .map(|n| {
                if n == 0 {
                    String::new()
                } else {
                    format!("{:.10}", 1.0 / n as f64)
                }
            })
            .collect();
        Ok(Planner {
            cfg,
            detect,
            mark,
            probabilities,
        })
    }

    pub fn config(&self) -> &PlannerConfig {
        &self.cfg
    }

    /// The jumps from built-in chains to ours (upstream's `iptablesJumpChains`,
    /// plus kubelet's KUBE-FIREWALL jumps when localhost NodePorts are on).
    pub fn jump_rules(&self) -> Vec<JumpSpec> {
        let new = || {
            vec![
                "-m".into(),
                "conntrack".into(),
                "--ctstate".into(),
                "NEW".into(),
            ]
        };
        let j = |table, to, from, comment, extra_args| JumpSpec {
            table,
            from,
            to,
            extra_args,
            comment,
        };
        let ext = "kubernetes externally-visible service portals";
        let portals = "kubernetes service portals";
        let lbfw = "kubernetes load balancer firewall";
        let mut v = vec![
            j(Table::Filter, KUBE_EXTERNAL_SERVICES, "INPUT", ext, new()),
            j(Table::Filter, KUBE_EXTERNAL_SERVICES, "FORWARD", ext, new()),
            j(
                Table::Filter,
                KUBE_NODEPORTS,
                "INPUT",
                "kubernetes health check service ports",
                vec![],
            ),
            j(Table::Filter, KUBE_SERVICES, "FORWARD", portals, new()),
            j(Table::Filter, KUBE_SERVICES, "OUTPUT", portals, new()),
            j(
                Table::Filter,
                KUBE_FORWARD,
                "FORWARD",
                "kubernetes forwarding rules",
                vec![],
            ),
            j(Table::Filter, KUBE_PROXY_FIREWALL, "INPUT", lbfw, new()),
            j(Table::Filter, KUBE_PROXY_FIREWALL, "OUTPUT", lbfw, new()),
            j(Table::Filter, KUBE_PROXY_FIREWALL, "FORWARD", lbfw, new()),
            j(Table::Nat, KUBE_SERVICES, "OUTPUT", portals, vec![]),
            j(Table::Nat, KUBE_SERVICES, "PREROUTING", portals, vec![]),
            j(
                Table::Nat,
                KUBE_POSTROUTING,
                "POSTROUTING",
                "kubernetes postrouting rules",
                vec![],
            ),
        ];
        if self.cfg.effective_localhost_nodeports() {
            v.push(j(Table::Filter, KUBELET_FIREWALL, "INPUT", "", vec![]));
            v.push(j(Table::Filter, KUBELET_FIREWALL, "OUTPUT", "", vec![]));
        }
        v
    }

    fn ctx(&self, large: bool) -> Ctx<'_> {
        Ctx {
            cfg: &self.cfg,
            detect: &self.detect,
            probabilities: &self.probabilities,
            large,
        }
    }

    /// The fixed chains (besides the dispatch chains) and their rules.
    fn fixed_chains(&self) -> Vec<(Table, &'static str, Vec<String>)> {
        let mark = &self.mark;
        let mut forward = Vec::with_capacity(3);
        if !self.cfg.conntrack_tcp_be_liberal {
            forward.push("-m conntrack --ctstate INVALID -j DROP".to_string());
        }
        forward.push(format!(
            "-m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
        ));
        forward.push(
            "-m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
                .to_string(),
        );
        let mut v = vec![
            (Table::Filter, KUBE_FORWARD, forward),
            (Table::Filter, CANARY, vec![]),
        ];
        if self.cfg.effective_localhost_nodeports() {
            // Mitigates the route_localnet hole (kubernetes#90259); kubelet
            // writes the same rule.
            v.push((
                Table::Filter,
                KUBELET_FIREWALL,
                vec!["-m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP".to_string()],
            ));
        }
        let masq = if self.cfg.random_fully {
            "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
        } else {
            "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE"
        };
        v.push((
            Table::Nat,
            KUBE_POSTROUTING,
            vec![
                format!("-m mark ! --mark {mark}/{mark} -j RETURN"),
                format!("-j MARK --xor-mark {mark}"),
                masq.to_string(),
            ],
        ));
        v.push((
            Table::Nat,
            MARK_MASQ,
            vec![format!("-j MARK --or-mark {mark}")],
        ));
        v.push((Table::Nat, CANARY, vec![]));
        v
    }

    /// The last rules of nat KUBE-SERVICES: the jump to KUBE-NODEPORTS.
    fn nodeport_tail(&self) -> Vec<String> {
        let c =
            comment("kubernetes service nodeports; NOTE: this must be the last rule in this chain");
        let v6 = self.cfg.family == IpFamily::V6;
        let localhost = self.cfg.effective_localhost_nodeports();
        match &self.cfg.nodeport_addresses {
            NodePortAddresses::AllLocal => {
                let block = if v6 {
                    " ! -d ::1/128"
                } else if !localhost {
                    " ! -d 127.0.0.0/8"
                } else {
                    ""
                };
                vec![format!(
                    "{c} -m addrtype --dst-type LOCAL{block} -j {KUBE_NODEPORTS}"
                )]
            }
            NodePortAddresses::Ips(ips) => {
                let mut seen = BTreeSet::new();
                ips.iter()
                    .filter(|ip| IpFamily::of(ip) == self.cfg.family)
                    .filter(|ip| !ip.is_loopback() || (!v6 && localhost))
                    .filter(|ip| seen.insert(**ip))
                    .map(|ip| format!("{c} -d {ip} -j {KUBE_NODEPORTS}"))
                    .collect()
            }
        }
    }

    fn is_large(&self, endpoints: usize) -> bool {
        endpoints > self.cfg.large_cluster_endpoint_threshold
    }

    /// Writes everything kproxy owns and deletes owned service chains in
    /// `existing` that are no longer wanted.
    pub fn plan_full(&self, ports: &FamilyState, existing: &ExistingChains) -> Plan {
        let mut body = String::new();
        let parts = self.full(ports, existing, Some(&mut body));
        // Head in front of the body, in the body's buffer: one move of the
        // body instead of a second copy of it.
        let mut text = body;
        text.reserve_exact(parts.head.len() + parts.end.len());
        text.insert_str(0, &parts.head);
        text.push_str(&parts.end);
        Plan {
            kind: SyncKind::Full,
            text,
            counts: parts.counts,
            update: AppliedUpdate::Replace(Box::new(parts.applied)),
        }
    }

    /// [`Planner::plan_full`] without holding the text: see [`StreamedPlan`].
    pub fn plan_full_streamed<'a>(
        &'a self,
        ports: &'a FamilyState,
        existing: &ExistingChains,
    ) -> StreamedPlan<'a> {
        let parts = self.full(ports, existing, None);
        StreamedPlan {
            planner: self,
            ports,
            large: parts.large,
            head: parts.head,
            body_len: parts.body_len,
            end: parts.end,
            counts: parts.counts,
            update: AppliedUpdate::Replace(Box::new(parts.applied)),
        }
    }

    /// A full plan in parts; the service ports' chain rules (the body) are
    /// appended to `body` if given.
    fn full(
        &self,
        ports: &FamilyState,
        existing: &ExistingChains,
        mut body: Option<&mut String>,
    ) -> FullParts {
        let endpoints: usize = ports.values().map(|sp| sp.endpoints.all.len()).sum();
        let large = self.is_large(endpoints);
        let ctx = self.ctx(large);
        let fixed = self.fixed_chains();
        let tail = self.nodeport_tail();

        let mut counts = PlanCounts::default();
        let mut totals = Totals {
            endpoints,
            ..Totals::default()
        };
        let mut bufs: BTreeMap<Dispatch, String> =
            Dispatch::ALL.iter().map(|d| (*d, String::new())).collect();
        // The service ports' own chain rules are the bulk of the text and
        // come last: each port is rendered, its chain rules written to
        // `body` and the port kept only as an `AppliedPort`, so the rule
        // texts of all ports never exist as separate strings at once.
        let mut rendered = 0usize;
        let mut body_len = 0usize;
        let records: BTreeMap<ServicePortName, AppliedPort> = ports
            .iter()
            .filter_map(|(name, sp)| {
                let rec = port::render(&ctx, sp)?;
                for (d, spec) in &rec.dispatch {
                    if let Some(b) = bufs.get_mut(d) {
                        b.push_str("-A ");
                        b.push_str(d.chain());
                        b.push(' ');
                        b.push_str(spec);
                        b.push('\n');
                    }
                }
                let len = chain_rules_len(&rec);
                body_len += len;
                if let Some(body) = body.as_deref_mut() {
                    reserve_by_average(body, len, rendered, ports.len());
                    push_chain_rules(&rec, body);
                }
                rendered += 1;
                totals.nat_rules += rec.nat_rules();
                totals.filter_rules += rec.filter_rules();
                totals.no_local_internal += usize::from(rec.no_local_internal);
                totals.no_local_external += usize::from(rec.no_local_external);
                Some((name.clone(), AppliedPort::of(&rec)))
            })
            .collect();
        // Only needed when the kernel holds service chains (not on a first
        // sync into empty tables): skip building a set of every chain name.
        let check_stale = existing
            .0
            .iter()
            .any(|(t, name)| *t == Table::Nat && is_service_chain(name));
        let wanted: BTreeSet<&str> = if check_stale {
            records
                .values()
                .flat_map(|rec| rec.chains().iter().map(|c| c.name()))
                .collect()
        } else {
            BTreeSet::new()
        };
        let stale: Vec<&str> = existing
            .0
            .iter()
            .filter(|(t, name)| {
                *t == Table::Nat && is_service_chain(name) && !wanted.contains(name.as_str())
            })
            .map(|(_, name)| name.as_str())
            .collect();

        let chain_count: usize = records.values().map(|r| r.chains().len()).sum();
        let mut out = String::with_capacity(
            4096 + bufs.values().map(String::len).sum::<usize>() + (chain_count + stale.len()) * 40,
        );
        let declare = |out: &mut String, name: &str, counts: &mut PlanCounts| {
            let _ = writeln!(out, ":{name} - [0:0]");
            counts.chains_written += 1;
        };
        let mut rules_written = 0usize;

        out.push_str("*filter\n");
        for d in Dispatch::ALL.iter().filter(|d| !d.is_nat()) {
            declare(&mut out, d.chain(), &mut counts);
        }
        for (_, c, _) in fixed.iter().filter(|(t, _, _)| *t == Table::Filter) {
            declare(&mut out, c, &mut counts);
        }
        for d in Dispatch::ALL.iter().filter(|d| !d.is_nat()) {
            if let Some(b) = bufs.get(d) {
                out.push_str(b);
            }
        }
        for (_, c, rules) in fixed.iter().filter(|(t, _, _)| *t == Table::Filter) {
            for r in rules {
                let _ = writeln!(out, "-A {c} {r}");
                totals.filter_rules += 1;
            }
        }
        out.push_str("COMMIT\n*nat\n");
        // Declared in byte order: iptables-nft-restore (1.8.9) keeps a
        // table's chains sorted by name and finds each new one's place
        // walking back from the last, so declarations in any other order
        // cost O(chains²) — at 10k services 7 s instead of 3.4 s for the
        // whole restore (benches/README.md).
        let mut nat_chains: Vec<&str> = Dispatch::ALL
            .iter()
            .filter(|d| d.is_nat())
            .map(|d| d.chain())
            .chain(
                fixed
                    .iter()
                    .filter(|(t, _, _)| *t == Table::Nat)
                    .map(|(_, c, _)| *c),
            )
            .chain(
                records
                    .values()
                    .flat_map(|rec| rec.chains().iter().map(|c| c.name())),
            )
            .collect();
        counts.chains_written += nat_chains.len();
        nat_chains.extend(stale.iter().copied());
        nat_chains.sort_unstable();
        for name in nat_chains {
            out.push(':');
            out.push_str(name);
            out.push_str(" - [0:0]\n");
        }
        for (_, c, rules) in fixed.iter().filter(|(t, _, _)| *t == Table::Nat) {
            for r in rules {
                let _ = writeln!(out, "-A {c} {r}");
                totals.nat_rules += 1;
            }
        }
        if let Some(b) = bufs.get(&Dispatch::NatServices) {
            out.push_str(b);
        }
        for r in &tail {
            let _ = writeln!(out, "-A {KUBE_SERVICES} {r}");
            totals.nat_rules += 1;
        }
        if let Some(b) = bufs.get(&Dispatch::NatNodePorts) {
            out.push_str(b);
        }
        let mut end = String::with_capacity(
            stale.iter().map(|n| n.len() + 4).sum::<usize>() + "COMMIT\n".len(),
        );
        for name in &stale {
            let _ = writeln!(end, "-X {name}");
        }
        end.push_str("COMMIT\n");
        rules_written += totals.nat_rules + totals.filter_rules;

        counts.chains_deleted = stale.len();
        counts.rules_written = rules_written;
        counts.nat_rules = totals.nat_rules;
        counts.filter_rules = totals.filter_rules;
        counts.no_local_internal = totals.no_local_internal;
        counts.no_local_external = totals.no_local_external;
        let applied = Applied {
            config: self.cfg.clone(),
            large_cluster: large,
            fixed,
            tail,
            ports: records,
            totals,
        };
        FullParts {
            large,
            head: out,
            body_len,
            end,
            counts,
            applied,
        }
    }

    /// Brings the kernel from `previous` to `ports`, touching only the
    /// service ports in `changed`. Falls back to a full plan when the
    /// family-wide config or the large-cluster mode differs from `previous`.
    pub fn plan_partial(
        &self,
        previous: &Applied,
        ports: &FamilyState,
        changed: &BTreeSet<ServicePortName>,
    ) -> Plan {
        if previous.config != self.cfg {
            return self.plan_full(ports, &previous.existing_chains());
        }
        let mut totals = previous.totals;
        for name in changed {
            if let Some(old) = previous.ports.get(name) {
                totals.endpoints -= old.endpoints();
            }
            if let Some(sp) = ports.get(name) {
                totals.endpoints += sp.endpoints.all.len();
            }
        }
        let large = self.is_large(totals.endpoints);
        if large != previous.large_cluster {
            return self.plan_full(ports, &previous.existing_chains());
        }
        let ctx = self.ctx(large);
        // Each changed port: its record as applied, and as rendered now
        // (with texts, to write) plus that rendering's compact form (to
        // compare with the applied one and to keep).
        let mut patch = Vec::with_capacity(changed.len());
        for name in changed {
            let old = previous.ports.get(name);
            let new = ports
                .get(name)
                .and_then(|sp| port::render(&ctx, sp))
                .map(|rec| {
                    let compact = AppliedPort::of(&rec);
                    (rec, compact)
                });
            match (old, &new) {
                (None, None) => continue,
                (Some(o), Some((_, n))) if o == n => continue,
                _ => {}
            }
            patch.push((name.clone(), old, new));
        }

        let mut counts = PlanCounts::default();
        let mut filter_text = String::new();
        let mut nat_decl = String::new();
        let mut nat_del = String::new();
        let mut nat_rules = String::new();
        let mut nat_add = String::new();
        let mut nat_x = String::new();
        let (empty, empty_compact) = (PortRecord::default(), AppliedPort::default());
        for (_, old, new) in &patch {
            let o: &AppliedPort = old.unwrap_or(&empty_compact);
            let (n, nc): (&PortRecord, &AppliedPort) = match new {
                Some((rec, compact)) => (rec, compact),
                None => (&empty, &empty_compact),
            };
            totals.nat_rules = totals.nat_rules - o.nat_rules() + nc.nat_rules();
            totals.filter_rules = totals.filter_rules - o.filter_rules() + nc.filter_rules();
            totals.no_local_internal = totals.no_local_internal
                - usize::from(o.no_local_internal())
                + usize::from(nc.no_local_internal());
            totals.no_local_external = totals.no_local_external
                - usize::from(o.no_local_external())
                + usize::from(nc.no_local_external());

            for (d, spec) in o.dispatch() {
                if !nc.has_dispatch(d, spec) {
                    let buf = if d.is_nat() {
                        &mut nat_del
                    } else {
                        &mut filter_text
                    };
                    let _ = writeln!(buf, "-D {} {spec}", d.chain());
                    counts.rules_deleted += 1;
                }
            }
            // `nc.chains()` are the digests of `n.chains`, in the same order.
            for ((name, rules), digest) in n.chains.iter().zip(nc.chains()) {
                if o.chains().contains(digest) {
                    continue;
                }
                let _ = writeln!(nat_decl, ":{name} - [0:0]");
                counts.chains_written += 1;
                for r in rules {
                    let _ = writeln!(nat_rules, "-A {name} {r}");
                    counts.rules_written += 1;
                }
            }
            for name in o.chains().iter().map(ChainDigest::name) {
                if !n.chains.iter().any(|(nn, _)| nn == name) {
                    // Flush first: its rules may jump to other chains being deleted.
                    let _ = writeln!(nat_decl, ":{name} - [0:0]");
                    let _ = writeln!(nat_x, "-X {name}");
                    counts.chains_deleted += 1;
                }
            }
            for (d, spec) in &n.dispatch {
                if !o.has_dispatch(*d, spec) {
                    match d {
                        // Keeps the NodePort jump the last rule.
                        Dispatch::NatServices => {
                            let _ = writeln!(nat_add, "-I {KUBE_SERVICES} 1 {spec}");
                        }
                        Dispatch::NatNodePorts => {
                            let _ = writeln!(nat_add, "-A {KUBE_NODEPORTS} {spec}");
                        }
                        _ => {
                            let _ = writeln!(filter_text, "-A {} {spec}", d.chain());
                        }
                    }
                    counts.rules_written += 1;
                }
            }
        }
        let mut out = String::with_capacity(
            filter_text.len()
                + nat_decl.len()
                + nat_del.len()
                + nat_rules.len()
                + nat_add.len()
                + nat_x.len()
                + 32,
        );
        if !filter_text.is_empty() {
            // Deletes before adds, so a rule replaced by an equal-looking one
            // of another port never collides.
            let (dels, adds): (Vec<&str>, Vec<&str>) =
                filter_text.lines().partition(|l| l.starts_with("-D "));
            out.push_str("*filter\n");
            for l in dels.into_iter().chain(adds) {
                out.push_str(l);
                out.push('\n');
            }
            out.push_str("COMMIT\n");
        }
        if !(nat_decl.is_empty() && nat_del.is_empty() && nat_add.is_empty()) {
            out.push_str("*nat\n");
            out.push_str(&nat_decl);
            out.push_str(&nat_del);
            out.push_str(&nat_rules);
            out.push_str(&nat_add);
            out.push_str(&nat_x);
            out.push_str("COMMIT\n");
        }
        counts.nat_rules = totals.nat_rules;
        counts.filter_rules = totals.filter_rules;
        counts.no_local_internal = totals.no_local_internal;
        counts.no_local_external = totals.no_local_external;
        Plan {
            kind: SyncKind::Partial,
            text: out,
            counts,
            update: AppliedUpdate::Patch(AppliedPatch {
                ports: patch
                    .into_iter()
                    .map(|(name, _, new)| (name, new.map(|(_, compact)| compact)))
                    .collect(),
                totals,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rules_go_before_their_sections_commit() {
        let mut text =
            "*filter\n:A - [0:0]\nCOMMIT\n*nat\n:B - [0:0]\n-A B -j RETURN\nCOMMIT\n".to_string();
        add_table_rules(&mut text, Table::Nat, "-I OUTPUT -j B\n");
        add_table_rules(&mut text, Table::Filter, "-I INPUT -j A\n");
        add_table_rules(&mut text, Table::Filter, "");
        assert_eq!(
            text,
            "*filter\n:A - [0:0]\n-I INPUT -j A\nCOMMIT\n*nat\n:B - [0:0]\n-A B -j RETURN\n-I OUTPUT -j B\nCOMMIT\n"
        );
        // A table the text lacks gets its own section; an empty text too.
        let mut only_nat = "*nat\nCOMMIT\n".to_string();
        add_table_rules(&mut only_nat, Table::Filter, "-I INPUT -j A\n");
        assert_eq!(only_nat, "*nat\nCOMMIT\n*filter\n-I INPUT -j A\nCOMMIT\n");
        let mut empty = String::new();
        add_table_rules(&mut empty, Table::Nat, "-I OUTPUT -j B\n");
        assert_eq!(empty, "*nat\n-I OUTPUT -j B\nCOMMIT\n");
    }
}
