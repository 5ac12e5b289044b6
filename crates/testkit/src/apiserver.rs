//! A fake Kubernetes API server speaking the real HTTP protocol.
//!
//! It serves core/v1 Services, Nodes and Events, discovery.k8s.io/v1
//! EndpointSlices and events.k8s.io/v1 Events over plain `http://`, well
//! enough for the unmodified kube-rs client and `kube::runtime::watcher`:
//! paged lists with consistent snapshots, label and field selectors, watch
//! streams with bookmarks, the 410 `ERROR` event for expired
//! resourceVersions, and create/update/patch/delete.
//!
//! The layers: [`store`] is the pure in-memory state (objects, one
//! resourceVersion counter, a bounded change log); [`http`] translates HTTP
//! to store calls; [`FakeApiServer`] owns the listener and gives tests a
//! typed API plus outage simulation ([`FakeApiServer::stop`],
//! [`FakeApiServer::restart`]) and history control
//! ([`FakeApiServer::reset_history`], [`FakeApiServer::compact`]).

pub mod http;
pub mod resources;
pub mod selector;
pub mod store;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use self::http::{AppState, RequestLog};
pub use self::http::{RequestRecord, Verb};
use self::resources::{ResourceId, ALL};
use self::store::{Preconditions, SharedStore, UpdateMode};
pub use self::store::{StoreError, DEFAULT_EVENT_WINDOW};

/// Default interval between BOOKMARK events on watches that allow them.
/// Much shorter than upstream's minute, so tests see them quickly.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the fake API server does not serve {0}")]
    UnsupportedKind(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("YAML: {0}")]
    Yaml(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("kube client: {0}")]
    Kube(#[from] kube::Error),
    #[error("invalid URL: {0}")]
    Uri(String),
    #[error("the server is already serving")]
    AlreadyRunning,
}

impl Error {
    /// The HTTP status code the real API server would answer, if any.
    pub fn code(&self) -> Option<u16> {
        match self {
            Error::Store(e) => Some(e.code()),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Tunables for a new server.
#[derive(Debug, Clone)]
pub struct Options {
    /// Number of change events retained for watches and consistent lists.
    pub event_window: usize,
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            event_window: DEFAULT_EVENT_WINDOW,
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
        }
    }
}

/// An event recorded through either Events API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    /// `v1` or `events.k8s.io/v1`.
    pub api_version: String,
    pub namespace: String,
    pub name: String,
    /// Normal or Warning.
    pub type_: String,
    pub reason: String,
    /// `message` (core/v1) or `note` (events.k8s.io/v1).
    pub message: String,
    /// The object the event is about: `involvedObject` or `regarding`.
    pub regarding_kind: String,
    pub regarding_name: String,
}

struct Serving {
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// A running fake API server. Dropping it stops serving.
pub struct FakeApiServer {
    state: Arc<AppState>,
    addr: SocketAddr,
    serving: Mutex<Option<Serving>>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.addr)
            .finish()
    }
}

fn resource_of<K: k8s_openapi::Resource>() -> Result<ResourceId> {
    resources::by_api_version_kind(K::API_VERSION, K::KIND)
        .ok_or_else(|| Error::UnsupportedKind(format!("{}/{}", K::API_VERSION, K::KIND)))
}

fn resource_of_json(obj: &Value) -> Result<ResourceId> {
    let av = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    resources::by_api_version_kind(av, kind)
        .ok_or_else(|| Error::UnsupportedKind(format!("{av}/{kind}")))
}

/// Serializes a typed object with its apiVersion/kind set.
fn to_json<K: k8s_openapi::Resource + Serialize>(obj: &K) -> Result<Value> {
    let mut v = serde_json::to_value(obj)?;
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), Value::from(K::API_VERSION));
        m.insert("kind".into(), Value::from(K::KIND));
    }
    Ok(v)
}

fn from_json<K: DeserializeOwned>(v: &Value) -> Result<K> {
    Ok(K::deserialize(v)?)
}

fn meta<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

impl FakeApiServer {
    /// Serves on a fresh port of 127.0.0.1.
    pub async fn start() -> Result<Self> {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        Self::serve_on_with(listener, options)
    }

    /// Serves on a listener bound by the caller (e.g. inside a network
    /// namespace). Only this listener is used. Needs a Tokio runtime.
    pub fn serve_on(listener: std::net::TcpListener) -> Result<Self> {
        Self::serve_on_with(listener, Options::default())
    }

