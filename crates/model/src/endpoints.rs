//! EndpointSlices → endpoints of a service port, and the choice among them.
//!
//! Parsing follows upstream's `pkg/proxy/endpointslicecache.go`; the choice
//! follows `pkg/proxy/topology.go` (`CategorizeEndpoints`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::compat::ListField;
use crate::types::{Endpoint, IpFamily, NodeInfo, Protocol, ServiceEndpoints, ServicePort};
use crate::validate::{self, FieldError};

/// The parts of an EndpointSlice kproxy uses, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedSlice {
    /// `None` for FQDN slices, which kube-proxy ignores.
    pub family: Option<IpFamily>,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<ParsedEndpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// Empty for an unnamed port (`name` absent or "").
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedEndpoint {
    pub ip: IpAddr,
    pub is_local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Boxed: most endpoints have no hints, and inline they would double
    /// the size of every parsed endpoint.
    pub hints: Option<Box<Hints>>,
}

/// An endpoint's topology hints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hints {
    /// `hints.forZones[].name`.
    pub zones: Box<[String]>,
    /// `hints.forNodes[].name`.
    pub nodes: Box<[String]>,
}

impl ParsedEndpoint {
    /// Empty when the endpoint has no zone hint.
    pub fn zone_hints(&self) -> &[String] {
        self.hints.as_deref().map_or(&[], |h| &h.zones)
    }

    /// Empty when the endpoint has no node hint.
    pub fn node_hints(&self) -> &[String] {
        self.hints.as_deref().map_or(&[], |h| &h.nodes)
    }
}

/// Validates and parses one slice. `namespace` is the Service's: a slice
/// elsewhere cannot belong to it.
pub fn parse_slice(
    namespace: &str,
    slice: &EndpointSlice,
    node_name: &str,
) -> Result<ParsedSlice, Vec<FieldError>> {
    let mut errs = Vec::new();
    let name = slice.metadata.name.as_deref().unwrap_or_default();
    if !validate::is_dns1123_subdomain(name) {
        errs.push(FieldError::str(
            "metadata.name",
            name,
            "is not a DNS-1123 subdomain",
        ));
    }
    let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
    if ns != namespace {
        errs.push(FieldError::str(
            "metadata.namespace",
            ns,
            format!(
                "is not the Service's namespace {}",
                validate::quote(namespace)
            ),
        ));
    }
    let family = match slice.address_type.as_str() {
        "IPv4" => Some(IpFamily::V4),
        "IPv6" => Some(IpFamily::V6),
        // Upstream ignores FQDN slices entirely.
        "FQDN" => None,
        other => {
            errs.push(FieldError::str(
                "addressType",
                other,
                "is not IPv4, IPv6 or FQDN",
            ));
            None
        }
    };
    if family.is_none() {
        return if errs.is_empty() {
            Ok(ParsedSlice {
                family: None,
                ports: Vec::new(),
                endpoints: Vec::new(),
            })
        } else {
            Err(errs)
        };
    }

    let mut ports = Vec::new();
    for (i, p) in slice
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let name = p.name.clone().unwrap_or_default();
        if !name.is_empty() && !validate::is_dns1123_label(&name) {
            errs.push(FieldError::str(
                format!("ports[{i}].name"),
                &name,
                "is not a DNS-1123 label",
            ));
        }
        let protocol = Protocol::from_api(p.protocol.as_deref());
        if protocol.is_none() {
            errs.push(FieldError::new(
                format!("ports[{i}].protocol"),
                p.protocol.as_deref().unwrap_or_default(),
                "is not TCP, UDP or SCTP",
            ));
        }
        let port = match p.port {
            // Upstream skips ports without a number ("all ports" is not
            // implemented anywhere).
            None | Some(0) => None,
            Some(n) => match validate::port(n) {
                Some(n) => Some(n),
                None => {
                    errs.push(FieldError::new(
                        format!("ports[{i}].port"),
                        n,
                        "is not a port number",
                    ));
                    None
                }
            },
        };
        if let (Some(protocol), Some(port)) = (protocol, port) {
            ports.push(SlicePort {
                name,
                protocol,
                port,
            });
        }
    }

    let mut endpoints = Vec::with_capacity(slice.endpoints.items().len());
    for (i, ep) in slice.endpoints.items().iter().enumerate() {
        let mut first = None;
        for (j, a) in ep.addresses.iter().enumerate() {
            match validate::parse_ip(a) {
                Some(ip) if Some(IpFamily::of(&ip)) == family => {
                    first.get_or_insert(ip);
                }
                Some(_) => errs.push(FieldError::str(
                    format!("endpoints[{i}].addresses[{j}]"),
                    a,
                    format!("is not an {} address", slice.address_type),
                )),
                None => errs.push(FieldError::str(
                    format!("endpoints[{i}].addresses[{j}]"),
                    a,
                    "is not an IP address",
                )),
            }
        }
        // Addresses are fungible: like upstream, use the first one. An
        // endpoint without addresses is skipped.
        let Some(ip) = first else { continue };
        let cond = ep.conditions.as_ref();
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        let hints = ep.hints.as_ref();
        let zones: Box<[String]> = hints
            .and_then(|h| h.for_zones.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|z| z.name.clone())
            .collect();
        let nodes: Box<[String]> = hints
            .and_then(|h| h.for_nodes.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|n| n.name.clone())
            .collect();
        let hints =
            (!zones.is_empty() || !nodes.is_empty()).then(|| Box::new(Hints { zones, nodes }));
        endpoints.push(ParsedEndpoint {
            ip,
            is_local: !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name),
            ready,
            serving,
            terminating,
            hints,
        });
    }

    if errs.is_empty() {
        Ok(ParsedSlice {
            family,
            ports,
            endpoints,
        })
    } else {
        Err(errs)
    }
}

