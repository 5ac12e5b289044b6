//! The pure IPVS planner: [`ProxyState`] → the virtual servers, real servers
//! and kube-ipvs0 addresses IPVS mode wants.
//!
//! Per service port (one family):
//! - `ClusterIP:port` with the cluster endpoints, or only the local ones
//!   under `internalTrafficPolicy: Local`;
//! - `nodeIP:NodePort` for every node IP of the family, every
//!   load-balancer IP and every external IP, with the cluster endpoints, or
//!   only the local ones under `externalTrafficPolicy: Local` (as upstream's
//!   IPVS mode: there is no short-circuit of pod traffic to cluster
//!   endpoints for external addresses);
//! - every real server is a NAT (masquerading) destination of weight 1;
//! - ClientIP affinity is IPVS persistence with the affinity timeout and a
//!   host mask (/32, /128).
//!
//! kube-ipvs0 holds the ClusterIPs, load-balancer IPs and external IPs (not
//! the node IPs, which are already local). The iptables rules IPVS mode
//! still needs are in [`crate::rules`].

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use kproxy_model::{Endpoint, IpFamily, ProxyState, ServicePort, ServicePortName};

use crate::codec::{Destination, IpvsProtocol, Service, ServiceKey};

/// Graceful termination bound for TCP real servers that still have
/// connections. Upstream has none (a busy long-lived connection keeps a
/// removed pod's real server forever); 15 minutes is IPVS's default TCP
/// established timeout, after which an idle connection is gone anyway.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The settings of IPVS mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsConfig {
    /// `--ipvs-scheduler`; empty means `rr`.
    pub scheduler: String,
    /// NodePort addresses. Empty: every local address of the node except
    /// loopback, IPv6 link-local and kube-ipvs0's, found on each full sync.
    pub node_ips: Vec<IpAddr>,
    /// `--iptables-masquerade-bit` (0..=31).
    pub masquerade_bit: u8,
    /// `--masquerade-all`: masquerade all service traffic.
    pub masquerade_all: bool,
    /// Local traffic detection: sources outside these CIDRs (first one of
    /// each family) are masqueraded when they reach a ClusterIP. Empty: no
    /// ClusterIP masquerade (unless `masquerade_all`), as upstream.
    pub cluster_cidrs: Vec<IpNet>,
    /// `ipvs.strictARP`.
    pub strict_arp: bool,
    /// `ipvs.excludeCIDRs`: virtual servers on these addresses are never
    /// deleted by kproxy.
    pub exclude_cidrs: Vec<IpNet>,
    pub tcp_timeout: Option<Duration>,
    pub tcp_fin_timeout: Option<Duration>,
    pub udp_timeout: Option<Duration>,
    /// The dummy interface holding service addresses.
    pub dummy_name: String,
    /// How long a removed TCP real server may drain (weight 0) before it is
    /// deleted even with connections left.
    pub drain_timeout: Duration,
    /// How often draining real servers are checked between syncs.
    pub drain_check_interval: Duration,
    /// Which iptables to use for the iptables part.
    pub iptables_backend: kproxy_iptables::runner::BackendPreference,
}

impl Default for IpvsConfig {
    fn default() -> Self {
        IpvsConfig {
            scheduler: "rr".to_string(),
            node_ips: Vec::new(),
            masquerade_bit: 14,
            masquerade_all: false,
            cluster_cidrs: Vec::new(),
            strict_arp: false,
            exclude_cidrs: Vec::new(),
            tcp_timeout: None,
            tcp_fin_timeout: None,
            udp_timeout: None,
            dummy_name: crate::link::DEFAULT_DUMMY_NAME.to_string(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            drain_check_interval: Duration::from_secs(5),
            iptables_backend: kproxy_iptables::runner::BackendPreference::Auto,
        }
    }
}

impl IpvsConfig {
    pub fn scheduler(&self) -> &str {
        if self.scheduler.is_empty() {
            "rr"
        } else {
            &self.scheduler
        }
    }

    /// The ClusterIP masquerade CIDR of `family` (the first one given).
    pub fn cluster_cidr(&self, family: IpFamily) -> Option<IpNet> {
        self.cluster_cidrs
            .iter()
            .copied()
            .find(|n| IpFamily::of_net(n) == family)
    }

