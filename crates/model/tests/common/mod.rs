//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_model::{
    IpFamily, Protocol, ServiceKey, ServicePort, ServicePortName, ServiceUpdate, StateBuilder,
};

pub const NODE: &str = "node-a";

pub fn key(ns: &str, name: &str) -> ServiceKey {
    ServiceKey::new(ns, name)
}

pub fn spn(ns: &str, name: &str, port: &str, proto: Protocol) -> ServicePortName {
    ServicePortName {
        service: key(ns, name),
        port: port.into(),
        protocol: proto,
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Feeds one service and its slices into `b`.
pub fn update(b: &mut StateBuilder, svc: &Service, slices: &[EndpointSlice]) -> ServiceUpdate {
    let ns = svc.metadata.namespace.clone().unwrap();
    let name = svc.metadata.name.clone().unwrap();
    let refs: Vec<&EndpointSlice> = slices.iter().collect();
    b.update_service(&key(&ns, &name), Some(svc), &refs)
}

pub fn get(
    b: &StateBuilder,
    fam: IpFamily,
    ns: &str,
    name: &str,
    port: &str,
    proto: Protocol,
) -> Arc<ServicePort> {
    b.state()
        .family(fam)
        .get(&spn(ns, name, port, proto))
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no {fam} port {ns}/{name}:{port}/{proto} in {:#?}",
                b.state()
            )
        })
}

/// `ip:port` strings of endpoints, for compact assertions.
pub fn addrs(eps: &[kproxy_model::Endpoint]) -> Vec<String> {
    eps.iter().map(|e| e.addr_string()).collect()
}
