//! The in-memory object store: objects by kind/namespace/name, one
//! monotonically increasing resourceVersion shared by all kinds (as etcd's
//! revision), and a bounded log of recent changes that serves watches and
//! consistent (paged or exact-version) lists. Knows nothing about HTTP.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::{json, Value};
use tokio::sync::watch;

use super::resources::{self, ResourceId, ALL};
use super::selector::{FieldSelector, LabelSelector};

/// `(namespace, name)`; the namespace is empty for cluster-scoped kinds.
pub type Key = (String, String);

/// Default number of change events kept for watches.
pub const DEFAULT_EVENT_WINDOW: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change. `object` is the state after the change (for a deletion: the
/// last state stamped with the deletion's resourceVersion, as upstream sends
/// it); `prev` is the state before it.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub rv: u64,
    pub resource: ResourceId,
    pub kind: EventType,
    pub key: Key,
    pub object: Arc<Value>,
    pub prev: Option<Arc<Value>>,
}

/// Failures, each mapping onto the Status the real server would answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("{resource} \"{name}\" not found")]
    NotFound { resource: String, name: String },
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists { resource: String, name: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Expired(String),
    #[error("{0}")]
    TooLargeResourceVersion(String),
    #[error("{0}")]
    MethodNotAllowed(String),
}

impl StoreError {
    pub fn code(&self) -> u16 {
        match self {
            StoreError::NotFound { .. } => 404,
            StoreError::AlreadyExists { .. } | StoreError::Conflict(_) => 409,
            StoreError::Invalid(_) => 422,
            StoreError::BadRequest(_) => 400,
            StoreError::Expired(_) => 410,
            StoreError::TooLargeResourceVersion(_) => 504,
            StoreError::MethodNotAllowed(_) => 405,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::NotFound { .. } => "NotFound",
            StoreError::AlreadyExists { .. } => "AlreadyExists",
            StoreError::Conflict(_) => "Conflict",
            StoreError::Invalid(_) => "Invalid",
            StoreError::BadRequest(_) => "BadRequest",
            StoreError::Expired(_) => "Expired",
            StoreError::TooLargeResourceVersion(_) => "Timeout",
            StoreError::MethodNotAllowed(_) => "MethodNotAllowed",
        }
    }

    /// The `Status` object the real API server sends for this error.
    pub fn to_status(&self) -> Value {
        status_json(self.code(), self.reason(), &self.to_string())
    }
}

pub fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn parse_rv(s: &str) -> Result<u64, StoreError> {
    s.parse()
        .map_err(|_| StoreError::BadRequest(format!("invalid resource version {s:?}")))
}

/// What a main-resource or `/status` update may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateMode {
    /// Everything (the test API, and kinds without a status subresource).
    Replace,
    /// Everything except `status` (PUT on a kind with a status subresource).
    KeepStatus,
    /// Only `status` (PUT on `/status`).
    StatusOnly,
}

/// Delete preconditions from a DeleteOptions body.
#[derive(Debug, Clone, Default)]
pub struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub version_match: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ListResult {
    pub resource_version: u64,
    pub items: Vec<Arc<Value>>,
    pub continue_token: Option<String>,
    pub remaining: Option<u64>,
}

/// Which objects a watch or list sees.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, key: &Key, obj: &Value) -> bool {
        self.namespace.as_ref().is_none_or(|ns| *ns == key.0)
            && self.labels.matches(obj)
            && self.fields.matches(obj)
    }

    /// Translates a change into what this watcher sees: objects entering the
    /// selection are ADDED and objects leaving it are DELETED (carrying the
    /// last matching state at the new resourceVersion), as upstream does.
    pub fn to_event(&self, e: &LogEntry) -> Option<(EventType, Arc<Value>)> {
        let now = self.matches(&e.key, &e.object);
        match e.kind {
            EventType::Added | EventType::Deleted => now.then(|| (e.kind, e.object.clone())),
            EventType::Modified => {
                let before = e.prev.as_ref().is_some_and(|p| self.matches(&e.key, p));
                match (before, now) {
                    (true, true) => Some((EventType::Modified, e.object.clone())),
                    (false, true) => Some((EventType::Added, e.object.clone())),
                    (true, false) => {
                        let mut last = (**e.prev.as_ref()?).clone();
                        set_rv(&mut last, e.rv);
                        Some((EventType::Deleted, Arc::new(last)))
                    }
                    (false, false) => None,
                }
            }
        }
    }
}

