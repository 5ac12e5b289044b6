//! The resource types the fake API server knows, and their per-kind defaulting.

use serde_json::Value;

/// One served resource: where it lives in the URL space and what it is called.
#[derive(Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// URL path segment, e.g. `services`.
    pub plural: &'static str,
    pub namespaced: bool,
    /// Whether `/status` is a separate subresource (then a main-resource PUT
    /// keeps the stored status, as the real server does).
    pub status_subresource: bool,
}

impl ResourceType {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// Checks that a JSON object has the shape of this kind, using the
    /// k8s-openapi type, so malformed bodies get a 400 like on a real server.
    pub fn validate(&self, obj: &Value) -> Result<(), String> {
        use k8s_openapi::api;
        fn check<T: serde::de::DeserializeOwned>(v: &Value) -> Result<(), String> {
            T::deserialize(v).map(|_| ()).map_err(|e| e.to_string())
        }
        match (self.group, self.kind) {
            ("", "Service") => check::<api::core::v1::Service>(obj),
            ("", "Node") => check::<api::core::v1::Node>(obj),
            ("", "Event") => check::<api::core::v1::Event>(obj),
            ("discovery.k8s.io", "EndpointSlice") => {
                check::<api::discovery::v1::EndpointSlice>(obj)
            }
            ("events.k8s.io", "Event") => check::<api::events::v1::Event>(obj),
            _ => Ok(()),
        }
    }
}

pub const SERVICES: ResourceType = ResourceType {
    group: "",
    version: "v1",
    kind: "Service",
    plural: "services",
    namespaced: true,
    status_subresource: true,
};
pub const NODES: ResourceType = ResourceType {
    group: "",
    version: "v1",
    kind: "Node",
    plural: "nodes",
    namespaced: false,
    status_subresource: true,
};
pub const CORE_EVENTS: ResourceType = ResourceType {
    group: "",
    version: "v1",
    kind: "Event",
    plural: "events",
    namespaced: true,
    status_subresource: false,
};
pub const ENDPOINT_SLICES: ResourceType = ResourceType {
    group: "discovery.k8s.io",
    version: "v1",
    kind: "EndpointSlice",
    plural: "endpointslices",
    namespaced: true,
    status_subresource: false,
};
pub const EVENTS_V1: ResourceType = ResourceType {
    group: "events.k8s.io",
    version: "v1",
    kind: "Event",
    plural: "events",
    namespaced: true,
    status_subresource: false,
};

/// Every served resource. Its index is the resource's id in the store.
pub static ALL: [&ResourceType; 5] = [
    &SERVICES,
    &NODES,
    &CORE_EVENTS,
    &ENDPOINT_SLICES,
    &EVENTS_V1,
];

/// Index into [`ALL`].
pub type ResourceId = usize;

pub fn by_path(group: &str, version: &str, plural: &str) -> Option<ResourceId> {
    ALL.iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

pub fn by_api_version_kind(api_version: &str, kind: &str) -> Option<ResourceId> {
    ALL.iter()
        .position(|r| r.api_version() == api_version && r.kind == kind)
}

/// Server-side defaults for Services, as the real API server applies them
/// (type, protocols, target ports, traffic policies, IP families). IP and
/// port allocation happens in the store, which knows what is taken.
pub fn default_service(svc: &mut Value) {
    let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let ty = spec
        .entry("type")
        .or_insert_with(|| Value::from("ClusterIP"))
        .as_str()
        .unwrap_or("ClusterIP")
        .to_string();
    if ty == "ExternalName" {
        return;
    }
    spec.entry("sessionAffinity")
        .or_insert_with(|| Value::from("None"));
    spec.entry("internalTrafficPolicy")
        .or_insert_with(|| Value::from("Cluster"));
    if ty == "NodePort" || ty == "LoadBalancer" {
        spec.entry("externalTrafficPolicy")
            .or_insert_with(|| Value::from("Cluster"));
    }
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for port in ports.iter_mut().filter_map(Value::as_object_mut) {
            port.entry("protocol").or_insert_with(|| Value::from("TCP"));
            if let Some(p) = port.get("port").cloned() {
                port.entry("targetPort").or_insert(p);
            }
        }
    }
}
