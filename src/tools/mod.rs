//! The operator's tools: `kproxy dump`, `kproxy diff`, `kproxy trace`, and
//! the Kubernetes Events kproxy emits for rejected objects ([`events`]).
//!
//! The tools never program anything. They build the same [`ProxyState`] the
//! proxy would (same label selector, same [`StateBuilder`]) from the API
//! server (one list, no watch) or from a YAML file, and render it with the
//! same planner the proxy programs the kernel with (`Planner::plan_full`),
//! configured from the same resolved [`Settings`]:
//!
//! - [`dump`]: the planner's output, as `iptables-restore` text or JSON;
//! - [`diff`]: planned chains against `iptables-save` of the current network
//!   namespace, per chain, semantically (iptables-save's canonical spelling
//!   of a rule equals the planner's);
//! - [`trace`]: interprets the planned rules for the first packet of a
//!   connection as netfilter would.
//!
//! Exit codes: 0 ok (diff: no difference), 1 diff found differences,
//! 2 bad usage or the input/kernel could not be read.

pub mod diff;
pub mod dump;
pub mod events;
pub mod style;
pub mod trace;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_iptables::netutil;
use kproxy_iptables::planner::{LocalDetector, NodePortAddresses, PlannerConfig};
use kproxy_model::{IpFamily, ProxyState, ServiceKey, StateBuilder};
use serde_json::Value;

use crate::cli::ToolCommand;
use crate::config::{LocalDetection, NodePortAddress, ProxyMode, Settings};

/// Why a tool could not do its job (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{0}")]
    Usage(String),
    #[error("--from-file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("listing from the API server: {0}")]
    Api(String),
    #[error("{0}")]
    Kernel(String),
    #[error("{0}")]
    Planner(String),
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

/// Text for people or JSON for scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

/// The API objects the state is built from.
#[derive(Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub node: Option<Node>,
    /// Where they came from, for headers ("objects.yaml", "the API server").
    pub source: String,
}

/// Everything a tool needs besides its own arguments.
pub struct Input {
    pub settings: Settings,
    pub state: ProxyState,
    pub source: String,
    /// `--local-addresses`, else the current namespace's (interface, address).
    pub local: Vec<(String, IpNet)>,
    pub families: Vec<IpFamily>,
    pub output: Output,
}

/// Runs a tool; returns the process exit code.
pub fn main(settings: Settings, tool: ToolCommand) -> ExitCode {
    let name = match &tool {
        ToolCommand::Dump(_) => "dump",
        ToolCommand::Diff(_) => "diff",
        ToolCommand::Trace(_) => "trace",
    };
    let color = style::Style::detect();
    let result = match tool {
        ToolCommand::Dump(args) => prepare(settings, &args, None).and_then(|input| {
            let text = dump::run(&input)?;
            print_out(&text)?;
            Ok(0)
        }),
        ToolCommand::Diff(args) => prepare(settings, &args, None).and_then(|input| {
            let report = diff::run(&input)?;
            let text = match input.output {
                Output::Json => diff::render_json(&report),
                Output::Text => diff::render_text(&report, color),
            };
            print_out(&text)?;
            Ok(if report.is_empty() { 0 } else { 1 })
        }),
        ToolCommand::Trace(args) => trace::Request::parse(&args).and_then(|request| {
            let input = prepare(settings, &args.input, Some(request.family))?;
            let result = trace::run(&input, &request)?;
            let text = match input.output {
                Output::Json => trace::render_json(&result),
                Output::Text => trace::render_text(&result, color),
            };
            print_out(&text)?;
            Ok(0)
        }),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("kproxy {name}: {err}");
            ExitCode::from(2)
        }
    }
}