/// Where a new watch starts.
#[derive(Debug)]
pub struct WatchStart {
    /// Synthetic ADDED events for the current state, if the request asked
    /// for it (resourceVersion unset or "0", or sendInitialEvents).
    pub initial: Vec<Arc<Value>>,
    /// Changes after this resourceVersion follow.
    pub cursor: u64,
    pub epoch: u64,
}

fn set_rv(obj: &mut Value, rv: u64) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::from(rv.to_string()));
    }
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn hex_encode(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<String> {
    if s.len() % 2 != 0 {
        return None;
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// Continue tokens carry the snapshot version and the last key returned,
/// so later pages read the same snapshot.
fn encode_continue(rv: u64, key: &Key) -> String {
    hex_encode(&format!("{rv}/{}/{}", key.0, key.1))
}

fn decode_continue(token: &str) -> Result<(u64, Key), StoreError> {
    let bad = || StoreError::BadRequest("continue key is not valid".into());
    let text = hex_decode(token).ok_or_else(bad)?;
    let mut parts = text.splitn(3, '/');
    let rv = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let ns = parts.next().ok_or_else(bad)?.to_string();
    let name = parts.next().ok_or_else(bad)?.to_string();
    Ok((rv, (ns, name)))
}

const SERVICE_CIDR_BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);
const SERVICE_CIDR_SIZE: u32 = 1 << 20; // 10.96.0.0/12
const NODE_PORTS: std::ops::RangeInclusive<i64> = 30000..=32767;

#[derive(Debug)]
pub struct Store {
    objects: Vec<BTreeMap<Key, Arc<Value>>>,
    rv: u64,
    /// Every change with a resourceVersion above this is still in `log`.
    compacted: u64,
    log: VecDeque<LogEntry>,
    window: usize,
    /// Bumped by `reset_history`: running watches end with 410.
    epoch: u64,
    next_uid: u64,
    /// Cluster IPs and node ports the stored Services hold, with how many
    /// hold each: allocation looks them up instead of scanning every
    /// Service (which made loading 50k services quadratic).
    claims: ServiceClaims,
}

/// See [`Store::claims`].
#[derive(Debug, Default)]
struct ServiceClaims {
    ips: HashMap<String, usize>,
    ports: BTreeMap<i64, usize>,
}

impl ServiceClaims {
    /// The cluster IPs and node ports (healthCheckNodePort included) of a
    /// Service object.
    fn of(svc: &Value) -> (Vec<String>, Vec<i64>) {
        let ips = svc
            .pointer("/spec/clusterIPs")
            .and_then(Value::as_array)
            .map(|ips| {
                ips.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let mut ports: Vec<i64> = svc
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p.get("nodePort")?.as_i64())
                    .collect()
            })
            .unwrap_or_default();
        ports.extend(
            svc.pointer("/spec/healthCheckNodePort")
                .and_then(Value::as_i64),
        );
        (ips, ports)
    }

    fn add(&mut self, svc: &Value) {
        let (ips, ports) = Self::of(svc);
        for ip in ips {
            *self.ips.entry(ip).or_default() += 1;
        }
        for p in ports {
            *self.ports.entry(p).or_default() += 1;
        }
    }

    fn remove(&mut self, svc: &Value) {
        let (ips, ports) = Self::of(svc);
        for ip in ips {
            if let Some(n) = self.ips.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.ips.remove(&ip);
                }
            }
        }
        for p in ports {
            if let Some(n) = self.ports.get_mut(&p) {
                *n -= 1;
                if *n == 0 {
                    self.ports.remove(&p);
                }
            }
        }
    }
}

