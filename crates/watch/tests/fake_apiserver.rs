//! The watch layer against the fake API server, through the real kube-rs
//! client: lists, watches, label selectors, outages and relists.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Node, NodeStatus, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kproxy_model::{IpFamily, ServiceKey, StateBuilder};
use kproxy_testkit::apiserver::FakeApiServer;
use kproxy_watch::{
    MinSyncInterval, Pending, TriggerReason, WatchConfig, WatchHandle, WatchObserver,
    LAST_CHANGE_TRIGGER_TIME, SERVICE_NAME_LABEL,
};
use tokio::sync::watch;
use tokio::time::timeout;

const NODE: &str = "node-a";
const NS: &str = "default";

fn svc(name: &str, ip: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some(NS.into()),
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(ip.into()),
            cluster_ips: Some(vec![ip.into()]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                target_port: Some(IntOrString::Int(8080)),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(service: &str, name: &str, ip: &str) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            namespace: Some(NS.into()),
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                SERVICE_NAME_LABEL.to_string(),
                service.to_string(),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(vec![Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            ..Default::default()
        }]),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

fn labelled<K: kube::ResourceExt>(mut obj: K, key: &str, value: &str) -> K {
    obj.labels_mut().insert(key.into(), value.into());
    obj
}

fn node(name: &str, zone: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                "topology.kubernetes.io/zone".to_string(),
                zone.to_string(),
            )])),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn key(name: &str) -> ServiceKey {
    ServiceKey::new(NS, name)
}

fn keys(names: &[&str]) -> BTreeSet<ServiceKey> {
    names.iter().map(|n| key(n)).collect()
}

/// Records observer callbacks.
#[derive(Default)]
struct Recorder {
    service_changes: AtomicUsize,
    slice_changes: AtomicUsize,
    queued: AtomicUsize,
    relisted: Mutex<Vec<String>>,
    errors: Mutex<Vec<String>>,
}

impl WatchObserver for Recorder {
    fn service_changed(&self) {
        self.service_changes.fetch_add(1, Ordering::SeqCst);
    }
    fn endpoint_slice_changed(&self) {
        self.slice_changes.fetch_add(1, Ordering::SeqCst);
    }
    fn change_queued(&self, _at: SystemTime) {
        self.queued.fetch_add(1, Ordering::SeqCst);
    }
    fn relisted(&self, kind: &str) {
        self.relisted.lock().unwrap().push(kind.to_string());
    }
    fn watch_error(&self, kind: &str, err: &str) {
        self.errors.lock().unwrap().push(format!("{kind}: {err}"));
    }
}

/// Holds back responses to EndpointSlice requests until the gate opens,
/// so a test can have Services listed while EndpointSlices are not.
#[derive(Clone)]
struct GateLayer(watch::Receiver<bool>);

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gated<S>;
    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            open: self.0.clone(),
        }
    }
}

struct Gated<S> {
    inner: S,
    open: watch::Receiver<bool>,
}

impl<S, B> tower::Service<http::Request<B>> for Gated<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let gated = req.uri().path().contains("/endpointslices");
        let mut open = self.open.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            if gated {
                let _ = open.wait_for(|o| *o).await;
            }
            response.await
        })
    }
}

/// A kube client built from the server's kubeconfig, as the binary does.
async fn client(server: &FakeApiServer, gate: Option<watch::Receiver<bool>>) -> kube::Client {
    let file = server.kubeconfig_file().unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(file.path()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    match gate {
        None => kube::Client::try_from(config).unwrap(),
        Some(gate) => kube::client::ClientBuilder::try_from(config)
            .unwrap()
            .with_layer(&GateLayer(gate))
            .build(),
    }
}

fn config() -> WatchConfig {
    WatchConfig {
        node_name: NODE.into(),
        min_sync_interval: MinSyncInterval::Fixed(Duration::from_millis(100)),
        sync_period: Duration::from_secs(60),
    }
}

async fn spawn(server: &FakeApiServer) -> (WatchHandle, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let handle = WatchHandle::spawn(client(server, None).await, config(), recorder.clone());
    (handle, recorder)
}

fn merge(into: &mut Pending, p: Pending) {
    into.services.extend(p.services);
    into.node_changed |= p.node_changed;
    into.relisted |= p.relisted;
    for (k, mut t) in p.trigger_times {
        into.trigger_times.entry(k).or_default().append(&mut t);
    }
}

/// Syncs (trigger, take) until `done` holds for everything taken so far.
async fn collect_until(
    handle: &WatchHandle,
    trigger: &mut kproxy_watch::SyncTrigger,
    limit: Duration,
    done: impl Fn(&Pending) -> bool,
) -> Pending {
    let mut acc = Pending::default();
    let deadline = tokio::time::Instant::now() + limit;
    while !done(&acc) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        timeout(left, trigger.next())
            .await
            .unwrap_or_else(|_| panic!("condition not met in {limit:?}; so far {acc:?}"));
        merge(&mut acc, handle.take_pending());
    }
    acc
}

