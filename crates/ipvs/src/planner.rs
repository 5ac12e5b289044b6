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
    /// The service port it comes from (the first one, if several collide).
    pub port_name: ServicePortName,
    pub kind: VsKind,
}

/// Everything IPVS mode wants in the IPVS table and on kube-ipvs0.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub services: BTreeMap<ServiceKey, DesiredService>,
    /// Addresses for kube-ipvs0.
    pub addresses: BTreeSet<IpAddr>,
    /// The virtual servers of each service port, for partial syncs.
    pub by_port: BTreeMap<(IpFamily, ServicePortName), Vec<ServiceKey>>,
    /// Service ports with no local endpoints under a Local policy.
    pub no_local_internal: usize,
    pub no_local_external: usize,
}

impl Plan {
    pub fn dest_count(&self) -> usize {
        self.services.values().map(|s| s.dests.len()).sum()
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
    let mut p = Plan::default();
    for family in IpFamily::ALL {
        for (name, sp) in state.family(family) {
            let mut keys = Vec::new();
            for (kind, service, dests) in port_services(cfg, sp, node_ips) {
                let key = service.key();
                keys.push(key);
                if kind != VsKind::NodePort && !node_ips.contains(&service.addr) {
                    p.addresses.insert(service.addr);
                }
                // Two ports claiming one address:port:protocol (only possible
                // with clashing external IPs): the first one wins, as the
                // kernel can hold only one.
                p.services.entry(key).or_insert(DesiredService {
                    service,
                    dests,
                    port_name: name.clone(),
                    kind,
                });
            }
            if sp.internal_policy_local && sp.endpoints.local.is_empty() {
                p.no_local_internal += 1;
            }
            if sp.externally_accessible()
                && sp.external_policy_local
                && sp.endpoints.local.is_empty()
            {
                p.no_local_external += 1;
            }
            p.by_port.insert((family, name.clone()), keys);
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
        assert_eq!(p.by_port.values().next().map(Vec::len), Some(4));
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
