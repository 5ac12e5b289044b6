//! [`IpvsProxier`]: the `kproxy_model::Proxier` of IPVS mode, and
//! [`cleanup`] for `kproxy --cleanup`.
//!
//! A sync: plan (pure; a partial sync updates the last plan for the changed
//! service ports only) → read the kernel's IPVS table (all of it on a full
//! sync; only the virtual servers of changed service ports and of draining
//! real servers on a partial one) → diff (pure) → add missing kube-ipvs0
//! addresses → apply the operations in order → remove stale addresses →
//! one iptables-restore per family if the iptables part changed (always on
//! a full sync, which also ensures the jumps from built-in chains) → delete
//! stale UDP conntrack flows. Nothing is flushed at start: the first sync is
//! full and adopts what the kernel has.
//!
//! A background thread checks draining real servers every
//! `drain_check_interval` and deletes those without connections (or past
//! the bound). It shares one lock with the sync, so the two never race on a
//! real server coming back.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kproxy_iptables::conntrack::{ConntrackCleaner, UdpServiceTarget};
use kproxy_iptables::runner::{parse_save_tables, BackendPreference, Iptables, IptablesError};
use kproxy_model::{Changes, IpFamily, Proxier, ProxyState, SyncFailure, SyncKind, SyncReport};
use tracing::{debug, info, warn};

use crate::client::{IpvsClient, IpvsError};
use crate::codec::{Destination, IpvsProtocol, Service, ServiceKey, Timeouts};
use crate::diff::{diff, CurrentService, DrainPolicy, DrainState, Op};
use crate::link::{host_net, LinkClient, LinkError};
use crate::planner::{plan, DesiredService, IpvsConfig, Plan};
use crate::rules::{jump_rules, FamilyRules, IptablesPlan};
use crate::sysctl::{
    apply_sysctls, ipvs_sysctls, parse_kernel_release, SysctlError, SysctlOptions,
};

