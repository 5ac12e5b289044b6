//! [`IptablesProxier`]: the `kproxy_model::Proxier` of iptables mode.
//!
//! One [`FamilyProxier`] per IP family, each with its [`Planner`], the
//! [`Applied`] record of what it last wrote (none until the first successful
//! full sync) and a [`RuleApplier`] that talks to the kernel. A sync is full
//! on the first call, after any failure, when `changes.force_full` is set,
//! when the canary chain is gone (checked at most once per second, after a
//! partial restore, which is then followed at once by a full one), and
//! after a change of the family-wide planner config (including the node's
//! pod CIDRs); otherwise it is partial. Full syncs also ensure the jumps from
//! the built-in chains, before their restore. The first sync adopts what a
//! previous run left: it reads `iptables-save` of nat and filter so the
//! first full plan deletes stale owned chains, without a flush, and leaves
//! out every chain whose rules the kernel already holds (compared in their
//! normalised form, see [`crate::normalize`]): unchanged chains are neither
//! redeclared nor refilled, so their packet counters survive a restart. The [`Applied`]
//! record is the full plan's either way. Every other full sync (nothing to
//! adopt) streams its plan into iptables-restore ([`StreamedPlan`]) instead
//! of holding its text.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kproxy_model::{
    Changes, IpFamily, Protocol, Proxier, ProxyState, ServicePortName, SyncFailure, SyncKind,
    SyncReport,
};
use tracing::{debug, info, warn};

use crate::conntrack::{ConntrackCleaner, UdpServiceTarget};
use crate::normalize::{held_chains_in_save, is_dispatch, unchanged_chains, HeldChains};
use crate::planner::{
    add_table_rules, is_service_chain, Applied, AppliedUpdate, ExistingChains, JumpSpec,
    LocalDetector, Plan, PlanCounts, PlanError, Planner, PlannerConfig, StreamedPlan, Table,
    CANARY,
};
use crate::runner::{
    BackendPreference, Iptables, IptablesError, JumpRule, Position, RestoreOutcome, StdinSource,
};

/// Why the applier failed, reduced to what the proxier reports.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApplyError {
    pub message: String,
    /// The refused restore input line (1-based number and text), if known.
    pub line: Option<(usize, String)>,
}

impl From<IptablesError> for ApplyError {
    fn from(e: IptablesError) -> Self {
        ApplyError {
            line: e.failed_line().map(|l| (l.number, l.text.clone())),
            message: e.to_string(),
        }
    }
}

/// The kernel seam of one family: implemented for the runner's [`Iptables`],
/// and by a recording fake in tests.
pub trait RuleApplier: Send {
    /// `iptables-restore --noflush --counters` of what `input` writes.
    fn restore(&self, input: &dyn StdinSource) -> Result<RestoreOutcome, ApplyError>;
    /// `iptables-save -t table`.
    fn save(&self, table: Table) -> Result<String, ApplyError>;
    /// The jumps from built-in chains their chain's listing lacks (see
    /// [`MissingJumps`](crate::runner::MissingJumps)).
    fn missing_jump_rules(&self, rules: &[JumpSpec]) -> Result<MissingJumpSpecs, ApplyError>;
    /// Adds the missing jumps from built-in chains, one command each.
    fn ensure_jump_rules(&self, rules: &[JumpSpec]) -> Result<(), ApplyError>;
    fn chain_exists(&self, table: Table, chain: &str) -> Result<bool, ApplyError>;
}

/// [`crate::runner::MissingJumps`] as planner jumps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MissingJumpSpecs {
    /// Nothing in their chain jumps to their target: they can go into the
    /// restore.
    pub absent: Vec<JumpSpec>,
    /// A differently spelled rule jumps to their target: `-C` decides.
    pub unsure: Vec<JumpSpec>,
}

/// Turns a planner jump into the runner's rule: extra matches, upstream's
/// comment (one argv entry, no shell quoting), the jump; prepended as upstream.
pub fn jump_rule(spec: &JumpSpec) -> JumpRule {
    let mut rulespec = spec.extra_args.clone();
    if !spec.comment.is_empty() {
        rulespec.extend([
            "-m".into(),
            "comment".into(),
            "--comment".into(),
            spec.comment.to_string(),
        ]);
    }
    rulespec.extend(["-j".into(), spec.to.to_string()]);
    JumpRule {
        table: spec.table.as_str().to_string(),
        chain: spec.from.to_string(),
        position: Position::Prepend,
        rulespec,
    }
}

impl RuleApplier for Iptables {
    fn restore(&self, input: &dyn StdinSource) -> Result<RestoreOutcome, ApplyError> {
        Ok(Iptables::restore_from(self, input)?)
    }

    fn save(&self, table: Table) -> Result<String, ApplyError> {
        Ok(Iptables::save(self, table.as_str())?)
    }

    fn missing_jump_rules(&self, specs: &[JumpSpec]) -> Result<MissingJumpSpecs, ApplyError> {
        let rules: Vec<JumpRule> = specs.iter().map(jump_rule).collect();
        let missing = Iptables::missing_jump_rules(self, &rules)?;
        let specs_of = |found: &[&JumpRule]| -> Vec<JumpSpec> {
            rules
                .iter()
                .zip(specs)
                .filter(|(r, _)| found.iter().any(|f| std::ptr::eq(*f, *r)))
                .map(|(_, s)| s.clone())
                .collect()
        };
        Ok(MissingJumpSpecs {
            absent: specs_of(&missing.absent),
            unsure: specs_of(&missing.unsure),
        })
    }

    fn ensure_jump_rules(&self, rules: &[JumpSpec]) -> Result<(), ApplyError> {
        let rules: Vec<JumpRule> = rules.iter().map(jump_rule).collect();
        Iptables::ensure_jump_rules(self, &rules)?;
        Ok(())
    }

    fn chain_exists(&self, table: Table, chain: &str) -> Result<bool, ApplyError> {
        Ok(Iptables::chain_exists(self, table.as_str(), chain)?)
    }
}

/// Deletes conntrack flows of UDP service ports that no longer lead to a
/// serving endpoint.
pub trait FlowCleaner: Send {
    fn delete_stale_udp(
        &self,
        family: IpFamily,
        targets: &[UdpServiceTarget],
    ) -> Result<usize, String>;
}

impl FlowCleaner for ConntrackCleaner {
    fn delete_stale_udp(
        &self,
        family: IpFamily,
        targets: &[UdpServiceTarget],
    ) -> Result<usize, String> {
        ConntrackCleaner::delete_stale_udp(self, family, targets).map_err(|e| e.to_string())
    }
}

