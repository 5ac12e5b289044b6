//! `kproxy diff`: the planned rules against the kernel's, per chain.
//!
//! Only kproxy's chains are compared — the chains the planner writes plus
//! per-service chains (`KUBE-SVC-…`, `KUBE-SEP-…`, …) found in the kernel —
//! and, in the built-in chains, only jumps to our chains. Rules are compared
//! in their canonical form (see [`kproxy_iptables::normalize`]), since
//! iptables-save respells what it was given. The dispatch chains (`KUBE-SERVICES`,
//! `KUBE-NODEPORTS`, `KUBE-EXTERNAL-SERVICES`, `KUBE-PROXY-FIREWALL`) are
//! compared as sets: partial syncs insert into them, so their order is not
//! the full plan's, and their rules match disjoint traffic — except that the
//! NodePort jump must stay the last rule of nat `KUBE-SERVICES`, which is
//! checked. All other chains are ordered (endpoint probabilities depend on
//! the order) and diffed line by line.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use kproxy_iptables::cleanup::is_owned_chain;
use kproxy_iptables::planner::{
    is_service_chain, KUBE_EXTERNAL_SERVICES, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL, KUBE_SERVICES,
};
use kproxy_iptables::runner::{parse_save_tables, BackendPreference, Iptables, SavedTable};
use kproxy_model::IpFamily;
use serde_json::{json, Value};

use super::dump::{jump_spec, plan, Planned};
use super::style::Style;
use super::{Input, ToolError};
use crate::config::IptablesBackend;
use kproxy_iptables::normalize::Rule;

const BUILTIN: &[&str] = &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// How a chain differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Planned but not in the kernel.
    Missing,
    /// In the kernel but not planned (stale).
    Extra,
    /// In both, with different rules.
    Differs,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Missing => "missing",
            Status::Extra => "extra",
            Status::Differs => "differs",
        }
    }
}

