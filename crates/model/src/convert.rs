//! Service object → validated [`ServicePort`]s (without endpoints).
//!
//! Follows upstream's `pkg/proxy/serviceport.go` and
//! `servicechangetracker.go`: one service port per (IP family, port), with
//! external IPs, load-balancer IPs and source ranges filtered per family.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::types::{
    IpFamily, Protocol, ServiceEndpoints, ServiceKey, ServicePort, ServicePortName,
};
use crate::validate::{self, FieldError};

/// Objects with this label belong to another proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Legacy way to set source ranges, read when the spec field is empty.
pub const ANNOTATION_LB_SOURCE_RANGES: &str =
    "service.beta.kubernetes.io/load-balancer-source-ranges";
/// Upstream's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_SECONDS: u32 = 10800;
/// Upstream's maximum ClientIP affinity timeout (1 day).
pub const MAX_AFFINITY_SECONDS: u32 = 86400;

/// The service ports of a Service, one per (family, port), sorted by
/// (family, name), with empty endpoints. `Ok(vec![])` for services kproxy
/// does not proxy (ExternalName, headless, another proxy's).
pub fn service_ports(key: &ServiceKey, svc: &Service) -> Result<Vec<ServicePort>, Vec<FieldError>> {
    let spec = match &svc.spec {
        Some(spec) => spec,
        None => return Ok(Vec::new()),
    };
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
        return Ok(Vec::new());
    }
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return Ok(Vec::new());
    }
    let cluster_ips: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    // Headless: no cluster IP, so nothing to proxy.
    if matches!(cluster_ips.first(), None | Some(&"") | Some(&"None")) {
        return Ok(Vec::new());
    }

    let mut errs = Vec::new();
    if !validate::is_dns1123_label(&key.namespace) {
        errs.push(FieldError::str(
            "metadata.namespace",
            &key.namespace,
            "is not a DNS-1123 label",
        ));
    }
    if !validate::is_dns1123_label(&key.name) {
        errs.push(FieldError::str(
            "metadata.name",
            &key.name,
            "is not a DNS-1123 label",
        ));
    }

    let (node_ports_allowed, is_lb) = match svc_type {
        "ClusterIP" => (false, false),
        "NodePort" => (true, false),
        "LoadBalancer" => (true, true),
        other => {
            errs.push(FieldError::str(
                "spec.type",
                other,
                "is not a known Service type",
            ));
            (false, false)
        }
    };

    // Cluster IPs: at most one per family.
    let mut by_family: Vec<(IpFamily, IpAddr)> = Vec::new();
    if cluster_ips.len() > 2 {
        errs.push(FieldError::new(
            "spec.clusterIPs",
            &cluster_ips,
            "has more than two addresses",
        ));
    }
    for (i, s) in cluster_ips.iter().enumerate() {
        match validate::parse_ip(s) {
            Some(ip) => {
                let fam = IpFamily::of(&ip);
                if by_family.iter().any(|(f, _)| *f == fam) {
                    errs.push(FieldError::str(
                        format!("spec.clusterIPs[{i}]"),
                        s,
                        format!("is a second {fam} address"),
                    ));
                } else {
                    by_family.push((fam, ip));
                }
            }
            None => errs.push(FieldError::str(
                format!("spec.clusterIPs[{i}]"),
                s,
                "is not an IP address",
            )),
        }
    }

    let external_ips = parse_ip_list(
        "spec.externalIPs",
        spec.external_ips.as_deref().unwrap_or_default(),
        &mut errs,
    );

    let mut lb_ips = Vec::new();
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default();
    for (i, ing) in ingress.iter().enumerate() {
        let Some(ip) = ing.ip.as_deref().filter(|s| !s.is_empty()) else {
            continue;
        };
        // Only VIP-mode ingress IPs are programmed (upstream's IsVIPMode):
        // with "Proxy" the load balancer delivers to the node IP instead.
        if !matches!(ing.ip_mode.as_deref(), None | Some("VIP")) {
            continue;
        }
        match validate::parse_ip(ip) {
            Some(ip) => lb_ips.push(ip),
            None => errs.push(FieldError::str(
                format!("status.loadBalancer.ingress[{i}].ip"),
                ip,
                "is not an IP address",
            )),
        }
    }

    let source_ranges = source_ranges(svc, &mut errs);

    let affinity_seconds = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        match timeout {
            None => Some(DEFAULT_AFFINITY_SECONDS),
            Some(t) => match u32::try_from(t) {
                Ok(t) if (1..=MAX_AFFINITY_SECONDS).contains(&t) => Some(t),
                _ => {
                    errs.push(FieldError::new(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        t,
                        format!("is not within 1..={MAX_AFFINITY_SECONDS}"),
                    ));
                    None
                }
            },
        }
    } else {
        None
    };

    // Upstream's apiservice.ExternallyAccessible / ExternalPolicyLocal /
    // NeedsHealthCheck, all decided on the whole Service.
    let externally_accessible = node_ports_allowed || !external_ips.is_empty();
    let external_policy_local =
        externally_accessible && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_policy_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port = if is_lb && external_policy_local {
        match spec.health_check_node_port {
            None | Some(0) => None,
            Some(p) => match validate::port(p) {
                Some(p) => Some(p),
                None => {
                    errs.push(FieldError::new(
                        "spec.healthCheckNodePort",
                        p,
                        "is not a port number",
                    ));
                    None
                }
            },
        }
    } else {
        None
    };

    struct Port {
        name: String,
        protocol: Protocol,
        port: u16,
        target: String,
        node_port: Option<u16>,
    }
    let mut ports = Vec::new();
    let mut seen_names = BTreeSet::new();
    let mut seen_ports = BTreeSet::new();
    for (i, p) in spec.ports.as_deref().unwrap_or_default().iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let name = p.name.clone().unwrap_or_default();
        // The API server validates Service port names as DNS-1123 labels
        // (not the 15-character IANA rule of container ports).
        if !name.is_empty() && !validate::is_dns1123_label(&name) {
            errs.push(FieldError::str(
                field("name"),
                &name,
                "is not a DNS-1123 label",
            ));
        }
        if !seen_names.insert(name.clone()) {
            errs.push(FieldError::str(
                field("name"),
                &name,
                "is used by another port of this Service",
            ));
        }
        let protocol = Protocol::from_api(p.protocol.as_deref());
        if protocol.is_none() {
            errs.push(FieldError::new(
                field("protocol"),
                p.protocol.as_deref().unwrap_or_default(),
                "is not TCP, UDP or SCTP",
            ));
        }
        let port = validate::port(p.port);
        if port.is_none() {
            errs.push(FieldError::new(
                field("port"),
                p.port,
                "is not a port number",
            ));
        }
        if let (Some(port), Some(protocol)) = (port, protocol) {
            if !seen_ports.insert((port, protocol)) {
                errs.push(FieldError::str(
                    field("port"),
                    &format!("{port}/{protocol}"),
                    "is used by another port of this Service",
                ));
            }
        }
        let node_port = match p.node_port {
            Some(np) if node_ports_allowed && np != 0 => match validate::port(np) {
                Some(np) => Some(np),
                None => {
                    errs.push(FieldError::new(
                        field("nodePort"),
                        np,
                        "is not a port number",
                    ));
                    None
                }
            },
            _ => None,
        };
        let target = match &p.target_port {
            None => port.map(|p| p.to_string()).unwrap_or_default(),
            Some(IntOrString::Int(n)) => match u16::try_from(*n) {
                Ok(n) => n.to_string(),
                Err(_) => {
                    errs.push(FieldError::new(
                        field("targetPort"),
                        n,
                        "is not a port number",
                    ));
                    String::new()
                }
            },
            Some(IntOrString::String(s)) => {
                if !validate::is_iana_svc_name(s) {
                    errs.push(FieldError::str(
                        field("targetPort"),
                        s,
                        "is not a valid port name",
                    ));
                }
                s.clone()
            }
        };
        if let (Some(port), Some(protocol)) = (port, protocol) {
            ports.push(Port {
                name,
                protocol,
                port,
                target,
                node_port,
            });
        }
    }

    if !errs.is_empty() {
        return Err(errs);
    }

    let mut out = Vec::with_capacity(by_family.len() * ports.len());
    by_family.sort();
    for (family, cluster_ip) in by_family {
        let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
            ips.iter()
                .copied()
                .filter(|ip| IpFamily::of(ip) == family)
                .collect()
        };
        let external_ips = of_family(&external_ips);
        let load_balancer_ips = of_family(&lb_ips);
        let load_balancer_source_ranges: Vec<IpNet> = source_ranges
            .iter()
            .copied()
            .filter(|n| IpFamily::of_net(n) == family)
            .collect();
        for p in &ports {
            out.push(ServicePort {
                name: ServicePortName {
                    service: key.clone(),
                    port: p.name.clone(),
                    protocol: p.protocol,
                },
                family,
                cluster_ip,
                port: p.port,
                target_port: p.target.clone(),
                node_port: p.node_port,
                external_ips: external_ips.clone(),
                load_balancer_ips: load_balancer_ips.clone(),
                load_balancer_source_ranges: load_balancer_source_ranges.clone(),
                session_affinity_seconds: affinity_seconds,
                external_policy_local,
                internal_policy_local,
                health_check_node_port,
                endpoints: ServiceEndpoints::default(),
            });
        }
    }
    out.sort_by(|a, b| (a.family, &a.name).cmp(&(b.family, &b.name)));
    Ok(out)
}