fn print_out(text: &str) -> Result<(), ToolError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // `kproxy dump | head` is fine.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Reads the objects, builds the state and resolves the tool's flags.
fn prepare(
    settings: Settings,
    args: &crate::cli::ToolInput,
    family_hint: Option<IpFamily>,
) -> Result<Input, ToolError> {
    let output = parse_output(args.output.as_deref())?;
    let families = match args.family.as_deref() {
        Some(f) => vec![parse_family(f)?],
        None => match family_hint {
            Some(f) => vec![f],
            None => IpFamily::ALL.to_vec(),
        },
    };
    let local = match &args.local_addresses {
        Some(list) => parse_local_addresses(list)?,
        None => netutil::local_addresses().unwrap_or_default(),
    };
    let objects = match &args.from_file {
        Some(path) => read_file(Path::new(path))?,
        None => list_from_api(&settings)?,
    };
    let state = build_state(&settings.node_name, &objects);
    Ok(Input {
        settings,
        state,
        source: objects.source,
        local,
        families,
        output,
    })
}

pub fn parse_output(s: Option<&str>) -> Result<Output, ToolError> {
    match s.map(str::trim) {
        None | Some("") | Some("text") => Ok(Output::Text),
        Some("json") => Ok(Output::Json),
        Some(other) => Err(ToolError::Usage(format!(
            "--output {other:?}: expected text or json"
        ))),
    }
}

pub fn parse_family(s: &str) -> Result<IpFamily, ToolError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "ipv4" | "v4" | "4" => Ok(IpFamily::V4),
        "ipv6" | "v6" | "6" => Ok(IpFamily::V6),
        _ => Err(ToolError::Usage(format!(
            "--family {s:?}: expected ipv4 or ipv6"
        ))),
    }
}

fn parse_local_addresses(list: &str) -> Result<Vec<(String, IpNet)>, ToolError> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpAddr>()
                .map(|ip| ("--local-addresses".to_string(), IpNet::from(ip)))
                .map_err(|_| {
                    ToolError::Usage(format!("--local-addresses: {s:?} is not an IP address"))
                })
        })
        .collect()
}

/// Upstream's label selector, applied to file input as the API server
/// applies it to lists.
fn selected(labels: Option<&BTreeMap<String, String>>) -> bool {
    let labels = match labels {
        Some(l) => l,
        None => return true,
    };
    !labels.contains_key("service.kubernetes.io/service-proxy-name")
        && !labels.contains_key("service.kubernetes.io/headless")
}

/// Parses a multi-document YAML (or JSON) file of Services, EndpointSlices
/// and at most one Node; `List` documents are unpacked, other kinds are
/// skipped.
pub fn parse_objects(text: &str, source: &str) -> Result<Objects, String> {
    // serde-saphyr's default budget (1024 documents, 250k nodes) is for
    // config files; a large cluster's dump has far more. The limits grow with
    // the file instead (a document or node takes at least a byte of it),
    // while the alias limits that stop expansion bombs stay as they are.
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = text.len() / 2 + 1024;
    budget.max_nodes = text.len() + 250_000;
    budget.max_events = 2 * text.len() + 1_000_000;
    budget.max_reader_input_bytes = None;
    let options = serde_saphyr::options! { budget: Some(budget) };
    let docs: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| e.to_string())?;
    let mut objects = Objects {
        source: source.to_string(),
        ..Objects::default()
    };
    let mut queue: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    queue.reverse();
    let mut index = 0usize;
    while let Some(doc) = queue.pop() {
        index += 1;
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
        let what = || {
            let name = doc
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("?");
            format!("document {index} ({kind} {name})")
        };
        match kind {
            "List" | "ServiceList" | "EndpointSliceList" | "NodeList" => {
                let items = doc
                    .get("items")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                queue.extend(items.into_iter().rev());
            }
            "Service" => objects
                .services
                .push(serde_json::from_value(doc.clone()).map_err(|e| format!("{}: {e}", what()))?),
            "EndpointSlice" => objects
                .slices
                .push(serde_json::from_value(doc.clone()).map_err(|e| format!("{}: {e}", what()))?),
            "Node" => {
                if objects.node.is_some() {
                    return Err(format!("{}: more than one Node", what()));
                }
                objects.node = Some(
                    serde_json::from_value(doc.clone()).map_err(|e| format!("{}: {e}", what()))?,
                );
            }
            _ => {}
        }
    }
    Ok(objects)
}

