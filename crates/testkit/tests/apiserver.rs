//! The fake API server exercised through the real kube-rs client.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, ObjectReference, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kproxy_testkit::apiserver::{plain_http_client, FakeApiServer, Options, Verb};
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use tokio::time::timeout;

const PROXY_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
const WAIT: Duration = Duration::from_secs(20);

fn service(name: &str, labels: &[(&str, &str)]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort {
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn name_of(s: &Service) -> String {
    s.metadata.name.clone().unwrap_or_default()
}

async fn setup() -> (FakeApiServer, Client) {
    let server = FakeApiServer::start_with(Options {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .await
    .unwrap();
    let client = server.client().unwrap();
    (server, client)
}

/// Next watcher event, skipping errors (reconnect attempts log them).
async fn next_event(
    stream: &mut (impl futures::Stream<Item = Result<Event<Service>, watcher::Error>> + Unpin),
) -> Event<Service> {
    loop {
        match timeout(WAIT, stream.next())
            .await
            .expect("watcher event in time")
        {
            Some(Ok(ev)) => return ev,
            Some(Err(_)) => continue,
            None => panic!("watcher ended"),
        }
    }
}

/// Reads a full Init..InitDone sequence and returns the names listed.
async fn read_init(
    stream: &mut (impl futures::Stream<Item = Result<Event<Service>, watcher::Error>> + Unpin),
) -> Vec<String> {
    loop {
        if let Event::Init = next_event(stream).await {
            break;
        }
    }
    let mut names = Vec::new();
    loop {
        match next_event(stream).await {
            Event::InitApply(s) => names.push(name_of(&s)),
            Event::InitDone => return names,
            other => panic!("unexpected {other:?} during init"),
        }
    }
}

#[tokio::test]
async fn list_pages_over_one_snapshot() {
    let (server, client) = setup().await;
    for n in ["a", "b", "c", "d", "e"] {
        server.create(&service(n, &[])).unwrap();
    }
    let api: Api<Service> = Api::all(client);
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    let mut versions = Vec::new();
    loop {
        let mut lp = ListParams::default().limit(2);
        if let Some(t) = token.take() {
            lp = lp.continue_token(&t);
        }
        let page = api.list(&lp).await.unwrap();
        assert!(page.items.len() <= 2);
        names.extend(page.items.iter().map(name_of));
        versions.push(page.metadata.resource_version.clone());
        // A write between pages must not show up in later pages.
        server
            .create(&service(&format!("z{}", names.len()), &[]))
            .ok();
        match page.metadata.continue_ {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => break,
        }
    }
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
    assert_eq!(versions.len(), 3);
    assert!(versions.windows(2).all(|w| w[0] == w[1]), "{versions:?}");
    assert_eq!(server.list_count("services"), 3);
}

#[tokio::test]
async fn label_and_field_selectors() {
    let (server, client) = setup().await;
    server.create(&service("plain", &[("app", "web")])).unwrap();
    server
        .create(&service(
            "other-proxy",
            &[("service.kubernetes.io/service-proxy-name", "x")],
        ))
        .unwrap();
    server
        .create(&service(
            "headless",
            &[("service.kubernetes.io/headless", "")],
        ))
        .unwrap();
    let api: Api<Service> = Api::all(client.clone());
    let got = api
        .list(&ListParams::default().labels(PROXY_SELECTOR))
        .await
        .unwrap();
    assert_eq!(got.items.iter().map(name_of).collect::<Vec<_>>(), ["plain"]);
    let got = api
        .list(&ListParams::default().labels("app in (web,db)"))
        .await
        .unwrap();
    assert_eq!(got.items.len(), 1);
    let got = api
        .list(&ListParams::default().fields("metadata.name=headless,metadata.namespace=default"))
        .await
        .unwrap();
    assert_eq!(
        got.items.iter().map(name_of).collect::<Vec<_>>(),
        ["headless"]
    );
    let err = api
        .list(&ListParams::default().labels("a in (b"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 400),
        "{err:?}"
    );
    let ns_api: Api<Service> = Api::namespaced(client, "elsewhere");
    assert!(ns_api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());
}

#[tokio::test]
async fn watch_streams_changes_in_order() {
    let (server, client) = setup().await;
    let api: Api<Service> = Api::namespaced(client, "default");
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let created = server.create(&service("a", &[])).unwrap();
    let mut changed = created.clone();
    changed.metadata.labels = Some([("v".to_string(), "2".to_string())].into());
    server.update(&changed).unwrap();
    server.delete::<Service>("default", "a").unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match timeout(WAIT, stream.try_next()).await.unwrap().unwrap() {
            Some(WatchEvent::Added(s)) => seen.push(("ADDED", s)),
            Some(WatchEvent::Modified(s)) => seen.push(("MODIFIED", s)),
            Some(WatchEvent::Deleted(s)) => seen.push(("DELETED", s)),
            Some(WatchEvent::Bookmark(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let kinds: Vec<_> = seen.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"]);
    let rvs: Vec<u64> = seen
        .iter()
        .map(|(_, s)| {
            s.metadata
                .resource_version
                .as_deref()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(rvs.windows(2).all(|w| w[0] < w[1]), "{rvs:?}");
}

#[tokio::test]
async fn watch_sends_bookmarks_and_honours_timeout() {
    let (server, client) = setup().await;
    server.create(&service("a", &[])).unwrap();
    let api: Api<Service> = Api::all(client);
    let wp = WatchParams::default().timeout(2);
    let started = std::time::Instant::now();
    let events: Vec<_> = timeout(
        WAIT,
        api.watch(&wp, "0").await.unwrap().try_collect::<Vec<_>>(),
    )
    .await
    .unwrap()
    .unwrap();
    // rv "0": synthetic ADDED for the current state first, then bookmarks.
    assert!(matches!(events.first(), Some(WatchEvent::Added(s)) if name_of(s) == "a"));
    let bookmarks = events
        .iter()
        .filter(|e| matches!(e, WatchEvent::Bookmark(_)))
        .count();
    assert!(bookmarks >= 2, "{bookmarks} bookmarks");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn expired_version_is_an_error_event() {
    let (server, client) = setup().await;
    server.create(&service("a", &[])).unwrap();
    server.compact();
    let api: Api<Service> = Api::all(client.clone());
    let events: Vec<_> = api
        .watch(&WatchParams::default(), "1")
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(events.len(), 1);
    match &events[0] {
        Ok(WatchEvent::Error(e)) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
            assert!(
                e.message.starts_with("too old resource version"),
                "{}",
                e.message
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    // The raw wire form: HTTP 200 with a single ERROR event line.
    let req = http::Request::get("/api/v1/services?watch=true&resourceVersion=1")
        .body(Vec::new())
        .unwrap();
    let text = client.request_text(req).await.unwrap();
    let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(line["type"], "ERROR");
    assert_eq!(line["object"]["kind"], "Status");
    assert_eq!(line["object"]["status"], "Failure");
    assert_eq!(line["object"]["code"], 410);
}

#[tokio::test]
async fn watcher_sees_init_then_apply_and_delete() {
    let (server, client) = setup().await;
    server.create(&service("a", &[])).unwrap();
    server
        .create(&service("h", &[("service.kubernetes.io/headless", "")]))
        .unwrap();
    let api: Api<Service> = Api::all(client);
    let mut stream = watcher(api, watcher::Config::default().labels(PROXY_SELECTOR)).boxed();
    assert_eq!(read_init(&mut stream).await, ["a"]);
    server.create(&service("b", &[])).unwrap();
    assert!(matches!(next_event(&mut stream).await, Event::Apply(s) if name_of(&s) == "b"));
    // Gaining the excluded label removes it from the selection: a Delete.
    server
        .update(&service("b", &[("service.kubernetes.io/headless", "")]))
        .unwrap();
    assert!(matches!(next_event(&mut stream).await, Event::Delete(s) if name_of(&s) == "b"));
    server.delete::<Service>("default", "a").unwrap();
    assert!(matches!(next_event(&mut stream).await, Event::Delete(s) if name_of(&s) == "a"));
    assert_eq!(server.list_count("services"), 1);
    assert_eq!(server.watch_count("services"), 1);
}

fn watcher(
    api: Api<Service>,
    config: watcher::Config,
) -> impl futures::Stream<Item = Result<Event<Service>, watcher::Error>> {
    kube::runtime::watcher(api, config).default_backoff()
}

#[tokio::test]
async fn reset_history_makes_a_running_watcher_relist() {
    let (server, client) = setup().await;
    server.create(&service("a", &[])).unwrap();
    let api: Api<Service> = Api::all(client);
    let mut stream = watcher(api, watcher::Config::default()).boxed();
    assert_eq!(read_init(&mut stream).await, ["a"]);
    server.reset_history();
    server.create(&service("b", &[])).unwrap();
    let names = read_init(&mut stream).await;
    assert_eq!(names, ["a", "b"]);
    assert_eq!(server.list_count("services"), 2);
}

#[tokio::test]
async fn watcher_recovers_from_an_outage() {
    let (server, client) = setup().await;
    server.create(&service("a", &[])).unwrap();
    server.create(&service("b", &[])).unwrap();
    let api: Api<Service> = Api::all(client);
    let (reader, writer) = kube::runtime::reflector::store();
    let mut stream = watcher(api, watcher::Config::default())
        .reflect(writer)
        .boxed();
    assert_eq!(read_init(&mut stream).await, ["a", "b"]);

    // Outage without history loss: the watcher resumes from its version.
    server.stop().await;
    server.create(&service("c", &[])).unwrap();
    server.restart().await.unwrap();
    assert!(matches!(next_event(&mut stream).await, Event::Apply(s) if name_of(&s) == "c"));
    assert_eq!(server.list_count("services"), 1, "resumed without a relist");

    // Outage with history loss: the resumed watch gets 410 and relists,
    // picking up the deletion made while the server was away.
    server.stop().await;
    server.delete::<Service>("default", "a").unwrap();
    server.create(&service("d", &[])).unwrap();
    server.reset_history();
    server.restart().await.unwrap();
    assert_eq!(read_init(&mut stream).await, ["b", "c", "d"]);
    let mut cached: Vec<String> = reader.state().iter().map(|s| name_of(s)).collect();
    cached.sort();
    assert_eq!(cached, ["b", "c", "d"]);
    assert_eq!(server.list_count("services"), 2);
    // The resumed watch after the second outage was answered with the 410 event.
    assert!(server.watch_count("services") >= 2);
}

#[tokio::test]
async fn crud_over_http() {
    let (server, client) = setup().await;
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let created = api
        .create(&PostParams::default(), &service("web", &[]))
        .await
        .unwrap();
    let meta = &created.metadata;
    assert!(
        meta.uid.is_some() && meta.creation_timestamp.is_some() && meta.resource_version.is_some()
    );
    let spec = created.spec.as_ref().unwrap();
    assert!(spec
        .cluster_ip
        .as_deref()
        .is_some_and(|ip| ip.starts_with("10.96.")));
    assert_eq!(
        server
            .get::<Service>("default", "web")
            .unwrap()
            .unwrap()
            .metadata
            .uid,
        meta.uid
    );

    let err = api
        .create(&PostParams::default(), &service("web", &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{err:?}"
    );
    let err = api.get("missing").await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404 && s.reason == "NotFound"),
        "{err:?}"
    );

    let mut changed = created.clone();
    changed.metadata.labels = Some([("v".to_string(), "2".to_string())].into());
    let updated = api
        .replace("web", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert_ne!(
        updated.metadata.resource_version,
        created.metadata.resource_version
    );
    assert_eq!(
        updated.spec.as_ref().unwrap().cluster_ip,
        spec.cluster_ip,
        "kept on update"
    );
    // Replacing with the stale version conflicts.
    let err = api
        .replace("web", &PostParams::default(), &changed)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err:?}"
    );

    api.delete("web", &DeleteParams::default()).await.unwrap();
    assert!(server.get::<Service>("default", "web").unwrap().is_none());
    let err = api
        .delete("web", &DeleteParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err:?}"
    );

    // Malformed bodies are a 400 Status, not a crash.
    let req = http::Request::post("/api/v1/namespaces/default/services")
        .header("content-type", "application/json")
        .body(b"{not json".to_vec())
        .unwrap();
    let err = client.request_text(req).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 400),
        "{err:?}"
    );
    let req = http::Request::get("/api/v1/nosuchthings")
        .body(Vec::new())
        .unwrap();
    let err = client.request_text(req).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err:?}"
    );

    assert_eq!(server.request_count(Verb::Create, "services"), 3);
    assert_eq!(server.request_count(Verb::Delete, "services"), 2);
}

#[tokio::test]
async fn nodes_endpointslices_and_events() {
    let (server, client) = setup().await;
    let node = Node {
        metadata: ObjectMeta {
            name: Some("n1".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    server.apply(&node).unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    assert_eq!(
        nodes.get("n1").await.unwrap().metadata.name.as_deref(),
        Some("n1")
    );

    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some("web-abc".into()),
            namespace: Some("default".into()),
            labels: Some([("kubernetes.io/service-name".to_string(), "web".to_string())].into()),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(vec![Endpoint {
            addresses: vec!["10.0.0.1".into()],
            ..Default::default()
        }]),
        ports: None,
    };
    server.create(&slice).unwrap();
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let got = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .unwrap();
    assert_eq!(got.items.len(), 1);

    let recorder = kube::runtime::events::Recorder::new(
        client,
        kube::runtime::events::Reporter {
            controller: "kproxy".into(),
            instance: Some("n1".into()),
        },
    );
    let reference = ObjectReference {
        kind: Some("Node".into()),
        name: Some("n1".into()),
        api_version: Some("v1".into()),
        ..Default::default()
    };
    recorder
        .publish(
            &kube::runtime::events::Event {
                type_: kube::runtime::events::EventType::Normal,
                reason: "Starting".into(),
                note: Some("Starting kproxy.".into()),
                action: "StartKubeProxy".into(),
                secondary: None,
            },
            &reference,
        )
        .await
        .unwrap();
    let events = server.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].reason, "Starting");
    assert_eq!(events[0].message, "Starting kproxy.");
    assert_eq!(events[0].regarding_name, "n1");
}

#[tokio::test]
async fn kubeconfig_and_serve_on() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = FakeApiServer::serve_on(listener).unwrap();
    assert_eq!(server.addr(), addr);
    server.create(&service("a", &[])).unwrap();
    let file = server.kubeconfig_file().unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(file.path()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let client = plain_http_client(config);
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
    let api: Api<Service> = Api::default_namespaced(client);
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}

#[tokio::test]
async fn binary_serves_preloaded_objects() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects.yaml");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &objects,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  ports: [{port: 80}]\n---\napiVersion: v1\nkind: Node\nmetadata: {name: n1}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: default}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\n",
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fake-apiserver"))
        .arg("--objects")
        .arg(&objects)
        .arg("--kubeconfig-out")
        .arg(&kubeconfig)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let url = timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let client = plain_http_client(config);
    let svc = Api::<Service>::namespaced(client.clone(), "default")
        .get("web")
        .await
        .unwrap();
    assert!(svc.spec.unwrap().cluster_ip.is_some());
    assert_eq!(
        Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    assert_eq!(
        Api::<EndpointSlice>::all(client)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    child.kill().await.unwrap();
}

#[tokio::test]
async fn streaming_list_watcher() {
    let (server, client) = setup().await;
    server.create(&service("a", &[])).unwrap();
    let api: Api<Service> = Api::all(client);
    let mut stream = watcher(api, watcher::Config::default().streaming_lists()).boxed();
    assert_eq!(read_init(&mut stream).await, ["a"]);
    server.create(&service("b", &[])).unwrap();
    assert!(matches!(next_event(&mut stream).await, Event::Apply(s) if name_of(&s) == "b"));
    assert_eq!(
        server.list_count("services"),
        0,
        "no list: initial events came on the watch"
    );
}