#[derive(Debug, thiserror::Error)]
pub enum IpvsProxierError {
    /// Includes "IPVS is not available in this kernel: load ip_vs or use --mode=iptables".
    #[error(transparent)]
    Ipvs(#[from] IpvsError),
    #[error("{0}")]
    Link(#[from] LinkError),
    #[error("sysctl: {0}")]
    Sysctl(#[from] SysctlError),
    #[error("iptables for {family}: {source}")]
    Iptables {
        family: IpFamily,
        #[source]
        source: IptablesError,
    },
    #[error("invalid IPVS config: {0}")]
    Config(String),
}

/// What the last sync planned, kept so a partial sync updates only the
/// changed service ports' share instead of planning everything again.
#[derive(Debug)]
struct Applied {
    plan: Plan,
    /// The iptables part per family, by service port.
    rules: BTreeMap<IpFamily, FamilyRules>,
    /// The iptables restore input last applied, per family.
    iptables: BTreeMap<IpFamily, IptablesPlan>,
}

/// State shared with the drain checker.
struct Shared {
    drain: DrainState,
}

pub struct IpvsProxier {
    cfg: IpvsConfig,
    ipvs: IpvsClient,
    link: LinkClient,
    ifindex: u32,
    iptables: BTreeMap<IpFamily, Iptables>,
    shared: Arc<Mutex<Shared>>,
    applied: Option<Applied>,
    needs_full: bool,
    node_ips: Option<Vec<IpAddr>>,
    conntrack: ConntrackCleaner,
    checker: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

/// Records the first failure of a sync (and logs every one).
fn note(failure: &mut Option<SyncFailure>, cause: &str, message: String) {
    warn!(cause, %message, "IPVS sync step failed");
    if failure.is_none() {
        *failure = Some(SyncFailure {
            cause: cause.to_string(),
            message,
        });
    }
}

fn secs(d: Option<Duration>) -> u32 {
    d.map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // A panic in the checker must not stop syncs; the drain map is still valid.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

fn key_service(k: &ServiceKey) -> Service {
    Service::new(k.protocol, k.addr, k.port)
}

impl IpvsProxier {
    /// Checks IPVS, applies sysctls and timeouts, ensures kube-ipvs0, finds
    /// iptables, and starts the drain checker. Touches no virtual server.
    pub fn new(cfg: IpvsConfig) -> Result<Self, IpvsProxierError> {
        if cfg.masquerade_bit > 31 {
            return Err(IpvsProxierError::Config(format!(
                "masquerade bit {} is not in 0..=31",
                cfg.masquerade_bit
            )));
        }
        let mut ipvs = IpvsClient::new()?;
        let kernel_version = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .and_then(|r| parse_kernel_release(&r));
        apply_sysctls(
            Path::new("/proc/sys"),
            &ipvs_sysctls(SysctlOptions {
                strict_arp: cfg.strict_arp,
                kernel_version,
            }),
        )?;
        let timeouts = Timeouts {
            tcp: secs(cfg.tcp_timeout),
            tcp_fin: secs(cfg.tcp_fin_timeout),
            udp: secs(cfg.udp_timeout),
        };
        if timeouts != Timeouts::default() {
            ipvs.set_timeouts(&timeouts)?;
        }
        let mut link = LinkClient::new()?;
        let ifindex = link.ensure_dummy(&cfg.dummy_name)?;
        let mut iptables = BTreeMap::new();
        for family in IpFamily::ALL {
            match Iptables::detect(family, cfg.iptables_backend) {
                Ok(ipt) => {
                    iptables.insert(family, ipt);
                }
                Err(source) if family == IpFamily::V6 => {
                    warn!(error = %source, "no ip6tables: IPv6 services get no iptables rules");
                }
                Err(source) => return Err(IpvsProxierError::Iptables { family, source }),
            }
        }
        let shared = Arc::new(Mutex::new(Shared {
            drain: DrainState::new(),
        }));
        // Its own socket, opened here so it lives in our network namespace.
        let checker_client = IpvsClient::new()?;
        let (tx, rx) = mpsc::channel();
        let handle = {
            let shared = shared.clone();
            let interval = cfg.drain_check_interval.max(Duration::from_millis(100));
            let timeout = cfg.drain_timeout;
            std::thread::Builder::new()
                .name("ipvs-drain".into())
                .spawn(move || drain_loop(checker_client, shared, rx, interval, timeout))
                .map_err(|e| IpvsProxierError::Config(format!("starting the drain checker: {e}")))?
        };
        info!(
            scheduler = cfg.scheduler(),
            interface = %cfg.dummy_name,
            "IPVS proxier ready"
        );
        Ok(IpvsProxier {
            cfg,
            ipvs,
            link,
            ifindex,
            iptables,
            shared,
            applied: None,
            needs_full: true,
            node_ips: None,
            conntrack: ConntrackCleaner::new(),
            checker: Some((tx, handle)),
        })
    }

    /// Real servers currently draining (for tests and debugging).
    pub fn draining(&self) -> Vec<(ServiceKey, SocketAddr)> {
        lock(&self.shared).drain.keys().copied().collect()
    }

    fn node_ips(&mut self, full: bool) -> Vec<IpAddr> {
        if !self.cfg.node_ips.is_empty() {
            return self.cfg.node_ips.clone();
        }
        if full || self.node_ips.is_none() {
            match discover_node_ips(&self.cfg.dummy_name) {
                Ok(ips) => self.node_ips = Some(ips),
                Err(e) => warn!(error = %e, "cannot list node addresses for NodePorts"),
            }
        }
        self.node_ips.clone().unwrap_or_default()
    }

    /// Reads the kernel's virtual servers (`None`: all) with their real servers.
    fn read_current(
        &mut self,
        keys: Option<&BTreeSet<ServiceKey>>,
    ) -> Result<Vec<CurrentService>, IpvsError> {
        let services = match keys {
            None => self.ipvs.list_services()?,
            Some(keys) => {
                let mut out = Vec::new();
                for k in keys {
                    if let Some(s) = self.ipvs.get_service(&key_service(k))? {
                        out.push(s);
                    }
                }
                out
            }
        };
        let mut out = Vec::with_capacity(services.len());
        for service in services {
            let dests = self.ipvs.list_destinations(&service)?;
            out.push(CurrentService { service, dests });
        }
        Ok(out)
    }

    fn apply_op(&mut self, op: &Op) -> Result<(), IpvsError> {
        let r = match op {
            Op::AddService(s) => self.ipvs.add_service(s),
            Op::UpdateService(s) => self.ipvs.update_service(s),
            Op::AddDest(s, d) => self.ipvs.add_destination(s, d),
            Op::UpdateDest(s, d) | Op::DrainDest(s, d) => self.ipvs.update_destination(s, d),
            Op::DelDest(s, d) => self.ipvs.delete_destination(s, d),
            Op::DelService(s) => self.ipvs.delete_service(s),
        };
        match r {
            // Someone (or an earlier failed sync) got there first: the goal is met.
            Err(e) if e.is_exists() && matches!(op, Op::AddService(_) | Op::AddDest(..)) => {
                if let Op::AddService(s) = op {
                    self.ipvs.update_service(s)
                } else {
                    Ok(())
                }
            }
            Err(e) if e.is_not_found() && matches!(op, Op::DelDest(..) | Op::DelService(_)) => {
                Ok(())
            }
            r => r,
        }
    }

    fn do_sync(&mut self, state: &ProxyState, changes: &Changes) -> SyncReport {
        let start = Instant::now();
        let full = self.needs_full || changes.force_full || self.applied.is_none();
        let shared = self.shared.clone();
        let mut guard = lock(&shared);
        let node_ips = self.node_ips(full);
        // A partial sync updates the last plan, made for the same node IPs
        // (they are only looked up again on full syncs); anything else
        // plans afresh.
        let last = self
            .applied
            .take()
            .filter(|a| !full && a.plan.node_ips() == node_ips.as_slice());
        let full = last.is_none();
        let kind = if full {
            SyncKind::Full
        } else {
            SyncKind::Partial
        };
        let mut failure: Option<SyncFailure> = None;
        let mut written = 0usize;

        // The plan, what to look at in the kernel (None: everything), and
        // the kube-ipvs0 addresses to compare (None: all of the plan's).
        let (plan, mut rules, mut applied_ipt, scope, have_addrs, want_addrs) = match last {
            None => {
                let plan = plan(state, &self.cfg, &node_ips);
                let have = match self.link.list_addresses(self.ifindex) {
                    Ok(nets) => nets.into_iter().map(|n| n.addr()).collect(),
                    Err(e) => {
                        note(&mut failure, "netlink", e.to_string());
                        BTreeSet::new()
                    }
                };
                (plan, BTreeMap::new(), BTreeMap::new(), None, have, None)
            }
            Some(Applied {
                mut plan,
                rules,
                iptables,
            }) => {
                // Only the changed ports' virtual servers (before and after)
                // and addresses can differ from the last sync.
                let port_keys = |plan: &Plan, keys: &mut BTreeSet<ServiceKey>| {
                    for port in &changes.ports {
                        keys.extend(plan.by_port.get(port).into_iter().flat_map(|p| &p.keys));
                    }
                };
                let addrs_in = |plan: &Plan, keys: &BTreeSet<ServiceKey>| -> BTreeSet<IpAddr> {
                    keys.iter()
                        .map(|k| k.addr)
                        .filter(|a| plan.addresses.contains(a))
                        .collect()
                };
                let mut keys = BTreeSet::new();
                port_keys(&plan, &mut keys);
                // Where the old keys were. A new key's address that another
                // port already had is added again: EEXIST, harmless.
                let have = addrs_in(&plan, &keys);
                plan.update(state, &self.cfg, &changes.ports);
                port_keys(&plan, &mut keys);
                let want = addrs_in(&plan, &keys);
                keys.extend(guard.drain.keys().map(|(k, _)| *k));
                (plan, rules, iptables, Some(keys), have, Some(want))
            }
        };
        let current = match self.read_current(scope.as_ref()) {
            Ok(c) => c,
            Err(e) => {
                note(&mut failure, "netlink", e.to_string());
                self.needs_full = true;
                drop(guard);
                return self.report(kind, start, written, &plan, failure);
            }
        };
        let scoped: BTreeMap<ServiceKey, DesiredService>;
        let desired = match &scope {
            None => &plan.services,
            Some(keys) => {
                scoped = keys
                    .iter()
                    .filter_map(|k| plan.services.get(k).map(|d| (*k, d.clone())))
                    .collect();
                &scoped
            }
        };
        let cfg = &self.cfg;
        let ours = |s: &Service| {
            s.fwmark == 0
                && !cfg.is_excluded(&s.addr)
                && (have_addrs.contains(&s.addr)
                    || plan.addresses.contains(&s.addr)
                    || node_ips.contains(&s.addr)
                    || scope.as_ref().is_some_and(|k| k.contains(&s.key())))
        };
        let now = Instant::now();
        let ops = diff(
            desired,
            &current,
            &ours,
            &DrainPolicy {
                now,
                started: &guard.drain,
                timeout: self.cfg.drain_timeout,
            },
        );

        // Addresses first, so a new virtual server is reachable at once.
        let want_addrs = want_addrs.as_ref().unwrap_or(&plan.addresses);
        for ip in want_addrs.difference(&have_addrs) {
            match self.link.add_address(self.ifindex, host_net(*ip)) {
                Ok(()) => written += 1,
                Err(e) if e.errno() == Some(libc::EEXIST) => {}
                Err(e) => note(&mut failure, "netlink", e.to_string()),
            }
        }

        let mut udp_targets: BTreeMap<(IpFamily, ServiceKey), UdpServiceTarget> = BTreeMap::new();
        for op in &ops {
            debug!(%op, "ipvs");
            match self.apply_op(op) {
                Ok(()) => written += 1,
                Err(e) => {
                    note(&mut failure, "netlink", e.to_string());
                    continue;
                }
            }
            let svc = op.service();
            match op {
                Op::DrainDest(s, d) => {
                    guard.drain.insert((s.key(), d.socket_addr()), now);
                }
                Op::AddDest(s, d) | Op::UpdateDest(s, d) | Op::DelDest(s, d) => {
                    guard.drain.remove(&(s.key(), d.socket_addr()));
                }
                Op::DelService(s) => {
                    let k = s.key();
                    guard.drain.retain(|(dk, _), _| *dk != k);
                }
                _ => {}
            }
            if svc.protocol == IpvsProtocol::Udp
                && matches!(op, Op::DelDest(..) | Op::DelService(_))
            {
                let serving = plan
                    .services
                    .get(&svc.key())
                    .map(|d| d.dests.keys().copied().collect())
                    .unwrap_or_default();
                udp_targets.insert(
                    (svc.family, svc.key()),
                    UdpServiceTarget {
                        service_addrs: vec![svc.addr],
                        port: svc.port,
                        node_port: None,
                        serving,
                    },
                );
            }
        }

        for ip in have_addrs.difference(want_addrs) {
            if node_ips.contains(ip) {
                continue;
            }
            match self.link.del_address(self.ifindex, host_net(*ip)) {
                Ok(()) => written += 1,
                Err(e) if e.errno() == Some(libc::EADDRNOTAVAIL) => {}
                Err(e) => note(&mut failure, "netlink", e.to_string()),
            }
        }

        // The iptables part: rewritten only when it changed (or on full
        // syncs). A partial sync regenerates only the changed ports' rules,
        // and renders the text only if one of them changed.
        let mut ipt_counts = (0usize, 0usize);
        for (family, ipt) in &self.iptables {
            let changed = match rules.get_mut(family) {
                Some(r) if !full => r.update(
                    state,
                    &self.cfg,
                    &node_ips,
                    changes
                        .ports
                        .iter()
                        .filter(|(f, _)| f == family)
                        .map(|(_, name)| name),
                ),
                _ => {
                    let r = FamilyRules::new(state, &self.cfg, *family, &node_ips);
                    rules.insert(*family, r);
                    true
                }
            };
            if !changed {
                if let Some(last) = applied_ipt.get(family) {
                    ipt_counts.0 += last.nat_rules;
                    ipt_counts.1 += last.filter_rules;
                    continue;
                }
            }
            let Some(family_rules) = rules.get(family) else {
                continue;
            };
            let rendered = family_rules.render(&self.cfg);
            ipt_counts.0 += rendered.nat_rules;
            ipt_counts.1 += rendered.filter_rules;
            if !full && applied_ipt.get(family).map(|a| &a.text) == Some(&rendered.text) {
                continue;
            }
            match ipt.restore(&rendered.text) {
                Ok(_) => {
                    written += rendered.nat_rules + rendered.filter_rules;
                    applied_ipt.insert(*family, rendered);
                }
                Err(e) => {
                    applied_ipt.remove(family);
                    note(&mut failure, "iptables-restore", e.to_string());
                    continue;
                }
            }
            // On every full sync (periodic ones too), as iptables mode: a
            // flushed built-in chain loses our jump, and the --noflush
            // restore of our own chains does not bring it back.
            if full {
                if let Err(e) = ipt.ensure_jump_rules(&jump_rules()) {
                    note(&mut failure, "iptables", e.to_string());
                }
            }
        }
        if !state.ipv6.is_empty() && !self.iptables.contains_key(&IpFamily::V6) {
            note(
                &mut failure,
                "iptables",
                "IPv6 services but no ip6tables".to_string(),
            );
        }
        drop(guard);

        for ((family, _), target) in &udp_targets {
            if let Err(e) = self
                .conntrack
                .delete_stale_udp(*family, std::slice::from_ref(target))
            {
                warn!(error = %e, "stale UDP conntrack cleanup failed");
            }
        }

        self.needs_full = failure.is_some();
        let mut report = self.report(kind, start, written, &plan, failure);
        report.rules_per_table = vec![
            ("nat".to_string(), ipt_counts.0),
            ("filter".to_string(), ipt_counts.1),
            ("ipvs".to_string(), plan.services.len()),
        ];
        self.applied = Some(Applied {
            plan,
            rules,
            iptables: applied_ipt,
        });
        report
    }

    fn report(
        &self,
        kind: SyncKind,
        start: Instant,
        written: usize,
        plan: &Plan,
        failure: Option<SyncFailure>,
    ) -> SyncReport {
        SyncReport {
            kind,
            duration: start.elapsed(),
            objects_written: written,
            rules_per_table: vec![("ipvs".to_string(), plan.services.len())],
            no_local_endpoints: vec![
                ("internal".to_string(), plan.no_local_internal),
                ("external".to_string(), plan.no_local_external),
            ],
            lock_wait: None,
            failure,
        }
    }
}

impl Proxier for IpvsProxier {
    fn mode(&self) -> &'static str {
        "ipvs"
    }

    fn sync(&mut self, state: &ProxyState, changes: &Changes) -> SyncReport {
        let report = self.do_sync(state, changes);
        if let Some(f) = &report.failure {
            self.needs_full = true;
            warn!(cause = %f.cause, message = %f.message, "IPVS sync failed; next sync is full");
        }
        report
    }
}

impl Drop for IpvsProxier {
    fn drop(&mut self) {
        if let Some((tx, handle)) = self.checker.take() {
            drop(tx);
            let _ = handle.join();
        }
    }
}

/// Checks draining real servers until the sender is dropped.
fn drain_loop(
    mut ipvs: IpvsClient,
    shared: Arc<Mutex<Shared>>,
    stop: mpsc::Receiver<()>,
    interval: Duration,
    timeout: Duration,
) {
    loop {
        match stop.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let mut guard = lock(&shared);
        if guard.drain.is_empty() {
            continue;
        }
        if let Err(e) = check_draining(&mut ipvs, &mut guard.drain, timeout) {
            warn!(error = %e, "checking draining real servers failed");
        }
    }
}

/// Deletes draining real servers that have no connections left or drained
/// longer than `timeout`; forgets those that are gone or got weight back.
pub fn check_draining(
    ipvs: &mut IpvsClient,
    drain: &mut DrainState,
    timeout: Duration,
) -> Result<usize, IpvsError> {
    let now = Instant::now();
    let services: BTreeSet<ServiceKey> = drain.keys().map(|(k, _)| *k).collect();
    let mut deleted = 0;
    for key in services {
        let svc = key_service(&key);
        let dests: BTreeMap<SocketAddr, Destination> = ipvs
            .list_destinations(&svc)?
            .into_iter()
            .map(|d| (d.socket_addr(), d))
            .collect();
        let entries: Vec<(SocketAddr, Instant)> = drain
            .iter()
            .filter(|((k, _), _)| *k == key)
            .map(|((_, a), t)| (*a, *t))
            .collect();
        for (addr, since) in entries {
            let Some(d) = dests.get(&addr) else {
                drain.remove(&(key, addr));
                continue;
            };
            if d.weight != 0 {
                drain.remove(&(key, addr));
                continue;
            }
            let conns = u64::from(d.active_conns) + u64::from(d.inactive_conns);
            if conns == 0 || now.saturating_duration_since(since) >= timeout {
                match ipvs.delete_destination(&svc, d) {
                    Ok(()) => deleted += 1,
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
                debug!(service = %key, dest = %addr, conns, "drained real server deleted");
                drain.remove(&(key, addr));
            }
        }
    }
    Ok(deleted)
}

/// Local addresses usable for NodePorts: not loopback, not IPv6
/// link-local, not on the dummy interface.
fn discover_node_ips(dummy: &str) -> Result<Vec<IpAddr>, String> {
    let local = kproxy_iptables::netutil::local_addresses().map_err(|e| e.to_string())?;
    let mut out: Vec<IpAddr> = Vec::new();
    for (ifname, net) in local {
        let ip = net.addr();
        let link_local = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
        if ifname == dummy || ip.is_loopback() || link_local || out.contains(&ip) {
            continue;
        }
        out.push(ip);
    }
    Ok(out)
}

/// What [`cleanup`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    pub ipvs_services_removed: usize,
    pub dummy_removed: bool,
    /// Rules and chains per family (kproxy's, kube-proxy's iptables and IPVS modes').
    pub iptables: Vec<(IpFamily, kproxy_iptables::cleanup::CleanupReport)>,
}

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error(transparent)]
    Ipvs(#[from] IpvsError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("iptables for {family}: {source}")]
    Iptables {
        family: IpFamily,
        #[source]
        source: IptablesError,
    },
}

/// Chains only upstream's IPVS mode has (the rest are shared with iptables
/// mode and removed by `kproxy_iptables::cleanup`).
const UPSTREAM_IPVS_CHAINS: &[(&str, &[&str])] = &[
    ("nat", &["KUBE-NODE-PORT", "KUBE-FIREWALL"]),
    (
        "filter",
        &[
            "KUBE-NODE-PORT",
            "KUBE-SOURCE-RANGES-FIREWALL",
            "KUBE-IPVS-FILTER",
            "KUBE-IPVS-OUT-FILTER",
        ],
    ),
];

/// `kproxy --cleanup` for IPVS mode, in the current network namespace.
///
/// Upstream's `CleanupLeftovers` flushes the whole IPVS table. kproxy is
/// more careful: only when kube-ipvs0 exists (a node that ran IPVS mode) it
/// deletes the virtual servers on kube-ipvs0's addresses and on the node's
/// own addresses (NodePorts); fwmark services and services on other
/// addresses stay. Then kube-ipvs0 and the iptables chains go. Running it
/// again finds nothing. A kernel without IPVS skips the IPVS part.
pub fn cleanup() -> Result<CleanupReport, CleanupError> {
    cleanup_with(crate::link::DEFAULT_DUMMY_NAME, BackendPreference::Auto)
}

pub fn cleanup_with(
    dummy: &str,
    backend: BackendPreference,
) -> Result<CleanupReport, CleanupError> {
    let mut report = CleanupReport::default();
    let mut link = LinkClient::new()?;
    if let Some(l) = link.get_link(dummy)? {
        match IpvsClient::new() {
            Ok(mut ipvs) => {
                let mut addrs: BTreeSet<IpAddr> = link
                    .list_addresses(l.index)?
                    .into_iter()
                    .map(|n| n.addr())
                    .collect();
                match discover_node_ips(dummy) {
                    Ok(ips) => addrs.extend(ips),
                    Err(e) => {
                        warn!(error = %e, "cannot list node addresses; NodePort services stay")
                    }
                }
                for s in ipvs.list_services()? {
                    if s.fwmark == 0 && addrs.contains(&s.addr) {
                        match ipvs.delete_service(&s) {
                            Ok(()) => report.ipvs_services_removed += 1,
                            Err(e) if e.is_not_found() => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
            }
            Err(IpvsError::NotAvailable) => {}
            Err(e) => return Err(e.into()),
        }
        report.dummy_removed = link.delete_dummy(dummy)?;
    }
    for family in IpFamily::ALL {
        let ipt = match Iptables::detect(family, backend) {
            Ok(ipt) => ipt,
            Err(e) => {
                debug!(%family, error = %e, "no iptables for cleanup");
                continue;
            }
        };
        let err = |source| CleanupError::Iptables { family, source };
        let mut r = kproxy_iptables::cleanup::cleanup_with(&ipt).map_err(err)?;
        cleanup_upstream_ipvs_chains(&ipt, &mut r).map_err(err)?;
        report.iptables.push((family, r));
    }
    info!(
        services = report.ipvs_services_removed,
        dummy = report.dummy_removed,
        "IPVS cleanup done"
    );
    Ok(report)
}

fn cleanup_upstream_ipvs_chains(
    ipt: &Iptables,
    report: &mut kproxy_iptables::cleanup::CleanupReport,
) -> Result<(), IptablesError> {
    let mut restore = String::new();
    for (table, chains) in UPSTREAM_IPVS_CHAINS {
        let saved = ipt.save(table)?;
        let Some(state) = parse_save_tables(&saved).remove(*table) else {
            continue;
        };
        let present: Vec<&&str> = chains
            .iter()
            .filter(|c| state.chains.contains_key(**c))
            .collect();
        if present.is_empty() {
            continue;
        }
        // Unlink from built-in chains (by number, highest first).
        for (chain, rules) in &state.chains {
            if present.iter().any(|c| **c == chain.as_str()) {
                continue;
            }
            let mut hits: Vec<(usize, &String)> = rules
                .iter()
                .enumerate()
                .filter(|(_, r)| {
                    let w: Vec<&str> = r.split_whitespace().collect();
                    w.windows(2).any(|p| {
                        (p[0] == "-j" || p[0] == "-g") && present.iter().any(|c| **c == p[1])
                    })
                })
                .map(|(i, r)| (i + 1, r))
                .collect();
            hits.reverse();
            for (n, r) in hits {
                ipt.run_command(table, &["-D".to_string(), chain.clone(), n.to_string()])?;
                report
                    .rules_removed
                    .push((table.to_string(), chain.clone(), r.clone()));
            }
        }
        restore.push_str(&format!("*{table}\n"));
        for c in &present {
            restore.push_str(&format!(":{c} - [0:0]\n"));
        }
        for c in &present {
            restore.push_str(&format!("-X {c}\n"));
            report
                .chains_removed
                .push((table.to_string(), c.to_string()));
        }
        restore.push_str("COMMIT\n");
    }
    if !restore.is_empty() {
        ipt.restore(&restore)?;
    }
    Ok(())
}
