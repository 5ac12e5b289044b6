//! Builders for Services, EndpointSlices and Nodes, for tests and benches
//! (enable the `fixtures` feature from other crates).
//!
//! ```ignore
//! let svc = SvcBuilder::new("ns", "web").cluster_ip("10.0.0.1").port("http", 80, "TCP").build();
//! let slice = SliceBuilder::new("ns", "web-1", "web", "IPv4")
//!     .port("http", 8080, "TCP")
//!     .endpoint(Ep::new("10.1.0.1").node("node-a"))
//!     .build();
//! ```

use std::collections::BTreeMap;

use crate::compat::ListField;
use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Node, NodeSpec, Service,
    ServicePort as ApiServicePort, ServiceSpec, ServiceStatus, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint as ApiEndpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
    ForNode, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The label that ties an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(ns.to_string()),
        name: Some(name.to_string()),
        ..ObjectMeta::default()
    }
}

/// Builds a [`Service`]; starts as type ClusterIP with no IP and no ports.
#[derive(Clone, Debug)]
pub struct SvcBuilder(Service);

impl SvcBuilder {
    pub fn new(ns: &str, name: &str) -> Self {
        SvcBuilder(Service {
            metadata: meta(ns, name),
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                ..ServiceSpec::default()
            }),
            status: None,
        })
    }

    fn spec(&mut self) -> &mut ServiceSpec {
        self.0.spec.get_or_insert_with(ServiceSpec::default)
    }

    /// Sets `clusterIP` and `clusterIPs = [ip]`.
    pub fn cluster_ip(mut self, ip: &str) -> Self {
        self.spec().cluster_ip = Some(ip.into());
        self.spec().cluster_ips = Some(vec![ip.into()]);
        self
    }

    /// Sets `clusterIPs` (and `clusterIP` to the first).
    pub fn cluster_ips(mut self, ips: &[&str]) -> Self {
        self.spec().cluster_ip = ips.first().map(|s| s.to_string());
        self.spec().cluster_ips = Some(ips.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn type_(mut self, t: &str) -> Self {
        self.spec().type_ = Some(t.into());
        self
    }

    /// Adds a port (name "" for unnamed) with targetPort = port.
    pub fn port(self, name: &str, port: i32, protocol: &str) -> Self {
        self.port_full(ApiServicePort {
            name: (!name.is_empty()).then(|| name.to_string()),
            port,
            protocol: Some(protocol.to_string()),
            target_port: Some(IntOrString::Int(port)),
            ..ApiServicePort::default()
        })
    }

    /// Adds a port with a nodePort.
    pub fn node_port(self, name: &str, port: i32, protocol: &str, node_port: i32) -> Self {
        self.port_full(ApiServicePort {
            name: (!name.is_empty()).then(|| name.to_string()),
            port,
            protocol: Some(protocol.to_string()),
            node_port: Some(node_port),
            target_port: Some(IntOrString::Int(port)),
            ..ApiServicePort::default()
        })
    }

    pub fn port_full(mut self, p: ApiServicePort) -> Self {
        self.spec().ports.get_or_insert_with(Vec::new).push(p);
        self
    }

    pub fn external_ips(mut self, ips: &[&str]) -> Self {
        self.spec().external_ips = Some(ips.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Adds a `status.loadBalancer.ingress` entry.
    pub fn lb_ingress(mut self, ip: &str, ip_mode: Option<&str>) -> Self {
        self.0
            .status
            .get_or_insert_with(ServiceStatus::default)
            .load_balancer
            .get_or_insert_with(LoadBalancerStatus::default)
            .ingress
            .get_or_insert_with(Vec::new)
            .push(LoadBalancerIngress {
                ip: Some(ip.into()),
                ip_mode: ip_mode.map(Into::into),
                ..LoadBalancerIngress::default()
            });
        self
    }

    pub fn source_ranges(mut self, ranges: &[&str]) -> Self {
        self.spec().load_balancer_source_ranges =
            Some(ranges.iter().map(|s| s.to_string()).collect());
        self
    }

    /// ClientIP affinity; `None` leaves the timeout unset (the default applies).
    pub fn affinity(mut self, timeout: Option<i32>) -> Self {
        self.spec().session_affinity = Some("ClientIP".into());
        self.spec().session_affinity_config = Some(SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: timeout,
            }),
        });
        self
    }

    pub fn external_traffic_policy(mut self, p: &str) -> Self {
        self.spec().external_traffic_policy = Some(p.into());
        self
    }

    pub fn internal_traffic_policy(mut self, p: &str) -> Self {
        self.spec().internal_traffic_policy = Some(p.into());
        self
    }

    pub fn health_check_node_port(mut self, p: i32) -> Self {
        self.spec().health_check_node_port = Some(p);
        self
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(k.into(), v.into());
        self
    }

    pub fn annotation(mut self, k: &str, v: &str) -> Self {
        self.0
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(k.into(), v.into());
        self
    }

    /// Sets uid and resourceVersion.
    pub fn version(mut self, uid: &str, rv: &str) -> Self {
        self.0.metadata.uid = Some(uid.into());
        self.0.metadata.resource_version = Some(rv.into());
        self
    }

    /// Direct access for anything the builder does not cover.
    pub fn with(mut self, f: impl FnOnce(&mut Service)) -> Self {
        f(&mut self.0);
        self
    }

    pub fn build(self) -> Service {
        self.0
    }
}

/// Builds one endpoint of an [`EndpointSlice`]; conditions unset (meaning
/// ready, serving, not terminating) unless set.
#[derive(Clone, Debug)]
pub struct Ep(ApiEndpoint);