/// The settings of one family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyConfig {
    /// `node_pod_cidrs` is filled from the Node on every sync.
    pub planner: PlannerConfig,
    /// `--detect-local-mode=NodeCIDR`: the local detector is the node's pod
    /// CIDR of this family, taken from the Node on every sync.
    pub detect_local_from_node: bool,
}

impl FamilyConfig {
    pub fn new(planner: PlannerConfig) -> Self {
        FamilyConfig {
            planner,
            detect_local_from_node: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxierError {
    #[error("invalid iptables config: {0}")]
    Config(#[from] PlanError),
    #[error("iptables for {family}: {source}")]
    Iptables {
        family: IpFamily,
        #[source]
        source: IptablesError,
    },
}

const CANARY_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// What one family's sync did.
struct FamilyOutcome {
    kind: SyncKind,
    rules_written: usize,
    nat_rules: usize,
    filter_rules: usize,
    no_local_internal: usize,
    no_local_external: usize,
    lock_wait: Option<Duration>,
    failure: Option<SyncFailure>,
}

/// The proxier of one IP family.
pub struct FamilyProxier {
    config: FamilyConfig,
    planner: Planner,
    applier: Box<dyn RuleApplier>,
    applied: Option<Applied>,
    /// Chains found by `iptables-save` before the first successful full sync.
    adopted: Option<ExistingChains>,
    /// Their rules (as `iptables-save` prints them), for that full sync to
    /// leave unchanged chains alone. Dropped after it, and after a failed
    /// apply (the retry reads the kernel again).
    kernel_rules: Option<HeldChains>,
    needs_full: bool,
    /// Set when a full restore failed on a `-X`: someone else references a
    /// stale chain, so the retry leaves stale chains alone.
    skip_stale_deletion: bool,
    last_canary_check: Option<Instant>,
    canary_interval: Duration,
}

impl FamilyProxier {
    pub fn new(config: FamilyConfig, applier: Box<dyn RuleApplier>) -> Result<Self, PlanError> {
        let planner = Planner::new(config.planner.clone())?;
        Ok(FamilyProxier {
            config,
            planner,
            applier,
            applied: None,
            adopted: None,
            kernel_rules: None,
            needs_full: true,
            skip_stale_deletion: false,
            last_canary_check: None,
            canary_interval: CANARY_CHECK_INTERVAL,
        })
    }

    pub fn family(&self) -> IpFamily {
        self.config.planner.family
    }

    /// What this family last applied successfully.
    pub fn applied(&self) -> Option<&Applied> {
        self.applied.as_ref()
    }

    /// The planner config for this sync: the static one plus what comes from the Node.
    fn effective_config(&self, state: &ProxyState) -> PlannerConfig {
        let family = self.family();
        let mut cfg = self.config.planner.clone();
        let cidrs: Vec<_> = state
            .node
            .pod_cidrs
            .iter()
            .filter(|c| IpFamily::of_net(c) == family)
            .copied()
            .collect();
        if self.config.detect_local_from_node {
            cfg.local_detector = match cidrs.first() {
                Some(c) => LocalDetector::Cidrs(vec![*c]),
                None => LocalDetector::None,
            };
        }
        cfg.node_pod_cidrs = cidrs;
        cfg
    }

    fn canary_gone(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last_canary_check
            .is_some_and(|t| now.duration_since(t) < self.canary_interval)
        {
            return false;
        }
        self.last_canary_check = Some(now);
        for table in [Table::Nat, Table::Filter] {
            match self.applier.chain_exists(table, CANARY) {
                Ok(true) => {}
                Ok(false) => {
                    info!(family = %self.family(), table = table.as_str(), "canary chain gone: tables were flushed, doing a full sync");
                    return true;
                }
                Err(e) => {
                    warn!(family = %self.family(), error = %e, "cannot check the canary chain; doing a full sync");
                    return true;
                }
            }
        }
        false
    }

    /// Reads what a previous run left, once, before the first full sync.
    fn adopt(&mut self) {
        if self.adopted.is_some() || self.applied.is_some() {
            return;
        }
        let mut existing = ExistingChains::default();
        let mut rules = HeldChains::new();
        for table in [Table::Nat, Table::Filter] {
            match self.applier.save(table) {
                Ok(text) => {
                    existing.add_save(table, &text);
                    rules.extend(held_chains_in_save(table, &text));
                }
                Err(e) => warn!(family = %self.family(), table = table.as_str(), error = %e,
                    "cannot read existing rules; stale chains of a previous run stay until the next restart"),
            }
        }
        self.adopted = Some(existing);
        self.kernel_rules = Some(rules);
    }

    /// Whether this full sync may find chains to adopt: the kernel (as read
    /// before the first full sync) holds a dispatch or service chain, i.e.
    /// kube-proxy or kproxy ran before. Fixed chains alone (kubelet's
    /// KUBE-FIREWALL) are rewritten as every full sync does; without
    /// chains to adopt the plan is streamed and its text never held.
    fn may_adopt(&self) -> bool {
        self.kernel_rules.as_ref().is_some_and(|k| {
            k.keys()
                .any(|(t, c)| is_service_chain(c) || is_dispatch(*t, c))
        })
    }

    /// Leaves the chains the kernel already holds out of a full plan.
    fn skip_unchanged(&self, plan: &mut Plan) {
        let (Some(kernel), AppliedUpdate::Replace(_)) = (&self.kernel_rules, &plan.update) else {
            return;
        };
        // The desired rules come from the plan's text (the Applied record
        // keeps no rule texts), borrowed, and go before the text is edited.
        let (unchanged, desired_chains) = {
            let desired = plan.rules_by_chain();
            (unchanged_chains(&desired, kernel), desired.len())
        };
        let (text, rules, chains) = drop_chains(std::mem::take(&mut plan.text), &unchanged);
        plan.text = text;
        plan.counts.rules_written = plan.counts.rules_written.saturating_sub(rules);
        plan.counts.chains_written = plan.counts.chains_written.saturating_sub(chains);
        info!(
            family = %self.family(),
            chains_adopted = unchanged.len(),
            chains_rewritten = desired_chains - unchanged.len(),
            rules_adopted = rules,
            rules_written = plan.counts.rules_written,
            "first full sync: adopted the unchanged chains in place, rewriting only the ones that differ"
        );
    }

    fn sync(&mut self, state: &ProxyState, changes: &Changes) -> FamilyOutcome {
        let family = self.family();
        let cfg = self.effective_config(state);
        if cfg != *self.planner.config() {
            match Planner::new(cfg) {
                // A new config makes the partial planner fall back to full.
                Ok(p) => self.planner = p,
                Err(e) => {
                    warn!(%family, error = %e, "node-derived iptables config is invalid; keeping the previous one")
                }
            }
        }
        let ports = state.family(family);
        let changed: BTreeSet<ServicePortName> = changes
            .ports
            .iter()
            .filter(|(f, _)| *f == family)
            .map(|(_, n)| n.clone())
            .collect();

        let full = self.needs_full || changes.force_full || self.applied.is_none();
        let mut plan = match (&self.applied, full) {
            (Some(prev), false) => Pending::Text(self.planner.plan_partial(prev, ports, &changed)),
            _ => {
                self.adopt();
                let mut existing = ExistingChains::default();
                if !self.skip_stale_deletion {
                    if let Some(a) = &self.applied {
                        existing = a.existing_chains();
                    }
                    if let Some(adopted) = &self.adopted {
                        existing.0.extend(adopted.0.iter().cloned());
                    }
                }
                if self.may_adopt() {
                    let mut plan = self.planner.plan_full(ports, &existing);
                    self.skip_unchanged(&mut plan);
                    Pending::Text(plan)
                } else {
                    // Nothing to leave out: no need to hold the text.
                    Pending::Streamed(self.planner.plan_full_streamed(ports, &existing))
                }
            }
        };
        let kind = plan.kind();
        let counts = plan.counts();
        let mut outcome = FamilyOutcome {
            kind,
            rules_written: 0,
            nat_rules: self.applied.as_ref().map_or(0, |a| a.nat_rules()),
            filter_rules: self.applied.as_ref().map_or(0, |a| a.filter_rules()),
            no_local_internal: counts.no_local_internal,
            no_local_external: counts.no_local_external,
            lock_wait: None,
            failure: None,
        };
        // Missing jumps from the built-in chains go into the full restore:
        // one transaction instead of three commands per jump (≈ 4 ms each,
        // 15 jumps per family), and with iptables-legacy an insert into a
        // loaded table rewrites all of it (≈ 0.5 s per nat jump at 10k
        // services). Atomic too: traffic meets the rules complete. A jump
        // whose chain holds a differently spelled rule to the same target
        // is checked with `-C` instead, before the restore, so that it is
        // never added twice.
        let jump_failure = if kind == SyncKind::Full {
            match self.applier.missing_jump_rules(&self.planner.jump_rules()) {
                Ok(missing) => {
                    for table in [Table::Filter, Table::Nat] {
                        let lines: String = missing
                            .absent
                            .iter()
                            .filter(|j| j.table == table)
                            .map(|j| jump_rule(j).restore_line())
                            .collect();
                        plan.add_table_rules(table, &lines);
                    }
                    if missing.unsure.is_empty() {
                        None
                    } else {
                        self.applier.ensure_jump_rules(&missing.unsure).err()
                    }
                }
                Err(e) => Some(e),
            }
        } else {
            None
        };
        let bytes = plan.text_len();
        if bytes > 0 {
            debug!(%family, kind = kind.as_str(), bytes, "iptables-restore");
            match self.applier.restore(plan.input()) {
                Ok(o) => outcome.lock_wait = o.lock_wait,
                Err(e) => {
                    self.needs_full = true;
                    if self.applied.is_none() {
                        // Read the kernel again before the retry: what it
                        // holds may change in between.
                        self.adopted = None;
                        self.kernel_rules = None;
                    }
                    if kind == SyncKind::Full
                        && e.line.as_ref().is_some_and(|(_, l)| l.starts_with("-X "))
                    {
                        self.skip_stale_deletion = true;
                    }
                    let message = match &e.line {
                        Some((n, l)) => format!(
                            "{family}: iptables-restore refused line {n} ({l}): {}",
                            e.message
                        ),
                        None => format!("{family}: {}", e.message),
                    };
                    outcome.failure = Some(SyncFailure {
                        cause: "iptables-restore".into(),
                        message,
                    });
                    return outcome;
                }
            }
        }
        plan.into_update().apply_to(&mut self.applied);
        outcome.rules_written = counts.rules_written;
        outcome.nat_rules = counts.nat_rules;
        outcome.filter_rules = counts.filter_rules;
        self.needs_full = false;
        // After a partial restore, not before: the check reads the whole nat
        // table with iptables-legacy (≈ 0.1 s at 10k services), which should
        // not delay the change. Flushed tables get a full sync right away.
        if kind == SyncKind::Partial && self.canary_gone() {
            self.needs_full = true;
            return self.sync(state, changes);
        }
        if kind == SyncKind::Full {
            self.adopted = None;
            self.kernel_rules = None;
            self.skip_stale_deletion = false;
            self.last_canary_check = Some(Instant::now());
            if let Some(e) = jump_failure {
                self.needs_full = true;
                outcome.failure = Some(SyncFailure {
                    cause: "iptables-jump-rules".into(),
                    message: format!("{family}: {e}"),
                });
            }
        }
        outcome
    }
}

impl StdinSource for StreamedPlan<'_> {
    fn write_to(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        StreamedPlan::write_to(self, w)
    }
}

/// A plan as a sync applies it: with its text, or a full plan written
/// straight into iptables-restore's stdin.
enum Pending<'a> {
    Text(Plan),
    Streamed(StreamedPlan<'a>),
}

impl Pending<'_> {
    fn kind(&self) -> SyncKind {
        match self {
            Pending::Text(p) => p.kind,
            Pending::Streamed(_) => SyncKind::Full,
        }
    }

    fn counts(&self) -> PlanCounts {
        match self {
            Pending::Text(p) => p.counts,
            Pending::Streamed(p) => p.counts,
        }
    }

    fn text_len(&self) -> usize {
        match self {
            Pending::Text(p) => p.text.len(),
            Pending::Streamed(p) => p.text_len(),
        }
    }

    /// See [`add_table_rules`]; only for full plans.
    fn add_table_rules(&mut self, table: Table, lines: &str) {
        match self {
            Pending::Text(p) => add_table_rules(&mut p.text, table, lines),
            Pending::Streamed(p) => p.add_table_rules(table, lines),
        }
    }

    fn input(&self) -> &dyn StdinSource {
        match self {
            Pending::Text(p) => &p.text,
            Pending::Streamed(p) => p,
        }
    }

    fn into_update(self) -> AppliedUpdate {
        match self {
            Pending::Text(p) => p.update,
            Pending::Streamed(p) => p.update,
        }
    }
}

/// `text` (a full plan) without the declarations and rules of the chains in
/// `skip`, and without tables left empty; with the number of rules and
/// chains left out. `-X` lines (stale chains) always stay. Takes the text
/// so that nothing to skip (a first sync into empty tables) costs no copy.
fn drop_chains(text: String, skip: &BTreeSet<(Table, String)>) -> (String, usize, usize) {
    if skip.is_empty() {
        return (text, 0, 0);
    }
    let skipped = |table: Table| -> HashSet<&str> {
        skip.iter()
            .filter(|(t, _)| *t == table)
            .map(|(_, c)| c.as_str())
            .collect()
    };
    let (nat, filter, none) = (skipped(Table::Nat), skipped(Table::Filter), HashSet::new());
    // Grown as needed, not sized like `text`: after a restart most chains
    // are unchanged and the output is small, and a second buffer the size
    // of the plan (≈ 17 MB at 10k services) would sit beside it.
    let mut out = String::new();
    // The current table's header and its kept lines.
    let mut header = "";
    let mut body = String::new();
    let mut current = &none;
    let (mut rules, mut chains) = (0, 0);
    for line in text.lines() {
        if let Some(table) = line.strip_prefix('*') {
            header = line;
            body.clear();
            current = match table {
                "nat" => &nat,
                "filter" => &filter,
                _ => &none,
            };
            continue;
        }
        if line == "COMMIT" {
            if !body.is_empty() {
                out.push_str(header);
                out.push('\n');
                out.push_str(&body);
                out.push_str("COMMIT\n");
            }
            body.clear();
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            if decl
                .split_whitespace()
                .next()
                .is_some_and(|c| current.contains(c))
            {
                chains += 1;
                continue;
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            if current.contains(rule.split(' ').next().unwrap_or_default()) {
                rules += 1;
                continue;
            }
        }
        body.push_str(line);
        body.push('\n');
    }
    (out, rules, chains)
}

/// The UDP service ports among `changed` that now exist, as conntrack targets.
fn udp_targets(state: &ProxyState, family: IpFamily, changes: &Changes) -> Vec<UdpServiceTarget> {
    let ports = state.family(family);
    changes
        .ports
        .iter()
        .filter(|(f, n)| *f == family && n.protocol == Protocol::Udp)
        .filter_map(|(_, n)| ports.get(n))
        .map(|sp| {
            let mut service_addrs = vec![sp.cluster_ip];
            service_addrs.extend(sp.external_ips.iter().copied());
            service_addrs.extend(sp.load_balancer_ips.iter().copied());
            let mut serving: Vec<SocketAddr> = sp
                .endpoints
                .cluster
                .iter()
                .chain(sp.endpoints.local.iter())
                .map(|e| SocketAddr::new(e.ip, e.port))
                .collect();
            serving.sort();
            serving.dedup();
            UdpServiceTarget {
                service_addrs,
                port: sp.port,
                node_port: sp.node_port,
                serving,
            }
        })
        .collect()
}

/// iptables mode for one or both families.
pub struct IptablesProxier {
    families: Vec<FamilyProxier>,
    cleaner: Option<Box<dyn FlowCleaner>>,
}

impl IptablesProxier {
    pub fn new(families: Vec<FamilyProxier>, cleaner: Option<Box<dyn FlowCleaner>>) -> Self {
        IptablesProxier { families, cleaner }
    }

    /// The real thing: `iptables`/`ip6tables` detected per family, conntrack
    /// cleanup over netlink.
    pub fn detect(
        configs: Vec<FamilyConfig>,
        preference: BackendPreference,
    ) -> Result<Self, ProxierError> {
        let mut families = Vec::with_capacity(configs.len());
        for cfg in configs {
            let family = cfg.planner.family;
            let ipt = Iptables::detect(family, preference)
                .map_err(|source| ProxierError::Iptables { family, source })?;
            info!(%family, backend = %ipt.backend(), "iptables backend");
            families.push(FamilyProxier::new(cfg, Box::new(ipt))?);
        }
        Ok(IptablesProxier::new(
            families,
            Some(Box::new(ConntrackCleaner::new())),
        ))
    }

    pub fn families(&self) -> &[FamilyProxier] {
        &self.families
    }
}

impl Proxier for IptablesProxier {
    fn mode(&self) -> &'static str {
        "iptables"
    }

    fn sync(&mut self, state: &ProxyState, changes: &Changes) -> SyncReport {
        let start = Instant::now();
        let mut report = SyncReport {
            kind: SyncKind::Partial,
            duration: Duration::ZERO,
            objects_written: 0,
            rules_per_table: vec![],
            no_local_endpoints: vec![],
            lock_wait: None,
            failure: None,
        };
        let (mut nat, mut filter, mut internal, mut external) = (0, 0, 0, 0);
        for fp in &mut self.families {
            let family = fp.family();
            let o = fp.sync(state, changes);
            if o.kind == SyncKind::Full {
                report.kind = SyncKind::Full;
            }
            report.objects_written += o.rules_written;
            nat += o.nat_rules;
            filter += o.filter_rules;
            internal += o.no_local_internal;
            external += o.no_local_external;
            if let Some(w) = o.lock_wait {
                report.lock_wait = Some(report.lock_wait.unwrap_or_default() + w);
            }
            match o.failure {
                Some(f) => {
                    warn!(%family, cause = %f.cause, message = %f.message, "iptables sync failed");
                    if report.failure.is_none() {
                        report.failure = Some(f);
                    }
                }
                None => {
                    if let Some(cleaner) = &self.cleaner {
                        let targets = udp_targets(state, family, changes);
                        if !targets.is_empty() {
                            match cleaner.delete_stale_udp(family, &targets) {
                                Ok(n) if n > 0 => {
                                    debug!(%family, deleted = n, "deleted stale UDP conntrack entries")
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    warn!(%family, error = %e, "stale UDP conntrack cleanup failed")
                                }
                            }
                        }
                    }
                }
            }
        }
        report.rules_per_table = vec![("nat".into(), nat), ("filter".into(), filter)];
        report.no_local_endpoints =
            vec![("internal".into(), internal), ("external".into(), external)];
        report.duration = start.elapsed();
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use kproxy_model::{Endpoint, ServiceEndpoints, ServiceKey, ServicePort};

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Call {
        Restore(String),
        Save(Table),
        /// Jump rules listed (how many).
        Jumps(usize),
        /// Jump rules added one command each (how many).
        EnsureJumps(usize),
        Canary(Table),
    }

    #[derive(Clone, Default)]
    struct Fake {
        calls: Arc<Mutex<Vec<Call>>>,
        fail_next_restore: Arc<Mutex<Option<(usize, String)>>>,
        canary_present: Arc<Mutex<bool>>,
        save_nat: Arc<Mutex<String>>,
        save_filter: Arc<Mutex<String>>,
        /// Per restore: whether its input came without a text (streamed).
        streamed: Arc<Mutex<Vec<bool>>>,
        /// The jumps are in the built-in chains (a restore with `-I` lines
        /// puts them there).
        jumps_present: Arc<Mutex<bool>>,
        /// The listing shows other rules to the jumps' targets.
        jumps_unsure: Arc<Mutex<bool>>,
    }

    impl Fake {
        fn calls(&self) -> Vec<Call> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }
        fn restores(&self) -> Vec<String> {
            self.calls()
                .into_iter()
                .filter_map(|c| match c {
                    Call::Restore(t) => Some(t),
                    _ => None,
                })
                .collect()
        }
        fn clear(&self) {
            if let Ok(mut c) = self.calls.lock() {
                c.clear();
            }
        }
        fn record(&self, c: Call) {
            if let Ok(mut v) = self.calls.lock() {
                v.push(c);
            }
        }
    }

    impl RuleApplier for Fake {
        fn restore(&self, input: &dyn StdinSource) -> Result<RestoreOutcome, ApplyError> {
            let mut bytes = Vec::new();
            input.write_to(&mut bytes).expect("write to a Vec");
            let text = String::from_utf8(bytes).expect("UTF-8");
            let adds_jumps = text.contains("\n-I ");
            self.record(Call::Restore(text));
            if let Ok(mut s) = self.streamed.lock() {
                s.push(input.as_text().is_none());
            }
            if let Some(line) = self
                .fail_next_restore
                .lock()
                .ok()
                .and_then(|mut f| f.take())
            {
                return Err(ApplyError {
                    message: "iptables-restore: exited with status 1".into(),
                    line: Some(line),
                });
            }
            if let Ok(mut c) = self.canary_present.lock() {
                *c = true;
            }
            if adds_jumps {
                if let Ok(mut j) = self.jumps_present.lock() {
                    *j = true;
                }
            }
            Ok(RestoreOutcome {
                lock_wait: None,
                duration: Duration::ZERO,
            })
        }
        fn save(&self, table: Table) -> Result<String, ApplyError> {
            self.record(Call::Save(table));
            Ok(match table {
                Table::Nat => self.save_nat.lock().map(|s| s.clone()).unwrap_or_default(),
                Table::Filter => self
                    .save_filter
                    .lock()
                    .map(|s| s.clone())
                    .unwrap_or_default(),
            })
        }
        fn missing_jump_rules(&self, rules: &[JumpSpec]) -> Result<MissingJumpSpecs, ApplyError> {
            self.record(Call::Jumps(rules.len()));
            let flag = |f: &Mutex<bool>| f.lock().map(|b| *b).unwrap_or(false);
            let missing = if flag(&self.jumps_present) {
                vec![]
            } else {
                rules.to_vec()
            };
            Ok(if flag(&self.jumps_unsure) {
                MissingJumpSpecs {
                    absent: vec![],
                    unsure: missing,
                }
            } else {
                MissingJumpSpecs {
                    absent: missing,
                    unsure: vec![],
                }
            })
        }
        fn ensure_jump_rules(&self, rules: &[JumpSpec]) -> Result<(), ApplyError> {
            self.record(Call::EnsureJumps(rules.len()));
            if let Ok(mut j) = self.jumps_present.lock() {
                *j = true;
            }
            Ok(())
        }
        fn chain_exists(&self, table: Table, _chain: &str) -> Result<bool, ApplyError> {
            self.record(Call::Canary(table));
            Ok(self.canary_present.lock().map(|c| *c).unwrap_or(false))
        }
    }

    /// As after a previous run: the jumps from the built-in chains exist.
    fn jumps_in_place(fake: &Fake) {
        if let Ok(mut j) = fake.jumps_present.lock() {
            *j = true;
        }
    }

    type CleanerCalls = Arc<Mutex<Vec<(IpFamily, Vec<UdpServiceTarget>)>>>;

    #[derive(Clone, Default)]
    struct FakeCleaner(CleanerCalls);

    impl FlowCleaner for FakeCleaner {
        fn delete_stale_udp(
            &self,
            family: IpFamily,
            targets: &[UdpServiceTarget],
        ) -> Result<usize, String> {
            if let Ok(mut v) = self.0.lock() {
                v.push((family, targets.to_vec()));
            }
            Ok(0)
        }
    }

    fn ep(ip: &str, local: bool) -> Endpoint {
        Endpoint {
            ip: ip.parse().expect("ip"),
            port: 53,
            is_local: local,
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    fn port(name: &str, proto: Protocol, cip: &str, eps: Vec<Endpoint>) -> ServicePort {
        ServicePort {
            name: ServicePortName {
                service: ServiceKey::new("ns", name),
                port: "p".into(),
                protocol: proto,
            },
            family: IpFamily::V4,
            cluster_ip: cip.parse().expect("ip"),
            port: 53,
            target_port: "53".into(),
            node_port: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            session_affinity_seconds: None,
            external_policy_local: false,
            internal_policy_local: false,
            health_check_node_port: None,
            endpoints: ServiceEndpoints {
                all: eps.clone(),
                cluster: eps.clone(),
                local: vec![],
                has_any: !eps.is_empty(),
            },
        }
    }

    fn put(state: &mut ProxyState, sp: ServicePort) -> (IpFamily, ServicePortName) {
        let key = (IpFamily::V4, sp.name.clone());
        state.ipv4.insert(sp.name.clone(), Arc::new(sp));
        key
    }

    fn setup() -> (IptablesProxier, Fake, FakeCleaner) {
        let fake = Fake::default();
        if let Ok(mut s) = fake.save_nat.lock() {
            *s = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SEP-ZZZZZZZZZZZZZZZZ - [0:0]\n:OTHER - [0:0]\nCOMMIT\n".into();
        }
        let cleaner = FakeCleaner::default();
        let mut fp = FamilyProxier::new(
            FamilyConfig::new(PlannerConfig::new(IpFamily::V4)),
            Box::new(fake.clone()),
        )
        .expect("config");
        fp.canary_interval = Duration::ZERO;
        (
            IptablesProxier::new(vec![fp], Some(Box::new(cleaner.clone()))),
            fake,
            cleaner,
        )
    }

    fn changes(ports: &[(IpFamily, ServicePortName)]) -> Changes {
        Changes {
            ports: ports.iter().cloned().collect(),
            force_full: false,
        }
    }

    #[test]
    fn first_sync_adopts_and_is_full_then_partial() {
        let (mut p, fake, _) = setup();
        let mut st = ProxyState::default();
        let dns = put(
            &mut st,
            port(
                "dns",
                Protocol::Udp,
                "10.96.0.10",
                vec![ep("10.1.0.1", false)],
            ),
        );
        let r = p.sync(&st, &changes(std::slice::from_ref(&dns)));
        assert!(r.succeeded(), "{r:?}");
        assert_eq!(r.kind, SyncKind::Full);
        let calls = fake.calls();
        assert_eq!(calls[0], Call::Save(Table::Nat));
        assert_eq!(calls[1], Call::Save(Table::Filter));
        let restores = fake.restores();
        assert_eq!(restores.len(), 1);
        assert!(
            restores[0].contains("-X KUBE-SEP-ZZZZZZZZZZZZZZZZ\n"),
            "stale chain of a previous run deleted"
        );
        assert!(!restores[0].contains("OTHER"));
        assert!(
            calls.contains(&Call::Jumps(14)),
            "jumps ensured on a full sync: {calls:?}"
        );
        assert!(r.objects_written > 0);
        assert_eq!(r.rules_per_table[0].0, "nat");
        assert!(r.rules_per_table[0].1 >= 6);

        fake.clear();
        put(
            &mut st,
            port(
                "dns",
                Protocol::Udp,
                "10.96.0.10",
                vec![ep("10.1.0.2", false)],
            ),
        );
        let r = p.sync(&st, &changes(&[dns]));
        assert!(r.succeeded());
        assert_eq!(r.kind, SyncKind::Partial);
        let calls = fake.calls();
        assert!(
            !calls
                .iter()
                .any(|c| matches!(c, Call::Jumps(_) | Call::Save(_))),
            "{calls:?}"
        );
        let restores = fake.restores();
        assert_eq!(restores.len(), 1);
        assert!(restores[0].contains("--to-destination 10.1.0.2:53"));
        assert!(!restores[0].contains("KUBE-SERVICES"));
        assert_eq!(
            r.objects_written, 1,
            "one rule: the DNAT of the only endpoint"
        );
    }

    /// The `*table` section of a restore text, as iptables-save would print
    /// it (declarations and rules; no `-X`).
    fn section(text: &str, table: &str) -> String {
        let deleted: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("-X "))
            .map(|c| format!(":{c} "))
            .collect();
        let mut out = String::new();
        let mut inside = false;
        for line in text.lines() {
            if let Some(t) = line.strip_prefix('*') {
                inside = t == table;
            }
            if inside
                && !line.starts_with("-X ")
                && !deleted.iter().any(|d| line.starts_with(d.as_str()))
            {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    fn lines_of<'a>(text: &'a str, chain: &str) -> Vec<&'a str> {
        let decl = format!(":{chain} ");
        let rule = format!("-A {chain} ");
        text.lines()
            .filter(|l| l.starts_with(&decl) || l.starts_with(&rule))
            .collect()
    }

    #[test]
    fn first_sync_leaves_unchanged_chains_alone() {
        let mut st = ProxyState::default();
        let web = put(
            &mut st,
            port(
                "web",
                Protocol::Tcp,
                "10.96.0.1",
                vec![ep("10.1.0.1", false), ep("10.1.0.2", false)],
            ),
        );
        put(
            &mut st,
            port(
                "dns",
                Protocol::Udp,
                "10.96.0.10",
                vec![ep("10.1.0.3", false)],
            ),
        );
        put(&mut st, port("empty", Protocol::Tcp, "10.96.0.11", vec![]));
        // A previous run's rules, as the kernel holds them.
        let (mut first, fake1, _) = setup();
        // The jumps are in place: this test is about the chains.
        jumps_in_place(&fake1);
        assert!(first.sync(&st, &Changes::default()).succeeded());
        let full_text = fake1.restores().remove(0);
        let fresh = first.families()[0].applied().cloned().expect("applied");

        // Restart with the kernel unchanged: nothing is rewritten.
        let (mut p, fake, _) = setup();
        // The jumps are in place: this test is about the chains.
        jumps_in_place(&fake);
        if let Ok(mut c) = fake.canary_present.lock() {
            *c = true;
        }
        for (slot, table) in [(&fake.save_nat, "nat"), (&fake.save_filter, "filter")] {
            if let Ok(mut s) = slot.lock() {
                *s = section(&full_text, table);
            }
        }
        let r = p.sync(&st, &Changes::default());
        assert!(r.succeeded(), "{r:?}");
        assert_eq!(r.kind, SyncKind::Full);
        assert!(fake.restores().is_empty(), "{:?}", fake.restores());
        assert_eq!(r.objects_written, 0);
        assert!(
            fake.calls().contains(&Call::Jumps(14)),
            "jumps still ensured"
        );
        let adopted = p.families()[0].applied().cloned().expect("applied");
        // Equal records hold equal rules (digests of every chain's rules).
        assert_eq!(adopted, fresh);
        assert_eq!(
            (adopted.nat_rules(), adopted.filter_rules()),
            (fresh.nat_rules(), fresh.filter_rules())
        );
        assert_eq!(r.rules_per_table[0], ("nat".to_string(), fresh.nat_rules()));

        // Later syncs are partial against the same record: the next change
        // writes exactly what it writes after a fresh full sync.
        put(
            &mut st,
            port(
                "web",
                Protocol::Tcp,
                "10.96.0.1",
                vec![ep("10.1.0.9", false)],
            ),
        );
        fake.clear();
        fake1.clear();
        let ch = changes(std::slice::from_ref(&web));
        let r = p.sync(&st, &ch);
        let r1 = first.sync(&st, &ch);
        assert_eq!((r.kind, r1.kind), (SyncKind::Partial, SyncKind::Partial));
        assert_eq!(fake.restores(), fake1.restores());
        assert!(!fake.restores().is_empty());
    }

    #[test]
    fn full_syncs_stream_their_text_unless_adopting() {
        let mut st = ProxyState::default();
        let web = put(
            &mut st,
            port(
                "web",
                Protocol::Tcp,
                "10.96.0.1",
                vec![ep("10.1.0.1", false)],
            ),
        );
        let streamed = |f: &Fake| f.streamed.lock().map(|s| s.clone()).unwrap_or_default();
        // Tables without service or dispatch chains: nothing to adopt, the
        // full plan is streamed.
        let (mut first, fake1, _) = setup();
        // The jumps are in place: this test is about the chains.
        jumps_in_place(&fake1);
        if let Ok(mut s) = fake1.save_nat.lock() {
            *s = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-MARK-MASQ - [0:0]\nCOMMIT\n".into();
        }
        assert!(first.sync(&st, &Changes::default()).succeeded());
        let full_text = fake1.restores().remove(0);
        let forced = Changes {
            force_full: true,
            ..Changes::default()
        };
        assert_eq!(first.sync(&st, &forced).kind, SyncKind::Full);
        assert_eq!(fake1.restores()[1], full_text, "same text either way");
        put(
            &mut st,
            port(
                "web",
                Protocol::Tcp,
                "10.96.0.1",
                vec![ep("10.1.0.2", false)],
            ),
        );
        let r = first.sync(&st, &changes(std::slice::from_ref(&web)));
        assert_eq!(r.kind, SyncKind::Partial);
        assert_eq!(streamed(&fake1), [true, true, false]);

        // A restart onto those rules: the plan's text is needed to leave the
        // unchanged chains out.
        let (mut p, fake, _) = setup();
        // The jumps are in place: this test is about the chains.
        jumps_in_place(&fake);
        if let Ok(mut s) = fake.save_nat.lock() {
            *s = section(&full_text, "nat");
        }
        let r = p.sync(&st, &Changes::default());
        assert!(r.succeeded(), "{r:?}");
        assert_eq!(streamed(&fake), [false]);
        assert!(
            !section(&fake.restores()[0], "nat").contains(":KUBE-SERVICES"),
            "nat KUBE-SERVICES adopted"
        );

        // A failed streamed restore is reported like any other.
        if let Ok(mut f) = fake1.fail_next_restore.lock() {
            *f = Some((3, "-A KUBE-SVC-X bad".into()));
        }
        let r = first.sync(&st, &forced);
        assert!(r.failure.is_some_and(|f| f.message.contains("line 3")));
        assert_eq!(streamed(&fake1).last(), Some(&true));
        assert!(first.sync(&st, &Changes::default()).succeeded());
    }

    #[test]
    fn first_sync_rewrites_only_chains_that_differ() {
        let mut st = ProxyState::default();
        put(
            &mut st,
            port(
                "web",
                Protocol::Tcp,
                "10.96.0.1",
                vec![ep("10.1.0.1", false), ep("10.1.0.2", false)],
            ),
        );
        put(
            &mut st,
            port(
                "dns",
                Protocol::Udp,
                "10.96.0.10",
                vec![ep("10.1.0.3", false)],
            ),
        );
        let (mut first, fake1, _) = setup();
        // The jumps are in place: this test is about the chains.
        jumps_in_place(&fake1);
        assert!(first.sync(&st, &Changes::default()).succeeded());
        let full_text = fake1.restores().remove(0);
        let svc_of = |needle: &str| -> String {
            full_text
                .lines()
                .find(|l| l.starts_with("-A KUBE-SERVICES") && l.contains(needle))
                .and_then(|l| l.rsplit(' ').next())
                .expect("service jump")
                .to_string()
        };
        let (web_chain, dns_chain) = (svc_of("10.96.0.1 "), svc_of("10.96.0.10 "));

        // Someone changed web's chain; dns's is as planned, but the kernel
        // spells it its own way and lists KUBE-SERVICES in another order.
        let nat = section(&full_text, "nat")
            .replace("--probability 0.5000000000", "--probability 0.25")
            .replace(" -d 10.96.0.10 ", " -d 10.96.0.10/32 ");
        let mut nat_lines: Vec<&str> = nat.lines().collect();
        let first_svc = nat_lines
            .iter()
            .position(|l| l.starts_with("-A KUBE-SERVICES"))
            .expect("dispatch");
        nat_lines.swap(first_svc, first_svc + 1);
        let nat = nat_lines.join("\n") + "\n";
        let (mut p, fake, _) = setup();
        // The jumps are in place: this test is about the chains.
        jumps_in_place(&fake);
        if let Ok(mut s) = fake.save_nat.lock() {
            *s = nat.replace(
                ":KUBE-PROXY-CANARY - [0:0]\n",
                ":KUBE-PROXY-CANARY - [0:0]\n:KUBE-SVC-STALESTALESTALEX - [0:0]\n",
            );
        }
        // filter: the kernel has none of it.
        let r = p.sync(&st, &Changes::default());
        assert!(r.succeeded(), "{r:?}");
        let text = fake.restores().remove(0);
        assert_eq!(
            lines_of(&text, &web_chain),
            lines_of(&full_text, &web_chain),
            "the changed chain is rewritten as planned:\n{text}"
        );
        assert!(lines_of(&text, &dns_chain).is_empty(), "{text}");
        assert!(
            section(&text, "nat")
                .lines()
                .all(|l| !l.contains("KUBE-SERVICES")),
            "nat KUBE-SERVICES holds the same rules: left alone\n{text}"
        );
        assert!(text.contains("-X KUBE-SVC-STALESTALESTALEX\n"), "{text}");
        assert!(
            text.contains("*filter\n:KUBE-SERVICES - [0:0]\n"),
            "missing filter chains are written\n{text}"
        );
        let web_rules = lines_of(&full_text, &web_chain).len() - 1;
        let filter_rules = section(&full_text, "filter")
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count();
        assert_eq!(r.objects_written, web_rules + filter_rules);
        assert_eq!(p.families()[0].applied(), first.families()[0].applied());
    }

    #[test]
    fn failed_adopting_sync_reads_the_kernel_again() {
        let (mut p, fake, _) = setup();
        let mut st = ProxyState::default();
        put(
            &mut st,
            port("a", Protocol::Tcp, "10.96.0.1", vec![ep("10.1.0.1", false)]),
        );
        if let Ok(mut f) = fake.fail_next_restore.lock() {
            *f = Some((3, "-A KUBE-SVC-X bad".into()));
        }
        assert!(!p.sync(&st, &Changes::default()).succeeded());
        assert!(p.sync(&st, &Changes::default()).succeeded());
        let saves = fake
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::Save(_)))
            .count();
        assert_eq!(saves, 4, "nat and filter read before each attempt");
    }

    #[test]
    fn failure_keeps_previous_and_forces_full() {
        let (mut p, fake, _) = setup();
        let mut st = ProxyState::default();
        let a = put(
            &mut st,
            port("a", Protocol::Tcp, "10.96.0.1", vec![ep("10.1.0.1", false)]),
        );
        assert!(p.sync(&st, &changes(std::slice::from_ref(&a))).succeeded());
        let before = p.families()[0].applied().map(|x| x.nat_rules());

        put(&mut st, port("a", Protocol::Tcp, "10.96.0.1", vec![]));
        if let Ok(mut f) = fake.fail_next_restore.lock() {
            *f = Some((3, "-A KUBE-SVC-X bad".into()));
        }
        let r = p.sync(&st, &changes(&[a]));
        let failure = r.failure.expect("failure reported");
        assert_eq!(failure.cause, "iptables-restore");
        assert!(
            failure.message.contains("line 3 (-A KUBE-SVC-X bad)"),
            "{}",
            failure.message
        );
        assert_eq!(
            p.families()[0].applied().map(|x| x.nat_rules()),
            before,
            "previous record kept"
        );

        fake.clear();
        let r = p.sync(&st, &Changes::default());
        assert!(r.succeeded());
        assert_eq!(
            r.kind,
            SyncKind::Full,
            "a failure forces the next sync to be full"
        );
        assert!(fake.restores()[0].contains("has no endpoints"));
    }

    #[test]
    fn force_full_canary_and_config_change() {
        let (mut p, fake, _) = setup();
        let mut st = ProxyState::default();
        put(
            &mut st,
            port("a", Protocol::Tcp, "10.96.0.1", vec![ep("10.1.0.1", false)]),
        );
        assert_eq!(p.sync(&st, &Changes::default()).kind, SyncKind::Full);
        assert_eq!(p.sync(&st, &Changes::default()).kind, SyncKind::Partial);
        assert!(fake.restores().len() == 1, "nothing changed: no restore");

        let forced = Changes {
            force_full: true,
            ..Changes::default()
        };
        assert_eq!(p.sync(&st, &forced).kind, SyncKind::Full);

        // Someone flushed the tables.
        if let Ok(mut c) = fake.canary_present.lock() {
            *c = false;
        }
        assert_eq!(p.sync(&st, &Changes::default()).kind, SyncKind::Full);
        assert_eq!(p.sync(&st, &Changes::default()).kind, SyncKind::Partial);

        // The node's pod CIDR changes the hairpin decision: full.
        st.node.pod_cidrs = vec!["10.1.0.0/24".parse().expect("cidr")];
        assert_eq!(p.sync(&st, &Changes::default()).kind, SyncKind::Full);
        assert!(fake
            .restores()
            .last()
            .is_some_and(|t| t.contains("-s 10.1.0.1 -j KUBE-MARK-MASQ")));
        assert_eq!(p.sync(&st, &Changes::default()).kind, SyncKind::Partial);
    }

    #[test]
    fn udp_conntrack_cleanup_for_changed_udp_ports_only() {
        let (mut p, _fake, cleaner) = setup();
        let mut st = ProxyState::default();
        let dns = put(
            &mut st,
            port(
                "dns",
                Protocol::Udp,
                "10.96.0.10",
                vec![ep("10.1.0.1", false), ep("10.1.0.2", true)],
            ),
        );
        let web = put(
            &mut st,
            port(
                "web",
                Protocol::Tcp,
                "10.96.0.11",
                vec![ep("10.1.0.3", false)],
            ),
        );
        assert!(p.sync(&st, &changes(&[dns, web])).succeeded());
        let calls = cleaner.0.lock().map(|c| c.clone()).unwrap_or_default();
        assert_eq!(calls.len(), 1);
        let (family, targets) = &calls[0];
        assert_eq!(*family, IpFamily::V4);
        assert_eq!(targets.len(), 1);
        assert_eq!(
            targets[0].service_addrs,
            vec!["10.96.0.10".parse::<std::net::IpAddr>().expect("ip")]
        );
        assert_eq!(
            targets[0].serving,
            vec![
                "10.1.0.1:53".parse::<SocketAddr>().expect("sa"),
                "10.1.0.2:53".parse().expect("sa")
            ]
        );
    }

    #[test]
    fn no_local_endpoint_counts() {
        let (mut p, _fake, _) = setup();
        let mut st = ProxyState::default();
        let mut sp = port(
            "itp",
            Protocol::Tcp,
            "10.96.0.12",
            vec![ep("10.1.0.5", false)],
        );
        sp.internal_policy_local = true;
        sp.endpoints.cluster.clear();
        put(&mut st, sp);
        let r = p.sync(&st, &Changes::default());
        assert_eq!(
            r.no_local_endpoints,
            vec![("internal".to_string(), 1), ("external".to_string(), 0)]
        );
    }

    #[test]
    fn missing_jumps_go_into_the_full_restore_once() {
        let (mut p, fake, _) = setup();
        let st = ProxyState::default();
        assert!(p.sync(&st, &Changes::default()).succeeded());
        let first = fake.restores().remove(0);
        let nat = section(&first, "nat");
        assert!(
            nat.contains(
                "-I PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
            ),
            "{nat}"
        );
        assert!(
            section(&first, "filter").contains("-I INPUT -j KUBE-FIREWALL\n"),
            "{first}"
        );
        assert!(!fake
            .calls()
            .iter()
            .any(|c| matches!(c, Call::EnsureJumps(_))));
        fake.clear();
        let forced = Changes {
            force_full: true,
            ..Changes::default()
        };
        assert!(p.sync(&st, &forced).succeeded());
        assert!(!fake.restores()[0].contains("\n-I "), "added again");
    }

    #[test]
    fn jumps_with_a_differently_spelled_twin_are_ensured_one_by_one() {
        let (mut p, fake, _) = setup();
        if let Ok(mut u) = fake.jumps_unsure.lock() {
            *u = true;
        }
        assert!(p
            .sync(&ProxyState::default(), &Changes::default())
            .succeeded());
        assert!(fake.calls().contains(&Call::EnsureJumps(14)));
        assert!(!fake.restores()[0].contains("\n-I "));
    }

    #[test]
    fn jump_rules_carry_upstream_comments() {
        let planner = Planner::new(PlannerConfig::new(IpFamily::V4)).expect("config");
        let rules: Vec<JumpRule> = planner.jump_rules().iter().map(jump_rule).collect();
        let pre = rules
            .iter()
            .find(|r| r.table == "nat" && r.chain == "PREROUTING")
            .expect("PREROUTING jump");
        assert_eq!(
            pre.rulespec,
            [
                "-m",
                "comment",
                "--comment",
                "kubernetes service portals",
                "-j",
                "KUBE-SERVICES"
            ]
        );
        let fwd = rules
            .iter()
            .find(|r| {
                r.table == "filter"
                    && r.chain == "FORWARD"
                    && r.rulespec.last().is_some_and(|t| t == "KUBE-SERVICES")
            })
            .expect("FORWARD jump");
        assert_eq!(&fwd.rulespec[..4], ["-m", "conntrack", "--ctstate", "NEW"]);
        assert!(rules.iter().all(|r| r.position == Position::Prepend));
    }
}