impl Store {
    pub fn new(window: usize) -> Self {
        Store {
            objects: ALL.iter().map(|_| BTreeMap::new()).collect(),
            rv: 1,
            compacted: 1,
            log: VecDeque::new(),
            window,
            epoch: 0,
            next_uid: 1,
            claims: ServiceClaims::default(),
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn compacted_version(&self) -> u64 {
        self.compacted
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn event_window(&self) -> usize {
        self.window
    }

    pub fn set_event_window(&mut self, window: usize) {
        self.window = window;
        self.trim();
    }

    /// Forgets all retained changes: watches and continue tokens from any
    /// older resourceVersion now get 410 Expired (running watches continue).
    pub fn compact(&mut self) {
        self.log.clear();
        self.compacted = self.rv;
    }

    /// Starts a new history: every resourceVersion handed out so far
    /// (including the current one) is too old, and running watches end with
    /// a 410 ERROR event, so every client must relist.
    pub fn reset_history(&mut self) {
        self.rv += 1;
        self.compact();
        self.epoch += 1;
    }

    fn trim(&mut self) {
        while self.log.len() > self.window {
            if let Some(e) = self.log.pop_front() {
                self.compacted = e.rv;
            }
        }
    }

    fn record(
        &mut self,
        resource: ResourceId,
        kind: EventType,
        key: Key,
        object: Arc<Value>,
        prev: Option<Arc<Value>>,
    ) {
        self.log.push_back(LogEntry {
            rv: self.rv,
            resource,
            kind,
            key,
            object,
            prev,
        });
        self.trim();
    }

    pub fn get(&self, resource: ResourceId, ns: &str, name: &str) -> Option<Arc<Value>> {
        self.objects[resource]
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    pub fn all(&self, resource: ResourceId) -> Vec<Arc<Value>> {
        self.objects[resource].values().cloned().collect()
    }

    fn not_found(resource: ResourceId, name: &str) -> StoreError {
        StoreError::NotFound {
            resource: ALL[resource].plural.into(),
            name: name.into(),
        }
    }

    /// Resolves the namespace of a write from the URL (`path_ns`) and the body.
    fn namespace_for(
        resource: ResourceId,
        path_ns: Option<&str>,
        obj: &mut Value,
    ) -> Result<String, StoreError> {
        let rt = ALL[resource];
        let body_ns = meta_str(obj, "namespace")
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let meta = obj
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| StoreError::BadRequest("object has no metadata".into()))?;
        if !rt.namespaced {
            // Upstream clears a namespace set on a cluster-scoped object.
            meta.remove("namespace");
            return Ok(String::new());
        }
        let ns = match (path_ns, body_ns) {
            (Some(p), Some(b)) if p != b => {
                return Err(StoreError::BadRequest(
                    "the namespace of the provided object does not match the namespace sent on the request".into(),
                ))
            }
            (Some(p), _) => p.to_string(),
            (None, Some(b)) => b,
            (None, None) => return Err(StoreError::BadRequest("namespace is required".into())),
        };
        meta.insert("namespace".into(), Value::from(ns.clone()));
        Ok(ns)
    }

    /// Fills in apiVersion/kind and checks the body is this kind.
    fn check_type(resource: ResourceId, obj: &mut Value) -> Result<(), StoreError> {
        let rt = ALL[resource];
        let map = obj
            .as_object_mut()
            .ok_or_else(|| StoreError::BadRequest("body is not a JSON object".into()))?;
        let api_version = rt.api_version();
        for (field, want) in [("apiVersion", api_version.as_str()), ("kind", rt.kind)] {
            match map.get(field).and_then(Value::as_str) {
                None | Some("") => {
                    map.insert(field.into(), Value::from(want));
                }
                Some(got) if got != want => {
                    return Err(StoreError::BadRequest(format!(
                        "{field} {got:?} does not match the expected {want:?}"
                    )))
                }
                Some(_) => {}
            }
        }
        map.entry("metadata").or_insert_with(|| json!({}));
        rt.validate(obj)
            .map_err(|e| StoreError::BadRequest(format!("invalid {}: {e}", rt.kind)))
    }

    pub fn create(
        &mut self,
        resource: ResourceId,
        path_ns: Option<&str>,
        mut obj: Value,
    ) -> Result<Arc<Value>, StoreError> {
        Self::check_type(resource, &mut obj)?;
        let ns = Self::namespace_for(resource, path_ns, &mut obj)?;
        let name = match meta_str(&obj, "name").filter(|s| !s.is_empty()) {
            Some(n) => n.to_string(),
            None => match meta_str(&obj, "generateName").filter(|s| !s.is_empty()) {
                // Counter-based suffix: unique without randomness.
                Some(prefix) => format!("{prefix}{:05x}", self.next_uid),
                None => {
                    return Err(StoreError::Invalid(
                        "metadata.name: Required value: name or generateName is required".into(),
                    ))
                }
            },
        };
        let key = (ns, name.clone());
        if self.objects[resource].contains_key(&key) {
            return Err(StoreError::AlreadyExists {
                resource: ALL[resource].plural.into(),
                name,
            });
        }
        if ALL[resource] == &resources::SERVICES {
            self.allocate_service(resource, &key, &mut obj, None)?;
        }
        self.rv += 1;
        let uid = format!("00000000-0000-4000-8000-{:012x}", self.next_uid);
        self.next_uid += 1;
        let now = jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("name".into(), Value::from(name));
            meta.insert("uid".into(), Value::from(uid));
            meta.insert("creationTimestamp".into(), Value::from(now));
            meta.insert("resourceVersion".into(), Value::from(self.rv.to_string()));
            meta.remove("deletionTimestamp");
        }
        let obj = Arc::new(obj);
        self.objects[resource].insert(key.clone(), obj.clone());
        if ALL[resource] == &resources::SERVICES {
            self.claims.add(&obj);
        }
        self.record(resource, EventType::Added, key, obj.clone(), None);
        Ok(obj)
    }

    pub fn update(
        &mut self,
        resource: ResourceId,
        path_ns: Option<&str>,
        name: &str,
        mut obj: Value,
        mode: UpdateMode,
    ) -> Result<Arc<Value>, StoreError> {
        Self::check_type(resource, &mut obj)?;
        let ns = Self::namespace_for(resource, path_ns, &mut obj)?;
        match meta_str(&obj, "name") {
            Some(n) if n == name => {}
            None | Some("") => {
                if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.insert("name".into(), Value::from(name));
                }
            }
            Some(_) => {
                return Err(StoreError::BadRequest(
                    "the name of the object does not match the name on the URL".into(),
                ))
            }
        }
        let key = (ns, name.to_string());
        let old = self.objects[resource]
            .get(&key)
            .cloned()
            .ok_or_else(|| Self::not_found(resource, name))?;
        let old_rv = meta_str(&old, "resourceVersion")
            .unwrap_or_default()
            .to_string();
        if let Some(rv) = meta_str(&obj, "resourceVersion").filter(|s| !s.is_empty()) {
            if rv != old_rv {
                return Err(StoreError::Conflict(format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    ALL[resource].plural
                )));
            }
        }
        match mode {
            UpdateMode::Replace => {}
            UpdateMode::KeepStatus => match old.get("status") {
                Some(s) => {
                    obj["status"] = s.clone();
                }
                None => {
                    if let Some(m) = obj.as_object_mut() {
                        m.remove("status");
                    }
                }
            },
            UpdateMode::StatusOnly => {
                let status = obj.get("status").cloned();
                obj = (*old).clone();
                if let Some(m) = obj.as_object_mut() {
                    match status {
                        Some(s) => m.insert("status".into(), s),
                        None => m.remove("status"),
                    };
                }
            }
        }
        if ALL[resource] == &resources::SERVICES {
            self.allocate_service(resource, &key, &mut obj, Some(&old))?;
        }
        // Server-owned metadata survives updates.
        if let (Some(meta), Some(old_meta)) = (
            obj.get_mut("metadata").and_then(Value::as_object_mut),
            old.get("metadata").and_then(Value::as_object),
        ) {
            for field in ["uid", "creationTimestamp"] {
                match old_meta.get(field) {
                    Some(v) => meta.insert(field.into(), v.clone()),
                    None => meta.remove(field),
                };
            }
            meta.insert("resourceVersion".into(), Value::from(old_rv));
        }
        // A no-op update changes nothing, not even the resourceVersion.
        if obj == *old {
            return Ok(old);
        }
        self.rv += 1;
        set_rv(&mut obj, self.rv);
        let obj = Arc::new(obj);
        self.objects[resource].insert(key.clone(), obj.clone());
        if ALL[resource] == &resources::SERVICES {
            self.claims.remove(&old);
            self.claims.add(&obj);
        }
        self.record(resource, EventType::Modified, key, obj.clone(), Some(old));
        Ok(obj)
    }

