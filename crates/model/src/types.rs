//! The validated proxy state: what every backend programs.
//!
//! Everything here is plain data. It is produced by [`crate::StateBuilder`]
//! from API objects and consumed by the backends' planners.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

/// An IP address family. A dual-stack service has one [`ServicePort`] per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    pub fn of(ip: &IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    pub fn of_net(net: &IpNet) -> IpFamily {
        match net {
            IpNet::V4(_) => IpFamily::V4,
            IpNet::V6(_) => IpFamily::V6,
        }
    }

    /// "IPv4" / "IPv6", as the Kubernetes API spells it.
    pub fn api_name(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.api_name())
    }
}

/// A transport protocol a service port can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// "TCP", "UDP", "SCTP", as the Kubernetes API spells it.
    pub fn api_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// "tcp", "udp", "sctp", as iptables and upstream's chain hashes spell it.
    pub fn lower_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// Parses the API spelling; an absent protocol means TCP.
    pub fn from_api(s: Option<&str>) -> Option<Protocol> {
        match s {
            None | Some("TCP") => Some(Protocol::Tcp),
            Some("UDP") => Some(Protocol::Udp),
            Some("SCTP") => Some(Protocol::Sctp),
            Some(_) => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.api_name())
    }
}

/// A service's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of one service: upstream's `ServicePortName`.
///
/// `Display` gives upstream's `String()` form, `ns/name:port` (or `ns/name`
/// for an unnamed port), which chain-name hashes are computed from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServicePortName {
    pub service: ServiceKey,
    /// The port's name; empty for a service's single unnamed port.
    pub port: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}", self.service)
        } else {
            write!(f, "{}:{}", self.service, self.port)
        }
    }
}

/// An endpoint of a service port, in one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// On this node (the slice's `nodeName` equals ours).
    pub is_local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Endpoint {
    /// `ip:port`, with brackets for IPv6, as iptables' `--to-destination` wants.
    pub fn addr_string(&self) -> String {
        std::net::SocketAddr::new(self.ip, self.port).to_string()
    }
}

/// The endpoints of one service port and the sets chosen from them by
/// upstream's rules (`pkg/proxy/topology.go`: ready first, serving and
/// terminating as the fallback, topology hints).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServiceEndpoints {
    /// Every endpoint of this port in this family, sorted, whatever its
    /// condition. Used to find endpoints that went away (conntrack cleanup)
    /// and for debugging.
    pub all: Vec<Endpoint>,
    /// The endpoints traffic under the Cluster policy goes to. Empty when the
    /// service port does not use cluster endpoints.
    pub cluster: Vec<Endpoint>,
    /// The node-local endpoints traffic under the Local policy goes to.
    /// Empty when the service port does not use local endpoints.
    pub local: Vec<Endpoint>,
    /// True when the service has a usable endpoint anywhere in the cluster
    /// (upstream's `hasAnyEndpoints`): distinguishes "reject, no endpoints"
    /// from "drop, no local endpoints".
    pub has_any: bool,
}

/// One service port in one IP family, validated and with its endpoints chosen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub family: IpFamily,
    pub cluster_ip: IpAddr,
    pub port: u16,
    /// The port the endpoints listen on is per endpoint ([`Endpoint::port`]);
    /// this is only the spec's targetPort for display.
    pub target_port: String,
    pub node_port: Option<u16>,
    /// `spec.externalIPs` of this family.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` of this family.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` of this family; empty means all sources.
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// ClientIP session affinity timeout in seconds, `None` without affinity.
    pub session_affinity_seconds: Option<u32>,
    /// `externalTrafficPolicy: Local`.
    pub external_policy_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_policy_local: bool,
    pub health_check_node_port: Option<u16>,
    pub endpoints: ServiceEndpoints,
}

impl ServicePort {
    /// Reachable from outside the cluster: has a NodePort, an external IP or
    /// a load-balancer IP (upstream's `ExternallyAccessible`).
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }

    /// Some traffic to this port is sent to cluster-wide endpoints: internal
    /// traffic under the Cluster policy, and any externally accessible port,
    /// because pods reaching an external address are short-circuited to the
    /// cluster endpoints even under `externalTrafficPolicy: Local` (upstream).
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible()
    }

    /// Some traffic to this port is sent only to node-local endpoints.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || (self.externally_accessible() && self.external_policy_local)
    }
}

/// What kproxy knows about its own node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    pub name: String,
    /// The `topology.kubernetes.io/zone` label, for zone hints.
    pub zone: Option<String>,
    /// The Node object has a deletionTimestamp: /healthz reports unhealthy.
    pub deleting: bool,
    /// `spec.podCIDRs`, for `--detect-local-mode=NodeCIDR`.
    pub pod_cidrs: Vec<IpNet>,
}

/// The kind of an API object a rejection refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    Node,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
        })
    }
}

/// An object (or part of one) that was not used, and why.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Rejection {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
    /// Names the field and the bad value, e.g. `spec.clusterIP "10.0.0.300" is not an IP address`.
    pub reason: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{}: {}",
            self.kind, self.namespace, self.name, self.reason
        )
    }
}

/// The service ports of one family, by name.
pub type FamilyState = BTreeMap<ServicePortName, Arc<ServicePort>>;

/// Everything the backends program.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProxyState {
    pub node: NodeInfo,
    #[serde(serialize_with = "serialize_family")]
    pub ipv4: FamilyState,
    #[serde(serialize_with = "serialize_family")]
    pub ipv6: FamilyState,
    /// Objects or parts of objects that were rejected, sorted.
    pub rejections: Vec<Rejection>,
}

/// JSON maps need string keys: a family is shown as the list of its ports
/// (each carries its own name).
fn serialize_family<S: serde::Serializer>(family: &FamilyState, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(family.values())
}

impl ProxyState {
    pub fn family(&self, family: IpFamily) -> &FamilyState {
        match family {
            IpFamily::V4 => &self.ipv4,
            IpFamily::V6 => &self.ipv6,
        }
    }

    pub fn family_mut(&mut self, family: IpFamily) -> &mut FamilyState {
        match family {
            IpFamily::V4 => &mut self.ipv4,
            IpFamily::V6 => &mut self.ipv6,
        }
    }

    /// Number of service ports over both families.
    pub fn service_port_count(&self) -> usize {
        self.ipv4.len() + self.ipv6.len()
    }

    /// Number of endpoints (all conditions) over both families.
    pub fn endpoint_count(&self) -> usize {
        self.ipv4
            .values()
            .chain(self.ipv6.values())
            .map(|sp| sp.endpoints.all.len())
            .sum()
    }
}

/// What changed since the last sync, as the backends need it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Service ports whose [`ServicePort`] differs from the last sync, was
    /// added, or was removed (then it is absent from the new state).
    pub ports: std::collections::BTreeSet<(IpFamily, ServicePortName)>,
    /// Periodic resync, relist after an outage, node change: the backend
    /// must do a full sync.
    pub force_full: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty() && !self.force_full
    }
}
