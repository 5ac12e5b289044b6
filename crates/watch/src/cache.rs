//! The in-memory copy of the watched objects, indexed for the sync, and
//! the change tracking that feeds [`Pending`].
//!
//! We keep our own store instead of kube's `reflector::Store` because the
//! sync needs EndpointSlices grouped by their service, and because a relist
//! must tell us *which* services differ between the old and the new
//! contents; a reflector store only offers the objects themselves.
//!
//! Services and slices are kept parsed ([`ServiceObject`], [`SliceObject`]),
//! not as API objects: at 10k services the objects cost ≈ 100 MB, the
//! parsed form a fraction, shared with the model by `Arc`. Comparing them
//! compares what kproxy programs, so an update that only touches fields
//! kproxy ignores is not a change.
//!
//! Relists follow the reflector's semantics: `Init` starts a fresh buffer,
//! `InitApply` fills it, `InitDone` swaps it in. Until the swap the old
//! contents stay live, so a sync during a relist never sees half a list.

use std::collections::HashMap;
use std::hash::Hash;
use std::mem;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_model::{ServiceKey, ServiceObject, SliceObject};
use kube::runtime::watcher::Event;
use kube::ResourceExt;

use crate::pending::{parse_trigger_time, Pending, LAST_CHANGE_TRIGGER_TIME};

/// The label naming an EndpointSlice's service (same namespace).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Written by `kubectl apply`; a full copy of the object we never read.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The current time, passed in so that the cache is deterministic in tests.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Now {
    pub instant: Instant,
    pub system: SystemTime,
}

impl Now {
    pub fn current() -> Self {
        Now {
            instant: Instant::now(),
            system: SystemTime::now(),
        }
    }
}

/// Drops from the Node what we never read and what costs the most memory.
pub(crate) fn strip<K: ResourceExt>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED_ANNOTATION);
    }
}

/// Which list of a kind completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ListDone {
    First,
    Relist,
}

/// What one watch event did to the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Number of services (or the node) newly marked as changed.
    pub changed: usize,
    /// Something was added to [`Pending`] (a change, or a list swap that
    /// forces a full sync).
    pub queued: bool,
    /// Set on `InitDone`.
    pub list_done: Option<ListDone>,
}

impl Outcome {
    fn changed(n: usize) -> Self {
        Outcome {
            changed: n,
            queued: n > 0,
            list_done: None,
        }
    }
}

/// Live contents of one kind plus the buffer of a list in progress.
#[derive(Debug, Default)]
struct Listed<T> {
    live: T,
    buffer: Option<T>,
    lists_done: u64,
}

impl<T: Default> Listed<T> {
    fn begin(&mut self) {
        self.buffer = Some(T::default());
    }

    /// The buffer; created if `Init` was missed (kube always sends it, but
    /// losing objects would be worse than tolerating a missing `Init`).
    fn buffer(&mut self) -> &mut T {
        self.buffer.get_or_insert_with(T::default)
    }

    /// Swaps the buffer in; returns the old contents.
    fn finish(&mut self) -> (T, ListDone) {
        let new = self.buffer.take().unwrap_or_default();
        let old = mem::replace(&mut self.live, new);
        self.lists_done += 1;
        let done = if self.lists_done == 1 {
            ListDone::First
        } else {
            ListDone::Relist
        };
        (old, done)
    }
}

/// Keys whose values differ between `old` and `new`, including keys present
/// in only one of them. Pure; the heart of the relist diff.
pub(crate) fn changed_keys<K, V>(old: &HashMap<K, V>, new: &HashMap<K, V>) -> Vec<K>
where
    K: Hash + Eq + Clone,
    V: PartialEq,
{
    let gone = old.keys().filter(|k| !new.contains_key(*k));
    let differ = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, _)| k);
    gone.chain(differ).cloned().collect()
}

/// Namespace and name of an object.
type ObjectId = (String, String);

fn object_id<K: ResourceExt>(obj: &K) -> Option<ObjectId> {
    let name = obj.meta().name.clone()?;
    Some((obj.namespace().unwrap_or_default(), name))
}

/// The service an EndpointSlice belongs to; `None` without the label.
fn slice_owner(slice: &EndpointSlice) -> Option<ServiceKey> {
    let service = slice.labels().get(SERVICE_NAME_LABEL)?;
    Some(ServiceKey::new(
        slice.namespace().unwrap_or_default(),
        service.clone(),
    ))
}

