//! Rejected objects as Kubernetes Events (events.k8s.io/v1, through
//! kube-rs' [`Recorder`]) and as one structured log line each.
//!
//! `kubectl describe service web` then shows
//! `Warning  Rejected  kproxy  spec.clusterIP "10.96.0.300" is not an IP address …`.
//!
//! Events are rate-limited per node: at most one per object per
//! [`PER_OBJECT_INTERVAL`] (a rejection that changes within that time is
//! logged but not posted again), and at most [`GLOBAL_PER_MINUTE`] in any
//! minute (a bad Helm chart applied to many objects does not flood the API
//! server). Posting happens on a task of its own; the sync loop only does a
//! non-blocking send, so a slow or unreachable API server never delays a
//! sync. Needs RBAC `create` and `patch` on `events` in `events.k8s.io`.
//!
//! The log line carries `service="ns/name"` (the field every per-service
//! log line uses) for a rejected Service, and for a rejected EndpointSlice
//! when its service is known.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, ObjectReference, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::Resource as _;
use kproxy_model::{ObjectKind, Rejection, ServiceKey};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Api;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// At most one Event per object in this time.
pub const PER_OBJECT_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// At most this many Events in any minute.
pub const GLOBAL_PER_MINUTE: usize = 10;
/// The Event's reason.
pub const REASON: &str = "Rejected";
/// Events must stay below 1 kB.
const MAX_NOTE: usize = 1000;

/// The rate limiter (pure; time is passed in).
#[derive(Debug)]
pub struct Limiter {
    per_object: Duration,
    per_minute: usize,
    last: HashMap<(ObjectKind, String, String), Instant>,
    recent: VecDeque<Instant>,
}

impl Limiter {
    pub fn new(per_object: Duration, per_minute: usize) -> Limiter {
        Limiter {
            per_object,
            per_minute,
            last: HashMap::new(),
            recent: VecDeque::new(),
        }
    }

    /// Whether an Event about `r` may be posted at `now` (and records it).
    pub fn allow(&mut self, r: &Rejection, now: Instant) -> bool {
        let minute = Duration::from_secs(60);
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= minute)
        {
            self.recent.pop_front();
        }
        let per_object = self.per_object;
        self.last
            .retain(|_, t| now.saturating_duration_since(*t) < per_object);
        let key = (r.kind, r.namespace.clone(), r.name.clone());
        if self.last.contains_key(&key) || self.recent.len() >= self.per_minute {
            return false;
        }
        self.last.insert(key, now);
        self.recent.push_back(now);
        true
    }
}