    pub fn delete(
        &mut self,
        resource: ResourceId,
        ns: &str,
        name: &str,
        pre: &Preconditions,
    ) -> Result<Arc<Value>, StoreError> {
        let ns = if ALL[resource].namespaced { ns } else { "" };
        let key = (ns.to_string(), name.to_string());
        let old = self.objects[resource]
            .get(&key)
            .cloned()
            .ok_or_else(|| Self::not_found(resource, name))?;
        let conflict = |what: &str, want: &str, got: &str| {
            StoreError::Conflict(format!(
                "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: {what}: {want}, {what} in object meta: {got}",
                ALL[resource].plural
            ))
        };
        if let Some(uid) = &pre.uid {
            let got = meta_str(&old, "uid").unwrap_or_default();
            if uid != got {
                return Err(conflict("UID in precondition", uid, got));
            }
        }
        if let Some(rv) = &pre.resource_version {
            let got = meta_str(&old, "resourceVersion").unwrap_or_default();
            if rv != got {
                return Err(conflict("ResourceVersion in precondition", rv, got));
            }
        }
        self.objects[resource].remove(&key);
        if ALL[resource] == &resources::SERVICES {
            self.claims.remove(&old);
        }
        self.rv += 1;
        let mut last = (*old).clone();
        set_rv(&mut last, self.rv);
        let last = Arc::new(last);
        self.record(resource, EventType::Deleted, key, last.clone(), Some(old));
        Ok(last)
    }