fn read_file(path: &Path) -> Result<Objects, ToolError> {
    let text = std::fs::read_to_string(path).map_err(|e| ToolError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    parse_objects(&text, &path.display().to_string()).map_err(|reason| ToolError::File {
        path: path.to_path_buf(),
        reason,
    })
}

/// One list of Services and EndpointSlices (with the proxy's label
/// selector) and a get of the own Node.
fn list_from_api(settings: &Settings) -> Result<Objects, ToolError> {
    use kube::api::{Api, ListParams};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ToolError::Api(format!("starting the async runtime: {e}")))?;
    runtime.block_on(async {
        let client = crate::run::kube_client(settings)
            .await
            .map_err(|e| ToolError::Api(format!("{e:#}")))?;
        let lp = ListParams::default().labels(kproxy_watch::LABEL_SELECTOR);
        let services = Api::<Service>::all(client.clone())
            .list(&lp)
            .await
            .map_err(|e| ToolError::Api(format!("Services: {e}")))?
            .items;
        let slices = Api::<EndpointSlice>::all(client.clone())
            .list(&lp)
            .await
            .map_err(|e| ToolError::Api(format!("EndpointSlices: {e}")))?
            .items;
        let node = Api::<Node>::all(client)
            .get_opt(&settings.node_name)
            .await
            .map_err(|e| ToolError::Api(format!("Node {}: {e}", settings.node_name)))?;
        Ok(Objects {
            services,
            slices,
            node,
            source: "the API server".to_string(),
        })
    })
}

/// The state the proxy would hold after its first sync of `objects`.
pub fn build_state(node_name: &str, objects: &Objects) -> ProxyState {
    let mut builder = StateBuilder::new(node_name);
    builder.set_node(objects.node.as_ref());
    let mut services: BTreeMap<ServiceKey, Option<&Service>> = BTreeMap::new();
    let mut slices: BTreeMap<ServiceKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for svc in &objects.services {
        if !selected(svc.metadata.labels.as_ref()) {
            continue;
        }
        let key = ServiceKey::new(
            svc.metadata.namespace.clone().unwrap_or_default(),
            svc.metadata.name.clone().unwrap_or_default(),
        );
        services.insert(key, Some(svc));
    }
    for slice in &objects.slices {
        if !selected(slice.metadata.labels.as_ref()) {
            continue;
        }
        let owner = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(kproxy_watch::SERVICE_NAME_LABEL));
        if let Some(owner) = owner {
            let key = ServiceKey::new(
                slice.metadata.namespace.clone().unwrap_or_default(),
                owner.clone(),
            );
            services.entry(key.clone()).or_insert(None);
            slices.entry(key).or_default().push(slice);
        }
    }
    for (key, svc) in &services {
        let own = slices.get(key).map(Vec::as_slice).unwrap_or_default();
        builder.update_service(key, *svc, own);
    }
    builder.state().clone()
}