/// The Event text for a rejection.
pub fn note(r: &Rejection, node: &str) -> String {
    let mut text = format!(
        "kproxy on node {node} ignores this {}: {}; its previous valid version (if any) stays in effect",
        r.kind, r.reason
    );
    if text.len() > MAX_NOTE {
        let mut end = MAX_NOTE - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// The service a rejection belongs to: the Service itself, or for an
/// EndpointSlice the one service of its namespace among those recomputed
/// in this sync (rejections only come from recomputed services), if unique.
pub fn rejection_service<'a>(
    r: &Rejection,
    recomputed: impl IntoIterator<Item = &'a ServiceKey>,
) -> Option<String> {
    match r.kind {
        ObjectKind::Service => Some(format!("{}/{}", r.namespace, r.name)),
        ObjectKind::EndpointSlice => {
            let mut in_ns = recomputed
                .into_iter()
                .filter(|k| k.namespace == r.namespace);
            match (in_ns.next(), in_ns.next()) {
                (Some(k), None) => Some(k.to_string()),
                _ => None,
            }
        }
        ObjectKind::Node => None,
    }
}

/// The structured warning for a rejected object.
pub fn log_rejection(r: &Rejection, service: Option<&str>) {
    let object = format!("{}/{}", r.namespace, r.name);
    match service {
        Some(service) => warn!(
            service,
            kind = %r.kind,
            object = %object,
            reason = %r.reason,
            "object rejected; its previous valid version (if any) stays in effect"
        ),
        None => warn!(
            kind = %r.kind,
            object = %object,
            reason = %r.reason,
            "object rejected; its previous valid version (if any) stays in effect"
        ),
    }
}

/// Posts Events for rejections from a task of its own.
#[derive(Clone, Debug)]
pub struct EventSink {
    tx: mpsc::Sender<Rejection>,
}

impl EventSink {
    /// Starts the posting task; call inside a Tokio runtime.
    pub fn spawn(client: kube::Client, node_name: &str) -> EventSink {
        let (tx, rx) = mpsc::channel(256);
        let reporter = Reporter {
            controller: "kproxy".to_string(),
            instance: Some(node_name.to_string()),
        };
        tokio::spawn(post_loop(client, reporter, node_name.to_string(), rx));
        EventSink { tx }
    }

    /// Queues an Event about `r`; never blocks (drops it when the queue is full).
    pub fn rejected(&self, r: &Rejection) {
        if self.tx.try_send(r.clone()).is_err() {
            debug!(rejection = %r, "event queue full; event not posted");
        }
    }
}

async fn post_loop(
    client: kube::Client,
    reporter: Reporter,
    node: String,
    mut rx: mpsc::Receiver<Rejection>,
) {
    let recorder = Recorder::new(client.clone(), reporter);
    let mut limiter = Limiter::new(PER_OBJECT_INTERVAL, GLOBAL_PER_MINUTE);
    while let Some(r) = rx.recv().await {
        if !limiter.allow(&r, Instant::now()) {
            debug!(rejection = %r, "event rate-limited");
            continue;
        }
        let reference = reference(&client, &r).await;
        let event = Event {
            type_: EventType::Warning,
            reason: REASON.to_string(),
            note: Some(note(&r, &node)),
            action: "Proxy".to_string(),
            secondary: None,
        };
        if let Err(err) = recorder.publish(&event, &reference).await {
            warn!(error = %err, object = %format!("{}/{}", r.namespace, r.name),
                "cannot post the Event for a rejected object (RBAC: events.k8s.io events create/patch)");
        }
    }
}

/// The object's reference, with its uid when it can be read (so that
/// `kubectl describe` finds the Event).
async fn reference(client: &kube::Client, r: &Rejection) -> ObjectReference {
    let ns = (!r.namespace.is_empty()).then(|| r.namespace.clone());
    let (api_version, kind) = match r.kind {
        ObjectKind::Service => (Service::API_VERSION, Service::KIND),
        ObjectKind::EndpointSlice => (EndpointSlice::API_VERSION, EndpointSlice::KIND),
        ObjectKind::Node => (Node::API_VERSION, Node::KIND),
    };
    let meta = match r.kind {
        ObjectKind::Service => Api::<Service>::namespaced(client.clone(), &r.namespace)
            .get_opt(&r.name)
            .await
            .ok()
            .flatten()
            .map(|o| o.metadata),
        ObjectKind::EndpointSlice => Api::<EndpointSlice>::namespaced(client.clone(), &r.namespace)
            .get_opt(&r.name)
            .await
            .ok()
            .flatten()
            .map(|o| o.metadata),
        ObjectKind::Node => Api::<Node>::all(client.clone())
            .get_opt(&r.name)
            .await
            .ok()
            .flatten()
            .map(|o| o.metadata),
    };
    ObjectReference {
        api_version: Some(api_version.to_string()),
        kind: Some(kind.to_string()),
        namespace: ns,
        name: Some(r.name.clone()),
        uid: meta.as_ref().and_then(|m| m.uid.clone()),
        resource_version: meta.and_then(|m| m.resource_version),
        ..ObjectReference::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rej(kind: ObjectKind, name: &str, reason: &str) -> Rejection {
        Rejection {
            kind,
            namespace: "default".into(),
            name: name.into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn one_per_object_per_interval_and_a_global_cap() {
        let mut l = Limiter::new(Duration::from_secs(600), 3);
        let t0 = Instant::now();
        let a = rej(ObjectKind::Service, "a", "x");
        assert!(l.allow(&a, t0));
        // Same object, even with another reason: not again within 10 min.
        assert!(!l.allow(
            &rej(ObjectKind::Service, "a", "y"),
            t0 + Duration::from_secs(30)
        ));
        // Another kind of the same name is another object.
        assert!(l.allow(&rej(ObjectKind::EndpointSlice, "a", "x"), t0));
        assert!(l.allow(&rej(ObjectKind::Service, "b", "x"), t0));
        // Global cap: 3 per minute.
        assert!(!l.allow(
            &rej(ObjectKind::Service, "c", "x"),
            t0 + Duration::from_secs(59)
        ));
        assert!(l.allow(
            &rej(ObjectKind::Service, "c", "x"),
            t0 + Duration::from_secs(61)
        ));
        assert!(l.allow(&a, t0 + Duration::from_secs(601)));
    }

    #[test]
    fn notes_are_bounded_and_name_the_field() {
        let r = rej(
            ObjectKind::Service,
            "a",
            "spec.clusterIP \"10.96.0.300\" is not an IP address",
        );
        let n = note(&r, "node-a");
        assert!(n.contains("spec.clusterIP") && n.contains("node-a"), "{n}");
        let long = rej(ObjectKind::Service, "a", &"é".repeat(2000));
        assert!(note(&long, "n").len() <= MAX_NOTE);
    }

    #[test]
    fn the_service_of_a_rejection() {
        let keys = [
            ServiceKey::new("default", "web"),
            ServiceKey::new("kube-system", "dns"),
        ];
        let svc = rej(ObjectKind::Service, "bad", "x");
        assert_eq!(
            rejection_service(&svc, &keys).as_deref(),
            Some("default/bad")
        );
        let slice = rej(ObjectKind::EndpointSlice, "web-abcde", "x");
        assert_eq!(
            rejection_service(&slice, &keys).as_deref(),
            Some("default/web")
        );
        let two = [
            ServiceKey::new("default", "web"),
            ServiceKey::new("default", "db"),
        ];
        assert_eq!(rejection_service(&slice, &two), None);
    }
}
