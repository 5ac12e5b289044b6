//! Services and EndpointSlices reduced to what the builder reads, parsed
//! once when they arrive.
//!
//! The watch cache keeps these instead of the API objects: a k8s-openapi
//! `EndpointSlice` of ten endpoints takes ≈ 4 kB, mostly `None` fields,
//! and 10k services cost ≈ 100 MB that way. The builder shares the parsed
//! parts (`Arc`s) instead of copying them.
//!
//! Equality is on content: two versions of an object that differ only in
//! fields kproxy ignores (labels, targetRef, resourceVersion, …) are equal,
//! so they cause no sync.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::convert;
use crate::endpoints::{self, ParsedSlice};
use crate::types::{ServiceKey, ServicePort};
use crate::validate;

/// A Service as the builder needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceObject {
    /// Its service ports (endpoints still empty), or why it is invalid.
    pub(crate) ports: Result<Arc<[ServicePort]>, String>,
    /// `metadata.creationTimestamp`: the older service wins a conflict.
    pub(crate) created: Option<jiff::Timestamp>,
}

impl ServiceObject {
    /// Validates and converts `svc`, known under `key`.
    pub fn parse(key: &ServiceKey, svc: &Service) -> Self {
        ServiceObject {
            ports: convert::service_ports(key, svc)
                .map(Arc::from)
                .map_err(|errs| validate::reason(&errs)),
            created: svc.metadata.creation_timestamp.as_ref().map(|t| t.0),
        }
    }

    /// Its service ports (endpoints still empty), or why it is invalid.
    pub fn ports(&self) -> Result<&[ServicePort], &str> {
        self.ports.as_deref().map_err(String::as_str)
    }
}

/// An EndpointSlice as the builder needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceObject {
    pub(crate) name: String,
    pub(crate) namespace: String,
    /// Its endpoints, or why it is invalid.
    pub(crate) parsed: Result<Arc<ParsedSlice>, String>,
}

impl SliceObject {
    /// Validates and parses `slice` as one of the slices of a service in
    /// `service_namespace`; endpoints on `node_name` are local, so the
    /// result is only valid for a builder of that node.
    pub fn parse(service_namespace: &str, slice: &EndpointSlice, node_name: &str) -> Self {
        SliceObject {
            name: slice.metadata.name.clone().unwrap_or_default(),
            namespace: slice.metadata.namespace.clone().unwrap_or_default(),
            parsed: endpoints::parse_slice(service_namespace, slice, node_name)
                .map(Arc::new)
                .map_err(|errs| validate::reason(&errs)),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its endpoints, or why it is invalid.
    pub fn parsed(&self) -> Result<&ParsedSlice, &str> {
        self.parsed.as_deref().map_err(String::as_str)
    }
}