/// Upstream's `Endpoint.IsServing` is "ready regardless of terminating";
/// the fallback set is serving and terminating.
fn is_fallback(ep: &Endpoint) -> bool {
    ep.serving && ep.terminating
}

/// Collects the endpoints of `sp` from `slices` (in a fixed order: the
/// caller iterates slices by name) and chooses the cluster and local sets.
pub fn select<'a>(
    sp: &ServicePort,
    slices: impl IntoIterator<Item = &'a ParsedSlice>,
    node: &NodeInfo,
) -> ServiceEndpoints {
    // (ip, port) → (endpoint, its hints). An endpoint moving between slices
    // is briefly in both; like upstream, a non-terminating copy wins over a
    // terminating one (a pod IP reused while the old pod terminates).
    let mut found: BTreeMap<(IpAddr, u16), (Endpoint, &'a ParsedEndpoint)> = BTreeMap::new();
    for slice in slices {
        if slice.family != Some(sp.family) {
            continue;
        }
        for port in &slice.ports {
            if port.name != sp.name.port || port.protocol != sp.name.protocol {
                continue;
            }
            for pe in &slice.endpoints {
                let ep = Endpoint {
                    ip: pe.ip,
                    port: port.port,
                    is_local: pe.is_local,
                    ready: pe.ready,
                    serving: pe.serving,
                    terminating: pe.terminating,
                };
                match found.entry((pe.ip, port.port)) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert((ep, pe));
                    }
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        if !pe.terminating && o.get().0.terminating {
                            o.insert((ep, pe));
                        }
                    }
                }
            }
        }
    }
    let candidates: Vec<(Endpoint, &ParsedEndpoint)> = found.into_values().collect();
    categorize(sp, &candidates, node)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    None,
    SameNode,
    SameZone,
}

/// Upstream's `topologyModeFromHints`.
fn topology_mode(candidates: &[(Endpoint, &ParsedEndpoint)], node: &NodeInfo) -> Topology {
    let zone = node.zone.as_deref().unwrap_or_default();
    let mut has_ready = false;
    let mut all_node_hints = true;
    let mut for_node = false;
    let mut all_zone_hints = true;
    let mut for_zone = false;
    for (ep, pe) in candidates {
        if !ep.ready {
            continue;
        }
        has_ready = true;
        if pe.node_hints().is_empty() {
            all_node_hints = false;
        } else if pe.node_hints().contains(&node.name) {
            for_node = true;
        }
        if pe.zone_hints().is_empty() {
            all_zone_hints = false;
        } else if pe.zone_hints().iter().any(|z| z == zone) {
            for_zone = true;
        }
    }
    if !has_ready {
        Topology::None
    } else if all_node_hints && for_node {
        Topology::SameNode
    } else if all_zone_hints && for_zone {
        Topology::SameZone
    } else {
        Topology::None
    }
}

fn available(pe: &ParsedEndpoint, mode: Topology, node: &NodeInfo) -> bool {
    match mode {
        Topology::None => true,
        Topology::SameNode => pe.node_hints().contains(&node.name),
        Topology::SameZone => {
            let zone = node.zone.as_deref().unwrap_or_default();
            pe.zone_hints().iter().any(|z| z == zone)
        }
    }
}

/// Upstream's `CategorizeEndpoints`. `candidates` is sorted and unique.
fn categorize(
    sp: &ServicePort,
    candidates: &[(Endpoint, &ParsedEndpoint)],
    node: &NodeInfo,
) -> ServiceEndpoints {
    let all: Vec<Endpoint> = candidates.iter().map(|(ep, _)| *ep).collect();
    let mut out = ServiceEndpoints {
        all,
        ..ServiceEndpoints::default()
    };
    if candidates.is_empty() {
        return out;
    }

    if sp.uses_cluster_endpoints() {
        let mode = topology_mode(candidates, node);
        out.cluster = candidates
            .iter()
            .filter(|(ep, pe)| ep.ready && available(pe, mode, node))
            .map(|(ep, _)| *ep)
            .collect();
        // No ready endpoint anywhere (topology is only used when a ready
        // endpoint matches it): fall back to serving terminating ones.
        if out.cluster.is_empty() {
            out.cluster = out.all.iter().copied().filter(is_fallback).collect();
        }
        out.has_any = !out.cluster.is_empty();
    }

    if sp.uses_local_endpoints() {
        let mut local_ready = false;
        let mut local_fallback = false;
        for ep in &out.all {
            if ep.ready {
                out.has_any = true;
                local_ready |= ep.is_local;
            } else if is_fallback(ep) {
                out.has_any = true;
                local_fallback |= ep.is_local;
            }
        }
        if local_ready {
            out.local = out
                .all
                .iter()
                .copied()
                .filter(|ep| ep.is_local && ep.ready)
                .collect();
        } else if local_fallback {
            out.local = out
                .all
                .iter()
                .copied()
                .filter(|ep| ep.is_local && is_fallback(ep))
                .collect();
        }
    }
    out
}