    /// The objects of one kind as they were at `rv`, rebuilt by undoing the
    /// retained changes newer than it.
    pub fn snapshot(
        &self,
        resource: ResourceId,
        rv: u64,
    ) -> Result<BTreeMap<Key, Arc<Value>>, StoreError> {
        if rv < self.compacted {
            return Err(StoreError::Expired(format!(
                "too old resource version: {rv} ({})",
                self.compacted
            )));
        }
        if rv > self.rv {
            return Err(StoreError::TooLargeResourceVersion(format!(
                "Too large resource version: {rv}, current: {}",
                self.rv
            )));
        }
        let mut map = self.objects[resource].clone();
        for e in self.log.iter().rev().take_while(|e| e.rv > rv) {
            if e.resource != resource {
                continue;
            }
            match (&e.kind, &e.prev) {
                (EventType::Added, _) => {
                    map.remove(&e.key);
                }
                (_, Some(prev)) => {
                    map.insert(e.key.clone(), prev.clone());
                }
                (_, None) => {}
            }
        }
        Ok(map)
    }

    pub fn list(&self, resource: ResourceId, q: &ListQuery) -> Result<ListResult, StoreError> {
        let (rv, start_after) = if let Some(token) =
            q.continue_token.as_deref().filter(|t| !t.is_empty())
        {
            let (rv, key) = decode_continue(token)?;
            if rv < self.compacted {
                return Err(StoreError::Expired(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.".into(),
                ));
            }
            (rv, Some(key))
        } else {
            match (q.resource_version.as_deref(), q.version_match.as_deref()) {
                (None | Some(""), _) => (self.rv, None),
                (Some("0"), Some("Exact")) => {
                    return Err(StoreError::BadRequest(
                        "resourceVersionMatch \"Exact\" requires a non-zero resourceVersion".into(),
                    ))
                }
                (Some(rv), Some("Exact")) => (parse_rv(rv)?, None),
                (Some(rv), _) => {
                    let rv = parse_rv(rv)?;
                    if rv > self.rv {
                        return Err(StoreError::TooLargeResourceVersion(format!(
                            "Too large resource version: {rv}, current: {}",
                            self.rv
                        )));
                    }
                    (self.rv, None)
                }
            }
        };
        let snapshot;
        let map = if rv == self.rv {
            &self.objects[resource]
        } else {
            snapshot = self.snapshot(resource, rv)?;
            &snapshot
        };
        let filter = Filter {
            namespace: q.namespace.clone(),
            labels: q.labels.clone(),
            fields: q.fields.clone(),
        };
        let lower = match &start_after {
            Some(k) => Bound::Excluded(k),
            None => Bound::Unbounded,
        };
        let mut matching = map
            .range::<Key, _>((lower, Bound::Unbounded))
            .filter(|(k, v)| filter.matches(k, v));
        let limit = q.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut last_key = None;
        for (k, v) in matching.by_ref().take(limit) {
            items.push(v.clone());
            last_key = Some(k.clone());
        }
        let rest = matching.count() as u64;
        let (continue_token, remaining) = match (rest, last_key) {
            (0, _) | (_, None) => (None, None),
            (n, Some(k)) => {
                // Upstream only counts the rest when no selector filters it.
                let exact = q.labels.is_empty() && q.fields.is_empty();
                (Some(encode_continue(rv, &k)), exact.then_some(n))
            }
        };
        Ok(ListResult {
            resource_version: rv,
            items,
            continue_token,
            remaining,
        })
    }

