//! `kproxy trace`: follows the first packet of a connection through the
//! rules the planner produces, as netfilter would, and reports every
//! possible outcome with its probability.
//!
//! The walk: nat `PREROUTING` (or `OUTPUT` for the node's own traffic) →
//! our jumps → `KUBE-SERVICES` …; a `-m statistic --mode random` rule forks
//! the walk (taken with p, skipped with 1 − p), so each outcome's probability
//! is the product of its branches. Then the filter hook the (possibly
//! DNATed) packet takes — `FORWARD`, `INPUT` or `OUTPUT` — with our jumps
//! only, for DROP/REJECT/ACCEPT; then nat `POSTROUTING` → `KUBE-POSTROUTING`,
//! which masquerades when a rule set the masquerade mark.
//!
//! It is the first packet of a *new* connection: `--ctstate NEW` matches,
//! `RELATED,ESTABLISHED` does not, and ClientIP affinity has no entry yet
//! (`-m recent --rcheck/--update` does not match, `--set` does). Only
//! kproxy's rules are walked: the built-in chains' other rules and policies
//! are not known here ("no verdict from kproxy's rules").

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use kproxy_iptables::planner::{KUBE_EXTERNAL_SERVICES, KUBE_NODEPORTS, KUBE_SERVICES};
use kproxy_model::IpFamily;
use serde_json::{json, Value};

use super::dump::{jump_spec, plan, Planned};
use super::style::Style;
use super::{Input, ToolError};
use crate::cli::TraceArgs;
use kproxy_iptables::normalize::{parse_mark, Opt, Rule};

/// The packet to trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    pub in_interface: Option<String>,
    pub family: IpFamily,
}

impl Request {
    pub fn parse(args: &TraceArgs) -> Result<Request, ToolError> {
        let src: IpAddr =
            args.src.trim().parse().map_err(|_| {
                ToolError::Usage(format!("--src {:?}: not an IP address", args.src))
            })?;
        let (addr, proto) = match args.dst.trim().rsplit_once('/') {
            Some((a, p)) => (a, p.to_ascii_lowercase()),
            None => (args.dst.trim(), "tcp".to_string()),
        };
        if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
            return Err(ToolError::Usage(format!(
                "--dst {:?}: protocol must be TCP, UDP or SCTP",
                args.dst
            )));
        }
        let dst: SocketAddr = addr.parse().map_err(|_| {
            ToolError::Usage(format!(
                "--dst {:?}: expected IP:PORT/PROTO, e.g. 10.96.0.10:80/TCP or [fd00::a]:53/UDP",
                args.dst
            ))
        })?;
        let family = IpFamily::of(&dst.ip());
        if IpFamily::of(&src) != family {
            return Err(ToolError::Usage(
                "--src and --dst must be of the same IP family".to_string(),
            ));
        }
        Ok(Request {
            src,
            dst: dst.ip(),
            port: dst.port(),
            protocol: proto,
            in_interface: args.in_interface.clone().filter(|s| !s.is_empty()),
            family,
        })
    }
}

/// A rule that matched on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub table: &'static str,
    pub chain: String,
    /// 1-based position in the chain.
    pub rule: usize,
    pub spec: String,
    pub note: Option<String>,
}

/// What became of one branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// DNATed and let through by kproxy's filter rules.
    Dnat,
    /// Not DNATed, and no kproxy filter rule objected.
    Untouched,
    Drop,
    Reject,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Dnat => "dnat",
            Verdict::Untouched => "untouched",
            Verdict::Drop => "drop",
            Verdict::Reject => "reject",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub probability: f64,
    pub verdict: Verdict,
    pub endpoint: Option<SocketAddr>,
    pub masqueraded: bool,
    /// The rule that dropped or rejected, or that accepted in filter.
    pub decided_by: Option<Step>,
    pub filter_accepted: bool,
    pub path: Vec<Step>,
}

#[derive(Clone, Debug)]
pub struct Trace {
    pub request: Request,
    pub local_origin: bool,
    /// The service port and how it was reached ("cluster IP", "NodePort", …).
    pub service: Option<(String, String)>,
    pub outcomes: Vec<Outcome>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug)]
struct Packet {
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    protocol: String,
    in_interface: Option<String>,
    mark: u32,
    dnat: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// Fell off the chain or RETURN: the caller continues.
    Return,
    Accept,
    Drop,
    Reject,
    Dnat,
    Masquerade,
}

