//! Incremental construction of the [`ProxyState`] from API objects.
//!
//! The watch layer calls [`StateBuilder::update_service`] for every service
//! whose Service object or EndpointSlices changed; only that service is
//! recomputed, so a sync costs O(changed services).
//!
//! Bad input loses nothing: an invalid Service or EndpointSlice is rejected
//! whole, reported once, and its previous valid version stays in use until
//! a valid version arrives or the object is deleted.
//!
//! Services that claim the same NodePort or the same `IP:port/protocol` are
//! resolved by age (see [`crate::conflicts`]): the newer one loses only the
//! contested part, with a rejection, and gets it back when the older one
//! goes away or lets go of it.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::conflicts::{self, Claim, Claimant};
use crate::endpoints::{self, ParsedSlice};
use crate::objects::{ServiceObject, SliceObject};
use crate::types::{
    IpFamily, NodeInfo, ObjectKind, ProxyState, Rejection, ServiceKey, ServicePort, ServicePortName,
};
use crate::validate;

/// The Node label holding the node's zone, for zone hints.
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

/// The result of recomputing one service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceUpdate {
    /// Service ports (per family) that were added, removed or changed.
    pub changed_ports: BTreeSet<(IpFamily, ServicePortName)>,
    /// Rejections of this service or its slices that were not reported
    /// before (so a periodic resync does not repeat the same warning),
    /// including conflicts it lost and conflicts other services now lose
    /// to it.
    pub new_rejections: Vec<Rejection>,
}

#[derive(Debug, Default)]
struct SliceEntry {
    /// The last valid version, kept while the current one is invalid.
    valid: Option<Arc<ParsedSlice>>,
    /// Boxed, like the service's: rejections are rare, and inline they
    /// would make every entry 80 bytes larger.
    rejection: Option<Box<Rejection>>,
}

/// A service's slices by name, sorted. A Vec, not a BTreeMap: most
/// services have one slice, and a BTreeMap's leaf node has room for eleven
/// entries (≈ 1.8 kB per service at 10k services).
#[derive(Debug, Default)]
struct SliceEntries(Vec<(String, SliceEntry)>);