#[tokio::test]
async fn initial_list_then_a_slice_update_marks_only_its_service() {
    let server = FakeApiServer::start().await.unwrap();
    for (name, ip, ep) in [
        ("a", "10.96.0.1", "10.1.0.1"),
        ("b", "10.96.0.2", "10.1.0.2"),
    ] {
        server.create(&svc(name, ip)).unwrap();
        server
            .create(&slice(name, &format!("{name}-1"), ep))
            .unwrap();
    }
    let (handle, recorder) = spawn(&server).await;
    let mut trigger = handle.trigger();

    let reason = timeout(Duration::from_secs(10), trigger.next())
        .await
        .unwrap();
    assert_eq!(reason, TriggerReason::Initial);
    assert!(handle.is_synced());
    timeout(Duration::from_secs(1), handle.wait_synced())
        .await
        .unwrap();
    let pending = handle.take_pending();
    assert_eq!(pending.services, keys(&["a", "b"]));
    assert!(pending.relisted, "the first sync must be full");
    assert!(pending.oldest_queued.is_some());

    let mut builder = StateBuilder::new(NODE);
    let applied = handle.apply_to(&mut builder, &pending);
    assert!(applied.changes.force_full);
    assert_eq!(applied.changes.ports.len(), 2);
    assert!(
        applied.new_rejections.is_empty(),
        "{:?}",
        applied.new_rejections
    );
    assert_eq!(builder.state().ipv4.len(), 2);

    // One slice changes: only its service is pending, and the trigger fires.
    let stamp = jiff::Timestamp::now();
    let mut updated = slice("a", "a-1", "10.1.0.99");
    updated
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(LAST_CHANGE_TRIGGER_TIME.into(), stamp.to_string());
    server.apply(&updated).unwrap();

    let reason = timeout(Duration::from_secs(5), trigger.next())
        .await
        .unwrap();
    assert_eq!(reason, TriggerReason::Changes);
    let pending = handle.take_pending();
    assert_eq!(pending.services, keys(&["a"]));
    assert!(!pending.relisted && !pending.node_changed);
    assert_eq!(
        pending.trigger_times.get(&key("a")),
        Some(&vec![SystemTime::from(stamp)])
    );

    let applied = handle.apply_to(&mut builder, &pending);
    assert!(!applied.changes.force_full);
    let changed: Vec<String> = applied
        .changes
        .ports
        .iter()
        .map(|(f, p)| format!("{f} {p}"))
        .collect();
    assert_eq!(changed, vec!["IPv4 default/a:http"]);
    let port = builder
        .state()
        .ipv4
        .values()
        .find(|p| p.name.service == key("a"))
        .unwrap();
    let ips: Vec<String> = port
        .endpoints
        .all
        .iter()
        .map(|e| e.ip.to_string())
        .collect();
    assert_eq!(ips, vec!["10.1.0.99"]);

    assert_eq!(recorder.service_changes.load(Ordering::SeqCst), 2);
    assert_eq!(recorder.slice_changes.load(Ordering::SeqCst), 3);
    assert!(recorder.queued.load(Ordering::SeqCst) >= 3);
    assert!(recorder.relisted.lock().unwrap().is_empty());
}

