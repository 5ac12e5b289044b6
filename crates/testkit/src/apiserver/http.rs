//! The HTTP face of the fake API server: URL routing, the list/watch/CRUD
//! verbs, discovery documents and the request log. All state lives in the
//! store; this layer only translates.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::resources::{self, ResourceId, ALL};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{
    EventType, Filter, ListQuery, Preconditions, SharedStore, StoreError, UpdateMode,
};

/// What a request did, for the request log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    Discovery,
    Unknown,
}

/// One served request.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub query: String,
    pub verb: Verb,
    /// API group of the resource (empty for core), if the path named one.
    pub group: String,
    /// Resource plural (`services`), if the path named one.
    pub resource: String,
    /// HTTP status answered (200 for a watch, whatever it then streams).
    pub status: u16,
}

#[derive(Debug, Default)]
pub struct RequestLog {
    records: Mutex<Vec<RequestRecord>>,
}

impl RequestLog {
    fn push(&self, r: RequestRecord) {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(r);
    }

    pub fn snapshot(&self) -> Vec<RequestRecord> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn clear(&self) {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct AppState {
    pub store: Arc<SharedStore>,
    pub log: RequestLog,
    pub bookmark_interval: Mutex<Duration>,
    pub addr: SocketAddr,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new().fallback(handle).with_state(state)
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error_response(e: &StoreError) -> Response {
    let code = StatusCode::from_u16(e.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &e.to_status())
}

/// What a URL addresses.
#[derive(Debug)]
enum Target {
    Document(Value),
    Resource {
        id: ResourceId,
        namespace: Option<String>,
        name: Option<String>,
        status: bool,
    },
}

fn not_found(path: &str) -> StoreError {
    StoreError::NotFound {
        resource: "path".into(),
        name: path.into(),
    }
}

fn route(path: &str, addr: SocketAddr) -> Result<Target, StoreError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Ok(Target::Document(version_doc())),
        ["api"] => return Ok(Target::Document(api_versions_doc(addr))),
        ["apis"] => return Ok(Target::Document(api_groups_doc())),
        ["apis", g] => {
            return group_doc(g)
                .map(Target::Document)
                .ok_or_else(|| not_found(path))
        }
        ["api", v] => {
            return resource_list_doc("", v)
                .map(Target::Document)
                .ok_or_else(|| not_found(path))
        }
        ["apis", g, v] => {
            return resource_list_doc(g, v)
                .map(Target::Document)
                .ok_or_else(|| not_found(path))
        }
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(not_found(path)),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(*sub)),
        _ => return Err(not_found(path)),
    };
    let id = resources::by_path(group, version, plural).ok_or_else(|| not_found(path))?;
    let rt = ALL[id];
    let status = match sub {
        None => false,
        Some("status") if rt.status_subresource => true,
        Some(_) => return Err(not_found(path)),
    };
    // Cluster-scoped kinds have no namespaced URLs; namespaced objects are
    // only addressable by name within their namespace.
    if (!rt.namespaced && namespace.is_some())
        || (rt.namespaced && name.is_some() && namespace.is_none())
    {
        return Err(not_found(path));
    }
    Ok(Target::Resource {
        id,
        namespace,
        name,
        status,
    })
}

fn version_doc() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-kproxy-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn api_versions_doc(addr: SocketAddr) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string()}],
    })
}

fn groups() -> Vec<&'static str> {
    let mut g: Vec<&str> = ALL
        .iter()
        .map(|r| r.group)
        .filter(|g| !g.is_empty())
        .collect();
    g.dedup();
    g
}

fn group_json(group: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/v1"), "version": "v1"});
    json!({"name": group, "versions": [gv.clone()], "preferredVersion": gv})
}