impl Ep {
    pub fn new(ip: &str) -> Self {
        Ep(ApiEndpoint {
            addresses: vec![ip.into()],
            ..ApiEndpoint::default()
        })
    }

    fn cond(&mut self) -> &mut EndpointConditions {
        self.0
            .conditions
            .get_or_insert_with(EndpointConditions::default)
    }

    pub fn ready(mut self, v: bool) -> Self {
        self.cond().ready = Some(v);
        self
    }

    pub fn serving(mut self, v: bool) -> Self {
        self.cond().serving = Some(v);
        self
    }

    pub fn terminating(mut self, v: bool) -> Self {
        self.cond().terminating = Some(v);
        self
    }

    /// Ready=false, serving=true, terminating=true: a pod shutting down
    /// gracefully.
    pub fn terminating_serving(self) -> Self {
        self.ready(false).serving(true).terminating(true)
    }

    pub fn node(mut self, name: &str) -> Self {
        self.0.node_name = Some(name.into());
        self
    }

    pub fn zone(mut self, zone: &str) -> Self {
        self.0.zone = Some(zone.into());
        self
    }

    pub fn zone_hints(mut self, zones: &[&str]) -> Self {
        self.0
            .hints
            .get_or_insert_with(EndpointHints::default)
            .for_zones = Some(
            zones
                .iter()
                .map(|z| ForZone {
                    name: z.to_string(),
                })
                .collect(),
        );
        self
    }

    pub fn node_hints(mut self, nodes: &[&str]) -> Self {
        self.0
            .hints
            .get_or_insert_with(EndpointHints::default)
            .for_nodes = Some(
            nodes
                .iter()
                .map(|n| ForNode {
                    name: n.to_string(),
                })
                .collect(),
        );
        self
    }

    pub fn addresses(mut self, ips: &[&str]) -> Self {
        self.0.addresses = ips.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn build(self) -> ApiEndpoint {
        self.0
    }
}

/// Builds an [`EndpointSlice`] labelled for its Service.
#[derive(Clone, Debug)]
pub struct SliceBuilder(EndpointSlice);

impl SliceBuilder {
    /// `family` is the addressType: "IPv4", "IPv6" or "FQDN".
    pub fn new(ns: &str, name: &str, service: &str, family: &str) -> Self {
        let mut m = meta(ns, name);
        m.labels = Some(BTreeMap::from([(
            LABEL_SERVICE_NAME.to_string(),
            service.to_string(),
        )]));
        SliceBuilder(EndpointSlice {
            metadata: m,
            address_type: family.into(),
            endpoints: Default::default(),
            ports: None,
        })
    }

    /// Adds a port (name "" for unnamed).
    pub fn port(mut self, name: &str, port: i32, protocol: &str) -> Self {
        self.0
            .ports
            .get_or_insert_with(Vec::new)
            .push(EndpointPort {
                name: Some(name.into()),
                port: Some(port),
                protocol: Some(protocol.into()),
                app_protocol: None,
            });
        self
    }

    pub fn port_full(mut self, p: EndpointPort) -> Self {
        self.0.ports.get_or_insert_with(Vec::new).push(p);
        self
    }

    pub fn endpoint(mut self, ep: Ep) -> Self {
        self.0.endpoints.items_mut().push(ep.build());
        self
    }

    /// Adds ready endpoints with no node.
    pub fn ready_ips(mut self, ips: &[&str]) -> Self {
        for ip in ips {
            self.0.endpoints.items_mut().push(Ep::new(ip).build());
        }
        self
    }

    pub fn version(mut self, uid: &str, rv: &str) -> Self {
        self.0.metadata.uid = Some(uid.into());
        self.0.metadata.resource_version = Some(rv.into());
        self
    }

    pub fn with(mut self, f: impl FnOnce(&mut EndpointSlice)) -> Self {
        f(&mut self.0);
        self
    }

    pub fn build(self) -> EndpointSlice {
        self.0
    }
}

/// A Node with an optional zone label.
pub fn node(name: &str, zone: Option<&str>) -> Node {
    let mut m = ObjectMeta {
        name: Some(name.into()),
        ..ObjectMeta::default()
    };
    if let Some(zone) = zone {
        m.labels = Some(BTreeMap::from([(
            crate::builder::LABEL_TOPOLOGY_ZONE.to_string(),
            zone.to_string(),
        )]));
    }
    Node {
        metadata: m,
        spec: Some(NodeSpec::default()),
        status: None,
    }
}

/// Marks a Node as being deleted.
pub fn deleting(mut node: Node) -> Node {
    node.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
    node
}

/// Sets a Node's `spec.podCIDRs`.
pub fn with_pod_cidrs(mut node: Node, cidrs: &[&str]) -> Node {
    node.spec.get_or_insert_with(NodeSpec::default).pod_cidrs =
        Some(cidrs.iter().map(|s| s.to_string()).collect());
    node
}

/// A ClusterIP Service with one unnamed TCP port.
pub fn simple_service(ns: &str, name: &str, ip: &str, port: i32) -> Service {
    SvcBuilder::new(ns, name)
        .cluster_ip(ip)
        .port("", port, "TCP")
        .build()
}

/// An IPv4 slice for `service` with one unnamed TCP port and ready endpoints.
pub fn simple_slice(
    ns: &str,
    service: &str,
    slice: &str,
    port: i32,
    ips: &[&str],
) -> EndpointSlice {
    SliceBuilder::new(ns, slice, service, "IPv4")
        .port("", port, "TCP")
        .ready_ips(ips)
        .build()
}