#[tokio::test]
async fn objects_of_other_proxies_and_headless_services_are_never_seen() {
    let server = FakeApiServer::start().await.unwrap();
    server.create(&svc("mine", "10.96.0.1")).unwrap();
    server.create(&slice("mine", "mine-1", "10.1.0.1")).unwrap();
    let other = "service.kubernetes.io/service-proxy-name";
    let headless = "service.kubernetes.io/headless";
    // The EndpointSlice controller copies these labels onto the slices.
    server
        .create(&labelled(svc("theirs", "10.96.0.2"), other, "cilium"))
        .unwrap();
    server
        .create(&labelled(
            slice("theirs", "theirs-1", "10.1.0.2"),
            other,
            "cilium",
        ))
        .unwrap();
    server
        .create(&labelled(slice("hl", "hl-1", "10.1.0.3"), headless, ""))
        .unwrap();

    let (handle, _recorder) = spawn(&server).await;
    let mut trigger = handle.trigger();
    timeout(Duration::from_secs(10), trigger.next())
        .await
        .unwrap();
    assert_eq!(handle.take_pending().services, keys(&["mine"]));

    // Updates to the others are filtered by the server; the last update is
    // a barrier: when it is seen, the earlier ones would have been too.
    server
        .apply(&labelled(
            slice("theirs", "theirs-1", "10.1.0.22"),
            other,
            "cilium",
        ))
        .unwrap();
    server
        .apply(&labelled(slice("hl", "hl-1", "10.1.0.33"), headless, ""))
        .unwrap();
    server.apply(&slice("mine", "mine-1", "10.1.0.11")).unwrap();
    let pending = collect_until(&handle, &mut trigger, Duration::from_secs(5), |p| {
        p.services.contains(&key("mine"))
    })
    .await;
    assert_eq!(pending.services, keys(&["mine"]));

    // Every list and watch carried upstream's selector; the Node's named ours.
    let requests = server.requests();
    let mut seen = BTreeSet::new();
    for r in &requests {
        match r.resource.as_str() {
            "services" | "endpointslices" => {
                assert!(
                    r.query.contains("labelSelector=")
                        && r.query.contains("service-proxy-name")
                        && r.query.contains("headless"),
                    "{r:?}"
                );
            }
            "nodes" => assert!(
                r.query.contains("fieldSelector=") && r.query.contains(NODE),
                "{r:?}"
            ),
            _ => continue,
        }
        seen.insert(r.resource.clone());
    }
    assert_eq!(seen.len(), 3, "{requests:?}");
}

#[tokio::test]
async fn relist_after_an_outage_finds_deletions_made_meanwhile() {
    let server = FakeApiServer::start().await.unwrap();
    for (name, ip, ep) in [
        ("a", "10.96.0.1", "10.1.0.1"),
        ("b", "10.96.0.2", "10.1.0.2"),
        ("c", "10.96.0.3", "10.1.0.3"),
    ] {
        server.create(&svc(name, ip)).unwrap();
        server
            .create(&slice(name, &format!("{name}-1"), ep))
            .unwrap();
    }
    let (handle, recorder) = spawn(&server).await;
    let mut trigger = handle.trigger();
    timeout(Duration::from_secs(10), trigger.next())
        .await
        .unwrap();
    let mut builder = StateBuilder::new(NODE);
    handle.apply_to(&mut builder, &handle.take_pending());
    assert_eq!(builder.state().ipv4.len(), 3);

    // The API server goes away; meanwhile b is deleted, c's endpoints move,
    // and the change history is lost (410 Gone on reconnect).
    server.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.delete::<Service>(NS, "b").unwrap();
    server.delete::<EndpointSlice>(NS, "b-1").unwrap();
    server.apply(&slice("c", "c-1", "10.1.0.33")).unwrap();
    server.reset_history();
    server.restart().await.unwrap();

    // Services and EndpointSlices relist independently: wait for both,
    // or b could still have its (stale) Service and lose only its slice.
    let both_relisted = || {
        let kinds = recorder.relisted.lock().unwrap();
        kinds.iter().any(|k| k == "Service") && kinds.iter().any(|k| k == "EndpointSlice")
    };
    let pending = collect_until(&handle, &mut trigger, Duration::from_secs(40), |p| {
        p.relisted
            && p.services.contains(&key("b"))
            && p.services.contains(&key("c"))
            && both_relisted()
    })
    .await;
    assert!(
        !pending.services.contains(&key("a")),
        "unchanged services are not pending: {:?}",
        pending.services
    );

    let applied = handle.apply_to(&mut builder, &pending);
    assert!(applied.changes.force_full);
    let changed: BTreeSet<String> = applied
        .changes
        .ports
        .iter()
        .map(|(_, p)| p.service.name.clone())
        .collect();
    assert_eq!(changed, ["b", "c"].map(String::from).into());
    let left: Vec<String> = builder
        .state()
        .ipv4
        .keys()
        .map(|p| p.service.name.clone())
        .collect();
    assert_eq!(left, vec!["a", "c"]);
    assert!(builder.state().family(IpFamily::V4).values().any(|p| p
        .endpoints
        .all
        .iter()
        .any(|e| e.ip.to_string() == "10.1.0.33")));

    let relisted = recorder.relisted.lock().unwrap().clone();
    assert!(relisted.contains(&"Service".to_string()), "{relisted:?}");
    assert!(
        relisted.contains(&"EndpointSlice".to_string()),
        "{relisted:?}"
    );
    assert!(
        !recorder.errors.lock().unwrap().is_empty(),
        "the outage is reported"
    );
}

