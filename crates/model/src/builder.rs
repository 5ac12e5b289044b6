//! Incremental construction of the [`ProxyState`] from API objects.
//!
//! The watch layer calls [`StateBuilder::update_service`] for every service
//! whose Service object or EndpointSlices changed; only that service is
//! recomputed, so a sync costs O(changed services).

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::types::{IpFamily, ProxyState, Rejection, ServiceKey, ServicePortName};

/// The result of recomputing one service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceUpdate {
    /// Service ports (per family) that were added, removed or changed.
    pub changed_ports: BTreeSet<(IpFamily, ServicePortName)>,
    /// Rejections of this service or its slices that were not reported
    /// before (so a periodic resync does not repeat the same warning).
    pub new_rejections: Vec<Rejection>,
}

/// Owns the current [`ProxyState`] and updates it one service at a time.
#[derive(Debug, Default)]
pub struct StateBuilder {
    state: ProxyState,
}

impl StateBuilder {
    /// A builder for the node named `node_name` (endpoints whose `nodeName`
    /// equals it are local).
    pub fn new(node_name: impl Into<String>) -> Self {
        let mut state = ProxyState::default();
        state.node.name = node_name.into();
        StateBuilder { state }
    }

    /// Takes the own Node object (`None` if it does not exist or is not
    /// known yet). Returns true when something that affects endpoint
    /// selection changed (the zone label): the caller must then recompute
    /// every service.
    pub fn set_node(&mut self, node: Option<&Node>) -> bool {
        let _ = node;
        todo!("implemented by the model work")
    }

    /// Recomputes one service from its Service object (`None` when deleted)
    /// and every EndpointSlice labelled `kubernetes.io/service-name` with its
    /// name in its namespace.
    pub fn update_service(
        &mut self,
        key: &ServiceKey,
        service: Option<&Service>,
        slices: &[&EndpointSlice],
    ) -> ServiceUpdate {
        let _ = (key, service, slices);
        todo!("implemented by the model work")
    }

    /// Every service currently known (including ones that yield no ports),
    /// for a full recompute after a node change.
    pub fn service_keys(&self) -> Vec<ServiceKey> {
        todo!("implemented by the model work")
    }

    pub fn state(&self) -> &ProxyState {
        &self.state
    }
}