/// The iptables planner config of `family`, exactly as the proxy builds it
/// (`backend::build_iptables` plus the Node-derived parts the proxier adds
/// on every sync), without its side effects (no sysctl is written).
pub fn iptables_config(
    settings: &Settings,
    family: IpFamily,
    local: &[(String, IpNet)],
    state: &ProxyState,
) -> PlannerConfig {
    let mut planner = PlannerConfig::new(family);
    planner.masquerade_bit = settings.iptables.masquerade_bit;
    planner.masquerade_all = settings.iptables.masquerade_all;
    planner.localhost_nodeports = settings.iptables.localhost_nodeports;
    planner.conntrack_tcp_be_liberal = settings.conntrack.tcp_be_liberal;
    planner.nodeport_addresses = nodeport_addresses(settings, family, local);
    let node_cidrs: Vec<IpNet> = state
        .node
        .pod_cidrs
        .iter()
        .filter(|c| IpFamily::of_net(c) == family)
        .copied()
        .collect();
    planner.local_detector = match &settings.detect_local {
        LocalDetection::None => LocalDetector::None,
        LocalDetection::ClusterCidr(cidrs) => LocalDetector::Cidrs(
            cidrs
                .iter()
                .filter(|c| IpFamily::of_net(c) == family)
                .copied()
                .collect(),
        ),
        LocalDetection::NodeCidr => match node_cidrs.first() {
            Some(c) => LocalDetector::Cidrs(vec![*c]),
            None => LocalDetector::None,
        },
        LocalDetection::BridgeInterface(name) => LocalDetector::Bridge(name.clone()),
        LocalDetection::InterfaceNamePrefix(prefix) => {
            LocalDetector::InterfacePrefix(prefix.clone())
        }
    };
    planner.node_pod_cidrs = node_cidrs;
    planner
}

/// `--nodeport-addresses` resolved against `local` (as `backend` does).
fn nodeport_addresses(
    settings: &Settings,
    family: IpFamily,
    local: &[(String, IpNet)],
) -> NodePortAddresses {
    if settings.nodeport_addresses.is_empty() {
        return NodePortAddresses::AllLocal;
    }
    let mut cidrs = Vec::new();
    for addr in &settings.nodeport_addresses {
        match addr {
            NodePortAddress::Cidr(cidr) if IpFamily::of_net(cidr) == family => cidrs.push(*cidr),
            NodePortAddress::Cidr(_) => {}
            NodePortAddress::Primary => {
                if let Some((_, net)) = local
                    .iter()
                    .find(|(_, n)| IpFamily::of_net(n) == family && is_global(&n.addr()))
                {
                    cidrs.push(IpNet::from(net.addr()));
                }
            }
        }
    }
    NodePortAddresses::Ips(netutil::addresses_in(&cidrs, local))
}