fn api_groups_doc() -> Value {
    let groups: Vec<Value> = groups().into_iter().map(group_json).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn group_doc(group: &str) -> Option<Value> {
    groups().contains(&group).then(|| {
        let mut g = group_json(group);
        g["kind"] = json!("APIGroup");
        g["apiVersion"] = json!("v1");
        g
    })
}

fn resource_list_doc(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in ALL
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        resources.push(json!({
            "name": r.plural,
            "singularName": r.kind.to_lowercase(),
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
        }));
        if r.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

fn flag(params: &HashMap<String, String>, key: &str) -> bool {
    matches!(params.get(key).map(String::as_str), Some("true" | "1"))
}

async fn handle(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut record = RequestRecord {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().unwrap_or_default().to_string(),
        verb: Verb::Unknown,
        group: String::new(),
        resource: String::new(),
        status: 0,
    };
    let response = dispatch(&state, &method, &uri, &headers, body, &mut record);
    record.status = response.status().as_u16();
    tracing::debug!(method = %record.method, path = %record.path, query = %record.query, status = record.status, "request");
    state.log.push(record);
    response
}

fn dispatch(
    state: &Arc<AppState>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
    record: &mut RequestRecord,
) -> Response {
    let params = match Query::<HashMap<String, String>>::try_from_uri(uri) {
        Ok(Query(p)) => p,
        Err(e) => return error_response(&StoreError::BadRequest(format!("invalid query: {e}"))),
    };
    if matches!(uri.path(), "/healthz" | "/readyz" | "/livez") {
        record.verb = Verb::Discovery;
        return (StatusCode::OK, "ok").into_response();
    }
    let target = match route(uri.path(), state.addr) {
        Ok(t) => t,
        Err(e) => return error_response(&e),
    };
    let (id, namespace, name, status) = match target {
        Target::Document(doc) => {
            record.verb = Verb::Discovery;
            return if method == Method::GET {
                json_response(StatusCode::OK, &doc)
            } else {
                error_response(&StoreError::MethodNotAllowed(format!(
                    "{method} is not supported here"
                )))
            };
        }
        Target::Resource {
            id,
            namespace,
            name,
            status,
        } => (id, namespace, name, status),
    };
    let rt = ALL[id];
    record.group = rt.group.to_string();
    record.resource = rt.plural.to_string();
    let result = match (method, name) {
        (&Method::GET, None) if flag(&params, "watch") => {
            record.verb = Verb::Watch;
            return watch(state, id, namespace, &params);
        }
        (&Method::GET, None) => {
            record.verb = Verb::List;
            list(state, id, namespace, &params)
        }
        (&Method::GET, Some(name)) => {
            record.verb = Verb::Get;
            let ns = namespace.unwrap_or_default();
            state
                .store
                .read(|s| s.get(id, &ns, &name))
                .map(|o| (StatusCode::OK, (*o).clone()))
                .ok_or(StoreError::NotFound {
                    resource: rt.plural.into(),
                    name,
                })
        }
        (&Method::POST, None) => {
            record.verb = Verb::Create;
            if rt.namespaced && namespace.is_none() {
                Err(StoreError::MethodNotAllowed(format!(
                    "create {} needs a namespaced URL",
                    rt.plural
                )))
            } else {
                parse_body(&body).and_then(|obj| {
                    state
                        .store
                        .write(|s| s.create(id, namespace.as_deref(), obj))
                        .map(|o| (StatusCode::CREATED, (*o).clone()))
                })
            }
        }
        (&Method::PUT, Some(name)) => {
            record.verb = Verb::Update;
            let mode = update_mode(id, status);
            parse_body(&body).and_then(|obj| {
                state
                    .store
                    .write(|s| s.update(id, namespace.as_deref(), &name, obj, mode))
                    .map(|o| (StatusCode::OK, (*o).clone()))
            })
        }
        (&Method::PATCH, Some(name)) => {
            record.verb = Verb::Patch;
            patch(state, id, namespace, &name, status, headers, &body)
        }
        (&Method::DELETE, Some(name)) => {
            record.verb = Verb::Delete;
            delete_preconditions(&body).and_then(|pre| {
                let ns = namespace.unwrap_or_default();
                state
                    .store
                    .write(|s| s.delete(id, &ns, &name, &pre))
                    .map(|o| (StatusCode::OK, (*o).clone()))
            })
        }
        (m, _) => Err(StoreError::MethodNotAllowed(format!(
            "{m} is not supported on {}",
            uri.path()
        ))),
    };
    match result {
        Ok((code, obj)) => json_response(code, &obj),
        Err(e) => error_response(&e),
    }
}

fn update_mode(id: ResourceId, status: bool) -> UpdateMode {
    match (status, ALL[id].status_subresource) {
        (true, _) => UpdateMode::StatusOnly,
        (false, true) => UpdateMode::KeepStatus,
        (false, false) => UpdateMode::Replace,
    }
}

fn parse_body(body: &[u8]) -> Result<Value, StoreError> {
    let v: Value = serde_json::from_slice(body)
        .or_else(|_| {
            let text = std::str::from_utf8(body).map_err(|e| e.to_string())?;
            serde_saphyr::from_str::<Value>(text).map_err(|e| e.to_string())
        })
        .map_err(|e| StoreError::BadRequest(format!("invalid body: {e}")))?;
    if v.is_object() {
        Ok(v)
    } else {
        Err(StoreError::BadRequest("body must be an object".into()))
    }
}

fn delete_preconditions(body: &[u8]) -> Result<Preconditions, StoreError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Preconditions::default());
    }
    let v = parse_body(body)?;
    let get = |f: &str| {
        v.get("preconditions")
            .and_then(|p| p.get(f))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    Ok(Preconditions {
        uid: get("uid"),
        resource_version: get("resourceVersion"),
    })
}