fn slice_trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    parse_trigger_time(slice.annotations().get(LAST_CHANGE_TRIGGER_TIME)?)
}

/// One EndpointSlice as the cache keeps it.
#[derive(Clone, Debug)]
struct CachedSlice {
    object: Arc<SliceObject>,
    /// Its `endpoints.kubernetes.io/last-change-trigger-time`.
    trigger: Option<SystemTime>,
}

impl CachedSlice {
    fn parse(owner: &ServiceKey, slice: &EndpointSlice, node_name: &str) -> Self {
        CachedSlice {
            object: Arc::new(SliceObject::parse(&owner.namespace, slice, node_name)),
            trigger: slice_trigger_time(slice),
        }
    }
}

/// Only what kproxy programs counts: a new trigger time on the same
/// endpoints is not a change.
impl PartialEq for CachedSlice {
    fn eq(&self, other: &Self) -> bool {
        self.object == other.object
    }
}

/// The slices of one service, sorted by name. A Vec, not a BTreeMap: most
/// services have one slice, and a BTreeMap's leaf node has room for eleven.
#[derive(Clone, Debug, Default, PartialEq)]
struct SliceGroup(Vec<CachedSlice>);

impl SliceGroup {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|s| s.object.name().cmp(name))
    }

    fn get(&self, name: &str) -> Option<&CachedSlice> {
        self.find(name).ok().map(|at| &self.0[at])
    }

    fn insert(&mut self, slice: CachedSlice) {
        match self.find(slice.object.name()) {
            Ok(at) => self.0[at] = slice,
            Err(at) => {
                self.0.reserve_exact(1);
                self.0.insert(at, slice);
            }
        }
    }

    fn remove(&mut self, name: &str) {
        if let Ok(at) = self.find(name) {
            self.0.remove(at);
        }
    }
}

/// EndpointSlices grouped by service, with a reverse index so that a slice
/// whose service label changes is removed from its old group.
#[derive(Debug, Default)]
struct SliceIndex {
    by_service: HashMap<ServiceKey, SliceGroup>,
    owner: HashMap<ObjectId, ServiceKey>,
}

impl SliceIndex {
    /// Inserts or replaces a slice with its service (`None` removes it: the
    /// label went away). Returns the services whose set of slices changed.
    fn upsert(
        &mut self,
        id: ObjectId,
        slice: Option<(ServiceKey, CachedSlice)>,
    ) -> Vec<ServiceKey> {
        let mut changed = Vec::new();
        if let Some(prev) = self.owner.get(&id) {
            if Some(prev) != slice.as_ref().map(|(owner, _)| owner) {
                if let Some(prev) = self.remove(&id) {
                    changed.push(prev);
                }
            }
        }
        if let Some((owner, slice)) = slice {
            let group = self.by_service.entry(owner.clone()).or_default();
            if group.get(&id.1).is_some_and(|old| *old == slice) {
                return changed;
            }
            group.insert(slice);
            self.owner.insert(id, owner.clone());
            changed.push(owner);
        }
        changed
    }

    /// Removes a slice; returns its service if it was known.
    fn remove(&mut self, id: &ObjectId) -> Option<ServiceKey> {
        let owner = self.owner.remove(id)?;
        if let Some(group) = self.by_service.get_mut(&owner) {
            group.remove(&id.1);
            if group.0.is_empty() {
                self.by_service.remove(&owner);
            }
        }
        Some(owner)
    }
}

/// Which watchers have completed their first list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStatus {
    pub services_listed: bool,
    pub endpoint_slices_listed: bool,
    pub node_listed: bool,
}

/// What the sync needs for one service.
pub(crate) type ServiceInput = (
    ServiceKey,
    Option<Arc<ServiceObject>>,
    Vec<Arc<SliceObject>>,
);

/// Services, EndpointSlices and the own Node, plus what changed since the
/// last sync.
#[derive(Debug)]
pub(crate) struct Cache {
    node_name: String,
    /// Trigger times before this are not ours to measure.
    started: SystemTime,
    services: Listed<HashMap<ServiceKey, Arc<ServiceObject>>>,
    slices: Listed<SliceIndex>,
    node: Listed<Option<Arc<Node>>>,
    pending: Pending,
}