fn parse_ip_list(field: &str, list: &[String], errs: &mut Vec<FieldError>) -> Vec<IpAddr> {
    let mut out = Vec::with_capacity(list.len());
    for (i, s) in list.iter().enumerate() {
        match validate::parse_ip(s) {
            Some(ip) => {
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
            None => errs.push(FieldError::str(
                format!("{field}[{i}]"),
                s,
                "is not an IP address",
            )),
        }
    }
    out
}

/// `spec.loadBalancerSourceRanges`, or the legacy annotation when the field
/// is empty (upstream's `GetLoadBalancerSourceRanges`). Entries are trimmed:
/// API validation used to accept whitespace around them.
fn source_ranges(svc: &Service, errs: &mut Vec<FieldError>) -> Vec<IpNet> {
    let mut out = Vec::new();
    let mut push = |field: String, raw: &str, errs: &mut Vec<FieldError>| match validate::parse_cidr(
        raw.trim(),
    ) {
        Some(net) => {
            if !out.contains(&net) {
                out.push(net);
            }
        }
        None => errs.push(FieldError::str(field, raw, "is not a CIDR")),
    };
    let spec_ranges = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.as_deref())
        .unwrap_or_default();
    if !spec_ranges.is_empty() {
        for (i, r) in spec_ranges.iter().enumerate() {
            push(format!("spec.loadBalancerSourceRanges[{i}]"), r, errs);
        }
    } else if let Some(ann) = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_LB_SOURCE_RANGES))
    {
        let field = format!("metadata.annotations[{ANNOTATION_LB_SOURCE_RANGES}]");
        for r in ann.split(',').filter(|r| !r.trim().is_empty()) {
            push(field.clone(), r, errs);
        }
    }
    out
}
