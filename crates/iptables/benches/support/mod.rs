//! The services both iptables benches plan: N ClusterIP services × 10
//! remote endpoints, with unique cluster and endpoint IPs.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use kproxy_model::{
    Endpoint, FamilyState, IpFamily, Protocol, ServiceEndpoints, ServiceKey, ServicePort,
    ServicePortName,
};

pub const ENDPOINTS: usize = 10;

pub fn v4(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(n))
}

pub fn service(i: usize, shift: u32) -> ServicePort {
    let eps: Vec<Endpoint> = (0..ENDPOINTS)
        .map(|e| Endpoint {
            // 10.64.0.0/10: unique per service and endpoint.
            ip: v4((10 << 24 | 64 << 16) + (i * ENDPOINTS + e) as u32 + shift),
            port: 8080,
            is_local: false,
            ready: true,
            serving: true,
            terminating: false,
        })
        .collect();
    ServicePort {
        name: ServicePortName {
            service: ServiceKey::new(format!("ns{}", i % 100), format!("svc{i}")),
            port: "http".into(),
            protocol: Protocol::Tcp,
        },
        family: IpFamily::V4,
        // 172.16.0.0/12
        cluster_ip: v4((172 << 24 | 16 << 16) + i as u32 + 1),
        port: 80,
        target_port: "8080".into(),
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
            cluster: eps,
            local: vec![],
            has_any: true,
        },
    }
}

pub fn state(n: usize) -> FamilyState {
    (0..n)
        .map(|i| {
            let sp = service(i, 0);
            (sp.name.clone(), Arc::new(sp))
        })
        .collect()
}