impl Cache {
    pub fn new(node_name: impl Into<String>, started: SystemTime) -> Self {
        Cache {
            node_name: node_name.into(),
            started,
            services: Listed::default(),
            slices: Listed::default(),
            node: Listed::default(),
            pending: Pending::default(),
        }
    }

    /// Both Services and EndpointSlices have completed their first list.
    pub fn synced(&self) -> bool {
        self.services.lists_done > 0 && self.slices.lists_done > 0
    }

    pub fn sync_status(&self) -> SyncStatus {
        SyncStatus {
            services_listed: self.services.lists_done > 0,
            endpoint_slices_listed: self.slices.lists_done > 0,
            node_listed: self.node.lists_done > 0,
        }
    }

    pub fn has_pending(&self) -> bool {
        self.pending.has_changes()
    }

    pub fn take_pending(&mut self) -> Pending {
        mem::take(&mut self.pending)
    }

    pub fn node(&self) -> Option<Arc<Node>> {
        self.node.live.clone()
    }

    /// The Service and slices of each key (cheap: clones `Arc`s).
    pub fn inputs<'a>(&self, keys: impl IntoIterator<Item = &'a ServiceKey>) -> Vec<ServiceInput> {
        keys.into_iter()
            .map(|key| {
                let service = self.services.live.get(key).cloned();
                let slices = self
                    .slices
                    .live
                    .by_service
                    .get(key)
                    .map(|g| g.0.iter().map(|s| s.object.clone()).collect())
                    .unwrap_or_default();
                (key.clone(), service, slices)
            })
            .collect()
    }

    fn mark(&mut self, key: &ServiceKey, now: Now, trigger: Option<SystemTime>) {
        self.pending.services.insert(key.clone());
        self.pending.queued(now.instant, now.system);
        if let Some(t) = trigger.filter(|t| *t >= self.started) {
            self.pending.add_trigger_time(key, t);
        }
    }

    fn list_swapped(&mut self, now: Now) {
        self.pending.relisted = true;
        self.pending.queued(now.instant, now.system);
    }

    pub fn service_event(&mut self, event: Event<Service>, now: Now) -> Outcome {
        match event {
            Event::Apply(svc) => {
                let Some((ns, name)) = object_id(&svc) else {
                    return Outcome::default();
                };
                let key = ServiceKey::new(ns, name);
                let svc = Arc::new(ServiceObject::parse(&key, &svc));
                if self.services.live.get(&key) == Some(&svc) {
                    return Outcome::default();
                }
                self.services.live.insert(key.clone(), svc);
                // Services carry no trigger annotation: their arrival is
                // the best estimate of when the change was made.
                self.mark(&key, now, Some(now.system));
                Outcome::changed(1)
            }
            Event::Delete(svc) => {
                let Some((ns, name)) = object_id(&svc) else {
                    return Outcome::default();
                };
                let key = ServiceKey::new(ns, name);
                if self.services.live.remove(&key).is_none() {
                    return Outcome::default();
                }
                self.mark(&key, now, Some(now.system));
                Outcome::changed(1)
            }
            Event::Init => {
                self.services.begin();
                Outcome::default()
            }
            Event::InitApply(svc) => {
                if let Some((ns, name)) = object_id(&svc) {
                    let key = ServiceKey::new(ns, name);
                    let svc = Arc::new(ServiceObject::parse(&key, &svc));
                    self.services.buffer().insert(key, svc);
                }
                Outcome::default()
            }
            Event::InitDone => {
                let (old, done) = self.services.finish();
                let changed = changed_keys(&old, &self.services.live);
                for key in &changed {
                    self.mark(key, now, Some(now.system));
                }
                self.list_swapped(now);
                Outcome {
                    changed: changed.len(),
                    queued: true,
                    list_done: Some(done),
                }
            }
        }
    }

    pub fn slice_event(&mut self, event: Event<EndpointSlice>, now: Now) -> Outcome {
        match event {
            Event::Apply(slice) => {
                let Some(id) = object_id(&slice) else {
                    return Outcome::default();
                };
                let owner = slice_owner(&slice);
                let trigger = slice_trigger_time(&slice);
                let cached = self.cached_slice(owner.clone(), &slice);
                let changed = self.slices.live.upsert(id, cached);
                for key in &changed {
                    // The annotation describes the slice's new service only.
                    let t = if Some(key) == owner.as_ref() {
                        trigger
                    } else {
                        None
                    };
                    self.mark(key, now, t);
                }
                Outcome::changed(changed.len())
            }
            Event::Delete(slice) => {
                let Some(id) = object_id(&slice) else {
                    return Outcome::default();
                };
                // A deleted slice's annotation dates from its last update,
                // not from the deletion: nothing to measure (as upstream).
                match self.slices.live.remove(&id) {
                    Some(key) => {
                        self.mark(&key, now, None);
                        Outcome::changed(1)
                    }
                    None => Outcome::default(),
                }
            }
            Event::Init => {
                self.slices.begin();
                Outcome::default()
            }
            Event::InitApply(slice) => {
                if let Some(id) = object_id(&slice) {
                    let cached = self.cached_slice(slice_owner(&slice), &slice);
                    self.slices.buffer().upsert(id, cached);
                }
                Outcome::default()
            }
            Event::InitDone => {
                let (old, done) = self.slices.finish();
                let changed = changed_keys(&old.by_service, &self.slices.live.by_service);
                for key in &changed {
                    let old_group = old.by_service.get(key);
                    let triggers: Vec<SystemTime> = self
                        .slices
                        .live
                        .by_service
                        .get(key)
                        .into_iter()
                        .flat_map(|g| &g.0)
                        .filter(|slice| {
                            old_group.and_then(|g| g.get(slice.object.name())) != Some(*slice)
                        })
                        .filter_map(|slice| slice.trigger)
                        .collect();
                    self.mark(key, now, None);
                    for t in triggers.into_iter().filter(|t| *t >= self.started) {
                        self.pending.add_trigger_time(key, t);
                    }
                }
                self.list_swapped(now);
                Outcome {
                    changed: changed.len(),
                    queued: true,
                    list_done: Some(done),
                }
            }
        }
    }

    /// The slice parsed for its service, `None` without one.
    fn cached_slice(
        &self,
        owner: Option<ServiceKey>,
        slice: &EndpointSlice,
    ) -> Option<(ServiceKey, CachedSlice)> {
        let owner = owner?;
        let cached = CachedSlice::parse(&owner, slice, &self.node_name);
        Some((owner, cached))
    }

    pub fn node_event(&mut self, event: Event<Node>, now: Now) -> Outcome {
        let ours = |node: &Node| node.metadata.name.as_deref() == Some(self.node_name.as_str());
        match event {
            Event::Apply(mut node) => {
                if !ours(&node) {
                    return Outcome::default();
                }
                strip(&mut node);
                let node = Arc::new(node);
                let changed = !node_relevant_eq(self.node.live.as_deref(), Some(&node));
                // Always keep the newest object, even when only status moved.
                self.node.live = Some(node);
                self.node_changed(changed, now, None)
            }
            Event::Delete(node) => {
                if !ours(&node) {
                    return Outcome::default();
                }
                let changed = self.node.live.take().is_some();
                self.node_changed(changed, now, None)
            }
            Event::Init => {
                self.node.begin();
                Outcome::default()
            }
            Event::InitApply(mut node) => {
                if ours(&node) {
                    strip(&mut node);
                    *self.node.buffer() = Some(Arc::new(node));
                }
                Outcome::default()
            }
            Event::InitDone => {
                let (old, done) = self.node.finish();
                let changed = !node_relevant_eq(old.as_deref(), self.node.live.as_deref());
                self.node_changed(changed, now, Some(done))
            }
        }
    }

    fn node_changed(&mut self, changed: bool, now: Now, list_done: Option<ListDone>) -> Outcome {
        if changed {
            self.pending.node_changed = true;
            self.pending.queued(now.instant, now.system);
        }
        Outcome {
            changed: usize::from(changed),
            queued: changed,
            list_done,
        }
    }
}

