//! The handle the binary uses: spawns the watchers, hands out pending
//! changes and applies them to the model.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_model::{Changes, Rejection, SliceObject, StateBuilder};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::cache::{Cache, ListDone, Now, Outcome, SyncStatus};
use crate::observer::WatchObserver;
use crate::pending::Pending;
use crate::shared::Shared;
use crate::trigger::{MinSyncInterval, SyncTrigger, TriggerTiming};

/// Upstream's label selector for Services and EndpointSlices: skip objects
/// owned by another proxy, and headless services.
pub const LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// What to watch and how often to sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchConfig {
    /// The own node: its Node object is watched, and endpoints on it are local.
    pub node_name: String,
    /// How soon a sync may follow the previous one (upstream
    /// `minSyncPeriod`, or adaptive when the operator did not set it).
    pub min_sync_interval: MinSyncInterval,
    /// Most time between two syncs; a forced resync (upstream `syncPeriod`).
    pub sync_period: Duration,
}

impl WatchConfig {
    /// kproxy's defaults: an adaptive min sync interval (upstream's fixed
    /// 1 s is its ceiling), 30 s sync period.
    pub fn new(node_name: impl Into<String>) -> Self {
        WatchConfig {
            node_name: node_name.into(),
            min_sync_interval: MinSyncInterval::Adaptive,
            sync_period: Duration::from_secs(30),
        }
    }
}

/// The result of [`WatchHandle::apply_to`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// What the backend must write.
    pub changes: Changes,
    /// Rejections not reported before, for the binary to log and count.
    pub new_rejections: Vec<Rejection>,
    /// How many pending services were recomputed.
    pub services_recomputed: usize,
}

/// Running watchers for Services, EndpointSlices and the own Node.
/// Dropping the handle stops them.
pub struct WatchHandle {
    shared: Arc<Shared>,
    timing: TriggerTiming,
    tasks: Vec<JoinHandle<()>>,
}

impl WatchHandle {
    /// Starts the watchers as tokio tasks; must be called inside a Tokio
    /// runtime. Watch failures are retried with kube's default backoff
    /// (800 ms → 30 s) and reported to `observer`; they never end the tasks.
    pub fn spawn(client: Client, cfg: WatchConfig, observer: Arc<dyn WatchObserver>) -> Self {
        let shared = Arc::new(Shared::new(Cache::new(
            cfg.node_name.clone(),
            SystemTime::now(),
        )));
        let selected = watcher::Config::default().labels(LABEL_SELECTOR);
        let node_cfg = watcher::Config::default().fields(&format!(
            "metadata.name={}",
            escape_field_value(&cfg.node_name)
        ));
        let tasks = vec![
            tokio::spawn(run_watcher(
                Api::<Service>::all(client.clone()),
                selected.clone(),
                Kind::Service,
                shared.clone(),
                observer.clone(),
            )),
            tokio::spawn(run_watcher(
                Api::<EndpointSlice>::all(client.clone()),
                selected,
                Kind::EndpointSlice,
                shared.clone(),
                observer.clone(),
            )),
            tokio::spawn(run_watcher(
                Api::<Node>::all(client),
                node_cfg,
                Kind::Node,
                shared.clone(),
                observer,
            )),
        ];
        WatchHandle {
            shared,
            timing: TriggerTiming::with_min(cfg.min_sync_interval, cfg.sync_period),
            tasks,
        }
    }

    /// Resolves once Services and EndpointSlices have both completed their
    /// first list; no rules may be written before that.
    pub async fn wait_synced(&self) {
        let mut rx = self.shared.subscribe_synced();
        // The sender lives in `self.shared`, so it cannot be dropped while
        // we wait; an error would only mean that, so it is ignored.
        let _ = rx.wait_for(|synced| *synced).await;
    }

    pub fn is_synced(&self) -> bool {
        self.shared.lock().synced()
    }