    pub fn is_excluded(&self, ip: &IpAddr) -> bool {
        self.exclude_cidrs.iter().any(|n| n.contains(ip))
    }
}

/// Which kind of address a virtual server is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VsKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl VsKind {
    /// Kubernetes' spelling, for tools' output.
    pub fn as_str(&self) -> &'static str {
        match self {
            VsKind::ClusterIp => "ClusterIP",
            VsKind::NodePort => "NodePort",
            VsKind::LoadBalancer => "LoadBalancer",
            VsKind::ExternalIp => "ExternalIP",
        }
    }
}

/// One virtual server and the real servers it should have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub service: Service,
    pub dests: BTreeMap<SocketAddr, Destination>,
    /// The service port it comes from (the first one, if several collide),
    /// with its family: together they name the owner.
    pub port_name: ServicePortName,
    pub port_family: IpFamily,
    pub kind: VsKind,
}

/// One service port's share of a [`Plan`], kept so a partial sync can take
/// it out again without the port's old [`ServicePort`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortPlan {
    /// Its virtual servers in [`port_services`] order. A key may be in
    /// several ports' lists; [`Plan::services`] holds the first port's.
    pub keys: Vec<ServiceKey>,
    no_local_internal: bool,
    no_local_external: bool,
}

/// Everything IPVS mode wants in the IPVS table and on kube-ipvs0.
///
/// Made whole by [`plan`]; kept up to date by [`Plan::update`] on partial
/// syncs, which gives the same plan (tested) in time proportional to the
/// change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub services: BTreeMap<ServiceKey, DesiredService>,
    /// Addresses for kube-ipvs0.
    pub addresses: BTreeSet<IpAddr>,
    /// The virtual servers of each service port, for partial syncs.
    pub by_port: BTreeMap<(IpFamily, ServicePortName), PortPlan>,
    /// Service ports with no local endpoints under a Local policy.
    pub no_local_internal: usize,
    pub no_local_external: usize,
    /// The NodePort addresses it was planned with.
    node_ips: Vec<IpAddr>,
    /// How many times ports list each key: a key whose owner goes away
    /// while others still list it needs a new owner.
    claims: BTreeMap<ServiceKey, u32>,
    /// How many listed keys are on each kube-ipvs0 address: two ports may
    /// share one (a ClusterIP with a TCP and a UDP port, an external IP of
    /// two services), and it goes only with the last.
    address_refs: BTreeMap<IpAddr, u32>,
}

impl Plan {
    pub fn dest_count(&self) -> usize {
        self.services.values().map(|s| s.dests.len()).sum()
    }

    /// The NodePort addresses the plan was made for.
    pub fn node_ips(&self) -> &[IpAddr] {
        &self.node_ips
    }

    /// Brings the plan up to date with `state` after the service ports in
    /// `changed` were added, changed or removed. Every other port must be
    /// as when it was planned, and `cfg` the same. Equals a fresh
    /// [`plan`] of `state` with the plan's node IPs.
    pub fn update(
        &mut self,
        state: &ProxyState,
        cfg: &IpvsConfig,
        changed: &BTreeSet<(IpFamily, ServicePortName)>,
    ) {
        let mut orphans = Vec::new();
        for port in changed {
            self.remove_port(port, &mut orphans);
        }
        // Now the plan of the unchanged ports, once their first claimant
        // owns each key the changed ports owned; then the changed ports
        // come in as in a full plan.
        for key in orphans {
            self.adopt(state, cfg, key);
        }
        for (family, name) in changed {
            if let Some(sp) = state.family(*family).get(name) {
                self.add_port(cfg, *family, name, sp);
            }
        }
    }