/// Whether two versions of the Node differ in anything the proxy may use.
/// The kubelet rewrites the status (conditions, heartbeats) all the time;
/// treating that as a change would force a full sync every few seconds.
fn node_relevant_eq(a: Option<&Node>, b: Option<&Node>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.metadata.labels == b.metadata.labels
                && a.metadata.deletion_timestamp == b.metadata.deletion_timestamp
                && a.spec == b.spec
                && a.status.as_ref().and_then(|s| s.addresses.as_ref())
                    == b.status.as_ref().and_then(|s| s.addresses.as_ref())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    use k8s_openapi::api::core::v1::{
        NodeSpec, NodeStatus, ObjectReference, ServicePort, ServiceSpec,
    };
    use k8s_openapi::api::discovery::v1::Endpoint;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};

    fn meta(ns: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            ..Default::default()
        }
    }

    fn svc(ns: &str, name: &str, ip: &str) -> Service {
        Service {
            metadata: meta(ns, name),
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                // Without a port there is nothing to proxy, so nothing to
                // tell two versions apart.
                ports: Some(vec![ServicePort {
                    port: 80,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(ns: &str, name: &str, service: Option<&str>, addr: &str) -> EndpointSlice {
        let mut m = meta(ns, name);
        if let Some(service) = service {
            m.labels = Some(BTreeMap::from([(
                SERVICE_NAME_LABEL.to_string(),
                service.to_string(),
            )]));
        }
        EndpointSlice {
            metadata: m,
            address_type: "IPv4".into(),
            endpoints: Some(vec![Endpoint {
                addresses: vec![addr.into()],
                ..Default::default()
            }]),
            ports: None,
        }
    }

    fn with_trigger(mut s: EndpointSlice, t: &str) -> EndpointSlice {
        s.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(LAST_CHANGE_TRIGGER_TIME.into(), t.into());
        s
    }

    fn key(ns: &str, name: &str) -> ServiceKey {
        ServiceKey::new(ns, name)
    }

    fn keys(p: &Pending) -> Vec<String> {
        p.services.iter().map(|k| k.to_string()).collect()
    }

    fn now() -> Now {
        Now::current()
    }

    /// A cache that started in 2020 so that annotations from 2024 count.
    fn cache() -> Cache {
        Cache::new(
            "node-a",
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_577_836_800),
        )
    }

    fn list_services(c: &mut Cache, items: Vec<Service>) -> Outcome {
        c.service_event(Event::Init, now());
        for s in items {
            c.service_event(Event::InitApply(s), now());
        }
        c.service_event(Event::InitDone, now())
    }

    fn list_slices(c: &mut Cache, items: Vec<EndpointSlice>) -> Outcome {
        c.slice_event(Event::Init, now());
        for s in items {
            c.slice_event(Event::InitApply(s), now());
        }
        c.slice_event(Event::InitDone, now())
    }

    fn synced_cache() -> Cache {
        let mut c = cache();
        list_services(
            &mut c,
            vec![svc("ns", "a", "10.0.0.1"), svc("ns", "b", "10.0.0.2")],
        );
        list_slices(
            &mut c,
            vec![
                slice("ns", "a-1", Some("a"), "10.1.0.1"),
                slice("ns", "b-1", Some("b"), "10.1.0.2"),
            ],
        );
        c.take_pending();
        c
    }

    fn slice_names(c: &Cache, k: &ServiceKey) -> Vec<String> {
        c.inputs([k])[0]
            .2
            .iter()
            .map(|s| s.name().to_string())
            .collect()
    }

    #[test]
    fn changed_keys_finds_added_removed_and_modified() {
        let old = HashMap::from([(1, "a"), (2, "b"), (3, "c")]);
        let new = HashMap::from([(1, "a"), (2, "B"), (4, "d")]);
        let mut changed = changed_keys(&old, &new);
        changed.sort();
        assert_eq!(changed, vec![2, 3, 4]);
        assert!(changed_keys(&old, &old).is_empty());
    }

    #[test]
    fn synced_only_after_both_lists() {
        let mut c = cache();
        assert!(!c.synced());
        let o = list_services(&mut c, vec![svc("ns", "a", "10.0.0.1")]);
        assert_eq!(o.list_done, Some(ListDone::First));
        assert!(!c.synced());
        c.slice_event(Event::Init, now());
        c.slice_event(
            Event::InitApply(slice("ns", "a-1", Some("a"), "10.1.0.1")),
            now(),
        );
        assert!(!c.synced(), "a list in progress is not a list");
        c.slice_event(Event::InitDone, now());
        assert!(c.synced());
        let p = c.take_pending();
        assert_eq!(keys(&p), vec!["ns/a"]);
        assert!(p.relisted, "the first list forces a full sync");
        assert!(p.oldest_queued.is_some());
        assert!(!c.has_pending());
    }

    #[test]
    fn identical_apply_is_not_a_change() {
        let mut c = synced_cache();
        let o = c.service_event(Event::Apply(svc("ns", "a", "10.0.0.1")), now());
        assert_eq!(o, Outcome::default());
        let o = c.slice_event(
            Event::Apply(slice("ns", "a-1", Some("a"), "10.1.0.1")),
            now(),
        );
        assert_eq!(o.changed, 0);
        assert!(!c.has_pending());
    }

    #[test]
    fn slice_update_marks_only_its_service_with_its_trigger_time() {
        let mut c = synced_cache();
        let s = with_trigger(
            slice("ns", "a-1", Some("a"), "10.1.0.9"),
            "2024-01-02T03:04:05Z",
        );
        let o = c.slice_event(Event::Apply(s), now());
        assert_eq!(o.changed, 1);
        assert!(o.queued);
        let p = c.take_pending();
        assert_eq!(keys(&p), vec!["ns/a"]);
        assert!(!p.relisted && !p.node_changed);
        assert_eq!(
            p.trigger_times.get(&key("ns", "a")),
            Some(&vec![
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_164_645)
            ])
        );
        let input = &c.inputs([&key("ns", "a")])[0];
        let parsed = input.2[0].parsed().map(|p| p.endpoints.clone());
        let ips: Vec<String> = parsed
            .unwrap_or_default()
            .iter()
            .map(|e| e.ip.to_string())
            .collect();
        assert_eq!(ips, vec!["10.1.0.9"]);
    }

    #[test]
    fn trigger_times_before_start_are_ignored() {
        let mut c = synced_cache();
        let s = with_trigger(
            slice("ns", "a-1", Some("a"), "10.1.0.9"),
            "2019-01-01T00:00:00Z",
        );
        c.slice_event(Event::Apply(s), now());
        let p = c.take_pending();
        assert_eq!(keys(&p), vec!["ns/a"]);
        assert!(p.trigger_times.is_empty());
    }

    #[test]
    fn service_change_uses_arrival_time() {
        let mut c = synced_cache();
        let at = now();
        c.service_event(Event::Apply(svc("ns", "b", "10.0.0.22")), at);
        let p = c.take_pending();
        assert_eq!(keys(&p), vec!["ns/b"]);
        assert_eq!(p.trigger_times.get(&key("ns", "b")), Some(&vec![at.system]));
        assert_eq!(p.oldest_queued, Some(at.instant));
    }

    #[test]
    fn slice_moving_between_services_marks_both() {
        let mut c = synced_cache();
        c.slice_event(
            Event::Apply(slice("ns", "a-1", Some("b"), "10.1.0.1")),
            now(),
        );
        let p = c.take_pending();
        assert_eq!(keys(&p), vec!["ns/a", "ns/b"]);
        assert!(slice_names(&c, &key("ns", "a")).is_empty());
        assert_eq!(slice_names(&c, &key("ns", "b")), vec!["a-1", "b-1"]);
        // Losing the label removes it from its service.
        c.slice_event(Event::Apply(slice("ns", "a-1", None, "10.1.0.1")), now());
        assert_eq!(keys(&c.take_pending()), vec!["ns/b"]);
        assert_eq!(slice_names(&c, &key("ns", "b")), vec!["b-1"]);
    }

    #[test]
    fn slices_without_service_label_are_ignored() {
        let mut c = synced_cache();
        let o = c.slice_event(Event::Apply(slice("ns", "stray", None, "10.9.9.9")), now());
        assert_eq!(o, Outcome::default());
        let o = c.slice_event(Event::Delete(slice("ns", "stray", None, "10.9.9.9")), now());
        assert_eq!(o, Outcome::default());
        assert!(!c.has_pending());
    }

    #[test]
    fn slices_are_grouped_per_namespace() {
        let mut c = synced_cache();
        c.slice_event(
            Event::Apply(slice("other", "a-1", Some("a"), "10.2.0.1")),
            now(),
        );
        assert_eq!(keys(&c.take_pending()), vec!["other/a"]);
        assert_eq!(slice_names(&c, &key("ns", "a")), vec!["a-1"]);
        assert_eq!(slice_names(&c, &key("other", "a")), vec!["a-1"]);
    }

    #[test]
    fn deletes_mark_their_service() {
        let mut c = synced_cache();
        c.slice_event(
            Event::Delete(slice("ns", "b-1", Some("b"), "10.1.0.2")),
            now(),
        );
        c.service_event(Event::Delete(svc("ns", "a", "10.0.0.1")), now());
        // Deleting something unknown is not a change.
        let o = c.service_event(Event::Delete(svc("ns", "zzz", "10.0.0.1")), now());
        assert_eq!(o, Outcome::default());
        assert_eq!(keys(&c.take_pending()), vec!["ns/a", "ns/b"]);
        let inputs = c.inputs([&key("ns", "a"), &key("ns", "b")]);
        assert!(inputs[0].1.is_none());
        assert_eq!(inputs[0].2.len(), 1);
        assert!(inputs[1].1.is_some());
        assert!(inputs[1].2.is_empty());
    }

    #[test]
    fn relist_marks_exactly_the_services_that_differ() {
        let mut c = cache();
        list_services(
            &mut c,
            vec![
                svc("ns", "same", "10.0.0.1"),
                svc("ns", "modified", "10.0.0.2"),
                svc("ns", "deleted", "10.0.0.3"),
            ],
        );
        list_slices(
            &mut c,
            vec![
                slice("ns", "same-1", Some("same"), "10.1.0.1"),
                slice("ns", "ep-1", Some("epchanged"), "10.1.0.2"),
                with_trigger(
                    slice("ns", "ep-2", Some("epchanged"), "10.1.0.3"),
                    "2023-01-01T00:00:00Z",
                ),
                slice("ns", "gone-1", Some("slicegone"), "10.1.0.4"),
            ],
        );
        c.take_pending();

        // The API server was away; meanwhile things changed. A relist
        // buffers until InitDone: the old contents stay visible.
        c.service_event(Event::Init, now());
        c.service_event(Event::InitApply(svc("ns", "same", "10.0.0.1")), now());
        c.service_event(Event::InitApply(svc("ns", "modified", "10.0.0.20")), now());
        c.service_event(Event::InitApply(svc("ns", "added", "10.0.0.4")), now());
        assert!(c.inputs([&key("ns", "deleted")])[0].1.is_some());
        assert!(c.inputs([&key("ns", "added")])[0].1.is_none());
        assert!(!c.has_pending());
        let o = c.service_event(Event::InitDone, now());
        assert_eq!(o.list_done, Some(ListDone::Relist));
        assert_eq!(o.changed, 3);

        let o = list_slices(
            &mut c,
            vec![
                slice("ns", "same-1", Some("same"), "10.1.0.1"),
                with_trigger(
                    slice("ns", "ep-1", Some("epchanged"), "10.1.0.22"),
                    "2024-01-02T03:04:05Z",
                ),
                // Unchanged slice of a changed service: its (old) trigger
                // time must not be reported again.
                with_trigger(
                    slice("ns", "ep-2", Some("epchanged"), "10.1.0.3"),
                    "2023-01-01T00:00:00Z",
                ),
            ],
        );
        assert_eq!(o.list_done, Some(ListDone::Relist));
        let p = c.take_pending();
        assert!(p.relisted);
        assert_eq!(
            keys(&p),
            vec![
                "ns/added",
                "ns/deleted",
                "ns/epchanged",
                "ns/modified",
                "ns/slicegone"
            ]
        );
        assert!(p.trigger_times.contains_key(&key("ns", "epchanged")));
        let ep_times = &p.trigger_times[&key("ns", "epchanged")];
        assert_eq!(
            ep_times,
            &vec![SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_164_645)]
        );
        assert!(c.inputs([&key("ns", "deleted")])[0].1.is_none());
        assert!(c.inputs([&key("ns", "slicegone")])[0].2.is_empty());
        assert_eq!(
            slice_names(&c, &key("ns", "epchanged")),
            vec!["ep-1", "ep-2"]
        );
    }

    #[test]
    fn relist_without_differences_only_forces_a_full_sync() {
        let mut c = synced_cache();
        let o = list_services(
            &mut c,
            vec![svc("ns", "a", "10.0.0.1"), svc("ns", "b", "10.0.0.2")],
        );
        assert_eq!(o.changed, 0);
        assert!(o.queued);
        let p = c.take_pending();
        assert!(p.services.is_empty());
        assert!(p.relisted);
    }

    #[test]
    fn interrupted_relist_starts_over() {
        let mut c = synced_cache();
        c.service_event(Event::Init, now());
        c.service_event(Event::InitApply(svc("ns", "x", "10.0.0.9")), now());
        // The list failed; kube starts again with a new Init.
        list_services(
            &mut c,
            vec![svc("ns", "a", "10.0.0.1"), svc("ns", "b", "10.0.0.2")],
        );
        let p = c.take_pending();
        assert!(p.services.is_empty(), "{:?}", p.services);
        assert!(c.inputs([&key("ns", "x")])[0].1.is_none());
    }

    #[test]
    fn changes_to_fields_kproxy_ignores_are_not_changes() {
        let mut c = synced_cache();
        let mut s = svc("ns", "a", "10.0.0.1");
        s.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        s.metadata.resource_version = Some("42".into());
        s.metadata.annotations = Some(BTreeMap::from([(
            LAST_APPLIED_ANNOTATION.to_string(),
            "{...}".to_string(),
        )]));
        assert_eq!(c.service_event(Event::Apply(s), now()), Outcome::default());
        let mut sl = slice("ns", "a-1", Some("a"), "10.1.0.1");
        sl.metadata.resource_version = Some("43".into());
        if let Some(eps) = sl.endpoints.as_mut() {
            eps[0].target_ref = Some(ObjectReference {
                kind: Some("Pod".into()),
                name: Some("a-xyz".into()),
                ..Default::default()
            });
        }
        assert_eq!(c.slice_event(Event::Apply(sl), now()).changed, 0);
        assert!(!c.has_pending());
    }

    #[test]
    fn invalid_objects_are_kept_with_their_reason() {
        let mut c = synced_cache();
        let o = c.slice_event(
            Event::Apply(slice("ns", "a-1", Some("a"), "not-an-ip")),
            now(),
        );
        assert_eq!(o.changed, 1);
        let input = &c.inputs([&key("ns", "a")])[0];
        let reason = input.2[0].parsed().err().unwrap_or_default();
        assert!(reason.contains("not-an-ip"), "{reason}");
    }

    #[test]
    fn slices_are_parsed_for_the_own_node() {
        let mut c = synced_cache();
        let mut sl = slice("ns", "a-1", Some("a"), "10.1.0.1");
        if let Some(eps) = sl.endpoints.as_mut() {
            eps[0].node_name = Some("node-a".into());
        }
        c.slice_event(Event::Apply(sl), now());
        let input = &c.inputs([&key("ns", "a")])[0];
        let local = input.2[0].parsed().map(|p| p.endpoints[0].is_local);
        assert_eq!(local, Ok(true));
    }

    fn node(name: &str, zone: &str, heartbeat: &str) -> Node {
        let mut m = meta("", name);
        m.namespace = None;
        m.labels = Some(BTreeMap::from([(
            "topology.kubernetes.io/zone".to_string(),
            zone.to_string(),
        )]));
        Node {
            metadata: m,
            spec: Some(NodeSpec::default()),
            status: Some(NodeStatus {
                phase: Some(heartbeat.into()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn node_changes_that_matter_are_tracked() {
        let mut c = cache();
        c.node_event(Event::Init, now());
        c.node_event(Event::InitApply(node("node-a", "z1", "h1")), now());
        let o = c.node_event(Event::InitDone, now());
        assert_eq!(o.list_done, Some(ListDone::First));
        let p = c.take_pending();
        assert!(p.node_changed);
        assert!(
            !p.relisted,
            "a node list does not force a full sync by itself"
        );

        // Status churn is stored but is not a change.
        let o = c.node_event(Event::Apply(node("node-a", "z1", "h2")), now());
        assert_eq!(o.changed, 0);
        assert!(!c.has_pending());
        let phase = c
            .node()
            .and_then(|n| n.status.clone())
            .and_then(|s| s.phase);
        assert_eq!(phase.as_deref(), Some("h2"));

        // Other nodes are ignored even if the server sends them.
        c.node_event(Event::Apply(node("node-b", "z9", "h1")), now());
        assert!(!c.has_pending());

        c.node_event(Event::Apply(node("node-a", "z2", "h2")), now());
        assert!(c.take_pending().node_changed);

        c.node_event(Event::Delete(node("node-a", "z2", "h2")), now());
        assert!(c.take_pending().node_changed);
        assert!(c.node().is_none());
    }
}