#[derive(Clone, Debug)]
struct Branch {
    probability: f64,
    packet: Packet,
    steps: Vec<Step>,
    end: End,
    last: Option<Step>,
}

/// The planned rules, parsed, with our jumps in the built-in chains in the
/// order the kernel holds them (each was inserted at the top).
struct Tables {
    chains: BTreeMap<(&'static str, String), Vec<Rule>>,
    local: Vec<IpNet>,
    notes: Vec<String>,
}

enum Match {
    No,
    Yes,
    Random(f64),
}

impl Tables {
    fn new(planned: &Planned, local: &[IpNet]) -> Tables {
        let mut chains: BTreeMap<(&'static str, String), Vec<Rule>> = BTreeMap::new();
        for (table, tchains) in &planned.tables {
            let t: &'static str = if table == "nat" { "nat" } else { "filter" };
            for (name, rules) in tchains {
                chains.insert(
                    (t, name.clone()),
                    rules.iter().map(|r| Rule::parse(r)).collect(),
                );
            }
        }
        for j in planned.jumps.iter().rev() {
            chains
                .entry((j.table.as_str(), j.from.to_string()))
                .or_default()
                .push(Rule::parse(&jump_spec(j)));
        }
        Tables {
            chains,
            local: local.to_vec(),
            notes: Vec::new(),
        }
    }

    fn is_local(&self, ip: &IpAddr) -> bool {
        ip.is_loopback() || self.local.iter().any(|n| n.addr() == *ip)
    }

    fn matches(&mut self, rule: &Rule, p: &Packet) -> Match {
        let mut random = None;
        for o in &rule.base {
            let ok = match o.name.as_str() {
                "-s" | "-d" => {
                    let ip = if o.name == "-s" { p.src } else { p.dst };
                    net_of(o.value()).is_some_and(|n| n.contains(&ip))
                }
                "-p" => o.value().eq_ignore_ascii_case(&p.protocol),
                "-i" => p
                    .in_interface
                    .as_deref()
                    .is_some_and(|i| iface_matches(o.value(), i)),
                other => {
                    self.note(format!(
                        "option {other} is not interpreted; assumed not to match"
                    ));
                    return Match::No;
                }
            };
            if ok == o.negated {
                return Match::No;
            }
        }
        for m in &rule.modules {
            for o in &m.opts {
                let ok = match (m.name.as_str(), o.name.as_str()) {
                    ("comment", _) => true,
                    ("tcp" | "udp" | "sctp", "--dport" | "--destination-port") => {
                        port_matches(o.value(), p.port)
                    }
                    ("statistic", "--mode") => o.value() == "random",
                    ("statistic", "--probability") => {
                        random = o.value().parse::<f64>().ok();
                        true
                    }
                    ("recent", "--set") => true,
                    ("recent", "--rcheck" | "--update") => {
                        self.note("ClientIP affinity: no entry yet for this client (first connection), so the affinity rules do not match".to_string());
                        false
                    }
                    ("recent", _) => true,
                    ("mark", "--mark") => {
                        parse_mark(o.value()).is_some_and(|(v, mask)| p.mark & mask == v)
                    }
                    ("conntrack", "--ctstate") => o.value().split(',').any(|s| match s {
                        "NEW" => true,
                        "DNAT" => p.dnat.is_some(),
                        _ => false,
                    }),
                    ("addrtype", "--dst-type") => o.value() == "LOCAL" && self.is_local(&p.dst),
                    ("addrtype", "--src-type") => o.value() == "LOCAL" && self.is_local(&p.src),
                    (module, opt) => {
                        self.note(format!(
                            "-m {module} {opt} is not interpreted; assumed not to match"
                        ));
                        return Match::No;
                    }
                };
                if ok == o.negated {
                    return Match::No;
                }
            }
        }
        match random {
            Some(p) => Match::Random(p),
            None => Match::Yes,
        }
    }

    fn note(&mut self, n: String) {
        if !self.notes.contains(&n) {
            self.notes.push(n);
        }
    }

    /// Walks `chain` of `table` from rule `from` (0-based).
    #[allow(clippy::too_many_arguments)]
    fn walk(
        &mut self,
        table: &'static str,
        chain: &str,
        from: usize,
        mut packet: Packet,
        mut steps: Vec<Step>,
        mut probability: f64,
        depth: usize,
        out: &mut Vec<Branch>,
    ) {
        let rules = match self.chains.get(&(table, chain.to_string())) {
            Some(r) => r.clone(),
            None => Vec::new(),
        };
        if depth > 32 {
            self.note(format!("jump depth exceeded in {table} {chain}"));
            return;
        }
        for (i, rule) in rules.iter().enumerate().skip(from) {
            let mut note = None;
            match self.matches(rule, &packet) {
                Match::No => continue,
                Match::Yes => {}
                Match::Random(p) => {
                    // Skipped with 1 - p: the walk goes on with the next rule.
                    if p < 1.0 {
                        self.walk(
                            table,
                            chain,
                            i + 1,
                            packet.clone(),
                            steps.clone(),
                            probability * (1.0 - p),
                            depth,
                            out,
                        );
                    }
                    probability *= p;
                    note = Some(format!("random: taken with probability {}", fraction(p)));
                }
            }
            let step = Step {
                table,
                chain: chain.to_string(),
                rule: i + 1,
                spec: rule.text.clone(),
                note,
            };
            steps.push(step.clone());
            let target = match &rule.target {
                Some(t) => t,
                None => continue,
            };
            let end = match target.name.as_str() {
                "RETURN" => Some(End::Return),
                "ACCEPT" => Some(End::Accept),
                "DROP" => Some(End::Drop),
                "REJECT" => Some(End::Reject),
                "MASQUERADE" => Some(End::Masquerade),
                "DNAT" => {
                    let to = target
                        .opt("--to-destination")
                        .map(Opt::value)
                        .unwrap_or_default();
                    match to.parse::<SocketAddr>() {
                        Ok(a) => {
                            packet.dnat = Some(a);
                            packet.dst = a.ip();
                            packet.port = a.port();
                        }
                        Err(_) => self.note(format!("DNAT target {to:?} is not IP:PORT")),
                    }
                    Some(End::Dnat)
                }
                "MARK" => {
                    for o in &target.opts {
                        let v = parse_mark(o.value()).map(|(v, _)| v).unwrap_or(0);
                        match o.name.as_str() {
                            "--or-mark" => packet.mark |= v,
                            "--xor-mark" => packet.mark ^= v,
                            "--set-xmark" => {
                                if let Some((v, m)) = parse_mark(o.value()) {
                                    packet.mark = (packet.mark & !m) ^ v;
                                }
                            }
                            _ => {}
                        }
                    }
                    None
                }
                name if self.chains.contains_key(&(table, name.to_string())) => {
                    let mut sub = Vec::new();
                    let name = name.to_string();
                    self.walk(
                        table,
                        &name,
                        0,
                        packet.clone(),
                        steps.clone(),
                        probability,
                        depth + 1,
                        &mut sub,
                    );
                    let depth_steps = steps.len();
                    for mut b in sub {
                        if b.end == End::Return {
                            // Nothing matched in there: leave the jump out of the path.
                            if b.steps.len() == depth_steps {
                                b.steps.pop();
                            }
                            self.walk(
                                table,
                                chain,
                                i + 1,
                                b.packet,
                                b.steps,
                                b.probability,
                                depth,
                                out,
                            );
                        } else {
                            out.push(b);
                        }
                    }
                    return;
                }
                other => {
                    self.note(format!("target {other} is not interpreted; walk continues"));
                    None
                }
            };
            if let Some(end) = end {
                out.push(Branch {
                    probability,
                    packet,
                    steps,
                    end,
                    last: Some(step),
                });
                return;
            }
        }
        out.push(Branch {
            probability,
            packet,
            steps,
            end: End::Return,
            last: None,
        });
    }

    /// Walks the built-in `chain` of `table` (our jumps only).
    fn hook(&mut self, table: &'static str, chain: &str, b: Branch) -> Vec<Branch> {
        let mut out = Vec::new();
        self.walk(
            table,
            chain,
            0,
            b.packet,
            b.steps,
            b.probability,
            0,
            &mut out,
        );
        out
    }
}

fn net_of(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

fn iface_matches(pattern: &str, iface: &str) -> bool {
    match pattern.strip_suffix('+') {
        Some(prefix) => iface.starts_with(prefix),
        None => pattern == iface,
    }
}

fn port_matches(spec: &str, port: u16) -> bool {
    match spec.split_once(':') {
        Some((a, b)) => {
            let lo = a.parse().unwrap_or(0);
            let hi = b.parse().unwrap_or(u16::MAX);
            (lo..=hi).contains(&port)
        }
        None => spec.parse() == Ok(port),
    }
}

/// `1/3` when p is (close to) a unit fraction, else a percentage.
pub fn fraction(p: f64) -> String {
    if p >= 1.0 - 1e-9 {
        return "always".to_string();
    }
    if p > 0.0 {
        let n = (1.0 / p).round();
        if n >= 2.0 && (p - 1.0 / n).abs() < 1e-6 {
            return format!("1/{n}");
        }
    }
    format!("{:.2}%", p * 100.0)
}

/// Traces `request` through the plan of `input`.
pub fn run(input: &Input, request: &Request) -> Result<Trace, ToolError> {
    super::require_iptables(&input.settings, "trace")?;
    let planned = plan(input, request.family)?;
    let local: Vec<IpNet> = input.local.iter().map(|(_, n)| *n).collect();
    Ok(trace(&planned, &local, request))
}

/// The pure walk.
pub fn trace(planned: &Planned, local: &[IpNet], request: &Request) -> Trace {
    let mut tables = Tables::new(planned, local);
    let local_origin = request.in_interface.is_none() && tables.is_local(&request.src);
    if request.in_interface.is_none() && !local_origin {
        tables.note(format!(
            "{} is not a local address and no --in-interface was given: rules matching -i do not match",
            request.src
        ));
    }
    let start = Branch {
        probability: 1.0,
        packet: Packet {
            src: request.src,
            dst: request.dst,
            port: request.port,
            protocol: request.protocol.clone(),
            in_interface: request.in_interface.clone(),
            mark: 0,
            dnat: None,
        },
        steps: Vec::new(),
        end: End::Return,
        last: None,
    };
    let nat_hook = if local_origin { "OUTPUT" } else { "PREROUTING" };
    let mut outcomes = Vec::new();
    for b in tables.hook("nat", nat_hook, start) {
        let dst_local = tables.is_local(&b.packet.dst);
        let filter_hooks: &[&str] = match (local_origin, dst_local) {
            (true, true) => &["OUTPUT", "INPUT"],
            (true, false) => &["OUTPUT"],
            (false, true) => &["INPUT"],
            (false, false) => &["FORWARD"],
        };
        let endpoint = b.packet.dnat;
        let mut live = vec![b];
        let mut decided: Vec<Outcome> = Vec::new();
        let mut accepted: Vec<(Branch, bool, Option<Step>)> = Vec::new();
        for hook in filter_hooks {
            let mut next = Vec::new();
            for b in live.drain(..) {
                for r in tables.hook("filter", hook, b) {
                    match r.end {
                        End::Drop | End::Reject => decided.push(Outcome {
                            probability: r.probability,
                            verdict: if r.end == End::Drop {
                                Verdict::Drop
                            } else {
                                Verdict::Reject
                            },
                            endpoint,
                            masqueraded: false,
                            decided_by: r.last.clone(),
                            filter_accepted: false,
                            path: r.steps,
                        }),
                        End::Accept => {
                            let last = r.last.clone();
                            accepted.push((r, true, last));
                        }
                        _ => next.push(r),
                    }
                }
            }
            live = next;
        }
        accepted.extend(live.into_iter().map(|b| (b, false, None)));
        for (b, filter_accepted, by) in accepted {
            // Packets delivered to this host from outside skip POSTROUTING.
            let post = if local_origin || !dst_local {
                tables.hook("nat", "POSTROUTING", b)
            } else {
                vec![b]
            };
            for p in post {
                decided.push(Outcome {
                    probability: p.probability,
                    verdict: if endpoint.is_some() {
                        Verdict::Dnat
                    } else {
                        Verdict::Untouched
                    },
                    endpoint,
                    masqueraded: p.end == End::Masquerade,
                    decided_by: by.clone(),
                    filter_accepted,
                    path: p.steps,
                });
            }
        }
        outcomes.extend(decided);
    }
    // The kernel's order: by the rules taken at the first fork.
    outcomes.sort_by(|a, b| {
        let key = |o: &Outcome| o.path.iter().map(|s| s.rule).collect::<Vec<_>>();
        key(a).cmp(&key(b))
    });
    let service = outcomes
        .iter()
        .flat_map(|o| o.path.iter())
        .find_map(service_of);
    Trace {
        request: request.clone(),
        local_origin,
        service,
        outcomes,
        notes: tables.notes,
    }
}

/// (service port, how it was reached) from a dispatch rule's comment.
fn service_of(step: &Step) -> Option<(String, String)> {
    let comment = Rule::parse(&step.spec).comment()?.to_string();
    if comment.starts_with("kubernetes ") {
        return None;
    }
    let dispatch = [KUBE_SERVICES, KUBE_NODEPORTS, KUBE_EXTERNAL_SERVICES];
    if !dispatch.contains(&step.chain.as_str()) && step.chain != "KUBE-PROXY-FIREWALL" {
        return None;
    }
    for suffix in [
        " cluster IP",
        " external IP",
        " loadbalancer IP",
        " has no endpoints",
        " has no local endpoints",
    ] {
        if let Some(name) = comment.strip_suffix(suffix) {
            return Some((name.to_string(), suffix.trim().to_string()));
        }
    }
    if let Some((name, _)) = comment.split_once(" traffic not accepted by ") {
        return Some((
            name.to_string(),
            "loadbalancer IP (source ranges)".to_string(),
        ));
    }
    if step.chain == KUBE_NODEPORTS {
        return Some((comment, "NodePort".to_string()));
    }
    None
}

fn proto_upper(p: &str) -> String {
    p.to_ascii_uppercase()
}

fn dst_string(r: &Request) -> String {
    format!(
        "{}/{}",
        SocketAddr::new(r.dst, r.port),
        proto_upper(&r.protocol)
    )
}

/// One line: where the connection goes.
pub fn summary(t: &Trace) -> String {
    let what = match &t.service {
        Some((name, via)) => format!("{name} ({via})"),
        None => dst_string(&t.request),
    };
    if t.outcomes.is_empty() {
        return format!("{what}: no outcome (no kproxy rule applies)");
    }
    let dnat: Vec<&Outcome> = t
        .outcomes
        .iter()
        .filter(|o| o.verdict == Verdict::Dnat)
        .collect();
    if dnat.len() == t.outcomes.len() {
        let eps: Vec<String> = dnat
            .iter()
            .map(|o| {
                format!(
                    "{} {}",
                    o.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                    fraction(o.probability)
                )
            })
            .collect();
        let masq = if dnat.iter().all(|o| o.masqueraded) {
            "masqueraded"
        } else if dnat.iter().all(|o| !o.masqueraded) {
            "not masqueraded"
        } else {
            "masqueraded on some paths"
        };
        return format!(
            "{what} → {} endpoint{}: {}; {masq}",
            dnat.len(),
            if dnat.len() == 1 { "" } else { "s" },
            eps.join(", ")
        );
    }
    let parts: Vec<String> = t
        .outcomes
        .iter()
        .map(|o| match o.verdict {
            Verdict::Drop | Verdict::Reject => {
                let by = o
                    .decided_by
                    .as_ref()
                    .map(|s| format!(" by {} {} rule {}", s.table, s.chain, s.rule))
                    .unwrap_or_default();
                let word = if o.verdict == Verdict::Drop {
                    "dropped"
                } else {
                    "rejected"
                };
                format!("{word}{by} ({})", fraction(o.probability))
            }
            Verdict::Dnat => format!(
                "to {} ({})",
                o.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                fraction(o.probability)
            ),
            Verdict::Untouched => format!(
                "not a service address for kproxy: no DNAT{} ({})",
                if o.masqueraded { ", masqueraded" } else { "" },
                fraction(o.probability)
            ),
        })
        .collect();
    format!("{what}: {}", parts.join("; "))
}

pub fn render_text(t: &Trace, style: Style) -> String {
    let r = &t.request;
    let mut out = String::new();
    let origin = if t.local_origin {
        "from this node".to_string()
    } else {
        match &r.in_interface {
            Some(i) => format!("arriving on {i}"),
            None => "arriving on an unknown interface".to_string(),
        }
    };
    let _ = writeln!(
        out,
        "{}",
        style.header(&format!(
            "trace {} → {} ({}, {origin}, first packet of a new connection)",
            r.src,
            dst_string(r),
            r.family
        ))
    );
    if let Some((name, via)) = &t.service {
        let _ = writeln!(out, "service: {name} ({via})");
    }
    for (i, o) in t.outcomes.iter().enumerate() {
        let head = match o.verdict {
            Verdict::Dnat => style.added(&format!(
                "DNAT to {}",
                o.endpoint.map(|e| e.to_string()).unwrap_or_default()
            )),
            Verdict::Untouched => "no DNAT".to_string(),
            Verdict::Drop => style.removed("DROPPED"),
            Verdict::Reject => style.removed("REJECTED"),
        };
        let masq = match o.verdict {
            Verdict::Drop | Verdict::Reject => String::new(),
            _ if o.masqueraded => format!(", {}", style.warn("masqueraded (SNAT to the node)")),
            _ => ", not masqueraded".to_string(),
        };
        let _ = writeln!(
            out,
            "\n[{}] {} {head}{masq}",
            i + 1,
            style.header(&fraction(o.probability))
        );
        for s in &o.path {
            let note = s
                .note
                .as_ref()
                .map(|n| style.dim(&format!("   # {n}")))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "    {} {}",
                style.chain(&format!("{:<6} {}#{}", s.table, s.chain, s.rule)),
                s.spec
            );
            if !note.is_empty() {
                let _ = writeln!(out, "    {note}");
            }
        }
        if matches!(o.verdict, Verdict::Dnat | Verdict::Untouched) && !o.filter_accepted {
            let _ = writeln!(
                    out,
                    "    {}",
                    style.dim("# filter: no verdict from kproxy's rules (the chain's other rules and policy decide)")
                );
        }
    }
    if !t.notes.is_empty() {
        out.push('\n');
        for n in &t.notes {
            let _ = writeln!(out, "{}", style.dim(&format!("note: {n}")));
        }
    }
    let _ = writeln!(out, "\n{} {}", style.header("summary:"), summary(t));
    out
}

pub fn render_json(t: &Trace) -> String {
    let step = |s: &Step| json!({"table": s.table, "chain": s.chain, "rule": s.rule, "spec": s.spec, "note": s.note});
    let outcomes: Vec<Value> = t
        .outcomes
        .iter()
        .map(|o| {
            json!({
                "probability": o.probability,
                "fraction": fraction(o.probability),
                "verdict": o.verdict.as_str(),
                "endpoint": o.endpoint.map(|e| e.to_string()),
                "masqueraded": o.masqueraded,
                "filter_accepted": o.filter_accepted,
                "decided_by": o.decided_by.as_ref().map(step),
                "path": o.path.iter().map(step).collect::<Vec<_>>(),
            })
        })
        .collect();
    let r = &t.request;
    json!({
        "packet": {
            "src": r.src.to_string(),
            "dst": SocketAddr::new(r.dst, r.port).to_string(),
            "protocol": proto_upper(&r.protocol),
            "in_interface": r.in_interface,
            "family": r.family.to_string(),
            "from_this_node": t.local_origin,
        },
        "service": t.service.as_ref().map(|(n, _)| n),
        "via": t.service.as_ref().map(|(_, v)| v),
        "outcomes": outcomes,
        "notes": t.notes,
        "summary": summary(t),
    })
    .to_string()
        + "\n"
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{golden, input};
    use super::*;

    fn req(src: &str, dst: &str, iface: Option<&str>) -> Request {
        Request::parse(&TraceArgs {
            input: Default::default(),
            src: src.into(),
            dst: dst.into(),
            in_interface: iface.map(str::to_string),
        })
        .expect("request")
    }

    fn run_fixture(src: &str, dst: &str, iface: Option<&str>) -> Trace {
        let input = input("cluster.yaml", &[]);
        let r = req(src, dst, iface);
        run(&input, &r).expect("trace")
    }

    #[test]
    fn cluster_ip_from_a_pod() {
        let t = run_fixture("10.244.1.10", "10.96.0.10:80/TCP", Some("br0"));
        golden(
            "trace-clusterip.golden.txt",
            &render_text(&t, Style::default()),
        );
        assert_eq!(t.outcomes.len(), 3);
        let total: f64 = t.outcomes.iter().map(|o| o.probability).sum();
        assert!((total - 1.0).abs() < 1e-9);
        for o in &t.outcomes {
            assert_eq!(o.verdict, Verdict::Dnat);
            assert_eq!(fraction(o.probability), "1/3");
            assert!(!o.masqueraded);
        }
        assert_eq!(
            t.service,
            Some(("default/web:http".into(), "cluster IP".into()))
        );
    }

    #[test]
    fn cluster_ip_from_outside_the_cluster_cidr_is_masqueraded() {
        let t = run_fixture("192.168.50.2", "10.96.0.10:80/TCP", Some("eth0"));
        assert!(t.outcomes.iter().all(|o| o.masqueraded), "{t:?}");
    }

    #[test]
    fn hairpin_is_masqueraded() {
        let t = run_fixture("10.244.1.11", "10.96.0.10:80/TCP", Some("br0"));
        let to_self = t
            .outcomes
            .iter()
            .find(|o| o.endpoint == Some("10.244.1.11:8080".parse().expect("addr")))
            .expect("an outcome to itself");
        assert!(to_self.masqueraded);
        let other = t
            .outcomes
            .iter()
            .find(|o| o.endpoint == Some("10.244.1.12:8080".parse().expect("addr")))
            .expect("another outcome");
        assert!(!other.masqueraded);
    }

    #[test]
    fn no_endpoints_is_rejected() {
        let t = run_fixture("10.244.1.10", "10.96.0.20:80/TCP", Some("br0"));
        golden(
            "trace-reject.golden.txt",
            &render_text(&t, Style::default()),
        );
        assert!(matches!(t.outcomes.as_slice(), [o] if o.verdict == Verdict::Reject));
        assert!(
            summary(&t).contains("rejected by filter KUBE-SERVICES"),
            "{}",
            summary(&t)
        );
    }

    #[test]
    fn nodeport_from_an_external_client() {
        let t = run_fixture("192.168.50.2", "192.168.50.1:30080/TCP", Some("eth0"));
        golden(
            "trace-nodeport.golden.txt",
            &render_text(&t, Style::default()),
        );
        assert!(
            matches!(t.outcomes.as_slice(), [o] if o.verdict == Verdict::Dnat && o.masqueraded)
        );
        assert_eq!(t.service.as_ref().map(|s| s.1.as_str()), Some("NodePort"));
        let v: Value = serde_json::from_str(&render_json(&t)).expect("json");
        assert_eq!(v["outcomes"][0]["endpoint"], "10.244.1.11:8080");
        assert_eq!(v["outcomes"][0]["masqueraded"], true);
    }

    #[test]
    fn load_balancer_source_ranges_and_local_policy() {
        // Allowed source, Local policy: only the local endpoint, no masquerade.
        let t = run_fixture("192.168.50.2", "203.0.113.10:443/TCP", Some("eth0"));
        assert!(
            matches!(t.outcomes.as_slice(), [o] if o.endpoint == Some("10.244.1.12:8443".parse().expect("a")) && !o.masqueraded),
            "{t:?}"
        );
        // Other sources are dropped by KUBE-PROXY-FIREWALL.
        let t = run_fixture("198.51.100.7", "203.0.113.10:443/TCP", Some("eth0"));
        assert!(
            matches!(t.outcomes.as_slice(), [o] if o.verdict == Verdict::Drop),
            "{t:?}"
        );
    }

    #[test]
    fn affinity_first_connection_and_unknown_addresses() {
        let t = run_fixture("10.244.1.10", "10.96.0.50:80/TCP", Some("br0"));
        assert_eq!(t.outcomes.len(), 2);
        assert!(t.notes.iter().any(|n| n.contains("affinity")));
        let t = run_fixture("10.244.1.10", "10.96.9.9:80/TCP", Some("br0"));
        assert!(
            summary(&t).contains("not a service address"),
            "{}",
            summary(&t)
        );
    }

    #[test]
    fn bad_requests() {
        for (src, dst) in [
            ("x", "10.0.0.1:80"),
            ("10.0.0.1", "10.0.0.1"),
            ("10.0.0.1", "10.0.0.1:80/ICMP"),
            ("fd00::1", "10.0.0.1:80"),
        ] {
            let r = Request::parse(&TraceArgs {
                input: Default::default(),
                src: src.into(),
                dst: dst.into(),
                in_interface: None,
            });
            assert!(matches!(r, Err(ToolError::Usage(_))), "{src} {dst}");
        }
        let r = req("fd00::1", "[fd00:10:96::10]:53/udp", None);
        assert_eq!(
            (r.port, r.protocol.as_str(), r.family),
            (53, "udp", IpFamily::V6)
        );
    }
}