    /// Adds one port, in plan order when called by [`plan`].
    fn add_port(
        &mut self,
        cfg: &IpvsConfig,
        family: IpFamily,
        name: &ServicePortName,
        sp: &ServicePort,
    ) {
        let mut keys = Vec::new();
        for (kind, service, dests) in port_services(cfg, sp, &self.node_ips) {
            let key = service.key();
            keys.push(key);
            *self.claims.entry(key).or_default() += 1;
            // NodePort virtual servers are on node IPs, which are already
            // local: only other addresses go on kube-ipvs0.
            if !self.node_ips.contains(&key.addr) {
                *self.address_refs.entry(key.addr).or_default() += 1;
                self.addresses.insert(key.addr);
            }
            let desired = DesiredService {
                service,
                dests,
                port_name: name.clone(),
                port_family: family,
                kind,
            };
            // Two ports claiming one address:port:protocol (clashing
            // external IPs, an external IP on a node IP): the kernel holds
            // one, the first port in plan order (family, name) gets it,
            // whichever order the ports were added in.
            match self.services.entry(key) {
                Entry::Vacant(v) => {
                    v.insert(desired);
                }
                Entry::Occupied(mut o) => {
                    if (family, name) < (o.get().port_family, &o.get().port_name) {
                        o.insert(desired);
                    }
                }
            }
        }
        let no_local_internal = sp.internal_policy_local && sp.endpoints.local.is_empty();
        let no_local_external =
            sp.externally_accessible() && sp.external_policy_local && sp.endpoints.local.is_empty();
        self.no_local_internal += usize::from(no_local_internal);
        self.no_local_external += usize::from(no_local_external);
        self.by_port.insert(
            (family, name.clone()),
            PortPlan {
                keys,
                no_local_internal,
                no_local_external,
            },
        );
    }

    /// Takes one port out; keys it owned that it leaves go to `orphans`.
    fn remove_port(&mut self, port: &(IpFamily, ServicePortName), orphans: &mut Vec<ServiceKey>) {
        let Some(old) = self.by_port.remove(port) else {
            return;
        };
        for key in old.keys {
            if let Some(n) = self.claims.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.claims.remove(&key);
                }
            }
            if let Some(n) = self.address_refs.get_mut(&key.addr) {
                *n -= 1;
                if *n == 0 {
                    self.address_refs.remove(&key.addr);
                    self.addresses.remove(&key.addr);
                }
            }
            let owned = self
                .services
                .get(&key)
                .is_some_and(|d| d.port_family == port.0 && d.port_name == port.1);
            if owned {
                self.services.remove(&key);
                orphans.push(key);
            }
        }
        self.no_local_internal -= usize::from(old.no_local_internal);
        self.no_local_external -= usize::from(old.no_local_external);
    }

    /// Gives an orphaned key that other ports still list to the first of
    /// them. Scans all ports, but only when ports share a virtual server,
    /// which the model's conflict resolution makes rare.
    fn adopt(&mut self, state: &ProxyState, cfg: &IpvsConfig, key: ServiceKey) {
        if !self.claims.contains_key(&key) {
            return;
        }
        let Some((family, name)) = self
            .by_port
            .iter()
            .find(|(_, p)| p.keys.contains(&key))
            .map(|(port, _)| port.clone())
        else {
            return;
        };
        let Some(sp) = state.family(family).get(&name) else {
            return;
        };
        let found = port_services(cfg, sp, &self.node_ips)
            .into_iter()
            .find(|(_, s, _)| s.key() == key);
        if let Some((kind, service, dests)) = found {
            self.services.insert(
                key,
                DesiredService {
                    service,
                    dests,
                    port_name: name,
                    port_family: family,
                    kind,
                },
            );
        }
    }
}

fn dests_of(eps: &[Endpoint]) -> BTreeMap<SocketAddr, Destination> {
    eps.iter()
        .map(|e| {
            (
                SocketAddr::new(e.ip, e.port),
                Destination::new(e.ip, e.port),
            )
        })
        .collect()
}

fn virtual_service(cfg: &IpvsConfig, sp: &ServicePort, addr: IpAddr, port: u16) -> Service {
    let mut s = Service::new(IpvsProtocol::from(sp.name.protocol), addr, port)
        .with_scheduler(cfg.scheduler());
    if let Some(timeout) = sp.session_affinity_seconds {
        s = s.with_persistence(timeout);
    }
    s
}