    /// Positions a new watch per the resourceVersion rules of the real
    /// server: unset or "0" first replays the current state as ADDED
    /// events; a specific version streams the changes after it, or fails
    /// with Expired when it is older than the retained window.
    pub fn watch_start(
        &self,
        resource: ResourceId,
        rv: Option<&str>,
        send_initial_events: bool,
        filter: &Filter,
    ) -> Result<WatchStart, StoreError> {
        let initial = |store: &Store| -> Vec<Arc<Value>> {
            store.objects[resource]
                .iter()
                .filter(|(k, v)| filter.matches(k, v))
                .map(|(_, v)| v.clone())
                .collect()
        };
        let (initial, cursor) = match rv.filter(|s| !s.is_empty()) {
            None | Some("0") => (initial(self), self.rv),
            Some(rv) => {
                let rv = parse_rv(rv)?;
                if rv < self.compacted {
                    return Err(StoreError::Expired(format!(
                        "too old resource version: {rv} ({})",
                        self.compacted
                    )));
                }
                if send_initial_events {
                    (initial(self), self.rv)
                } else {
                    // A version from the future waits for the store to catch up.
                    (Vec::new(), rv)
                }
            }
        };
        Ok(WatchStart {
            initial,
            cursor,
            epoch: self.epoch,
        })
    }

    /// Changes to `resource` after `cursor`, and the new cursor. Expired
    /// when the window has moved past the cursor (a watcher fell behind).
    pub fn changes_after(
        &self,
        resource: ResourceId,
        cursor: u64,
    ) -> Result<(Vec<LogEntry>, u64), StoreError> {
        if cursor < self.compacted {
            return Err(StoreError::Expired(format!(
                "too old resource version: {cursor} ({})",
                self.compacted
            )));
        }
        let start = self.log.partition_point(|e| e.rv <= cursor);
        let entries = self
            .log
            .range(start..)
            .filter(|e| e.resource == resource)
            .cloned()
            .collect();
        Ok((entries, self.rv.max(cursor)))
    }

    /// Assigns cluster IPs and node ports like the real allocators, keeping
    /// the ones an update leaves unset.
    fn allocate_service(
        &self,
        resource: ResourceId,
        key: &Key,
        svc: &mut Value,
        old: Option<&Value>,
    ) -> Result<(), StoreError> {
        resources::default_service(svc);
        let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) else {
            return Ok(());
        };
        if spec.get("type").and_then(Value::as_str) == Some("ExternalName") {
            return Ok(());
        }
        let old_spec = old.and_then(|o| o.get("spec"));
        // What the other Services hold: everything claimed, less what the
        // stored version of this one claims.
        let (own_ips, own_ports) = self.objects[resource]
            .get(key)
            .map(|o| ServiceClaims::of(o))
            .unwrap_or_default();
        let ip_used = |ip: &str| -> bool {
            let own = own_ips.iter().filter(|o| *o == ip).count();
            self.claims.ips.get(ip).is_some_and(|n| *n > own)
        };
        let mut used_ports: BTreeSet<i64> = self
            .claims
            .ports
            .iter()
            .filter(|(p, n)| **n > own_ports.iter().filter(|o| *o == *p).count())
            .map(|(p, _)| *p)
            .collect();

        let unset = |v: Option<&Value>| v.and_then(Value::as_str).is_none_or(str::is_empty);
        if unset(spec.get("clusterIP")) {
            if let Some(old_ip) = old_spec
                .and_then(|s| s.get("clusterIP"))
                .filter(|v| !unset(Some(v)))
            {
                spec.insert("clusterIP".into(), old_ip.clone());
                if let Some(ips) = old_spec.and_then(|s| s.get("clusterIPs")) {
                    spec.insert("clusterIPs".into(), ips.clone());
                }
            } else {
                let ip = (10..SERVICE_CIDR_SIZE - 1)
                    .map(|i| IpAddr::from((SERVICE_CIDR_BASE + i).to_be_bytes()).to_string())
                    .find(|ip| !ip_used(ip))
                    .ok_or_else(|| StoreError::Invalid("no service IPs left".into()))?;
                spec.insert("clusterIP".into(), Value::from(ip.clone()));
                spec.insert("clusterIPs".into(), json!([ip]));
            }
        }
        let ip = spec
            .get("clusterIP")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if ip != "None" && ip_used(&ip) {
            return Err(StoreError::Invalid(format!(
                "spec.clusterIPs: Invalid value: [\"{ip}\"]: failed to allocate IP {ip}: provided IP is already allocated"
            )));
        }
        if spec
            .get("clusterIPs")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        {
            spec.insert("clusterIPs".into(), json!([ip.clone()]));
        }
        if ip != "None" && !spec.contains_key("ipFamilies") {
            let family = if ip.contains(':') { "IPv6" } else { "IPv4" };
            spec.insert("ipFamilies".into(), json!([family]));
        }
        spec.entry("ipFamilyPolicy")
            .or_insert_with(|| Value::from("SingleStack"));