impl SliceEntries {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.as_str().cmp(name))
    }

    fn contains_key(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    fn remove(&mut self, name: &str) -> Option<SliceEntry> {
        self.find(name).ok().map(|at| self.0.remove(at).1)
    }

    fn insert(&mut self, name: String, entry: SliceEntry) {
        match self.find(&name) {
            Ok(at) => self.0[at].1 = entry,
            Err(at) => {
                // `insert` alone would reserve room for four.
                self.0.reserve_exact(1);
                self.0.insert(at, (name, entry));
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn values(&self) -> impl Iterator<Item = &SliceEntry> {
        self.0.iter().map(|(_, e)| e)
    }

    fn into_values(self) -> impl Iterator<Item = SliceEntry> {
        self.0.into_iter().map(|(_, e)| e)
    }
}

#[derive(Debug, Default)]
struct ServiceEntry {
    /// Ports (no endpoints yet) of the last valid version of the Service.
    valid: Option<Arc<[ServicePort]>>,
    /// The creationTimestamp of that version: decides conflicts.
    created: Option<jiff::Timestamp>,
    /// What the valid ports claim, as registered in the conflict index;
    /// sorted, without duplicates. A boxed slice, not a BTreeSet: most
    /// services claim one key, and a BTreeSet's leaf node has room for
    /// eleven (≈ 1.5 kB per service at 10k services).
    claims: Box<[(Claim, Claimant)]>,
    /// The parts lost to older services, if any.
    conflict: Option<Box<Rejection>>,
    rejection: Option<Box<Rejection>>,
    /// By slice name, sorted (see [`SliceEntries`]).
    slices: SliceEntries,
    /// Keys this service has in the state.
    ports: Vec<(IpFamily, ServicePortName)>,
}

impl ServiceEntry {
    fn is_empty(&self) -> bool {
        self.valid.is_none()
            && self.rejection.is_none()
            && self.conflict.is_none()
            && self.claims.is_empty()
            && self.slices.is_empty()
            && self.ports.is_empty()
    }
}

/// Owns the current [`ProxyState`] and updates it one service at a time.
#[derive(Debug, Default)]
pub struct StateBuilder {
    state: ProxyState,
    services: HashMap<ServiceKey, ServiceEntry>,
    node_rejection: Option<Rejection>,
    conflicts: conflicts::Index,
}

impl StateBuilder {
    /// A builder for the node named `node_name` (endpoints whose `nodeName`
    /// equals it are local).
    pub fn new(node_name: impl Into<String>) -> Self {
        let mut state = ProxyState::default();
        state.node.name = node_name.into();
        StateBuilder {
            state,
            services: HashMap::new(),
            node_rejection: None,
            conflicts: conflicts::Index::default(),
        }
    }

    /// Takes the own Node object (`None` if it does not exist or is not
    /// known yet). Returns true when something that affects endpoint
    /// selection changed (the zone label): the caller must then recompute
    /// every service (see [`StateBuilder::reselect_all`]).
    ///
    /// The node's name never changes: it is the builder's.
    pub fn set_node(&mut self, node: Option<&Node>) -> bool {
        let mut info = NodeInfo {
            name: self.state.node.name.clone(),
            ..NodeInfo::default()
        };
        let mut errs = Vec::new();
        if let Some(node) = node {
            info.zone = node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_TOPOLOGY_ZONE))
                .cloned();
            info.deleting = node.metadata.deletion_timestamp.is_some();
            let cidrs = node
                .spec
                .as_ref()
                .and_then(|s| s.pod_cidrs.as_deref())
                .unwrap_or_default();
            for (i, c) in cidrs.iter().enumerate() {
                match validate::parse_cidr(c.trim()) {
                    Some(net) => info.pod_cidrs.push(net),
                    None => errs.push(validate::FieldError::str(
                        format!("spec.podCIDRs[{i}]"),
                        c,
                        "is not a CIDR",
                    )),
                }
            }
        }
        let rejection = (!errs.is_empty()).then(|| Rejection {
            kind: ObjectKind::Node,
            namespace: String::new(),
            name: validate::display_name(&info.name),
            reason: validate::reason(&errs),
        });
        if rejection != self.node_rejection {
            if let Some(r) = &rejection {
                tracing::warn!(rejection = %r, "ignoring invalid fields of the Node");
            }
            replace_rejection(
                &mut self.state.rejections,
                self.node_rejection.as_ref(),
                rejection.as_ref(),
            );
            self.node_rejection = rejection;
        }
        let zone_changed = info.zone != self.state.node.zone;
        self.state.node = info;
        zone_changed
    }

    /// Recomputes one service from its Service object (`None` when deleted)
    /// and every EndpointSlice labelled `kubernetes.io/service-name` with its
    /// name in its namespace. Costs O(size of this service).
    pub fn update_service(
        &mut self,
        key: &ServiceKey,
        service: Option<&Service>,
        slices: &[&EndpointSlice],
    ) -> ServiceUpdate {
        let service = service.map(|svc| ServiceObject::parse(key, svc));
        let slices: Vec<SliceObject> = slices
            .iter()
            .map(|slice| SliceObject::parse(&key.namespace, slice, &self.state.node.name))
            .collect();
        let slices: Vec<&SliceObject> = slices.iter().collect();
        self.update_service_objects(key, service.as_ref(), &slices)
    }

    /// [`StateBuilder::update_service`] for objects parsed already (by the
    /// watch cache, for this builder's node). The builder keeps their
    /// parsed parts by `Arc`, not copies.
    pub fn update_service_objects(
        &mut self,
        key: &ServiceKey,
        service: Option<&ServiceObject>,
        slices: &[&SliceObject],
    ) -> ServiceUpdate {
        let mut update = ServiceUpdate::default();
        let mut entry = self.services.remove(key).unwrap_or_default();
        let rejections = &mut self.state.rejections;

        // The Service.
        let rejection = match service {
            None => {
                entry.valid = None;
                entry.created = None;
                None
            }
            Some(svc) => match &svc.ports {
                Ok(ports) => {
                    entry.valid = Some(ports.clone());
                    entry.created = svc.created;
                    None
                }
                // The last valid version stays in use.
                Err(reason) => Some(Rejection {
                    kind: ObjectKind::Service,
                    namespace: validate::display_name(&key.namespace),
                    name: validate::display_name(&key.name),
                    reason: reason.clone(),
                }),
            },
        };
        if rejection.as_ref() != entry.rejection.as_deref() {
            replace_rejection(rejections, entry.rejection.as_deref(), rejection.as_ref());
            // A deletion clears its rejection silently.
            if service.is_some() {
                update.new_rejections.extend(rejection.clone());
            }
            entry.rejection = rejection.map(Box::new);
        }

        // Its slices: exactly the ones given now, each either valid or kept
        // at its last valid version.
        let mut old_slices = std::mem::replace(
            &mut entry.slices,
            SliceEntries(Vec::with_capacity(slices.len())),
        );
        for slice in slices {
            if entry.slices.contains_key(&slice.name) {
                tracing::debug!(service = %key, slice = %slice.name, "ignoring a second slice of the same name");
                continue;
            }
            let mut se = old_slices.remove(&slice.name).unwrap_or_default();
            let rejection = match &slice.parsed {
                Ok(parsed) => {
                    se.valid = Some(parsed.clone());
                    None
                }
                Err(reason) => Some(Rejection {
                    kind: ObjectKind::EndpointSlice,
                    namespace: validate::display_name(&slice.namespace),
                    name: validate::display_name(&slice.name),
                    reason: reason.clone(),
                }),
            };
            if rejection.as_ref() != se.rejection.as_deref() {
                replace_rejection(rejections, se.rejection.as_deref(), rejection.as_ref());
                update.new_rejections.extend(rejection.clone());
                se.rejection = rejection.map(Box::new);
            }
            entry.slices.insert(slice.name.clone(), se);
        }
        // Slices that are gone: forget them and their rejections.
        for se in old_slices.into_values() {
            replace_rejection(rejections, se.rejection.as_deref(), None);
        }

        // Conflicts: register what the valid version claims; the services
        // sharing a key whose claimants changed may win or lose something.
        let others = self.register_claims(key, &mut entry);
        update.changed_ports = self.apply_ports(&mut entry, &mut update.new_rejections);
        if !entry.is_empty() {
            self.services.insert(key.clone(), entry);
        }
        for other in others {
            if let Some(mut e) = self.services.remove(&other) {
                let changed = self.apply_ports(&mut e, &mut update.new_rejections);
                update.changed_ports.extend(changed);
                self.services.insert(other, e);
            }
        }
        update
    }

    /// Replaces the entry's claims in the conflict index with those of its
    /// current valid version. Returns the other services that claim one of
    /// the keys that changed: who wins there may have changed.
    fn register_claims(
        &mut self,
        key: &ServiceKey,
        entry: &mut ServiceEntry,
    ) -> BTreeSet<ServiceKey> {
        let mut claims = BTreeSet::new();
        for sp in entry.valid.iter().flat_map(|v| v.iter()) {
            let claimant = Claimant::new(entry.created, sp.name.clone());
            for claim in conflicts::claims_of(sp) {
                claims.insert((claim, claimant.clone()));
            }
        }
        let mut others = BTreeSet::new();
        if claims.iter().eq(entry.claims.iter()) {
            return others;
        }
        let old: BTreeSet<(Claim, Claimant)> = std::mem::take(&mut entry.claims)
            .into_vec()
            .into_iter()
            .collect();
        for gone in old.difference(&claims) {
            self.conflicts.remove(&gone.0, &gone.1);
        }
        for added in claims.difference(&old) {
            self.conflicts.add(&added.0, &added.1);
        }
        for (claim, _) in old.symmetric_difference(&claims) {
            others.extend(
                self.conflicts
                    .claimants(claim)
                    .map(|c| &c.name.service)
                    .filter(|s| *s != key)
                    .cloned(),
            );
        }
        entry.claims = claims.into_iter().collect();
        others
    }

    /// Recomputes endpoint selection for every service from the objects
    /// already seen (after [`StateBuilder::set_node`] returned true).
    /// Returns the service ports that changed.
    pub fn reselect_all(&mut self) -> BTreeSet<(IpFamily, ServicePortName)> {
        let mut changed = BTreeSet::new();
        let mut services = std::mem::take(&mut self.services);
        // Conflicts do not depend on the node: nothing new to report.
        let mut rejections = Vec::new();
        for entry in services.values_mut() {
            changed.extend(self.apply_ports(entry, &mut rejections));
        }
        self.services = services;
        changed
    }

    /// Every service currently known (including ones that yield no ports),
    /// for a full recompute after a node change. Sorted.
    pub fn service_keys(&self) -> Vec<ServiceKey> {
        let mut keys: Vec<ServiceKey> = self.services.keys().cloned().collect();
        keys.sort();
        keys
    }

    pub fn state(&self) -> &ProxyState {
        &self.state
    }

    /// Builds the entry's service ports with their endpoints, without the
    /// parts it lost to older services, writes them into the state and
    /// returns the ones that differ from before. A changed conflict
    /// rejection goes to `new_rejections`.
    fn apply_ports(
        &mut self,
        entry: &mut ServiceEntry,
        new_rejections: &mut Vec<Rejection>,
    ) -> BTreeSet<(IpFamily, ServicePortName)> {
        let mut changed = BTreeSet::new();
        let mut new_keys = Vec::new();
        let mut lost = BTreeSet::new();
        if let Some(templates) = &entry.valid {
            new_keys.reserve(templates.len());
            for template in templates.iter() {
                let mut sp = template.clone();
                if !self.resolve_conflicts(&mut sp, entry.created, &mut lost) {
                    continue;
                }
                sp.endpoints = endpoints::select(
                    &sp,
                    entry.slices.values().filter_map(|s| s.valid.as_deref()),
                    &self.state.node,
                );
                let family = self.state.family_mut(sp.family);
                let key = (sp.family, sp.name.clone());
                if family.get(&sp.name).map(|old| **old != sp).unwrap_or(true) {
                    family.insert(sp.name.clone(), Arc::new(sp));
                    changed.insert(key.clone());
                }
                new_keys.push(key);
            }
        }
        for old in std::mem::take(&mut entry.ports) {
            if !new_keys.contains(&old) {
                self.state.family_mut(old.0).remove(&old.1);
                changed.insert(old);
            }
        }
        entry.ports = new_keys;

        let conflict = match (&entry.valid, lost.is_empty()) {
            (Some(templates), false) => templates.first().map(|sp| Rejection {
                kind: ObjectKind::Service,
                namespace: sp.name.service.namespace.clone(),
                name: sp.name.service.name.clone(),
                reason: lost.into_iter().collect::<Vec<_>>().join("; "),
            }),
            _ => None,
        };
        if conflict.as_ref() != entry.conflict.as_deref() {
            replace_rejection(
                &mut self.state.rejections,
                entry.conflict.as_deref(),
                conflict.as_ref(),
            );
            new_rejections.extend(conflict.clone());
            entry.conflict = conflict.map(Box::new);
        }
        changed
    }

    /// Removes from `sp` what older services hold (its NodePort, external
    /// or load-balancer IPs), adding why to `lost`. False when it lost its
    /// ClusterIP:port, so the whole port (in this family) is left out.
    fn resolve_conflicts(
        &self,
        sp: &mut ServicePort,
        created: Option<jiff::Timestamp>,
        lost: &mut BTreeSet<String>,
    ) -> bool {
        let me = Claimant::new(created, sp.name.clone());
        let protocol = sp.name.protocol;
        let port = sp.port;
        let address = |ip: IpAddr| Claim::Address { ip, port, protocol };
        if let Some(why) = self.conflicts.lost(&address(sp.cluster_ip), &me) {
            lost.insert(format!(
                "{why} (clusterIP; the {} port is left out)",
                sp.family
            ));
            return false;
        }
        if let Some(np) = sp.node_port {
            let claim = Claim::NodePort { port: np, protocol };
            if let Some(why) = self.conflicts.lost(&claim, &me) {
                lost.insert(why);
                sp.node_port = None;
            }
        }
        let mut keep = |ip: &IpAddr, field: &str| match self.conflicts.lost(&address(*ip), &me) {
            Some(why) => {
                lost.insert(format!("{why} ({field})"));
                false
            }
            None => true,
        };
        sp.external_ips.retain(|ip| keep(ip, "externalIPs"));
        sp.load_balancer_ips
            .retain(|ip| keep(ip, "status.loadBalancer.ingress"));
        true
    }
}

/// Keeps `rejections` sorted while one object's rejection changes.
fn replace_rejection(
    rejections: &mut Vec<Rejection>,
    old: Option<&Rejection>,
    new: Option<&Rejection>,
) {
    if old == new {
        return;
    }
    if let Some(old) = old {
        if let Ok(i) = rejections.binary_search(old) {
            rejections.remove(i);
        }
    }
    if let Some(new) = new {
        if let Err(i) = rejections.binary_search(new) {
            rejections.insert(i, new.clone());
        }
    }
}