fn is_global(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
        IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// The IPVS config, as `backend::build_ipvs` builds it.
pub fn ipvs_config(settings: &Settings, local: &[(String, IpNet)]) -> kproxy_ipvs::IpvsConfig {
    let mut node_ips = Vec::new();
    if !settings.nodeport_addresses.is_empty() {
        for family in IpFamily::ALL {
            if let NodePortAddresses::Ips(ips) = nodeport_addresses(settings, family, local) {
                node_ips.extend(ips);
            }
        }
    }
    let cluster_cidrs = match &settings.detect_local {
        LocalDetection::ClusterCidr(cidrs) => cidrs.clone(),
        LocalDetection::None => Vec::new(),
        _ => settings.cluster_cidrs.clone(),
    };
    kproxy_ipvs::IpvsConfig {
        scheduler: settings.ipvs.scheduler.as_str().to_string(),
        node_ips,
        masquerade_bit: settings.iptables.masquerade_bit,
        masquerade_all: settings.iptables.masquerade_all,
        cluster_cidrs,
        strict_arp: settings.ipvs.strict_arp,
        exclude_cidrs: settings.ipvs.exclude_cidrs.clone(),
        ..kproxy_ipvs::IpvsConfig::default()
    }
}

/// The NodePort addresses IPVS mode would use: the configured ones, else
/// every local address but loopback and IPv6 link-local.
pub fn ipvs_node_ips(cfg: &kproxy_ipvs::IpvsConfig, local: &[(String, IpNet)]) -> Vec<IpAddr> {
    if !cfg.node_ips.is_empty() {
        return cfg.node_ips.clone();
    }
    let mut set = BTreeSet::new();
    for (iface, net) in local {
        if iface == &cfg.dummy_name || !is_global(&net.addr()) {
            continue;
        }
        set.insert(net.addr());
    }
    set.into_iter().collect()
}

/// The tools' mode check: iptables everywhere, IPVS for dump only.
pub fn require_iptables(settings: &Settings, tool: &str) -> Result<(), ToolError> {
    match settings.mode {
        ProxyMode::Iptables => Ok(()),
        ProxyMode::Ipvs => Err(ToolError::Usage(format!(
            "kproxy {tool} supports --mode=iptables only (not yet IPVS); `kproxy dump --mode=ipvs` shows the IPVS plan"
        ))),
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Fixture input for the tools' unit tests.

    use super::*;

    pub fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/tools/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    /// Settings as `kproxy --hostname-override=node-a --cluster-cidr=…` resolves them.
    pub fn settings(extra: &[&str]) -> Settings {
        let mut argv = vec![
            "kproxy",
            "--hostname-override=node-a",
            "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56",
        ];
        argv.extend_from_slice(extra);
        match crate::config::load_settings(argv) {
            Ok(crate::config::Command::Run(s)) => *s,
            other => panic!("settings: {other:?}"),
        }
    }

    pub fn input(file: &str, extra: &[&str]) -> Input {
        let settings = settings(extra);
        let text = std::fs::read_to_string(fixture(file)).expect("fixture");
        let objects = parse_objects(&text, file).expect("objects");
        let state = build_state(&settings.node_name, &objects);
        Input {
            settings,
            state,
            source: file.to_string(),
            local: vec![
                ("lo".into(), "127.0.0.1/8".parse().expect("net")),
                ("eth0".into(), "192.168.50.1/24".parse().expect("net")),
                ("br0".into(), "10.244.1.1/24".parse().expect("net")),
                ("lo".into(), "::1/128".parse().expect("net")),
                ("eth0".into(), "fd00:0:0:50::1/64".parse().expect("net")),
            ],
            families: IpFamily::ALL.to_vec(),
            output: Output::Text,
        }
    }

    /// Compares with a golden file; `UPDATE_GOLDEN=1` rewrites it.
    pub fn golden(name: &str, actual: &str) {
        let path = fixture(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, actual).expect("write golden");
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            expected == actual,
            "{name} differs from the golden file (UPDATE_GOLDEN=1 rewrites it):\n--- expected\n{expected}\n--- actual\n{actual}"
        );
    }

    #[test]
    fn objects_from_yaml_with_lists_and_label_selector() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a, namespace: ns}\n  spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: other\n  namespace: ns\n  labels: {service.kubernetes.io/service-proxy-name: foo}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";
        let objects = parse_objects(text, "t").expect("parse");
        assert_eq!(objects.services.len(), 2);
        let state = build_state("n", &objects);
        assert_eq!(state.ipv4.len(), 1, "the other proxy's service is skipped");
        let err = parse_objects("kind: Service\nspec: 7\n", "t").expect_err("bad");
        assert!(err.contains("document 1 (Service ?)"), "{err}");
    }

    /// A large cluster's dump is beyond serde-saphyr's default budget for
    /// config files (1024 documents, 250k nodes); an alias bomb still is not.
    #[test]
    fn large_cluster_dumps_parse_and_alias_bombs_do_not() {
        let mut text = String::new();
        for i in 0..1100 {
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns}}\nspec: {{clusterIP: 10.96.{}.{}, ports: [{{port: 80}}]}}\n",
                i / 256,
                i % 256
            ));
        }
        let endpoints: String = (0..100_000)
            .map(|i| format!("- {{addresses: [10.64.0.{}]}}\n", i % 256))
            .collect();
        text.push_str(&format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s0-1, namespace: ns, labels: {{kubernetes.io/service-name: s0}}}}\naddressType: IPv4\nendpoints:\n{endpoints}"));
        let objects = parse_objects(&text, "t").expect("a 1101-document, 300k-node file parses");
        assert_eq!(objects.services.len(), 1100);
        assert_eq!(objects.slices.len(), 1);

        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..12 {
            let prev = level - 1;
            bomb.push_str(&format!("a{level}: &a{level} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"));
        }
        assert!(
            parse_objects(&bomb, "t").is_err(),
            "alias expansion is still bounded"
        );
    }
}