/// The virtual servers of one service port: (kind, service, its dests).
pub fn port_services(
    cfg: &IpvsConfig,
    sp: &ServicePort,
    node_ips: &[IpAddr],
) -> Vec<(VsKind, Service, BTreeMap<SocketAddr, Destination>)> {
    let internal = if sp.internal_policy_local {
        dests_of(&sp.endpoints.local)
    } else {
        dests_of(&sp.endpoints.cluster)
    };
    let external = if sp.external_policy_local {
        dests_of(&sp.endpoints.local)
    } else {
        dests_of(&sp.endpoints.cluster)
    };
    let mut out = vec![(
        VsKind::ClusterIp,
        virtual_service(cfg, sp, sp.cluster_ip, sp.port),
        internal,
    )];
    if let Some(np) = sp.node_port {
        for ip in node_ips.iter().filter(|ip| IpFamily::of(ip) == sp.family) {
            out.push((
                VsKind::NodePort,
                virtual_service(cfg, sp, *ip, np),
                external.clone(),
            ));
        }
    }
    for ip in &sp.load_balancer_ips {
        out.push((
            VsKind::LoadBalancer,
            virtual_service(cfg, sp, *ip, sp.port),
            external.clone(),
        ));
    }
    for ip in &sp.external_ips {
        out.push((
            VsKind::ExternalIp,
            virtual_service(cfg, sp, *ip, sp.port),
            external.clone(),
        ));
    }
    out
}