    pub fn serve_on_with(listener: std::net::TcpListener, options: Options) -> Result<Self> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = TcpListener::from_std(listener)?;
        let state = Arc::new(AppState {
            store: Arc::new(SharedStore::new(options.event_window)),
            log: RequestLog::default(),
            bookmark_interval: Mutex::new(options.bookmark_interval),
            addr,
        });
        let server = FakeApiServer {
            state,
            addr,
            serving: Mutex::new(None),
        };
        server.spawn(listener);
        Ok(server)
    }

    fn spawn(&self, listener: TcpListener) {
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, http::router(self.state.clone()), rx));
        *self.serving.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(Serving { shutdown: tx, task });
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn is_serving(&self) -> bool {
        self.serving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// A kubeconfig pointing at this server, for
    /// `kube::Config::from_custom_kubeconfig` or `--kubeconfig`.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {url}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
users:
- name: fake
  user: {{}}
preferences: {{}}
",
            url = self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())?;
        Ok(())
    }

    /// A temporary kubeconfig file, removed when dropped.
    pub fn kubeconfig_file(&self) -> Result<tempfile::NamedTempFile> {
        let file = tempfile::Builder::new()
            .prefix("fake-apiserver-")
            .suffix(".kubeconfig")
            .tempfile()?;
        self.write_kubeconfig(file.path())?;
        Ok(file)
    }

    /// A kube-rs client for this server (see [`plain_http_client`]).
    pub fn client(&self) -> Result<kube::Client> {
        let url = self
            .url()
            .parse::<::http::Uri>()
            .map_err(|e| Error::Uri(e.to_string()))?;
        Ok(plain_http_client(kube::Config::new(url)))
    }

    /// Closes the listener and drops every open connection and watch
    /// stream, as an API server outage would. State is kept.
    pub async fn stop(&self) {
        let serving = self
            .serving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(s) = serving {
            let _ = s.shutdown.send(());
            if let Err(e) = s.task.await {
                tracing::warn!("fake API server task failed: {e}");
            }
        }
    }

    /// Serves again on the same address, binding it in the calling
    /// thread's network namespace. A server started with `serve_on` in
    /// another namespace should use [`Self::restart_on`].
    pub async fn restart(&self) -> Result<()> {
        if self.is_serving() {
            return Err(Error::AlreadyRunning);
        }
        let socket = match self.addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // Connections dropped by `stop` linger in TIME_WAIT on this port.
        socket.set_reuseaddr(true)?;
        socket.bind(self.addr)?;
        self.spawn(socket.listen(1024)?);
        Ok(())
    }

    /// Serves again on a listener the caller bound (normally to `addr()`).
    pub fn restart_on(&self, listener: std::net::TcpListener) -> Result<()> {
        if self.is_serving() {
            return Err(Error::AlreadyRunning);
        }
        listener.set_nonblocking(true)?;
        self.spawn(TcpListener::from_std(listener)?);
        Ok(())
    }

    /// Starts a new resourceVersion history: every resourceVersion seen so
    /// far becomes too old. Running watches end with a 410 ERROR event and
    /// clients must relist.
    pub fn reset_history(&self) {
        self.state.store.write(|s| s.reset_history());
    }

    /// Drops the retained change log: watches from older versions get 410,
    /// running watches are unaffected.
    pub fn compact(&self) {
        self.state.store.write(|s| s.compact());
    }

    pub fn set_event_window(&self, events: usize) {
        self.state.store.write(|s| s.set_event_window(events));
    }

    /// Applies to watches started afterwards.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        *self
            .state
            .bookmark_interval
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = interval;
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.state.store.read(|s| s.resource_version())
    }

    pub fn create<K>(&self, obj: &K) -> Result<K>
    where
        K: k8s_openapi::Resource + Serialize + DeserializeOwned,
    {
        let id = resource_of::<K>()?;
        let v = to_json(obj)?;
        let created = self.state.store.write(|s| s.create(id, None, v))?;
        from_json(&created)
    }

    /// Replaces an object, keeping its status too. Conflicts if `obj`
    /// carries a resourceVersion that is not the current one; none means
    /// unconditional.
    pub fn update<K>(&self, obj: &K) -> Result<K>
    where
        K: k8s_openapi::Resource + Serialize + DeserializeOwned,
    {
        let id = resource_of::<K>()?;
        let v = to_json(obj)?;
        let name = meta(&v, "name").unwrap_or_default().to_string();
        let updated = self
            .state
            .store
            .write(|s| s.update(id, None, &name, v, UpdateMode::Replace))?;
        from_json(&updated)
    }

    /// Creates the object, or replaces it unconditionally if it exists.
    pub fn apply<K>(&self, obj: &K) -> Result<K>
    where
        K: k8s_openapi::Resource + Serialize + DeserializeOwned,
    {
        let id = resource_of::<K>()?;
        let v = to_json(obj)?;
        from_json(&self.apply_json_as(id, v)?)
    }

    fn apply_json_as(&self, id: ResourceId, mut v: Value) -> Result<Value> {
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        let name = meta(&v, "name").unwrap_or_default().to_string();
        let ns = if ALL[id].namespaced {
            meta(&v, "namespace").unwrap_or_default().to_string()
        } else {
            String::new()
        };
        let obj = self.state.store.write(|s| {
            if s.get(id, &ns, &name).is_some() {
                s.update(id, None, &name, v, UpdateMode::Replace)
            } else {
                s.create(id, None, v)
            }
        })?;
        Ok((*obj).clone())
    }

    /// `apply` for an untyped object (apiVersion and kind pick the kind).
    pub fn apply_json(&self, obj: Value) -> Result<Value> {
        let id = resource_of_json(&obj)?;
        self.apply_json_as(id, obj)
    }

    /// Applies every document of a multi-document YAML file.
    pub fn load_yaml(&self, yaml: &str) -> Result<Vec<Value>> {
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(yaml).map_err(|e| Error::Yaml(e.to_string()))?;
        docs.into_iter()
            .filter(|d| !d.is_null())
            .map(|d| self.apply_json(d))
            .collect()
    }

    /// Deletes an object; `ns` is ignored for cluster-scoped kinds.
    pub fn delete<K>(&self, ns: &str, name: &str) -> Result<K>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        let id = resource_of::<K>()?;
        let deleted = self
            .state
            .store
            .write(|s| s.delete(id, ns, name, &Preconditions::default()))?;
        from_json(&deleted)
    }

    /// `ns` is ignored for cluster-scoped kinds.
    pub fn get<K>(&self, ns: &str, name: &str) -> Result<Option<K>>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        let id = resource_of::<K>()?;
        let ns = if ALL[id].namespaced { ns } else { "" };
        match self.state.store.read(|s| s.get(id, ns, name)) {
            Some(v) => from_json(&v).map(Some),
            None => Ok(None),
        }
    }

    /// Every object of a kind, in all namespaces, ordered by namespace and name.
    pub fn list<K>(&self) -> Result<Vec<K>>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        let id = resource_of::<K>()?;
        self.state
            .store
            .read(|s| s.all(id))
            .iter()
            .map(|v| from_json(v))
            .collect()
    }

    /// Events posted through core/v1 and events.k8s.io/v1, in order of creation.
    pub fn events(&self) -> Vec<RecordedEvent> {
        let mut out: Vec<(u64, RecordedEvent)> = Vec::new();
        for id in [
            resources::by_path("", "v1", "events"),
            resources::by_path("events.k8s.io", "v1", "events"),
        ]
        .into_iter()
        .flatten()
        {
            for v in self.state.store.read(|s| s.all(id)) {
                let s = |p: &str| {
                    v.pointer(p)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                };
                let core = ALL[id].group.is_empty();
                let rv = s("/metadata/resourceVersion").parse().unwrap_or(0);
                out.push((
                    rv,
                    RecordedEvent {
                        api_version: ALL[id].api_version(),
                        namespace: s("/metadata/namespace"),
                        name: s("/metadata/name"),
                        type_: s("/type"),
                        reason: s("/reason"),
                        message: if core { s("/message") } else { s("/note") },
                        regarding_kind: if core {
                            s("/involvedObject/kind")
                        } else {
                            s("/regarding/kind")
                        },
                        regarding_name: if core {
                            s("/involvedObject/name")
                        } else {
                            s("/regarding/name")
                        },
                    },
                ));
            }
        }
        out.sort_by_key(|(rv, _)| *rv);
        out.into_iter().map(|(_, e)| e).collect()
    }

    /// Every request served so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.state.log.snapshot()
    }

    pub fn clear_requests(&self) {
        self.state.log.clear();
    }

    /// Requests of a verb on a resource plural (`services`, `endpointslices`, ...).
    pub fn request_count(&self, verb: Verb, resource: &str) -> usize {
        self.state
            .log
            .snapshot()
            .iter()
            .filter(|r| r.verb == verb && r.resource == resource)
            .count()
    }

    pub fn list_count(&self, resource: &str) -> usize {
        self.request_count(Verb::List, resource)
    }

    pub fn watch_count(&self, resource: &str) -> usize {
        self.request_count(Verb::Watch, resource)
    }
}

