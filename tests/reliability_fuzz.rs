//! Fuzzing the model and the iptables planner against the real
//! `iptables-restore`: thousands of arbitrary worlds (all Service types,
//! dual-stack, policies, affinity, source ranges, hints, terminating
//! endpoints, odd but API-possible values, a share of invalid objects, and
//! random planner settings) go through `StateBuilder` → `Planner::plan_full`
//! → a chain of `plan_partial`s → a final `plan_full` that deletes stale
//! chains. Nothing may panic, and every case's text must be accepted by the
//! real `iptables-restore --test` and `ip6tables-restore --test` (legacy,
//! which checks `-D` targets and jump targets, and nft) inside a private
//! network namespace. Many cases share one restore invocation: each case is
//! one `*filter`/`*nat` block pair (with `--test` every block starts from
//! the kernel's state again), its plans merged in order into one transaction.
//!
//! nft's `--test` costs ~12 ms per table block (legacy's a fraction of a
//! millisecond), so the nft binaries check every `KPROXY_FUZZ_NFT_EVERY`-th
//! case (default 10) and legacy every case.
//!
//! Every `KPROXY_FUZZ_COMMIT_EVERY`-th case (default 50) is also committed
//! for real: the rules after the full plan and its partial plans must equal
//! those of one full plan of the final state on a clean table, and so must
//! the rules after the final full plan.
//!
//! `KPROXY_FUZZ_CASES` (default 2000) and `KPROXY_FUZZ_SEED` for soak runs.

#[path = "fixtures/reliability/support.rs"]
mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Service, ServicePort as ApiServicePort};
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kproxy_iptables::planner::{
    Applied, ExistingChains, LocalDetector, NodePortAddresses, Planner, PlannerConfig,
};
use kproxy_model::fixtures::{node, Ep, SliceBuilder, SvcBuilder};
use kproxy_model::{IpFamily, ServiceKey, ServicePortName, StateBuilder};
use kproxy_testkit::netns::{skip_unless_root, Netns};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use support::{env_usize, figure, owned_rules};

const NODE: &str = "node-a";
const NAMES: &[&str] = &[
    "web",
    "dns",
    "a",
    "x-1",
    "0abc",
    "svc-with-a-name-that-is-exactly-sixty-three-characters-long-abc",
];
const NAMESPACES: &[&str] = &[
    "default",
    "kube-system",
    "ns-63-chars-long-namespace-name-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
];
/// Service and slice port names: slices match services often.
const PORT_NAMES: &[&str] = &[
    "",
    "http",
    "dns",
    "p-1",
    "port-name-that-is-exactly-sixty-three-characters-long-abcdefghi",
];
const PROTOS: &[&str] = &["TCP", "TCP", "UDP", "SCTP"];

fn pick<T: Clone + std::fmt::Debug + 'static>(items: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(items)
}

/// IPv4 addresses in a few ranges (service, pod CIDR of this node, remote
/// pods, public), in API-accepted spellings (leading zeros, IPv4-mapped).
fn ip4(base: &'static str) -> impl Strategy<Value = String> {
    (1..255u8, 0..8u8).prop_map(move |(h, style)| match style {
        0 => format!("{base}.{h:03}"),
        1 => format!("::ffff:{base}.{h}"),
        _ => format!("{base}.{h}"),
    })
}

fn ip6(base: &'static str) -> impl Strategy<Value = String> {
    (1..0xffffu16).prop_map(move |h| format!("{base}{h:x}"))
}

fn any_ip() -> impl Strategy<Value = String> {
    prop_oneof![
        ip4("10.96.0"),
        ip4("192.0.2"),
        ip4("203.0.113"),
        ip6("fd00:96::"),
        ip6("2001:db8::"),
        Just("255.255.255.255".to_string()),
        Just("::".to_string()),
    ]
}

fn port_num() -> impl Strategy<Value = i32> {
    prop_oneof![pick(&[1, 53, 80, 443, 8080, 65535]), 1..65536i32,]
}