/// The whole plan for `state`. `node_ips` are the NodePort addresses.
pub fn plan(state: &ProxyState, cfg: &IpvsConfig, node_ips: &[IpAddr]) -> Plan {
    let mut p = Plan {
        node_ips: node_ips.to_vec(),
        ..Plan::default()
    };
    for family in IpFamily::ALL {
        for (name, sp) in state.family(family) {
            p.add_port(cfg, family, name, sp);
        }
    }
    p
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kproxy_model::{Protocol, ServiceEndpoints, ServiceKey as SvcName};
    use std::sync::Arc;

    pub fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    pub fn ep(s: &str, port: u16, local: bool) -> Endpoint {
        Endpoint {
            ip: ip(s),
            port,
            is_local: local,
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    pub fn port(name: &str, cip: &str, p: u16, proto: Protocol, eps: Vec<Endpoint>) -> ServicePort {
        let local: Vec<Endpoint> = eps.iter().filter(|e| e.is_local).copied().collect();
        ServicePort {
            name: ServicePortName {
                service: SvcName::new("default", name),
                port: "p".to_string(),
                protocol: proto,
            },
            family: IpFamily::of(&ip(cip)),
            cluster_ip: ip(cip),
            port: p,
            target_port: "8080".to_string(),
            node_port: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            session_affinity_seconds: None,
            external_policy_local: false,
            internal_policy_local: false,
            health_check_node_port: None,
            endpoints: ServiceEndpoints {
                has_any: !eps.is_empty(),
                all: eps.clone(),
                cluster: eps,
                local,
            },
        }
    }

    pub fn state(ports: Vec<ServicePort>) -> ProxyState {
        let mut s = ProxyState::default();
        for sp in ports {
            s.family_mut(sp.family)
                .insert(sp.name.clone(), Arc::new(sp));
        }
        s
    }

    /// Random worlds for the incremental-vs-full property tests: 4 services
    /// with a TCP and a UDP port each, in both families. The address pools
    /// are small so ports collide: a ClusterIP shared by the TCP and the UDP
    /// port, an external or load-balancer IP of several services, an
    /// external IP on a node IP with the port of a NodePort.
    pub mod worlds {
        use super::*;
        use kproxy_model::Protocol;
        use proptest::prelude::*;

        pub const SLOTS: usize = 16;
        const V4: [&str; 5] = [
            "10.96.0.1",
            "10.96.0.2",
            "192.0.2.1",
            "192.0.2.2",
            "172.18.0.2",
        ];
        const V6: [&str; 5] = [
            "fd00::1",
            "fd00::2",
            "2001:db8::1",
            "2001:db8::2",
            "fd00:18::2",
        ];

        #[derive(Clone, Debug)]
        pub struct PortSpec {
            cluster_ip: usize,
            port: u16,
            node_port: Option<u16>,
            lb: Vec<usize>,
            ext: Vec<usize>,
            eps: Vec<(u8, bool)>,
            affinity: Option<u32>,
            etp_local: bool,
            itp_local: bool,
            source_ranges: bool,
        }

        pub fn port_spec() -> impl Strategy<Value = PortSpec> {
            (
                0..2usize,
                prop::sample::select(vec![80u16, 30000]),
                prop::option::of(prop::sample::select(vec![30000u16, 30001])),
                prop::collection::vec(0..5usize, 0..3),
                prop::collection::vec(0..5usize, 0..3),
                prop::collection::vec((0..6u8, any::<bool>()), 0..4),
                prop::option::of(prop::sample::select(vec![60u32, 10800])),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
            )
                .prop_map(
                    |(
                        cluster_ip,
                        port,
                        node_port,
                        lb,
                        ext,
                        eps,
                        affinity,
                        etp_local,
                        itp_local,
                        source_ranges,
                    )| PortSpec {
                        cluster_ip,
                        port,
                        node_port,
                        lb,
                        ext,
                        eps,
                        affinity,
                        etp_local,
                        itp_local,
                        source_ranges,
                    },
                )
        }

        /// A first world (a port spec or nothing per slot), then steps
        /// that each set or clear a few slots.
        pub type History = (Vec<Option<PortSpec>>, Vec<Vec<(usize, Option<PortSpec>)>>);

        pub fn history() -> impl Strategy<Value = History> {
            (
                prop::collection::vec(prop::option::weighted(0.7, port_spec()), SLOTS),
                prop::collection::vec(
                    prop::collection::vec(
                        (0..SLOTS, prop::option::weighted(0.7, port_spec())),
                        1..4,
                    ),
                    1..8,
                ),
            )
        }

        pub fn node_ips() -> impl Strategy<Value = Vec<IpAddr>> {
            prop::sample::select(vec![
                vec![],
                vec![ip("172.18.0.2")],
                vec![ip("172.18.0.2"), ip("172.18.0.3"), ip("fd00:18::2")],
            ])
        }

        fn build(slot: usize, spec: &PortSpec) -> ServicePort {
            let v6 = slot >= SLOTS / 2;
            let pool = if v6 { V6 } else { V4 };
            let proto = if slot % 2 == 0 {
                Protocol::Tcp
            } else {
                Protocol::Udp
            };
            let eps = spec
                .eps
                .iter()
                .map(|(n, local)| {
                    let a = if v6 {
                        format!("fd00:244::{}", n + 1)
                    } else {
                        format!("10.244.0.{}", n + 1)
                    };
                    ep(&a, 8080, *local)
                })
                .collect();
            let mut sp = port(
                &format!("svc-{}", (slot % (SLOTS / 2)) / 2),
                pool[spec.cluster_ip],
                spec.port,
                proto,
                eps,
            );
            sp.node_port = spec.node_port;
            sp.load_balancer_ips = spec.lb.iter().map(|i| ip(pool[*i])).collect();
            sp.external_ips = spec.ext.iter().map(|i| ip(pool[*i])).collect();
            sp.session_affinity_seconds = spec.affinity;
            sp.external_policy_local = spec.etp_local;
            sp.internal_policy_local = spec.itp_local;
            if spec.source_ranges {
                let range = if v6 {
                    "2001:db8:f::/48"
                } else {
                    "203.0.113.0/24"
                };
                sp.load_balancer_source_ranges = vec![range.parse().unwrap()];
            }
            sp
        }

        pub fn build_state(world: &[Option<PortSpec>]) -> ProxyState {
            state(
                world
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| s.as_ref().map(|s| build(i, s)))
                    .collect(),
            )
        }

        /// The ports that differ between `a` and `b`, as the model reports
        /// them, plus some that do not (`extra[i]`: harmless).
        pub fn changed(
            a: &ProxyState,
            b: &ProxyState,
            extra: &[bool],
        ) -> BTreeSet<(IpFamily, ServicePortName)> {
            let mut out = BTreeSet::new();
            for family in IpFamily::ALL {
                let names: BTreeSet<&ServicePortName> = a
                    .family(family)
                    .keys()
                    .chain(b.family(family).keys())
                    .collect();
                for (i, name) in names.into_iter().enumerate() {
                    let differs = a.family(family).get(name) != b.family(family).get(name);
                    if differs || extra.get(i).copied().unwrap_or(false) {
                        out.insert((family, name.clone()));
                    }
                }
            }
            out
        }
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// After every step of random changes, the incrementally updated
        /// plan equals a fresh full plan of the same state, bookkeeping
        /// (claims, address references, counters) included.
        #[test]
        fn updated_plan_equals_full_plan(
            (first, steps) in worlds::history(),
            extra in prop::collection::vec(any::<bool>(), worlds::SLOTS),
            node_ips in worlds::node_ips(),
        ) {
            let cfg = IpvsConfig::default();
            let mut world = first;
            let mut prev = worlds::build_state(&world);
            let mut p = plan(&prev, &cfg, &node_ips);
            for step in steps {
                for (slot, spec) in step {
                    world[slot] = spec;
                }
                let next = worlds::build_state(&world);
                p.update(&next, &cfg, &worlds::changed(&prev, &next, &extra));
                prop_assert_eq!(&p, &plan(&next, &cfg, &node_ips));
                prev = next;
            }
        }
    }

    #[test]
    fn shared_addresses_and_keys_survive_partial_removal() {
        // One ClusterIP for a TCP and a UDP port; an external IP of two
        // services on the same port: removing one keeps the address, and
        // the virtual server passes to the other service.
        let tcp = port("a", "10.96.0.1", 53, Protocol::Tcp, vec![]);
        let udp = port("a", "10.96.0.1", 53, Protocol::Udp, vec![]);
        let mut b = port("b", "10.96.0.2", 80, Protocol::Tcp, vec![]);
        b.external_ips = vec![ip("198.51.100.1")];
        let mut c = port("c", "10.96.0.3", 80, Protocol::Tcp, vec![]);
        c.external_ips = vec![ip("198.51.100.1")];
        let cfg = IpvsConfig::default();
        let all = state(vec![tcp.clone(), udp.clone(), b.clone(), c.clone()]);
        let mut p = plan(&all, &cfg, &[]);
        let ext = Service::new(IpvsProtocol::Tcp, ip("198.51.100.1"), 80).key();
        assert_eq!(p.services[&ext].port_name, b.name);
        let next = state(vec![udp.clone(), c.clone()]);
        let changed: BTreeSet<_> = [
            (IpFamily::V4, tcp.name.clone()),
            (IpFamily::V4, b.name.clone()),
        ]
        .into();
        p.update(&next, &cfg, &changed);
        assert!(p.addresses.contains(&ip("10.96.0.1")));
        assert!(p.addresses.contains(&ip("198.51.100.1")));
        assert!(!p.addresses.contains(&ip("10.96.0.2")));
        assert_eq!(p.services[&ext].port_name, c.name);
        assert_eq!(p, plan(&next, &cfg, &[]));
    }

    fn dest_addrs(d: &DesiredService) -> Vec<String> {
        d.dests.keys().map(|a| a.to_string()).collect()
    }

    #[test]
    fn cluster_ip_nodeport_lb_external_ip() {
        let mut sp = port(
            "web",
            "10.96.0.10",
            80,
            Protocol::Tcp,
            vec![ep("10.244.1.2", 8080, true), ep("10.244.2.2", 8080, false)],
        );
        sp.node_port = Some(30080);
        sp.load_balancer_ips = vec![ip("192.0.2.10")];
        sp.external_ips = vec![ip("198.51.100.7")];
        let cfg = IpvsConfig {
            scheduler: "wrr".into(),
            ..IpvsConfig::default()
        };
        let node_ips = [ip("172.18.0.2"), ip("fd00::2")];
        let p = plan(&state(vec![sp]), &cfg, &node_ips);
        let keys: Vec<String> = p.services.keys().map(|k| k.to_string()).collect();
        assert_eq!(
            keys,
            vec![
                "TCP 10.96.0.10:80",
                "TCP 172.18.0.2:30080",
                "TCP 192.0.2.10:80",
                "TCP 198.51.100.7:80"
            ]
        );
        for d in p.services.values() {
            assert_eq!(d.service.scheduler, "wrr");
            assert_eq!(dest_addrs(d), vec!["10.244.1.2:8080", "10.244.2.2:8080"]);
            for dest in d.dests.values() {
                assert_eq!(dest.weight, 1);
                assert_eq!(dest.fwd_method, crate::codec::ForwardMethod::Masquerade);
            }
        }
        let addrs: Vec<String> = p.addresses.iter().map(|a| a.to_string()).collect();
        assert_eq!(addrs, vec!["10.96.0.10", "192.0.2.10", "198.51.100.7"]);
        assert_eq!(p.by_port.values().next().map(|p| p.keys.len()), Some(4));
        assert_eq!(p.no_local_external, 0);
    }

    #[test]
    fn traffic_policies_pick_local_endpoints() {
        let eps = vec![ep("10.244.1.2", 8080, true), ep("10.244.2.2", 8080, false)];
        let mut ext_local = port("ext", "10.96.0.11", 80, Protocol::Tcp, eps.clone());
        ext_local.node_port = Some(30081);
        ext_local.load_balancer_ips = vec![ip("192.0.2.11")];
        ext_local.external_policy_local = true;
        let mut int_local = port("int", "10.96.0.12", 80, Protocol::Udp, eps.clone());
        int_local.internal_policy_local = true;
        let mut no_local = port(
            "nolocal",
            "10.96.0.13",
            80,
            Protocol::Tcp,
            vec![ep("10.244.2.3", 8080, false)],
        );
        no_local.node_port = Some(30083);
        no_local.external_policy_local = true;
        let p = plan(
            &state(vec![ext_local, int_local, no_local]),
            &IpvsConfig::default(),
            &[ip("172.18.0.2")],
        );
        let get = |k: &str| {
            p.services
                .values()
                .find(|d| d.service.key().to_string() == k)
                .unwrap_or_else(|| panic!("{k} missing"))
        };
        // eTP=Local: ClusterIP keeps all, external addresses only local.
        assert_eq!(dest_addrs(get("TCP 10.96.0.11:80")).len(), 2);
        assert_eq!(
            dest_addrs(get("TCP 172.18.0.2:30081")),
            vec!["10.244.1.2:8080"]
        );
        assert_eq!(
            dest_addrs(get("TCP 192.0.2.11:80")),
            vec!["10.244.1.2:8080"]
        );
        // iTP=Local: ClusterIP only local.
        assert_eq!(
            dest_addrs(get("UDP 10.96.0.12:80")),
            vec!["10.244.1.2:8080"]
        );
        // no local endpoints: the NodePort virtual server exists, empty
        assert!(get("TCP 172.18.0.2:30083").dests.is_empty());
        assert_eq!(
            dest_addrs(get("TCP 10.96.0.13:80")),
            vec!["10.244.2.3:8080"]
        );
        assert_eq!(p.no_local_external, 1);
        assert_eq!(p.no_local_internal, 0);
    }

    #[test]
    fn affinity_is_persistence_with_host_mask() {
        let mut sp = port("aff", "10.96.0.20", 80, Protocol::Tcp, vec![]);
        sp.session_affinity_seconds = Some(10800);
        let mut v6 = port("aff6", "fd00::20", 80, Protocol::Tcp, vec![]);
        v6.session_affinity_seconds = Some(60);
        let p = plan(&state(vec![sp, v6]), &IpvsConfig::default(), &[]);
        let s: Vec<&Service> = p.services.values().map(|d| &d.service).collect();
        assert_eq!(s.len(), 2);
        for svc in s {
            assert!(svc.flags.contains(crate::codec::ServiceFlags::PERSISTENT));
            assert_eq!(svc.netmask, Service::full_netmask(svc.family));
            assert_eq!(svc.scheduler, "rr");
        }
        assert_eq!(
            p.services
                .values()
                .map(|d| d.service.timeout)
                .collect::<Vec<_>>(),
            vec![10800, 60]
        );
    }
}