fn selectors(
    params: &HashMap<String, String>,
) -> Result<(LabelSelector, FieldSelector), StoreError> {
    let bad = |e: super::selector::SelectorError| StoreError::BadRequest(e.to_string());
    let labels = LabelSelector::parse(
        params
            .get("labelSelector")
            .map(String::as_str)
            .unwrap_or(""),
    )
    .map_err(bad)?;
    let fields = FieldSelector::parse(
        params
            .get("fieldSelector")
            .map(String::as_str)
            .unwrap_or(""),
    )
    .map_err(bad)?;
    Ok((labels, fields))
}

fn list(
    state: &AppState,
    id: ResourceId,
    namespace: Option<String>,
    params: &HashMap<String, String>,
) -> Result<(StatusCode, Value), StoreError> {
    let (labels, fields) = selectors(params)?;
    let limit = match params.get("limit") {
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| StoreError::BadRequest(format!("invalid limit {l:?}")))?,
        ),
        None => None,
    };
    let q = ListQuery {
        namespace,
        labels,
        fields,
        limit,
        continue_token: params.get("continue").cloned(),
        resource_version: params.get("resourceVersion").cloned(),
        version_match: params.get("resourceVersionMatch").cloned(),
    };
    let r = state.store.read(|s| s.list(id, &q))?;
    let rt = ALL[id];
    let mut meta = json!({"resourceVersion": r.resource_version.to_string()});
    if let Some(c) = r.continue_token {
        meta["continue"] = json!(c);
    }
    if let Some(n) = r.remaining {
        meta["remainingItemCount"] = json!(n);
    }
    let items: Vec<&Value> = r.items.iter().map(|o| o.as_ref()).collect();
    Ok((
        StatusCode::OK,
        json!({"kind": rt.list_kind(), "apiVersion": rt.api_version(), "metadata": meta, "items": items}),
    ))
}