/// A kube-rs client for an `http://` API server that needs no TLS stack.
///
/// `kube::Client::try_from(config)` always builds a rustls connector, which
/// panics when no rustls crypto provider is installed (the workspace's kube
/// has `rustls-tls` without `ring`/`aws-lc-rs`). Plain HTTP needs none of
/// it, so this wires kube's client onto hyper's HTTP connector directly.
/// Use it with a `Config` read from [`FakeApiServer::kubeconfig_file`].
pub fn plain_http_client(config: kube::Config) -> kube::Client {
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let service = PlainHttp {
        http,
        base: config.cluster_url,
    };
    kube::Client::new(service, config.default_namespace)
}

#[derive(Clone)]
struct PlainHttp {
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        kube::client::Body,
    >,
    base: ::http::Uri,
}

impl tower_service::Service<::http::Request<kube::client::Body>> for PlainHttp {
    type Response = ::http::Response<hyper::body::Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = hyper_util::client::legacy::ResponseFuture;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: ::http::Request<kube::client::Body>) -> Self::Future {
        // kube sends only path and query; add the server's scheme and authority.
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = req.uri().path_and_query().cloned();
        if let Ok(uri) = ::http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        self.http.request(req)
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(s) = self
            .serving
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            // Aborting the accept loop drops its JoinSet, which aborts every connection.
            s.task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    router: axum::Router,
    mut shutdown: oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tracing::trace!(%peer, "connection");
                    let service = TowerToHyperService::new(router.clone());
                    connections.spawn(async move {
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service);
                        if let Err(e) = conn.await {
                            tracing::debug!(%peer, "connection ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}