fn source_range() -> impl Strategy<Value = String> {
    prop_oneof![
        pick(&[
            "0.0.0.0/0",
            "::/0",
            "192.0.2.77/24",
            " 10.0.0.0/8 ",
            "203.0.113.5/32",
            "2001:db8::1/128",
            "fd00::/8",
            "010.001.0.0/16",
        ])
        .prop_map(String::from),
        (any_ip(), 0..33u8).prop_map(|(ip, l)| if ip.contains(':') && !ip.contains('.') {
            format!("{ip}/{}", u16::from(l) * 4)
        } else {
            format!("{}/{l}", ip.trim_start_matches("::ffff:"))
        }),
    ]
}

/// Something only an invalid object has (to exercise rejections).
const GARBAGE: &[&str] = &[
    "bad-ip",
    "bad-port-name",
    "bad-type",
    "bad-range",
    "bad-target",
    "bad-affinity",
];

#[derive(Clone, Debug)]
struct SvcKnobs {
    ty: &'static str,
    families: u8,
    cips: (String, String),
    ports: Vec<(usize, i32, &'static str, i32, Option<String>)>,
    eips: Vec<String>,
    ingress: Vec<(String, Option<&'static str>)>,
    ranges: (Vec<String>, bool),
    policies: (Option<&'static str>, Option<&'static str>, Option<i32>),
    hc_port: i32,
    other_proxy: bool,
    garbage: Option<&'static str>,
}

fn svc_knobs() -> impl Strategy<Value = SvcKnobs> {
    (
        pick(&[
            "ClusterIP",
            "ClusterIP",
            "NodePort",
            "LoadBalancer",
            "LoadBalancer",
            "ExternalName",
        ]),
        0..5u8,
        (ip4("10.96.1"), ip6("fd00:96::")),
        proptest::collection::vec(
            (
                0..PORT_NAMES.len(),
                port_num(),
                pick(PROTOS),
                prop_oneof![30000..32768i32, Just(0), 1..65536i32],
                proptest::option::of(prop_oneof![
                    pick(&["http", "dns-tcp", "h2c", "a1"]).prop_map(String::from),
                    (1..65536i32).prop_map(|p| p.to_string()),
                ]),
            ),
            1..5,
        ),
        proptest::collection::vec(any_ip(), 0..3),
        proptest::collection::vec(
            (any_ip(), pick(&[None, None, Some("VIP"), Some("Proxy")])),
            0..3,
        ),
        (
            proptest::collection::vec(source_range(), 0..3),
            any::<bool>(),
        ),
        (
            pick(&[None, Some("Local"), Some("Cluster")]),
            pick(&[None, Some("Local"), Some("Cluster")]),
            pick(&[None, Some(0), Some(1), Some(10800), Some(86400)]),
        ),
        prop_oneof![30000..32768i32, Just(0)],
        proptest::bool::weighted(0.03),
        proptest::option::weighted(0.06, pick(GARBAGE)),
    )
        .prop_map(
            |(
                ty,
                families,
                cips,
                ports,
                eips,
                ingress,
                ranges,
                policies,
                hc_port,
                other_proxy,
                garbage,
            )| {
                SvcKnobs {
                    ty,
                    families,
                    cips,
                    ports,
                    eips,
                    ingress,
                    ranges,
                    policies,
                    hc_port,
                    other_proxy,
                    garbage,
                }
            },
        )
}

fn build_service(ns: &str, name: &str, k: &SvcKnobs) -> Service {
    let (v4, v6) = (k.cips.0.as_str(), k.cips.1.as_str());
    let cips: Vec<&str> = match k.families {
        0 | 1 => vec![v4],
        2 => vec![v6],
        3 => vec![v4, v6],
        _ => vec![v6, v4],
    };
    let mut b = SvcBuilder::new(ns, name).type_(k.ty).cluster_ips(&cips);
    let mut names = BTreeSet::new();
    let mut ports = BTreeSet::new();
    let single = k.ports.len() == 1;
    for (i, (n, port, proto, np, target)) in k.ports.iter().enumerate() {
        let mut pname = PORT_NAMES[*n].to_string();
        if pname.is_empty() && !single {
            pname = format!("p{i}");
        }
        // A valid Service has distinct port names and port/protocol pairs.
        if !names.insert(pname.clone()) || !ports.insert((*port, *proto)) {
            continue;
        }
        if k.garbage == Some("bad-port-name") && i == 0 {
            pname = "Bad \"name\"\n-j ACCEPT".into();
        }
        let target = match (target, k.garbage) {
            (_, Some("bad-target")) => Some(IntOrString::String("--comment x".into())),
            (Some(t), _) => Some(match t.parse::<i32>() {
                Ok(n) => IntOrString::Int(n),
                Err(_) => IntOrString::String(t.clone()),
            }),
            (None, _) => None,
        };
        b = b.port_full(ApiServicePort {
            name: (!pname.is_empty()).then_some(pname),
            port: *port,
            protocol: Some(proto.to_string()),
            node_port: (*np != 0).then_some(*np),
            target_port: target,
            ..Default::default()
        });
    }
    let mut eips: Vec<&str> = k.eips.iter().map(String::as_str).collect();
    if k.garbage == Some("bad-ip") {
        eips.push("10.0.0.1 -j ACCEPT");
    }
    b = b.external_ips(&eips);
    for (ip, mode) in &k.ingress {
        b = b.lb_ingress(ip, *mode);
    }
    let mut ranges: Vec<&str> = k.ranges.0.iter().map(String::as_str).collect();
    if k.garbage == Some("bad-range") {
        ranges.push("10.0.0.0/33");
    }
    if k.ranges.1 {
        b = b.source_ranges(&ranges);
    } else if !ranges.is_empty() {
        b = b.annotation(
            "service.beta.kubernetes.io/load-balancer-source-ranges",
            &ranges.join(","),
        );
    }
    let (etp, itp, aff) = k.policies;
    if let Some(p) = etp {
        b = b.external_traffic_policy(p);
    }
    if let Some(p) = itp {
        b = b.internal_traffic_policy(p);
    }
    match (aff, k.garbage) {
        (_, Some("bad-affinity")) => b = b.affinity(Some(100_000)),
        (Some(0), _) => b = b.affinity(None),
        (Some(t), _) => b = b.affinity(Some(t)),
        (None, _) => {}
    }
    if k.hc_port != 0 {
        b = b.health_check_node_port(k.hc_port);
    }
    if k.other_proxy {
        b = b.label("service.kubernetes.io/service-proxy-name", "other");
    }
    if k.garbage == Some("bad-type") {
        b = b.type_("Weird");
    }
    b.build()
}

#[derive(Clone, Debug)]
struct EpKnobs {
    ip: String,
    conds: (Option<bool>, Option<bool>, Option<bool>),
    node: Option<&'static str>,
    zone_hints: Option<&'static [&'static str]>,
    node_hints: Option<&'static [&'static str]>,
}