fn patch(
    state: &AppState,
    id: ResourceId,
    namespace: Option<String>,
    name: &str,
    status: bool,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(StatusCode, Value), StoreError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let patch = serde_json::from_slice::<Value>(body).or_else(|_| {
        std::str::from_utf8(body)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_saphyr::from_str::<Value>(t).map_err(|e| e.to_string()))
            .map_err(|e| StoreError::BadRequest(format!("invalid patch: {e}")))
    })?;
    let ns = namespace.clone().unwrap_or_default();
    let mode = update_mode(id, status);
    state.store.write(|s| {
        let current = s.get(id, &ns, name);
        let apply = content_type == "application/apply-patch+yaml";
        let Some(current) = current else {
            // Server-side apply creates what does not exist yet.
            if apply {
                return s
                    .create(id, namespace.as_deref(), patch)
                    .map(|o| (StatusCode::CREATED, (*o).clone()));
            }
            return Err(StoreError::NotFound {
                resource: ALL[id].plural.into(),
                name: name.into(),
            });
        };
        let mut obj = (*current).clone();
        match content_type.as_str() {
            // Strategic merge and apply are approximated by a JSON merge
            // patch: lists are replaced rather than merged by key.
            "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/apply-patch+yaml" => merge_patch(&mut obj, &patch),
            "application/json-patch+json" => json_patch(&mut obj, &patch)?,
            other => {
                return Err(StoreError::BadRequest(format!(
                    "unsupported patch content type {other:?}"
                )))
            }
        }
        s.update(id, namespace.as_deref(), name, obj, mode)
            .map(|o| (StatusCode::OK, (*o).clone()))
    })
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Some(t) = target.as_object_mut() {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// RFC 6902 JSON patch: add, remove, replace and test.
fn json_patch(target: &mut Value, patch: &Value) -> Result<(), StoreError> {
    let bad = |m: String| StoreError::BadRequest(m);
    let ops = patch
        .as_array()
        .ok_or_else(|| bad("a JSON patch must be an array".into()))?;
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or("");
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing path".into()))?;
        let (parent, last) = match path.rfind('/') {
            Some(i) => (
                &path[..i],
                path[i + 1..].replace("~1", "/").replace("~0", "~"),
            ),
            None => return Err(bad(format!("invalid path {path:?}"))),
        };
        let value = op.get("value").cloned();
        match kind {
            "test" => {
                if target.pointer(path) != value.as_ref() {
                    return Err(StoreError::Invalid(format!("test failed at {path}")));
                }
            }
            "add" | "replace" | "remove" => {
                let container = target
                    .pointer_mut(parent)
                    .ok_or_else(|| bad(format!("path {path:?} does not exist")))?;
                match (container, kind) {
                    (Value::Object(m), "remove") => {
                        m.remove(&last)
                            .ok_or_else(|| bad(format!("{path:?} does not exist")))?;
                    }
                    (Value::Object(m), _) => {
                        if kind == "replace" && !m.contains_key(&last) {
                            return Err(bad(format!("{path:?} does not exist")));
                        }
                        m.insert(last, value.ok_or_else(|| bad("missing value".into()))?);
                    }
                    (Value::Array(a), _) => {
                        let idx = if last == "-" {
                            a.len()
                        } else {
                            last.parse::<usize>()
                                .map_err(|_| bad(format!("bad index in {path:?}")))?
                        };
                        match kind {
                            "add" if idx <= a.len() => {
                                a.insert(idx, value.ok_or_else(|| bad("missing value".into()))?)
                            }
                            "replace" if idx < a.len() => {
                                a[idx] = value.ok_or_else(|| bad("missing value".into()))?
                            }
                            "remove" if idx < a.len() => {
                                a.remove(idx);
                            }
                            _ => return Err(bad(format!("index out of range in {path:?}"))),
                        }
                    }
                    _ => return Err(bad(format!("{parent:?} is not a container"))),
                }
            }
            other => return Err(bad(format!("unsupported JSON patch op {other:?}"))),
        }
    }
    Ok(())
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object})
        .to_string()
        .into_bytes();
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark_line(id: ResourceId, rv: u64, initial_end: bool) -> Bytes {
    let rt = ALL[id];
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta}),
    )
}

