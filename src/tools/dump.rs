//! `kproxy dump`: the rules kproxy would program, from the same planner.
//!
//! iptables mode prints `Planner::plan_full`'s `iptables-restore` input per
//! family (what a full sync writes, without deletions of stale chains), then
//! the jumps from the built-in chains as comments; `--output json` gives
//! the same as tables → chains → rules. IPVS mode prints the virtual
//! servers, kube-ipvs0's addresses and the iptables part.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use kproxy_iptables::planner::{ExistingChains, JumpSpec, Planner, PlannerConfig};
use kproxy_iptables::runner::parse_save_tables;
use kproxy_model::{IpFamily, ProxyState};
use serde_json::{json, Value};

use super::{Input, Output, ToolError};
use crate::config::ProxyMode;

/// What the planner wants for one family.
#[derive(Clone, Debug)]
pub struct Planned {
    pub family: IpFamily,
    /// `iptables-restore --noflush` input of a full sync.
    pub text: String,
    /// table → chain → rule specs, in the order they are written.
    pub tables: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    pub jumps: Vec<JumpSpec>,
}

/// Plans `family` of `input` with the proxy's planner.
pub fn plan(input: &Input, family: IpFamily) -> Result<Planned, ToolError> {
    let config = super::iptables_config(&input.settings, family, &input.local, &input.state);
    plan_with(config, &input.state)
}

pub fn plan_with(config: PlannerConfig, state: &ProxyState) -> Result<Planned, ToolError> {
    let family = config.family;
    let planner = Planner::new(config).map_err(|e| ToolError::Planner(e.to_string()))?;
    let plan = planner.plan_full(state.family(family), &ExistingChains::default());
    let tables = parse_save_tables(&plan.text)
        .into_iter()
        .filter(|(t, _)| !t.is_empty())
        .map(|(t, saved)| (t, saved.chains.into_iter().collect()))
        .collect();
    Ok(Planned {
        family,
        text: plan.text,
        tables,
        jumps: planner.jump_rules(),
    })
}

/// A jump as iptables-save prints it (without `-A CHAIN`).
pub fn jump_spec(j: &JumpSpec) -> String {
    let mut out = j.extra_args.join(" ");
    if !j.comment.is_empty() {
        let _ = write!(out, " -m comment --comment \"{}\"", j.comment);
    }
    let _ = write!(out, " -j {}", j.to);
    out.trim_start().to_string()
}

pub fn run(input: &Input) -> Result<String, ToolError> {
    match input.settings.mode {
        ProxyMode::Iptables => match input.output {
            Output::Text => text(input),
            Output::Json => Ok(json_iptables(input)?.to_string() + "\n"),
        },
        ProxyMode::Ipvs => ipvs(input),
    }
}

fn header(input: &Input, mode: &str, family: Option<IpFamily>) -> String {
    let state = &input.state;
    let (ports, endpoints) = match family {
        Some(f) => (
            state.family(f).len(),
            state
                .family(f)
                .values()
                .map(|sp| sp.endpoints.all.len())
                .sum::<usize>(),
        ),
        None => (state.service_port_count(), state.endpoint_count()),
    };
    let family = family.map(|f| format!(", {f}")).unwrap_or_default();
    format!(
        "# kproxy dump: {mode} mode{family}, node {}, {ports} service ports, {endpoints} endpoints, from {}\n",
        state.node.name, input.source
    )
}

fn rejections(state: &ProxyState) -> String {
    let mut out = String::new();
    for r in &state.rejections {
        let _ = writeln!(out, "# rejected {r}");
    }
    out
}

fn text(input: &Input) -> Result<String, ToolError> {
    let mut out = String::new();
    out.push_str(&rejections(&input.state));
    for family in &input.families {
        let planned = plan(input, *family)?;
        out.push_str(&header(input, "iptables", Some(*family)));
        out.push_str(&planned.text);
        out.push_str(
            "# jumps from built-in chains (kproxy inserts each with iptables -I when missing):\n",
        );
        for j in &planned.jumps {
            let _ = writeln!(
                out,
                "# -t {} -A {} {}",
                j.table.as_str(),
                j.from,
                jump_spec(j)
            );
        }
    }
    Ok(out)
}

fn rejections_json(state: &ProxyState) -> Value {
    Value::Array(
        state
            .rejections
            .iter()
            .map(|r| {
                json!({
                    "kind": r.kind.to_string(),
                    "namespace": r.namespace,
                    "name": r.name,
                    "reason": r.reason,
                })
            })
            .collect(),
    )
}