type Hints = Option<&'static [&'static str]>;
const ZONE_HINTS: &[Hints] = &[None, Some(&["z1"]), Some(&["z2"]), Some(&["z1", "z2"])];
const NODE_HINTS: &[Hints] = &[None, Some(&[NODE]), Some(&["node-b"])];

fn ep_knobs(v6: bool) -> impl Strategy<Value = EpKnobs> {
    let ip = if v6 {
        prop_oneof![ip6("fd00:10:244:1::"), ip6("fd00:10:244:2::")].boxed()
    } else {
        prop_oneof![ip4("10.244.1"), ip4("10.244.2"), ip4("192.0.2")].boxed()
    };
    (
        ip,
        any::<(Option<bool>, Option<bool>, Option<bool>)>(),
        pick(&[None, Some(NODE), Some("node-b")]),
        pick(ZONE_HINTS),
        pick(NODE_HINTS),
    )
        .prop_map(|(ip, conds, node, zone_hints, node_hints)| EpKnobs {
            ip,
            conds,
            node,
            zone_hints,
            node_hints,
        })
}

#[derive(Clone, Debug)]
struct SliceKnobs {
    suffix: u8,
    family: &'static str,
    ports: Vec<(usize, i32, &'static str)>,
    endpoints: Vec<EpKnobs>,
}

fn slice_knobs() -> impl Strategy<Value = SliceKnobs> {
    (pick(&["IPv4", "IPv4", "IPv6", "FQDN"]), 0..3u8, 0..10u8).prop_flat_map(
        |(family, suffix, big)| {
            let n = if big == 0 { 40 } else { 6 };
            (
                Just(suffix),
                Just(family),
                proptest::collection::vec((0..PORT_NAMES.len(), 1..65536i32, pick(PROTOS)), 1..4),
                proptest::collection::vec(ep_knobs(family == "IPv6"), 0..n),
            )
                .prop_map(|(suffix, family, ports, endpoints)| SliceKnobs {
                    suffix,
                    family,
                    ports,
                    endpoints,
                })
        },
    )
}

fn build_slice(ns: &str, service: &str, k: &SliceKnobs) -> EndpointSlice {
    let mut b = SliceBuilder::new(ns, &format!("{service}-{}", k.suffix), service, k.family);
    let mut seen = BTreeSet::new();
    for (n, port, proto) in &k.ports {
        if seen.insert((*n, *proto)) {
            b = b.port_full(EndpointPort {
                name: Some(PORT_NAMES[*n].to_string()),
                port: Some(*port),
                protocol: Some(proto.to_string()),
                app_protocol: None,
            });
        }
    }
    for e in &k.endpoints {
        let mut ep = Ep::new(&e.ip);
        let (r, s, t) = e.conds;
        if let Some(r) = r {
            ep = ep.ready(r);
        }
        if let Some(s) = s {
            ep = ep.serving(s);
        }
        if let Some(t) = t {
            ep = ep.terminating(t);
        }
        if let Some(n) = e.node {
            ep = ep.node(n);
        }
        if let Some(z) = e.zone_hints {
            ep = ep.zone_hints(z);
        }
        if let Some(n) = e.node_hints {
            ep = ep.node_hints(n);
        }
        b = b.endpoint(ep);
    }
    b.build()
}

/// One object change: service `idx`'s Service (None: deleted) and slices.
type Change = (usize, Option<SvcKnobs>, Vec<SliceKnobs>);

#[derive(Clone, Debug)]
struct CfgKnobs {
    masquerade_bit: u8,
    flags: (bool, bool, bool, bool),
    detector: u8,
    nodeport_addresses: u8,
    threshold: usize,
    zone: Option<&'static str>,
    node_ip: bool,
}

#[derive(Clone, Debug)]
struct Case {
    cfg: CfgKnobs,
    initial: Vec<Change>,
    steps: Vec<Vec<Change>>,
}

fn change() -> impl Strategy<Value = Change> {
    (
        0..NAMES.len() * 2,
        proptest::option::weighted(0.85, svc_knobs()),
        proptest::collection::vec(slice_knobs(), 0..3),
    )
}

fn case() -> impl Strategy<Value = Case> {
    (
        (
            0..32u8,
            any::<(bool, bool, bool, bool)>(),
            0..4u8,
            0..3u8,
            prop_oneof![Just(1000usize), 2..30usize],
            pick(&[None, Some("z1"), Some("z2")]),
            any::<bool>(),
        ),
        proptest::collection::vec(change(), 1..10),
        proptest::collection::vec(proptest::collection::vec(change(), 1..4), 1..5),
    )
        .prop_map(
            |((masquerade_bit, flags, detector, npa, threshold, zone, node_ip), initial, steps)| {
                Case {
                    cfg: CfgKnobs {
                        masquerade_bit,
                        flags,
                        detector,
                        nodeport_addresses: npa,
                        threshold,
                        zone,
                        node_ip,
                    },
                    initial,
                    steps,
                }
            },
        )
}

fn planner_config(k: &CfgKnobs, family: IpFamily) -> PlannerConfig {
    let v6 = family == IpFamily::V6;
    let mut cfg = PlannerConfig::new(family);
    cfg.masquerade_bit = k.masquerade_bit;
    (
        cfg.masquerade_all,
        cfg.localhost_nodeports,
        cfg.random_fully,
        cfg.conntrack_tcp_be_liberal,
    ) = k.flags;
    let cidr = |s: &str| s.parse().expect("CIDR constant");
    cfg.local_detector = match k.detector {
        0 => LocalDetector::None,
        1 => LocalDetector::Cidrs(vec![cidr("10.244.0.0/16"), cidr("fd00:10:244::/56")]),
        2 => LocalDetector::Bridge("br0".into()),
        _ => LocalDetector::InterfacePrefix("veth".into()),
    };
    let ip = |s: &str| s.parse::<IpAddr>().expect("IP constant");
    cfg.nodeport_addresses = match k.nodeport_addresses {
        0 => NodePortAddresses::AllLocal,
        1 => NodePortAddresses::Ips(vec![ip("192.168.50.1"), ip("fd00::50:1")]),
        _ => NodePortAddresses::Ips(vec![ip("127.0.0.1"), ip("::1"), ip("192.168.50.1")]),
    };
    cfg.large_cluster_endpoint_threshold = k.threshold;
    cfg.node_ip = k.node_ip.then(|| {
        if v6 {
            ip("fd00::50:1")
        } else {
            ip("192.168.50.1")
        }
    });
    cfg.node_pod_cidrs = vec![if v6 {
        cidr("fd00:10:244:1::/64")
    } else {
        cidr("10.244.1.0/24")
    }];
    cfg
}

/// The restore text of one case per family: every plan's lines merged per
/// table, in order, so the whole history is one transaction per table.
#[derive(Default)]
struct CaseText {
    /// Full plan of the initial state, then the partial plans.
    filter: String,
    nat: String,
    /// The final full plan (stale chains deleted), on top.
    final_filter: String,
    final_nat: String,
    /// A full plan of the final state from nothing, for comparison.
    fresh: String,
}

fn merge_into(text: &str, filter: &mut String, nat: &mut String) {
    let mut cur: Option<&mut String> = None;
    for line in text.lines() {
        match line {
            "*filter" => cur = Some(&mut *filter),
            "*nat" => cur = Some(&mut *nat),
            "COMMIT" => cur = None,
            _ => {
                if let Some(buf) = cur.as_deref_mut() {
                    buf.push_str(line);
                    buf.push('\n');
                }
            }
        }
    }
}

fn wrap(filter: &str, nat: &str) -> String {
    format!("*filter\n{filter}COMMIT\n*nat\n{nat}COMMIT\n")
}

struct Outcome {
    texts: [CaseText; 2],
    rejections: usize,
    ports: usize,
    partials: usize,
}

/// Runs one case through the model and the planner (no I/O).
fn run_case(c: &Case) -> Outcome {
    let mut b = StateBuilder::new(NODE);
    b.set_node(Some(&node(NODE, c.cfg.zone)));
    let planners: Vec<Planner> = IpFamily::ALL
        .iter()
        .map(|f| Planner::new(planner_config(&c.cfg, *f)).expect("valid planner config"))
        .collect();
    let mut texts: [CaseText; 2] = Default::default();
    let mut applied: [Option<Applied>; 2] = [None, None];
    let mut rejections = 0;
    let mut partials = 0;

    let apply = |b: &mut StateBuilder, ch: &Change, rejections: &mut usize| {
        let (idx, svc, slices) = ch;
        let ns = NAMESPACES[idx / NAMES.len() % NAMESPACES.len()];
        let name = NAMES[idx % NAMES.len()];
        let svc = svc.as_ref().map(|k| build_service(ns, name, k));
        let slices: Vec<EndpointSlice> = slices.iter().map(|k| build_slice(ns, name, k)).collect();
        let refs: Vec<&EndpointSlice> = slices.iter().collect();
        let up = b.update_service(&ServiceKey::new(ns, name), svc.as_ref(), &refs);
        *rejections += up.new_rejections.len();
        up.changed_ports
    };

    for ch in &c.initial {
        apply(&mut b, ch, &mut rejections);
    }
    for (i, fam) in IpFamily::ALL.iter().enumerate() {
        let plan = planners[i].plan_full(b.state().family(*fam), &ExistingChains::default());
        merge_into(&plan.text, &mut texts[i].filter, &mut texts[i].nat);
        plan.update.apply_to(&mut applied[i]);
    }
    for step in &c.steps {
        let mut changed: BTreeSet<(IpFamily, ServicePortName)> = BTreeSet::new();
        for ch in step {
            changed.extend(apply(&mut b, ch, &mut rejections));
        }
        for (i, fam) in IpFamily::ALL.iter().enumerate() {
            let names: BTreeSet<ServicePortName> = changed
                .iter()
                .filter(|(f, _)| f == fam)
                .map(|(_, n)| n.clone())
                .collect();
            let Some(prev) = &applied[i] else {
                panic!("no applied record");
            };
            let plan = planners[i].plan_partial(prev, b.state().family(*fam), &names);
            merge_into(&plan.text, &mut texts[i].filter, &mut texts[i].nat);
            plan.update.apply_to(&mut applied[i]);
            partials += 1;
        }
    }
    for (i, fam) in IpFamily::ALL.iter().enumerate() {
        let existing = applied[i]
            .as_ref()
            .map(Applied::existing_chains)
            .unwrap_or_default();
        let plan = planners[i].plan_full(b.state().family(*fam), &existing);
        let t = &mut texts[i];
        merge_into(&plan.text, &mut t.final_filter, &mut t.final_nat);
        t.fresh = planners[i]
            .plan_full(b.state().family(*fam), &ExistingChains::default())
            .text;
    }
    Outcome {
        texts,
        rejections,
        ports: b.state().service_port_count(),
        partials,
    }
}

fn program_exists(p: &str) -> bool {
    Command::new(p)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs `program args` in `ns` with `input` on stdin: Ok or the stderr.
fn run_with_input(ns: &Netns, program: &str, args: &[&str], input: &str) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {program}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("write to {program}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("wait for {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The input line a restore error names ("line N failed", "at line: N").
fn failed_line(stderr: &str) -> Option<usize> {
    for pat in ["Error occurred at line: ", "line "] {
        if let Some(rest) = stderr.split(pat).nth(1) {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = digits.parse() {
                return Some(n);
            }
        }
    }
    None
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn reliability_fuzz_model_and_planner_against_iptables_restore() {
    const TEST: &str = "reliability_fuzz_model_and_planner_against_iptables_restore";
    let cases = env_usize("KPROXY_FUZZ_CASES", 2000);
    let commit_every = env_usize("KPROXY_FUZZ_COMMIT_EVERY", 50).max(1);
    let nft_every = env_usize("KPROXY_FUZZ_NFT_EVERY", 10).max(1);
    let seed = env_u64("KPROXY_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    eprintln!("{TEST}: {cases} cases, seed {seed} (KPROXY_FUZZ_SEED={seed} to replay)");
    let root = !skip_unless_root(TEST);
    let ns = if root {
        Some(Netns::create("fuzz").expect("fuzz namespace"))
    } else {
        eprintln!("{TEST}: not root: model and planner only, no iptables-restore check");
        None
    };
    // (family index, program) for --test; legacy checks -D and jump targets.
    let mut checkers: Vec<(usize, &str)> = Vec::new();
    for (i, progs) in [
        ["iptables-legacy-restore", "iptables-nft-restore"],
        ["ip6tables-legacy-restore", "ip6tables-nft-restore"],
    ]
    .iter()
    .enumerate()
    {
        for p in progs {
            if program_exists(p) {
                checkers.push((i, p));
            } else {
                eprintln!("{TEST}: {p} not installed, not checked");
            }
        }
    }
    if root {
        assert!(!checkers.is_empty(), "no iptables-restore to check against");
    }
    let legacy = ["iptables-legacy-restore", "ip6tables-legacy-restore"];
    let legacy_cmd = ["iptables-legacy", "ip6tables-legacy"];
    let legacy_save = ["iptables-legacy-save", "ip6tables-legacy-save"];
    let can_commit = root && legacy.iter().all(|p| program_exists(p));

    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let strategy = case();
    let start = Instant::now();
    let mut restore_time = Duration::ZERO;
    let (mut total_rejections, mut total_ports, mut total_partials, mut lines) = (0, 0, 0, 0);
    let mut committed = 0;
    let mut restore_runs = 0;
    let batch = 40;
    let mut done = 0;
    while done < cases {
        let n = batch.min(cases - done);
        let mut batch_cases = Vec::with_capacity(n);
        // Per family, per checker kind (legacy: every case, nft: a sample).
        let mut batch_texts: [[String; 2]; 2] = Default::default();
        // The same, (first line, case index) of each case's block.
        let mut starts: [[Vec<(usize, usize)>; 2]; 2] = Default::default();
        for j in 0..n {
            let c = strategy
                .new_tree(&mut runner)
                .expect("generate a case")
                .current();
            let idx = done + j;
            let out = std::panic::catch_unwind(|| run_case(&c)).unwrap_or_else(|_| {
                panic!("case {idx} (seed {seed}) panicked in the model or planner: {c:#?}")
            });
            total_rejections += out.rejections;
            total_ports += out.ports;
            total_partials += out.partials;
            for (f, t) in out.texts.iter().enumerate() {
                // The whole history as one transaction per table.
                let text = wrap(
                    &format!("{}{}", t.filter, t.final_filter),
                    &format!("{}{}", t.nat, t.final_nat),
                );
                lines += text.lines().count();
                for (k, buf) in batch_texts[f].iter_mut().enumerate() {
                    // nft's --test costs ~12 ms per table block: a sample.
                    if k == 0 || idx % nft_every == 0 {
                        starts[f][k].push((buf.lines().count() + 1, idx));
                        buf.push_str(&text);
                    }
                }
            }
            if can_commit && idx % commit_every == 0 {
                if let Some(ns) = &ns {
                    commit_and_compare(ns, &out, &legacy, &legacy_cmd, &legacy_save, idx, seed);
                    committed += 1;
                }
            }
            batch_cases.push(c);
        }
        if let Some(ns) = &ns {
            let t = Instant::now();
            for (f, program) in &checkers {
                let k = usize::from(program.contains("nft"));
                let text = &batch_texts[*f][k];
                if text.is_empty() {
                    continue;
                }
                restore_runs += 1;
                let res = run_with_input(ns, program, &["--noflush", "--test"], text);
                if let Err(stderr) = res {
                    let starts = &starts[*f][k];
                    let line = failed_line(&stderr).unwrap_or(0);
                    let (first, idx) = starts
                        .iter()
                        .rev()
                        .find(|(s, _)| *s <= line)
                        .copied()
                        .unwrap_or((1, done));
                    let context: Vec<String> = text
                        .lines()
                        .enumerate()
                        .skip(line.saturating_sub(6).max(first - 1))
                        .take(10)
                        .map(|(i, l)| format!("{:>6} {l}", i + 1))
                        .collect();
                    panic!(
                        "{program} --test refused case {idx} (seed {seed}): {stderr}\n{}\ncase: {:#?}",
                        context.join("\n"),
                        batch_cases[idx - done]
                    );
                }
            }
            restore_time += t.elapsed();
        }
        done += n;
    }
    let elapsed = start.elapsed();
    // The generators must produce real work, not only rejections.
    assert!(
        total_ports >= cases,
        "only {total_ports} service ports over {cases} cases"
    );
    assert!(total_rejections > 0, "no invalid object was generated");
    figure(
        TEST,
        &format!(
            "{cases} cases (seed {seed}) in {:.1} s ({:.1} s in {} iptables-restore --test runs over {} restore lines), {total_partials} partial plans, {total_ports} final service ports, {total_rejections} rejections, {committed} cases committed and compared with a fresh full plan",
            elapsed.as_secs_f64(),
            restore_time.as_secs_f64(),
            restore_runs,
            lines,
        ),
    );
}

/// Commits the case for real (legacy backend): the rules after the full
/// plan and its partials, and after the final full plan, must equal a full
/// plan of the final state on clean tables.
fn commit_and_compare(
    ns: &Netns,
    out: &Outcome,
    restore: &[&str; 2],
    cmd: &[&str; 2],
    save: &[&str; 2],
    idx: usize,
    seed: u64,
) {
    let clean = |f: usize| {
        for table in ["filter", "nat"] {
            for op in ["-F", "-X"] {
                ns.exec_ok([cmd[f], "-t", table, op])
                    .expect("clean the fuzz namespace");
            }
        }
    };
    let dump = |f: usize| owned_rules(&ns.exec_ok([save[f]]).expect("save"));
    let commit = |f: usize, text: &str, what: &str| {
        if let Err(e) = run_with_input(ns, restore[f], &["--noflush"], text) {
            panic!(
                "case {idx} (seed {seed}): {} refused the {what}: {e}\n{text}",
                restore[f]
            );
        }
    };
    for (f, t) in out.texts.iter().enumerate() {
        clean(f);
        commit(f, &wrap(&t.filter, &t.nat), "full plan + partial plans");
        let incremental = dump(f);
        commit(f, &wrap(&t.final_filter, &t.final_nat), "final full plan");
        let resynced = dump(f);
        clean(f);
        commit(f, &t.fresh, "fresh full plan");
        let fresh = dump(f);
        clean(f);
        assert!(
            incremental == fresh,
            "case {idx} (seed {seed}) {}: partial plans left other rules than a full plan:\n{}",
            restore[f],
            support::diff(&incremental, &fresh)
        );
        assert!(
            resynced == fresh,
            "case {idx} (seed {seed}) {}: the full resync left other rules:\n{}",
            restore[f],
            support::diff(&resynced, &fresh)
        );
    }
}

/// The check above can fail: a plan whose partial deletes a rule that was
/// never added, or jumps to a chain that does not exist, is refused.
#[test]
fn reliability_fuzz_checker_refuses_broken_plans() {
    if skip_unless_root("reliability_fuzz_checker_refuses_broken_plans")
        || !program_exists("iptables-legacy-restore")
    {
        return;
    }
    let ns = Netns::create("fuzzneg").expect("namespace");
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let c = case().new_tree(&mut runner).expect("case").current();
    let t = &run_case(&c).texts[0];
    let good = wrap(&t.filter, &t.nat);
    run_with_input(
        &ns,
        "iptables-legacy-restore",
        &["--noflush", "--test"],
        &good,
    )
    .expect("the generated plan is accepted");
    for bad in [
        "-D KUBE-SERVICES -d 10.99.99.99/32 -p tcp -m tcp --dport 1 -j RETURN\n",
        "-A KUBE-SERVICES -j KUBE-SVC-DOESNOTEXIST\n",
    ] {
        let text = wrap(&t.filter, &format!("{}{bad}", t.nat));
        assert!(
            run_with_input(
                &ns,
                "iptables-legacy-restore",
                &["--noflush", "--test"],
                &text
            )
            .is_err(),
            "accepted {bad}"
        );
    }
}