fn watch_response(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

struct WatchState {
    store: Arc<SharedStore>,
    changed: tokio::sync::watch::Receiver<u64>,
    id: ResourceId,
    filter: Filter,
    pending: VecDeque<Bytes>,
    cursor: u64,
    epoch: u64,
    bookmark: Option<(Duration, Instant)>,
    deadline: Option<Instant>,
    done: bool,
}

fn watch(
    state: &Arc<AppState>,
    id: ResourceId,
    namespace: Option<String>,
    params: &HashMap<String, String>,
) -> Response {
    let (labels, fields) = match selectors(params) {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    let filter = Filter {
        namespace,
        labels,
        fields,
    };
    let bookmarks = flag(params, "allowWatchBookmarks");
    let send_initial = flag(params, "sendInitialEvents");
    let timeout = match params.get("timeoutSeconds").map(|t| t.parse::<u64>()) {
        None => None,
        Some(Ok(t)) => Some(Duration::from_secs(t)),
        Some(Err(_)) => {
            return error_response(&StoreError::BadRequest("invalid timeoutSeconds".into()))
        }
    };
    // Subscribe before reading the start position, so no change is missed.
    let changed = state.store.subscribe();
    let rv = params.get("resourceVersion").map(String::as_str);
    let start = state
        .store
        .read(|s| s.watch_start(id, rv, send_initial, &filter));
    let start = match start {
        Ok(s) => s,
        // An expired version is not an HTTP error but one ERROR event on a
        // 200 stream, which is what makes kube-rs relist.
        Err(e @ StoreError::Expired(_)) => {
            return watch_response(Body::from(event_line("ERROR", &e.to_status())));
        }
        Err(e) => return error_response(&e),
    };
    let mut pending: VecDeque<Bytes> = start
        .initial
        .iter()
        .map(|o| event_line(EventType::Added.as_str(), o))
        .collect();
    if send_initial && bookmarks {
        pending.push_back(bookmark_line(id, start.cursor, true));
    }
    let interval = *state
        .bookmark_interval
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let now = Instant::now();
    let st = WatchState {
        store: state.store.clone(),
        changed,
        id,
        filter,
        pending,
        cursor: start.cursor,
        epoch: start.epoch,
        bookmark: bookmarks.then(|| (interval, now + interval)),
        deadline: timeout.map(|t| now + t),
        done: false,
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        let next = next_watch_chunk(&mut st).await?;
        Some((Ok::<_, Infallible>(next), st))
    });
    watch_response(Body::from_stream(stream))
}

/// The next chunk of a watch stream, or None to end it.
async fn next_watch_chunk(st: &mut WatchState) -> Option<Bytes> {
    loop {
        if let Some(b) = st.pending.pop_front() {
            return Some(b);
        }
        if st.done || st.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        // Mark the signal seen before reading, so a write after the read wakes us.
        st.changed.borrow_and_update();
        let (epoch, cursor) = (st.epoch, st.cursor);
        let changes = st.store.read(|s| {
            if s.epoch() != epoch {
                return Err(StoreError::Expired(format!(
                    "too old resource version: {cursor} ({})",
                    s.compacted_version()
                )));
            }
            s.changes_after(st.id, cursor)
        });
        match changes {
            Err(e) => {
                st.pending.push_back(event_line("ERROR", &e.to_status()));
                st.done = true;
            }
            Ok((entries, cursor)) => {
                st.cursor = cursor;
                for e in &entries {
                    if let Some((kind, obj)) = st.filter.to_event(e) {
                        st.pending.push_back(event_line(kind.as_str(), &obj));
                    }
                }
            }
        }
        if !st.pending.is_empty() {
            continue;
        }
        let bookmark_at = st.bookmark.map(|(_, at)| at);
        tokio::select! {
            r = st.changed.changed() => {
                if r.is_err() {
                    return None;
                }
            }
            _ = sleep_until_opt(bookmark_at) => {
                if let Some((interval, at)) = st.bookmark.as_mut() {
                    *at = Instant::now() + *interval;
                }
                st.pending.push_back(bookmark_line(st.id, st.cursor, false));
            }
            _ = sleep_until_opt(st.deadline) => return None,
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