fn json_iptables(input: &Input) -> Result<Value, ToolError> {
    let mut families = Vec::new();
    for family in &input.families {
        let planned = plan(input, *family)?;
        let tables: Vec<Value> = planned
            .tables
            .iter()
            .map(|(table, chains)| {
                json!({
                    "table": table,
                    "chains": chains
                        .iter()
                        .map(|(name, rules)| json!({"name": name, "rules": rules}))
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
        let jumps: Vec<Value> = planned
            .jumps
            .iter()
            .map(|j| json!({"table": j.table.as_str(), "chain": j.from, "rule": jump_spec(j)}))
            .collect();
        families.push(json!({
            "family": family.to_string(),
            "service_ports": input.state.family(*family).len(),
            "tables": tables,
            "jumps": jumps,
            "restore": planned.text,
        }));
    }
    Ok(json!({
        "mode": "iptables",
        "node": input.state.node.name,
        "source": input.source,
        "families": families,
        "rejected": rejections_json(&input.state),
    }))
}

fn ipvs(input: &Input) -> Result<String, ToolError> {
    let cfg = super::ipvs_config(&input.settings, &input.local);
    let node_ips = super::ipvs_node_ips(&cfg, &input.local);
    let mut state = input.state.clone();
    for family in IpFamily::ALL {
        if !input.families.contains(&family) {
            state.family_mut(family).clear();
        }
    }
    let plan = kproxy_ipvs::plan(&state, &cfg, &node_ips);
    if input.output == Output::Json {
        let services: Vec<Value> = plan
            .services
            .values()
            .map(|d| {
                json!({
                    "virtual_server": d.service.key().to_string(),
                    "scheduler": d.service.scheduler,
                    "persistence_seconds": (d.service.timeout > 0).then_some(d.service.timeout),
                    "service_port": d.port_name.to_string(),
                    "kind": d.kind.as_str(),
                    "real_servers": d.dests.keys().map(|a| a.to_string()).collect::<Vec<_>>(),
                })
            })
            .collect();
        let iptables: Vec<Value> = input
            .families
            .iter()
            .map(|f| {
                let p = kproxy_ipvs::rules::iptables_rules(&state, &cfg, *f, &node_ips);
                json!({"family": f.to_string(), "restore": p.text})
            })
            .collect();
        let v = json!({
            "mode": "ipvs",
            "node": input.state.node.name,
            "source": input.source,
            "virtual_servers": services,
            "kube_ipvs0_addresses": plan.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "iptables": iptables,
            "rejected": rejections_json(&input.state),
        });
        return Ok(v.to_string() + "\n");
    }
    let mut out = String::new();
    out.push_str(&rejections(&input.state));
    out.push_str(&header(input, "ipvs", None));
    out.push_str("# virtual servers (ipvsadm -Ln style; every real server is Masq, weight 1)\n");
    for d in plan.services.values() {
        let persistence = if d.service.timeout > 0 {
            format!(" persistent {}", d.service.timeout)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{}  {}{persistence}    # {} {}",
            d.service.key(),
            d.service.scheduler,
            d.port_name,
            d.kind.as_str()
        );
        for addr in d.dests.keys() {
            let _ = writeln!(out, "  -> {addr}  Masq 1");
        }
    }
    out.push_str("# kube-ipvs0 addresses\n");
    for a in &plan.addresses {
        let _ = writeln!(out, "# {a}");
    }
    for family in &input.families {
        let p = kproxy_ipvs::rules::iptables_rules(&state, &cfg, *family, &node_ips);
        let _ = writeln!(out, "# iptables part, {family}");
        out.push_str(&p.text);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{golden, input};
    use super::*;

    #[test]
    fn text_golden() {
        let input = input("cluster.yaml", &[]);
        golden("dump.golden.txt", &run(&input).expect("dump"));
    }

    #[test]
    fn json_matches_text() {
        let mut input = input("cluster.yaml", &[]);
        input.output = Output::Json;
        input.families = vec![IpFamily::V4];
        let v: Value = serde_json::from_str(&run(&input).expect("dump")).expect("json");
        let fam = &v["families"][0];
        assert_eq!(fam["family"], "IPv4");
        let planned = plan(&input, IpFamily::V4).expect("plan");
        assert_eq!(fam["restore"], planned.text.as_str());
        let nat = fam["tables"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["table"] == "nat"))
            .expect("nat");
        let services = nat["chains"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "KUBE-SERVICES"))
            .expect("KUBE-SERVICES");
        assert!(
            services["rules"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r
                    .as_str()
                    .is_some_and(|r| r.contains("default/web:http cluster IP")))),
            "{services}"
        );
        assert_eq!(v["rejected"][0]["name"], "bad");
    }

    #[test]
    fn ipvs_golden() {
        let input = input("cluster.yaml", &["--mode=ipvs"]);
        golden("dump-ipvs.golden.txt", &run(&input).expect("dump"));
    }
}