#[tokio::test]
async fn trigger_never_fires_before_both_lists_are_done() {
    let server = FakeApiServer::start().await.unwrap();
    server.create(&svc("a", "10.96.0.1")).unwrap();
    server.create(&slice("a", "a-1", "10.1.0.1")).unwrap();
    let (open, gate) = watch::channel(false);
    let handle = WatchHandle::spawn(
        client(&server, Some(gate)).await,
        config(),
        Arc::new(kproxy_watch::NoopObserver),
    );
    let mut trigger = handle.trigger();

    // Services get listed; EndpointSlices are held back.
    timeout(Duration::from_secs(10), async {
        while !handle.sync_status().services_listed {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert!(!handle.sync_status().endpoint_slices_listed);
    assert!(!handle.is_synced());
    // Changes keep arriving, and still nothing fires.
    server.create(&svc("b", "10.96.0.2")).unwrap();
    assert!(
        timeout(Duration::from_millis(1500), trigger.next())
            .await
            .is_err(),
        "fired before EndpointSlices were listed"
    );
    assert!(timeout(Duration::from_millis(100), handle.wait_synced())
        .await
        .is_err());

    open.send(true).unwrap();
    let reason = timeout(Duration::from_secs(10), trigger.next())
        .await
        .unwrap();
    assert_eq!(reason, TriggerReason::Initial);
    assert!(handle.is_synced());
    let pending = handle.take_pending();
    assert!(pending.services.contains(&key("a")));
    let mut builder = StateBuilder::new(NODE);
    handle.apply_to(&mut builder, &pending);
    let port = builder
        .state()
        .ipv4
        .values()
        .find(|p| p.name.service == key("a"));
    assert_eq!(port.map(|p| p.endpoints.all.len()), Some(1));
}

#[tokio::test]
async fn own_node_changes_that_matter_are_tracked() {
    let server = FakeApiServer::start().await.unwrap();
    server.create(&node(NODE, "z1")).unwrap();
    server.create(&node("node-b", "z1")).unwrap();
    let (handle, _recorder) = spawn(&server).await;
    let mut trigger = handle.trigger();

    let pending = collect_until(&handle, &mut trigger, Duration::from_secs(10), |p| {
        p.node_changed
    })
    .await;
    assert!(pending.node_changed);
    assert_eq!(
        handle
            .node()
            .and_then(|n| n.metadata.name.clone())
            .as_deref(),
        Some(NODE)
    );
    let mut builder = StateBuilder::new(NODE);
    let applied = handle.apply_to(&mut builder, &pending);
    assert!(applied.changes.force_full);
    assert_eq!(builder.state().node.zone.as_deref(), Some("z1"));

    // Another node, and status churn on ours, are not changes.
    server.apply(&node("node-b", "z2")).unwrap();
    let mut churn = node(NODE, "z1");
    churn.status = Some(NodeStatus {
        phase: Some("Running".into()),
        ..Default::default()
    });
    server.apply(&churn).unwrap();
    let stored: Option<Node> = server.get("", NODE).unwrap();
    let phase = stored.and_then(|n| n.status).and_then(|s| s.phase);
    assert_eq!(
        phase.as_deref(),
        Some("Running"),
        "the churn reached the server"
    );
    assert!(
        timeout(Duration::from_millis(1000), trigger.next())
            .await
            .is_err(),
        "status churn triggered a sync: {:?}",
        handle.take_pending()
    );

    server.apply(&node(NODE, "z2")).unwrap();
    let pending = collect_until(&handle, &mut trigger, Duration::from_secs(5), |p| {
        p.node_changed
    })
    .await;
    handle.apply_to(&mut builder, &pending);
    assert_eq!(builder.state().node.zone.as_deref(), Some("z2"));
}