/// One line of a chain's diff.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line {
    /// Planned, not in the kernel (as the planner writes it).
    Add(String),
    /// In the kernel, not planned (as iptables-save prints it).
    Remove(String),
    /// A remark, e.g. about rule order.
    Note(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainDiff {
    pub table: String,
    pub chain: String,
    pub status: Status,
    pub lines: Vec<Line>,
}

#[derive(Clone, Debug)]
pub struct FamilyDiff {
    pub family: IpFamily,
    /// "legacy" / "nft", or why the family was skipped.
    pub backend: String,
    pub skipped: Option<String>,
    pub chains_compared: usize,
    pub rules_compared: usize,
    pub chains: Vec<ChainDiff>,
}

#[derive(Clone, Debug)]
pub struct Report {
    pub source: String,
    pub families: Vec<FamilyDiff>,
}

impl Report {
    pub fn is_empty(&self) -> bool {
        self.families.iter().all(|f| f.chains.is_empty())
    }
}

fn preference(b: IptablesBackend) -> BackendPreference {
    match b {
        IptablesBackend::Auto => BackendPreference::Auto,
        IptablesBackend::Legacy => BackendPreference::Legacy,
        IptablesBackend::Nft => BackendPreference::Nft,
    }
}

/// Plans every requested family and compares it with `iptables-save` of
/// the current network namespace.
pub fn run(input: &Input) -> Result<Report, ToolError> {
    super::require_iptables(&input.settings, "diff")?;
    let explicit = input.families.len() == 1;
    let mut families = Vec::new();
    for family in &input.families {
        let planned = plan(input, *family)?;
        let ipt = match Iptables::detect(*family, preference(input.settings.iptables_backend)) {
            Ok(ipt) => ipt,
            Err(e) if !explicit && *family == IpFamily::V6 => {
                families.push(FamilyDiff {
                    family: *family,
                    backend: String::new(),
                    skipped: Some(format!("skipped: {e}")),
                    chains_compared: 0,
                    rules_compared: 0,
                    chains: Vec::new(),
                });
                continue;
            }
            Err(e) => return Err(ToolError::Kernel(format!("{family}: {e}"))),
        };
        let mut text = String::new();
        for table in ["filter", "nat"] {
            text.push_str(
                &ipt.save(table)
                    .map_err(|e| ToolError::Kernel(format!("{family}: {e}")))?,
            );
        }
        let kernel = parse_save_tables(&text);
        let mut fd = compare(&planned, &kernel);
        fd.backend = ipt.backend().to_string();
        families.push(fd);
    }
    Ok(Report {
        source: input.source.clone(),
        families,
    })
}

fn is_dispatch(table: &str, chain: &str) -> bool {
    match chain {
        KUBE_SERVICES | KUBE_NODEPORTS => true,
        KUBE_EXTERNAL_SERVICES | KUBE_PROXY_FIREWALL => table == "filter",
        _ => false,
    }
}

/// The pure comparison of a plan with parsed `iptables-save` tables.
pub fn compare(planned: &Planned, kernel: &BTreeMap<String, SavedTable>) -> FamilyDiff {
    let empty_table = SavedTable::default();
    let empty_chains = BTreeMap::new();
    let mut out = FamilyDiff {
        family: planned.family,
        backend: String::new(),
        skipped: None,
        chains_compared: 0,
        rules_compared: 0,
        chains: Vec::new(),
    };
    for table in ["filter", "nat"] {
        let desired = planned.tables.get(table).unwrap_or(&empty_chains);
        let current = kernel.get(table).unwrap_or(&empty_table);
        let mut names: BTreeSet<&String> = desired.keys().collect();
        names.extend(
            current
                .chains
                .keys()
                .filter(|c| table == "nat" && is_service_chain(c)),
        );
        for name in names {
            out.chains_compared += 1;
            let want = desired.get(name);
            let have = current.chains.get(name);
            out.rules_compared += want.map_or(0, Vec::len);
            let diff = match (want, have) {
                (Some(w), None) => Some(ChainDiff {
                    table: table.to_string(),
                    chain: name.clone(),
                    status: Status::Missing,
                    lines: w.iter().map(|r| Line::Add(r.clone())).collect(),
                }),
                (None, Some(h)) => Some(ChainDiff {
                    table: table.to_string(),
                    chain: name.clone(),
                    status: Status::Extra,
                    lines: h.iter().map(|r| Line::Remove(r.clone())).collect(),
                }),
                (Some(w), Some(h)) => {
                    let lines = if is_dispatch(table, name) {
                        let mut lines = set_diff(w, h);
                        if table == "nat" && name == KUBE_SERVICES && lines.is_empty() {
                            lines.extend(tail_check(w, h));
                        }
                        lines
                    } else {
                        ordered_diff(w, h)
                    };
                    (!lines.is_empty()).then(|| ChainDiff {
                        table: table.to_string(),
                        chain: name.clone(),
                        status: Status::Differs,
                        lines,
                    })
                }
                (None, None) => None,
            };
            out.chains.extend(diff);
        }
        // Jumps from the built-in chains to ours.
        let ours = |target: &str| desired.contains_key(target) || is_owned_chain(table, target);
        for builtin in BUILTIN {
            let want: Vec<String> = planned
                .jumps
                .iter()
                .filter(|j| j.table.as_str() == table && j.from == *builtin)
                .map(jump_spec)
                .collect();
            let have: Vec<String> = current
                .chains
                .get(*builtin)
                .map(|rules| {
                    rules
                        .iter()
                        .filter(|r| Rule::parse(r).target_name().is_some_and(ours))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            if want.is_empty() && have.is_empty() {
                continue;
            }
            out.rules_compared += want.len();
            let lines = set_diff(&want, &have);
            if !lines.is_empty() {
                out.chains.push(ChainDiff {
                    table: table.to_string(),
                    chain: (*builtin).to_string(),
                    status: Status::Differs,
                    lines,
                });
            }
        }
    }
    out
}

/// Multiset difference by canonical form.
fn set_diff(want: &[String], have: &[String]) -> Vec<Line> {
    let mut have_left: BTreeMap<String, Vec<&String>> = BTreeMap::new();
    for h in have {
        have_left
            .entry(Rule::parse(h).canonical())
            .or_default()
            .push(h);
    }
    let mut lines = Vec::new();
    for w in want {
        let key = Rule::parse(w).canonical();
        match have_left.get_mut(&key).and_then(Vec::pop) {
            Some(_) => {}
            None => lines.push(Line::Add(w.clone())),
        }
    }
    let mut removed: Vec<Line> = have_left
        .into_values()
        .flatten()
        .map(|h| Line::Remove(h.clone()))
        .collect();
    removed.append(&mut lines);
    removed
}

/// The NodePort jump (the planned last rule) must be the kernel's last rule.
fn tail_check(want: &[String], have: &[String]) -> Option<Line> {
    let last_want = Rule::parse(want.last()?).canonical();
    let last_have = Rule::parse(have.last()?).canonical();
    (last_want != last_have).then(|| {
        Line::Note(format!(
            "the last rule must be `{}`; the kernel's last rule is `{}`",
            want.last().map(String::as_str).unwrap_or_default(),
            have.last().map(String::as_str).unwrap_or_default()
        ))
    })
}

/// Line diff of two ordered rule lists by canonical form (LCS).
fn ordered_diff(want: &[String], have: &[String]) -> Vec<Line> {
    let a: Vec<String> = have.iter().map(|r| Rule::parse(r).canonical()).collect();
    let b: Vec<String> = want.iter().map(|r| Rule::parse(r).canonical()).collect();
    if a == b {
        return Vec::new();
    }
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut lines = Vec::new();
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            lines.push(Line::Add(want[j].clone()));
            j += 1;
        } else {
            lines.push(Line::Remove(have[i].clone()));
            i += 1;
        }
    }
    lines
}

pub fn render_text(report: &Report, style: Style) -> String {
    let mut out = String::new();
    for f in &report.families {
        if let Some(why) = &f.skipped {
            let _ = writeln!(out, "{}", style.dim(&format!("# {}: {why}", f.family)));
            continue;
        }
        let _ = writeln!(
            out,
            "{}",
            style.header(&format!(
                "# {} (iptables-{}): kernel vs kproxy's plan from {}; - kernel only, + planned only",
                f.family, f.backend, report.source
            ))
        );
        if f.chains.is_empty() {
            let _ = writeln!(
                out,
                "no differences: {} chains, {} planned rules",
                f.chains_compared, f.rules_compared
            );
            continue;
        }
        for c in &f.chains {
            let what = match c.status {
                Status::Missing => " (chain missing in the kernel)",
                Status::Extra => " (chain only in the kernel)",
                Status::Differs => "",
            };
            let _ = writeln!(
                out,
                "{}",
                style.chain(&format!("@@ {} {}{what} @@", c.table, c.chain))
            );
            for l in &c.lines {
                let line = match l {
                    Line::Add(r) => style.added(&format!("+-A {} {r}", c.chain)),
                    Line::Remove(r) => style.removed(&format!("--A {} {r}", c.chain)),
                    Line::Note(n) => style.warn(&format!("! {n}")),
                };
                let _ = writeln!(out, "{line}");
            }
        }
    }
    out
}

pub fn render_json(report: &Report) -> String {
    let families: Vec<Value> = report
        .families
        .iter()
        .map(|f| {
            let chains: Vec<Value> = f
                .chains
                .iter()
                .map(|c| {
                    let pick = |want: fn(&Line) -> Option<&String>| {
                        c.lines.iter().filter_map(want).cloned().collect::<Vec<_>>()
                    };
                    json!({
                        "table": c.table,
                        "chain": c.chain,
                        "status": c.status.as_str(),
                        "added": pick(|l| if let Line::Add(r) = l { Some(r) } else { None }),
                        "removed": pick(|l| if let Line::Remove(r) = l { Some(r) } else { None }),
                        "notes": pick(|l| if let Line::Note(r) = l { Some(r) } else { None }),
                    })
                })
                .collect();
            json!({
                "family": f.family.to_string(),
                "backend": f.backend,
                "skipped": f.skipped,
                "chains_compared": f.chains_compared,
                "rules_compared": f.rules_compared,
                "equal": f.chains.is_empty(),
                "chains": chains,
            })
        })
        .collect();
    json!({"equal": report.is_empty(), "source": report.source, "families": families}).to_string()
        + "\n"
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{golden, input};
    use super::*;

    /// What iptables-save prints after loading `planned` (and the jumps):
    /// the planner's rules respelled the way the kernel does.
    fn as_saved(planned: &Planned) -> String {
        let mut out = String::new();
        for (table, chains) in &planned.tables {
            let _ = writeln!(out, "*{table}");
            for b in BUILTIN {
                let _ = writeln!(out, ":{b} ACCEPT [0:0]");
            }
            for c in chains.keys() {
                let _ = writeln!(out, ":{c} - [0:0]");
            }
            for j in planned.jumps.iter().filter(|j| j.table.as_str() == table) {
                let _ = writeln!(out, "-A {} {}", j.from, jump_spec(j));
            }
            // Foreign rules in built-in chains are not ours to compare.
            let _ = writeln!(out, "-A FORWARD -i docker0 -j ACCEPT");
            for (c, rules) in chains {
                for r in rules {
                    let r = Rule::parse(r);
                    // Respell: base options first with /32, REJECT's default.
                    let mut spec = String::new();
                    for o in &r.base {
                        let neg = if o.negated { "! " } else { "" };
                        let v = kproxy_iptables::normalize::canonical_net(o.value());
                        let _ = write!(spec, "{neg}{} {v} ", o.name);
                    }
                    for m in &r.modules {
                        let _ = write!(spec, "-m {} ", m.name);
                        for o in &m.opts {
                            let neg = if o.negated { "! " } else { "" };
                            let vals: Vec<String> = o
                                .values
                                .iter()
                                .map(|v| {
                                    if v.contains(' ') {
                                        format!("\"{v}\"")
                                    } else {
                                        v.clone()
                                    }
                                })
                                .collect();
                            let _ = write!(spec, "{neg}{} ", o.name);
                            if !vals.is_empty() {
                                let _ = write!(spec, "{} ", vals.join(" "));
                            }
                        }
                    }
                    if let Some(t) = &r.target {
                        let _ = write!(spec, "-j {}", t.name);
                        for o in &t.opts {
                            let _ = write!(spec, " {} {}", o.name, o.values.join(" "));
                        }
                        if t.name == "REJECT" {
                            spec.push_str(" --reject-with icmp-port-unreachable");
                        }
                    }
                    let _ = writeln!(out, "-A {c} {}", spec.trim_end());
                }
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    #[test]
    fn equal_after_respelling() {
        let input = input("cluster.yaml", &[]);
        let planned = plan(&input, IpFamily::V4).expect("plan");
        let kernel = parse_save_tables(&as_saved(&planned));
        let fd = compare(&planned, &kernel);
        assert!(fd.chains.is_empty(), "{:?}", fd.chains);
        assert!(fd.rules_compared > 20);
    }

    #[test]
    fn missing_extra_and_changed_chains() {
        let input = input("cluster.yaml", &[]);
        let planned = plan(&input, IpFamily::V4).expect("plan");
        let saved = as_saved(&planned);
        let svc = planned.tables["nat"]
            .keys()
            .find(|c| c.starts_with("KUBE-SVC-"))
            .expect("a SVC chain")
            .clone();
        // Someone deleted a service chain (and the jump to it), left a stale
        // chain, and changed a probability.
        let mut tampered: Vec<String> = saved
            .lines()
            .filter(|l| !l.contains(&svc))
            .map(str::to_string)
            .collect();
        let commit = tampered
            .iter()
            .rposition(|l| l == "COMMIT")
            .expect("commit");
        tampered.insert(commit, ":KUBE-SEP-AAAAAAAAAAAAAAAA - [0:0]".into());
        tampered.insert(
            commit + 1,
            "-A KUBE-SEP-AAAAAAAAAAAAAAAA -j DNAT --to-destination 10.9.9.9:80".into(),
        );
        let tampered = tampered
            .join("\n")
            .replace("--probability 0.5000000000", "--probability 0.25");
        let fd = compare(&planned, &parse_save_tables(&tampered));
        let report = Report {
            source: "cluster.yaml".into(),
            families: vec![FamilyDiff {
                backend: "test".into(),
                ..fd
            }],
        };
        golden("diff.golden.txt", &render_text(&report, Style::default()));
        let v: Value = serde_json::from_str(&render_json(&report)).expect("json");
        assert_eq!(v["equal"], false);
        let statuses: Vec<&str> = v["families"][0]["chains"]
            .as_array()
            .expect("chains")
            .iter()
            .filter_map(|c| c["status"].as_str())
            .collect();
        assert!(
            statuses.contains(&"missing") && statuses.contains(&"extra"),
            "{statuses:?}"
        );
    }

    #[test]
    fn nodeport_jump_must_be_last() {
        let input = input("cluster.yaml", &[]);
        let planned = plan(&input, IpFamily::V4).expect("plan");
        let mut kernel = parse_save_tables(&as_saved(&planned));
        if let Some(rules) = kernel
            .get_mut("nat")
            .and_then(|t| t.chains.get_mut(KUBE_SERVICES))
        {
            rules.rotate_right(1);
        }
        let fd = compare(&planned, &kernel);
        assert!(
            matches!(fd.chains.as_slice(), [c] if matches!(c.lines.as_slice(), [Line::Note(_)])),
            "{:?}",
            fd.chains
        );
    }
}