        let ty = spec
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if ty != "NodePort" && ty != "LoadBalancer" {
            return Ok(());
        }
        let allocate = |used: &mut BTreeSet<i64>| -> Result<i64, StoreError> {
            let p = NODE_PORTS
                .clone()
                .find(|p| !used.contains(p))
                .ok_or_else(|| StoreError::Invalid("no node ports left".into()))?;
            used.insert(p);
            Ok(p)
        };
        let old_ports: Vec<Value> = old_spec
            .and_then(|s| s.get("ports"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
            for port in ports.iter_mut().filter_map(Value::as_object_mut) {
                if port.get("nodePort").and_then(Value::as_i64).unwrap_or(0) != 0 {
                    continue;
                }
                let kept = old_ports.iter().find_map(|o| {
                    (o.get("port") == port.get("port") && o.get("protocol") == port.get("protocol"))
                        .then(|| o.get("nodePort").cloned())
                        .flatten()
                });
                let p = match kept {
                    Some(p) => p,
                    None => Value::from(allocate(&mut used_ports)?),
                };
                port.insert("nodePort".into(), p);
            }
        }
        let local = spec.get("externalTrafficPolicy").and_then(Value::as_str) == Some("Local");
        if ty == "LoadBalancer"
            && local
            && spec
                .get("healthCheckNodePort")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                == 0
        {
            let p = match old_spec.and_then(|s| s.get("healthCheckNodePort")) {
                Some(p) => p.clone(),
                None => Value::from(allocate(&mut used_ports)?),
            };
            spec.insert("healthCheckNodePort".into(), p);
        }
        Ok(())
    }
}

/// The store shared by the HTTP layer and the test API, with a change
/// signal that wakes watch streams.
#[derive(Debug)]
pub struct SharedStore {
    inner: Mutex<Store>,
    changed: watch::Sender<u64>,
}