    /// Which first lists are complete, for startup logs and readiness.
    pub fn sync_status(&self) -> SyncStatus {
        self.shared.lock().sync_status()
    }

    /// Takes the changes accumulated since the last call.
    pub fn take_pending(&self) -> Pending {
        self.shared.lock().take_pending()
    }

    /// The own Node as last seen, if it exists.
    pub fn node(&self) -> Option<Arc<Node>> {
        self.shared.lock().node()
    }

    /// A trigger with this handle's intervals, for the sync loop.
    pub fn trigger(&self) -> SyncTrigger {
        SyncTrigger::new(self.timing, self.shared.clone())
    }

    /// Feeds the pending changes into `builder`: every pending service is
    /// recomputed from the cache's current Service and slices; after a node
    /// change that affects endpoint selection (the zone) every service's
    /// endpoints are re-selected. `force_full` is set after a list or a
    /// node change.
    pub fn apply_to(&self, builder: &mut StateBuilder, pending: &Pending) -> Applied {
        apply_pending(&self.shared, builder, pending)
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

pub(crate) fn apply_pending(
    shared: &Shared,
    builder: &mut StateBuilder,
    pending: &Pending,
) -> Applied {
    let mut applied = Applied::default();
    applied.changes.force_full = pending.relisted || pending.node_changed;
    if pending.node_changed {
        let node = shared.lock().node();
        if builder.set_node(node.as_deref()) {
            // The zone moved: endpoint selection of every service may
            // change. The builder re-selects from what it has already
            // parsed; the pending services are then updated below.
            applied.changes.ports.extend(builder.reselect_all());
        }
    }
    // Clone the `Arc`s under the lock and compute without it, so the
    // watchers are not held up by the model.
    let inputs = shared.lock().inputs(&pending.services);

    for (key, service, slices) in &inputs {
        let slices: Vec<&SliceObject> = slices.iter().map(|s| &**s).collect();
        let update = builder.update_service_objects(key, service.as_deref(), &slices);
        applied.changes.ports.extend(update.changed_ports);
        applied.new_rejections.extend(update.new_rejections);
    }
    applied.services_recomputed = inputs.len();
    debug!(
        services = applied.services_recomputed,
        changed_ports = applied.changes.ports.len(),
        force_full = applied.changes.force_full,
        rejections = applied.new_rejections.len(),
        "applied pending changes to the model"
    );
    applied
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
}

/// Routes one event to the cache; implemented per watched type.
trait Watched: Resource + Clone + DeserializeOwned + Debug + Send + 'static {
    fn apply(cache: &mut Cache, event: Event<Self>, now: Now) -> Outcome;
}

impl Watched for Service {
    fn apply(cache: &mut Cache, event: Event<Self>, now: Now) -> Outcome {
        cache.service_event(event, now)
    }
}

impl Watched for EndpointSlice {
    fn apply(cache: &mut Cache, event: Event<Self>, now: Now) -> Outcome {
        cache.slice_event(event, now)
    }
}

impl Watched for Node {
    fn apply(cache: &mut Cache, event: Event<Self>, now: Now) -> Outcome {
        cache.node_event(event, now)
    }
}

/// An error with its sources, each once: `a: b: c`.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = e.source();
    }
    out
}

/// Retry delays of a failed watch: 100 ms doubling to 400 ms, plus up to
/// 100 ms of jitter. kube's default (client-go's 0.8 s doubling to 30 s)
/// would leave the node's rules up to 30 s behind after an API server
/// outage; kproxy must catch up within a second of the server's return.
/// The jitter spreads a fleet's reconnects; each retry is one cheap request.
#[derive(Debug, Default)]
struct WatchBackoff {
    current: Option<Duration>,
}

