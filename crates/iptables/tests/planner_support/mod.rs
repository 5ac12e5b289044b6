//! Test support for the planner tests: state builders and a tiny
//! interpreter of `iptables-restore --noflush` input that is strict about
//! structure (open/closed tables, declared chains, exact `-D` matches,
//! deleting only empty unreferenced chains).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use kproxy_model::{
    Endpoint, FamilyState, IpFamily, Protocol, ServiceEndpoints, ServiceKey, ServicePort,
    ServicePortName,
};

pub fn spn(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName {
        service: ServiceKey::new(ns, name),
        port: port.into(),
        protocol,
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

pub fn net(s: &str) -> IpNet {
    s.parse().expect("test CIDR")
}

pub fn ep(addr: &str, port: u16, local: bool) -> Endpoint {
    Endpoint {
        ip: ip(addr),
        port,
        is_local: local,
        ready: true,
        serving: true,
        terminating: false,
    }
}

/// A ClusterIP service port with no endpoints.
pub fn svc(
    ns: &str,
    name: &str,
    port_name: &str,
    protocol: Protocol,
    cluster_ip: &str,
    port: u16,
) -> ServicePort {
    let cip = ip(cluster_ip);
    ServicePort {
        name: spn(ns, name, port_name, protocol),
        family: IpFamily::of(&cip),
        cluster_ip: cip,
        port,
        target_port: port.to_string(),
        node_port: None,
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        session_affinity_seconds: None,
        external_policy_local: false,
        internal_policy_local: false,
        health_check_node_port: None,
        endpoints: ServiceEndpoints::default(),
    }
}

/// Sets the endpoints the way the model would: cluster = all ready ones
/// when the port uses cluster endpoints, local = the local ready ones when
/// it uses local endpoints.
pub fn with_endpoints(mut sp: ServicePort, eps: Vec<Endpoint>) -> ServicePort {
    let ready: Vec<Endpoint> = eps.iter().copied().filter(|e| e.ready).collect();
    sp.endpoints = ServiceEndpoints {
        all: eps.clone(),
        cluster: if sp.uses_cluster_endpoints() {
            ready.clone()
        } else {
            vec![]
        },
        local: if sp.uses_local_endpoints() {
            ready.iter().copied().filter(|e| e.is_local).collect()
        } else {
            vec![]
        },
        has_any: !ready.is_empty(),
    };
    sp
}

pub fn state(ports: Vec<ServicePort>) -> FamilyState {
    ports
        .into_iter()
        .map(|p| (p.name.clone(), Arc::new(p)))
        .collect()
}

const BUILTIN_TARGETS: &[&str] = &[
    "ACCEPT",
    "DROP",
    "REJECT",
    "RETURN",
    "MARK",
    "MASQUERADE",
    "DNAT",
    "SNAT",
];

/// Splits a rule like a shell would (double quotes group words).
pub fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

fn target_of(spec: &str) -> Option<String> {
    let t = tokens(spec);
    t.iter()
        .position(|w| w == "-j")
        .and_then(|i| t.get(i + 1).cloned())
}

/// A simulated kernel: table → chain → rules (rulespecs without `-A CHAIN`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub tables: BTreeMap<String, BTreeMap<String, Vec<String>>>,
}

impl Default for Kernel {
    fn default() -> Self {
        let mut tables = BTreeMap::new();
        let builtin = |names: &[&str]| -> BTreeMap<String, Vec<String>> {
            names.iter().map(|n| (n.to_string(), vec![])).collect()
        };
        tables.insert("filter".into(), builtin(&["INPUT", "FORWARD", "OUTPUT"]));
        tables.insert(
            "nat".into(),
            builtin(&["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]),
        );
        Kernel { tables }
    }
}

impl Kernel {
    /// Applies restore input atomically; on error nothing changes and the
    /// message names the line.
    pub fn apply(&mut self, text: &str) -> Result<(), String> {
        let mut next = self.clone();
        let mut table: Option<String> = None;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let err = |m: &str| format!("line {n}: {m}: {line}");
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(t) = line.strip_prefix('*') {
                if table.is_some() {
                    return Err(err("table opened inside another"));
                }
                if !next.tables.contains_key(t) {
                    return Err(err("unknown table"));
                }
                table = Some(t.to_string());
                continue;
            }
            let Some(tname) = table.clone() else {
                return Err(err("line outside a table"));
            };
            let chains = next.tables.get_mut(&tname).ok_or_else(|| err("no table"))?;
            if line == "COMMIT" {
                table = None;
                continue;
            }
            if let Some(rest) = line.strip_prefix(':') {
                let parts: Vec<&str> = rest.split(' ').collect();
                if parts.len() != 3 || parts[1] != "-" || parts[2] != "[0:0]" {
                    return Err(err("bad chain line"));
                }
                let name = parts[0];
                if name.len() > 28 {
                    return Err(err("chain name too long"));
                }
                chains.insert(name.to_string(), vec![]);
                continue;
            }
            let (op, rest) = line.split_once(' ').ok_or_else(|| err("bad line"))?;
            match op {
                "-A" | "-I" | "-D" => {
                    let (chain, mut spec) =
                        rest.split_once(' ').ok_or_else(|| err("no rulespec"))?;
                    if op == "-I" {
                        let (pos, s) = spec.split_once(' ').ok_or_else(|| err("no position"))?;
                        if pos != "1" {
                            return Err(err("only -I CHAIN 1 is used"));
                        }
                        spec = s;
                    }
                    if let Some(t) = target_of(spec) {
                        if !BUILTIN_TARGETS.contains(&t.as_str()) && !chains.contains_key(&t) {
                            return Err(err("jump to an undeclared chain"));
                        }
                    }
                    let rules = chains.get_mut(chain).ok_or_else(|| err("no such chain"))?;
                    match op {
                        "-A" => rules.push(spec.to_string()),
                        "-I" => rules.insert(0, spec.to_string()),
                        _ => {
                            let pos = rules
                                .iter()
                                .position(|r| r == spec)
                                .ok_or_else(|| err("-D of a rule that is not there"))?;
                            rules.remove(pos);
                        }
                    }
                }
                "-X" => {
                    let rules = chains
                        .get(rest)
                        .ok_or_else(|| err("-X of a missing chain"))?;
                    if !rules.is_empty() {
                        return Err(err("-X of a non-empty chain"));
                    }
                    let referenced = chains
                        .values()
                        .flatten()
                        .any(|r| target_of(r).as_deref() == Some(rest));
                    if referenced {
                        return Err(err("-X of a referenced chain"));
                    }
                    chains.remove(rest);
                }
                _ => return Err(err("unknown command")),
            }
        }
        if table.is_some() {
            return Err("input ends inside a table (no COMMIT)".into());
        }
        *self = next;
        Ok(())
    }

    pub fn chain(&self, table: &str, chain: &str) -> Option<&Vec<String>> {
        self.tables.get(table).and_then(|t| t.get(chain))
    }
}

/// Structural check of a whole restore text on its own: applies cleanly to
/// an empty kernel, every table is closed, and no line is outside a table.
pub fn check_structure(text: &str) -> Result<Kernel, String> {
    let mut k = Kernel::default();
    k.apply(text)?;
    let opens = text.lines().filter(|l| l.starts_with('*')).count();
    let commits = text.lines().filter(|l| *l == "COMMIT").count();
    if opens != commits {
        return Err(format!("{opens} tables but {commits} COMMITs"));
    }
    Ok(k)
}