impl SharedStore {
    pub fn new(window: usize) -> Self {
        SharedStore {
            inner: Mutex::new(Store::new(window)),
            changed: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        // The store stays consistent between statements, so a panic in
        // another holder leaves usable data.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn read<R>(&self, f: impl FnOnce(&Store) -> R) -> R {
        f(&self.lock())
    }

    /// Runs a mutation and wakes every watcher.
    pub fn write<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let r = f(&mut self.lock());
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        r
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: ResourceId = 0;

    fn svc(name: &str, labels: Value) -> Value {
        json!({"metadata": {"name": name, "namespace": "default", "labels": labels},
               "spec": {"ports": [{"port": 80}]}})
    }

    #[test]
    fn create_assigns_metadata_and_defaults() {
        let mut s = Store::new(10);
        let o = s.create(SVC, None, svc("a", json!({}))).unwrap();
        assert_eq!(o["kind"], "Service");
        assert_eq!(o["metadata"]["resourceVersion"], "2");
        assert_eq!(o["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(o["spec"]["ports"][0]["targetPort"], 80);
        let b = s.create(SVC, None, svc("b", json!({}))).unwrap();
        assert_eq!(b["spec"]["clusterIP"], "10.96.0.11");
        assert!(matches!(
            s.create(SVC, None, svc("a", json!({}))),
            Err(StoreError::AlreadyExists { .. })
        ));
    }

    #[test]
    fn cluster_ips_and_node_ports_are_held_until_released() {
        let mut s = Store::new(100);
        let with_ip = |name: &str, ip: &str| {
            json!({"metadata": {"name": name, "namespace": "default"},
                   "spec": {"clusterIP": ip, "type": "NodePort", "ports": [{"port": 80}]}})
        };
        let a = s.create(SVC, None, with_ip("a", "10.96.0.50")).unwrap();
        assert_eq!(a["spec"]["ports"][0]["nodePort"], 30000);
        let taken = s.create(SVC, None, with_ip("b", "10.96.0.50"));
        assert!(
            matches!(&taken, Err(StoreError::Invalid(m)) if m.contains("already allocated")),
            "{taken:?}"
        );
        // Its own IP and port are not "taken" when it is updated.
        let mut a2 = (*a).clone();
        a2["metadata"]["labels"] = json!({"v": "2"});
        let a2 = s.update(SVC, None, "a", a2, UpdateMode::Replace).unwrap();
        assert_eq!(a2["spec"]["ports"][0]["nodePort"], 30000);
        let b = s.create(SVC, None, with_ip("b", "10.96.0.51")).unwrap();
        assert_eq!(b["spec"]["ports"][0]["nodePort"], 30001);
        s.delete(SVC, "default", "a", &Preconditions::default())
            .unwrap();
        let c = s.create(SVC, None, with_ip("c", "10.96.0.50")).unwrap();
        assert_eq!(c["spec"]["ports"][0]["nodePort"], 30000, "released with a");
    }

    #[test]
    fn snapshot_undoes_later_changes() {
        let mut s = Store::new(100);
        s.create(SVC, None, svc("a", json!({"v": "1"}))).unwrap();
        let rv = s.resource_version();
        s.update(
            SVC,
            None,
            "a",
            svc("a", json!({"v": "2"})),
            UpdateMode::Replace,
        )
        .unwrap();
        s.create(SVC, None, svc("b", json!({}))).unwrap();
        s.delete(SVC, "default", "a", &Preconditions::default())
            .unwrap();
        let snap = s.snapshot(SVC, rv).unwrap();
        assert_eq!(snap.len(), 1);
        let a = &snap[&("default".to_string(), "a".to_string())];
        assert_eq!(a["metadata"]["labels"]["v"], "1");
        s.compact();
        assert!(matches!(s.snapshot(SVC, rv), Err(StoreError::Expired(_))));
    }

    #[test]
    fn paging_reads_one_snapshot() {
        let mut s = Store::new(100);
        for n in ["a", "b", "c"] {
            s.create(SVC, None, svc(n, json!({}))).unwrap();
        }
        let q = ListQuery {
            limit: Some(2),
            ..Default::default()
        };
        let p1 = s.list(SVC, &q).unwrap();
        assert_eq!(p1.items.len(), 2);
        assert_eq!(p1.remaining, Some(1));
        s.delete(SVC, "default", "c", &Preconditions::default())
            .unwrap();
        let q2 = ListQuery {
            limit: Some(2),
            continue_token: p1.continue_token.clone(),
            ..Default::default()
        };
        let p2 = s.list(SVC, &q2).unwrap();
        assert_eq!(
            p2.items.len(),
            1,
            "deleted after the first page, still in the snapshot"
        );
        assert_eq!(p2.resource_version, p1.resource_version);
        assert!(p2.continue_token.is_none());
    }

    #[test]
    fn window_expires_old_versions() {
        let mut s = Store::new(2);
        let start = s.resource_version();
        for n in ["a", "b", "c"] {
            s.create(SVC, None, svc(n, json!({}))).unwrap();
        }
        assert!(s.changes_after(SVC, start).is_err());
        let (events, cursor) = s.changes_after(SVC, start + 1).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(cursor, s.resource_version());
        s.reset_history();
        assert!(s.changes_after(SVC, cursor).is_err());
    }

    #[test]
    fn selector_transitions_in_watch() {
        let mut s = Store::new(10);
        s.create(SVC, None, svc("a", json!({"x": "1"}))).unwrap();
        s.update(SVC, None, "a", svc("a", json!({})), UpdateMode::Replace)
            .unwrap();
        s.update(
            SVC,
            None,
            "a",
            svc("a", json!({"x": "1"})),
            UpdateMode::Replace,
        )
        .unwrap();
        let f = Filter {
            labels: LabelSelector::parse("x").unwrap(),
            ..Default::default()
        };
        let (entries, _) = s.changes_after(SVC, 1).unwrap();
        let kinds: Vec<_> = entries
            .iter()
            .filter_map(|e| f.to_event(e))
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            kinds,
            [EventType::Added, EventType::Deleted, EventType::Added]
        );
    }
}