const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
const WATCH_RETRY_MAX: Duration = Duration::from_millis(400);
const WATCH_RETRY_JITTER_MS: u32 = 100;

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let next = self
            .current
            .map_or(WATCH_RETRY_MIN, |d| (d * 2).min(WATCH_RETRY_MAX));
        self.current = Some(next);
        // Jitter from the clock's sub-second part: no RNG needed for this.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Some(next + Duration::from_millis(u64::from(nanos % WATCH_RETRY_JITTER_MS)))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.current = None;
    }
}

fn watch_backoff() -> WatchBackoff {
    WatchBackoff::default()
}

async fn run_watcher<K: Watched>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    shared: Arc<Shared>,
    observer: Arc<dyn WatchObserver>,
) {
    let name = kind.name();
    let mut stream = std::pin::pin!(watcher(api, config).backoff(watch_backoff()));
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                let now = Now::current();
                let outcome = shared.update(|cache| K::apply(cache, event, now));
                report(kind, &outcome, now.system, observer.as_ref());
            }
            // An expired resourceVersion is routine: kube relists.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                info!(kind = name, "watch expired (410 Gone), relisting");
            }
            Err(err) => {
                // The whole cause chain: "client error (Connect)" alone
                // hides an untrusted certificate or a refused connection.
                let err = error_chain(&err);
                warn!(kind = name, error = %err, "watch failed, retrying with backoff");
                observer.watch_error(name, &err);
            }
        }
    }
    // The backoff retries forever, so this is not expected.
    warn!(kind = name, "watch stream ended");
}

fn report(kind: Kind, outcome: &Outcome, at: SystemTime, observer: &dyn WatchObserver) {
    let name = kind.name();
    for _ in 0..outcome.changed {
        match kind {
            Kind::Service => observer.service_changed(),
            Kind::EndpointSlice => observer.endpoint_slice_changed(),
            Kind::Node => {}
        }
    }
    if outcome.queued {
        observer.change_queued(at);
    }
    match outcome.list_done {
        Some(ListDone::First) => {
            info!(
                kind = name,
                changed = outcome.changed,
                "initial list complete"
            );
        }
        Some(ListDone::Relist) => {
            info!(kind = name, changed = outcome.changed, "relist complete");
            observer.relisted(name);
        }
        None => {
            if outcome.changed > 0 {
                debug!(kind = name, changed = outcome.changed, "change queued");
            }
        }
    }
}

/// Escapes a field-selector value (`\`, `,` and `=` are special).
fn escape_field_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '\\' | ',' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_values_are_escaped() {
        assert_eq!(escape_field_value("node-1.example"), "node-1.example");
        assert_eq!(escape_field_value(r"a,b=c\d"), r"a\,b\=c\\d");
    }

    #[test]
    fn error_chain_names_every_cause_once() {
        let inner = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        let outer = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, inner);
        assert_eq!(
            error_chain(&outer),
            "invalid peer certificate: UnknownIssuer"
        );
        #[derive(Debug)]
        struct Connect(std::io::Error);
        impl std::fmt::Display for Connect {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("client error (Connect)")
            }
        }
        impl std::error::Error for Connect {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Connect(std::io::Error::other(
            "invalid peer certificate: UnknownIssuer",
        ));
        assert_eq!(
            error_chain(&e),
            "client error (Connect): invalid peer certificate: UnknownIssuer"
        );
    }

    #[test]
    fn watch_retries_stay_under_half_a_second_and_reset() {
        use kube::runtime::utils::Backoff;
        let mut b = watch_backoff();
        let delays: Vec<Duration> = (0..10).map(|_| b.next().unwrap()).collect();
        assert!(delays[0] >= WATCH_RETRY_MIN && delays[0] < Duration::from_millis(200));
        for d in &delays {
            assert!(*d < WATCH_RETRY_MAX + Duration::from_millis(100), "{d:?}");
        }
        assert!(delays[9] >= WATCH_RETRY_MAX);
        b.reset();
        assert!(b.next().unwrap() < Duration::from_millis(200));
    }
}
