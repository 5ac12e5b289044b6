//! Rule normalisation: the planner's text (`-A CHAIN <spec>`) and
//! `iptables-save`'s spelling of the same rule parse into one [`Rule`], whose
//! [`Rule::canonical`] form is equal for both. The kernel reorders and
//! respells what it was given: `-d 10.0.0.1` comes back as `-d 10.0.0.1/32`
//! before the matches, `--probability 0.3333333333` as `0.33333333349`,
//! `-j MARK --or-mark 0x4000` as `--set-xmark 0x4000/0x4000`, and `-m recent`
//! gains its default `--mask`/`--rsource`.
//!
//! Used by `kproxy diff` (planned against kernel) and by the proxier's first
//! full sync, which leaves chains whose rules already equal the plan
//! untouched ([`unchanged_chains`]) so their counters survive a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use ipnet::IpNet;

use crate::planner::{Dispatch, Table, KUBE_NODEPORTS, KUBE_SERVICES};

/// One option: `[!] --name [values…]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opt {
    pub negated: bool,
    pub name: String,
    pub values: Vec<String>,
}

impl Opt {
    pub fn value(&self) -> &str {
        self.values.first().map(String::as_str).unwrap_or_default()
    }
}

/// A match module (`-m name` and its options).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    pub opts: Vec<Opt>,
}

impl Module {
    pub fn opt(&self, name: &str) -> Option<&Opt> {
        self.opts.iter().find(|o| o.name == name)
    }
}

/// A parsed rule spec (everything after `-A CHAIN`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The spec as written.
    pub text: String,
    /// `-s -d -i -o -p` (long names folded to these), in the order given.
    pub base: Vec<Opt>,
    pub modules: Vec<Module>,
    /// `-j NAME` with its options; `None` for a rule without a target.
    pub target: Option<Module>,
}

/// Splits a rule spec like a shell would for iptables-save output: double
/// quotes group (with `\"` and `\\` escapes), whitespace separates.
pub fn tokenize(spec: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_token = false;
    let mut quoted = false;
    let mut chars = spec.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_token = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_token {
                    out.push(std::mem::take(&mut cur));
                    in_token = false;
                }
            }
            c => {
                cur.push(c);
                in_token = true;
            }
        }
    }
    if in_token {
        out.push(cur);
    }
    out
}

fn base_name(token: &str) -> Option<&'static str> {
    Some(match token {
        "-s" | "--source" | "--src" => "-s",
        "-d" | "--destination" | "--dst" => "-d",
        "-i" | "--in-interface" => "-i",
        "-o" | "--out-interface" => "-o",
        "-p" | "--protocol" => "-p",
        _ => return None,
    })
}

impl Rule {
    pub fn parse(spec: &str) -> Rule {
        let tokens = tokenize(spec);
        let mut rule = Rule {
            text: spec.trim().to_string(),
            base: Vec::new(),
            modules: Vec::new(),
            target: None,
        };
        #[derive(Clone, Copy)]
        enum Cur {
            Base,
            Module,
            Target,
        }
        let mut cur = Cur::Base;
        let mut negated = false;
        let mut i = 0;
        while i < tokens.len() {
            let t = tokens[i].as_str();
            i += 1;
            if t == "!" {
                negated = true;
                continue;
            }
            if t == "-m" || t == "--match" {
                let name = tokens.get(i).cloned().unwrap_or_default();
                i += 1;
                rule.modules.push(Module {
                    name,
                    opts: Vec::new(),
                });
                cur = Cur::Module;
                negated = false;
                continue;
            }
            if t == "-j" || t == "--jump" {
                let name = tokens.get(i).cloned().unwrap_or_default();
                i += 1;
                rule.target = Some(Module {
                    name,
                    opts: Vec::new(),
                });
                cur = Cur::Target;
                negated = false;
                continue;
            }
            if let Some(name) = base_name(t) {
                let value = tokens.get(i).cloned().unwrap_or_default();
                i += 1;
                rule.base.push(Opt {
                    negated,
                    name: name.to_string(),
                    values: vec![value],
                });
                negated = false;
                continue;
            }
            // An option of the current module or target with its values.
            let mut values = Vec::new();
            while let Some(v) = tokens.get(i) {
                if v == "!" || (v.starts_with('-') && v.len() > 1 && !is_number(v)) {
                    break;
                }
                values.push(v.clone());
                i += 1;
            }
            let opt = Opt {
                negated,
                name: t.to_string(),
                values,
            };
            negated = false;
            match cur {
                Cur::Base => rule.base.push(opt),
                Cur::Module => {
                    if let Some(m) = rule.modules.last_mut() {
                        m.opts.push(opt);
                    }
                }
                Cur::Target => {
                    if let Some(t) = rule.target.as_mut() {
                        t.opts.push(opt);
                    }
                }
            }
        }
        rule
    }

    pub fn module(&self, name: &str) -> Option<&Module> {
        self.modules.iter().find(|m| m.name == name)
    }

    pub fn target_name(&self) -> Option<&str> {
        self.target.as_ref().map(|t| t.name.as_str())
    }

    /// The comment (`-m comment --comment X`), if any.
    pub fn comment(&self) -> Option<&str> {
        self.module("comment")
            .and_then(|m| m.opt("--comment"))
            .map(Opt::value)
    }

    /// A spelling that is the same for the planner's text and for what
    /// iptables-save prints after the kernel loaded it.
    pub fn canonical(&self) -> String {
        let mut out = String::new();
        let order = ["-s", "-d", "-i", "-o", "-p"];
        let mut base: Vec<&Opt> = self.base.iter().collect();
        base.sort_by_key(|o| {
            order
                .iter()
                .position(|n| *n == o.name)
                .unwrap_or(order.len())
        });
        for o in base {
            let value = match o.name.as_str() {
                "-s" | "-d" => canonical_net(o.value()),
                "-p" => o.value().to_ascii_lowercase(),
                _ => o.value().to_string(),
            };
            push_opt(&mut out, o.negated, &o.name, &[value]);
        }
        for m in &self.modules {
            let _ = write!(out, " -m {}", m.name);
            let mut opts: BTreeMap<String, (bool, Vec<String>)> = BTreeMap::new();
            for o in &m.opts {
                let values: Vec<String> = match (m.name.as_str(), o.name.as_str()) {
                    ("statistic", "--probability") => vec![canonical_probability(o.value())],
                    ("recent", "--mask") if is_full_mask(o.value()) => continue,
                    ("recent", "--rsource") => continue,
                    _ => o.values.clone(),
                };
                opts.insert(o.name.clone(), (o.negated, values));
            }
            for (name, (neg, values)) in opts {
                push_opt(&mut out, neg, &name, &values);
            }
        }
        if let Some(t) = &self.target {
            let _ = write!(out, " -j {}", t.name);
            let mut opts: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for o in &t.opts {
                match (t.name.as_str(), o.name.as_str()) {
                    ("MARK", "--or-mark") => {
                        let v = canonical_hex(o.value());
                        opts.insert("--set-xmark".into(), vec![format!("{v}/{v}")]);
                    }
                    ("MARK", "--xor-mark") => {
                        let v = canonical_hex(o.value());
                        opts.insert("--set-xmark".into(), vec![format!("{v}/0x0")]);
                    }
                    ("MARK", "--set-xmark") | ("MARK", "--set-mark") => {
                        let (v, m) = o
                            .value()
                            .split_once('/')
                            .unwrap_or((o.value(), "0xffffffff"));
                        opts.insert(
                            "--set-xmark".into(),
                            vec![format!("{}/{}", canonical_hex(v), canonical_hex(m))],
                        );
                    }
                    ("REJECT", "--reject-with")
                        if matches!(
                            o.value(),
                            "icmp-port-unreachable" | "icmp6-port-unreachable"
                        ) => {}
                    _ => {
                        opts.insert(o.name.clone(), o.values.clone());
                    }
                }
            }
            for (name, values) in opts {
                push_opt(&mut out, false, &name, &values);
            }
        }
        out.trim_start().to_string()
    }
}

fn is_number(s: &str) -> bool {
    s.parse::<f64>().is_ok()
}

fn push_opt(out: &mut String, negated: bool, name: &str, values: &[String]) {
    if negated {
        out.push_str(" !");
    }
    out.push(' ');
    out.push_str(name);
    for v in values {
        out.push(' ');
        if v.is_empty() || v.contains(char::is_whitespace) || v.contains('"') {
            let _ = write!(out, "\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""));
        } else {
            out.push_str(v);
        }
    }
}

/// `10.0.0.1` → `10.0.0.1/32`; a CIDR as its network; anything else as is.
pub fn canonical_net(s: &str) -> String {
    if let Ok(net) = s.parse::<IpNet>() {
        return net.trunc().to_string();
    }
    match s.parse::<std::net::IpAddr>() {
        Ok(ip) => IpNet::from(ip).to_string(),
        Err(_) => s.to_string(),
    }
}

/// The probability as the kernel stores it (xt_statistic: a u32 of 2^31ths).
fn canonical_probability(s: &str) -> String {
    match s.parse::<f64>() {
        Ok(p) => format!("{}", (p * 2_147_483_648.0).round() as u64),
        Err(_) => s.to_string(),
    }
}

fn canonical_hex(s: &str) -> String {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse::<u32>().ok(),
    };
    parsed.map_or_else(|| s.to_string(), |v| format!("{v:#x}"))
}

fn is_full_mask(s: &str) -> bool {
    s == "255.255.255.255" || s.eq_ignore_ascii_case("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")
}

/// Parses a `0x4000/0x4000` style mark match into (value, mask).
pub fn parse_mark(s: &str) -> Option<(u32, u32)> {
    let (v, m) = s.split_once('/').unwrap_or((s, "0xffffffff"));
    let num = |x: &str| match x.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => x.parse().ok(),
    };
    Some((num(v)?, num(m)?))
}

/// The canonical form of one rule spec (the text after `-A CHAIN`).
pub fn normalize(spec: &str) -> String {
    Rule::parse(spec).canonical()
}

/// Ordered chains (everything but the dispatch chains): equal rule by rule.
pub fn same_rules<W: AsRef<str>>(want: &[W], have: &[String]) -> bool {
    want.len() == have.len()
        && want
            .iter()
            .map(AsRef::as_ref)
            .zip(have)
            .all(|(w, h)| w == h.as_str() || normalize(w) == normalize(h))
}

/// Dispatch chains: the same rules as a multiset (partial syncs insert into
/// them, so their order is not the full plan's), and the last `tail` rules
/// the same and in the same order (nat KUBE-SERVICES' NodePort jump must
/// stay last).
pub fn same_rule_set<W: AsRef<str>>(want: &[W], have: &[String], tail: usize) -> bool {
    if want.len() != have.len() || tail > want.len() {
        return false;
    }
    let mut w: Vec<String> = want.iter().map(|r| normalize(r.as_ref())).collect();
    let mut h: Vec<String> = have.iter().map(|r| normalize(r)).collect();
    if w[w.len() - tail..] != h[h.len() - tail..] {
        return false;
    }
    w.sort_unstable();
    h.sort_unstable();
    w == h
}

/// Whether `chain` of `table` is a dispatch chain (compared as a set).
pub fn is_dispatch(table: Table, chain: &str) -> bool {
    Dispatch::ALL
        .iter()
        .any(|d| d.table() == table && d.chain() == chain)
}

/// A chain the kernel holds, as [`unchanged_chains`] compares it: dispatch
/// chains with their rules (compared as a set), every other chain as a
/// digest of its normalized rules in order. A restart onto 120k rules then
/// does not keep their text beside the full plan (≈ 20 MB at 10k services).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeldChain {
    Rules(Vec<String>),
    Digest { rules: usize, hash: u64 },
}

impl HeldChain {
    /// `rules` as `iptables-save` prints them (without `-A CHAIN`).
    pub fn new(table: Table, chain: &str, rules: Vec<String>) -> Self {
        if is_dispatch(table, chain) {
            HeldChain::Rules(rules)
        } else {
            HeldChain::Digest {
                rules: rules.len(),
                hash: normalized_digest(&rules),
            }
        }
    }
}

/// Chains the kernel holds, by table and name.
pub type HeldChains = BTreeMap<(Table, String), HeldChain>;

/// [`HeldChain`]s of rules per chain as `iptables-save` prints them.
pub fn held_chains(rules: BTreeMap<(Table, String), Vec<String>>) -> HeldChains {
    rules
        .into_iter()
        .map(|((t, c), r)| {
            let held = HeldChain::new(t, &c, r);
            ((t, c), held)
        })
        .collect()
}

/// The [`HeldChain`]s of `table` in `iptables-save` output, read line by
/// line: the rules of digested chains are never held, only the text.
pub fn held_chains_in_save(table: Table, text: &str) -> HeldChains {
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};
    enum Acc {
        Rules(Vec<String>),
        Digest(usize, DefaultHasher),
    }
    let new_acc = |chain: &str| {
        if is_dispatch(table, chain) {
            Acc::Rules(Vec::new())
        } else {
            Acc::Digest(0, DefaultHasher::new())
        }
    };
    let mut chains: BTreeMap<&str, Acc> = BTreeMap::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix('*') {
            inside = name.trim() == table.as_str();
        } else if !inside {
            continue;
        } else if let Some(decl) = line.strip_prefix(':') {
            if let Some(chain) = decl.split_whitespace().next() {
                chains.entry(chain).or_insert_with(|| new_acc(chain));
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
            match chains.entry(chain).or_insert_with(|| new_acc(chain)) {
                Acc::Rules(rules) => rules.push(spec.to_string()),
                Acc::Digest(n, h) => {
                    *n += 1;
                    normalize(spec).hash(h);
                }
            }
        }
    }
    chains
        .into_iter()
        .map(|(chain, acc)| {
            let held = match acc {
                Acc::Rules(rules) => HeldChain::Rules(rules),
                Acc::Digest(rules, h) => HeldChain::Digest {
                    rules,
                    hash: h.finish(),
                },
            };
            ((table, chain.to_string()), held)
        })
        .collect()
}

/// A hash of the rules' normalized forms, in order (`str`'s `Hash` ends
/// each with a terminator, so rule boundaries count). SipHash-1-3 with
/// fixed keys: a collision would only keep a chain another full sync
/// rewrites.
fn normalized_digest<W: AsRef<str>>(rules: &[W]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for r in rules {
        normalize(r.as_ref()).hash(&mut h);
    }
    h.finish()
}

/// The chains of `desired` (a full plan's chains with their rules, as
/// [`crate::planner::Plan::rules_by_chain`] lists them) whose rules the
/// kernel already holds. Chains missing from the kernel are never
/// unchanged.
pub fn unchanged_chains<C, W>(
    desired: &BTreeMap<(Table, C), Vec<W>>,
    kernel: &HeldChains,
) -> BTreeSet<(Table, String)>
where
    C: AsRef<str>,
    W: AsRef<str>,
{
    desired
        .iter()
        .filter_map(|((table, chain), want)| {
            let key = (*table, chain.as_ref().to_string());
            let have = kernel.get(&key)?;
            let (table, chain) = (*table, chain.as_ref());
            let same = match have {
                HeldChain::Digest { rules, hash } => {
                    want.len() == *rules && normalized_digest(want) == *hash
                }
                HeldChain::Rules(have) if !is_dispatch(table, chain) => same_rules(want, have),
                HeldChain::Rules(have) => {
                    let tail = if table == Table::Nat && chain == KUBE_SERVICES {
                        want.iter()
                            .rev()
                            .take_while(|r| {
                                Rule::parse(r.as_ref()).target_name() == Some(KUBE_NODEPORTS)
                            })
                            .count()
                    } else {
                        0
                    };
                    same_rule_set(want, have, tail)
                }
            };
            same.then_some(key)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planner_and_iptables_save_spellings_agree() {
        let pairs = [
            (
                r#"-m comment --comment "default/web:http cluster IP" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-SVC-ABC"#,
                r#"-d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-ABC"#,
            ),
            (
                r#"-m comment --comment "default/web:http -> 10.244.1.11:8080" -m statistic --mode random --probability 0.3333333333 -m tcp -p tcp -j DNAT --to-destination 10.244.1.11:8080"#,
                r#"-p tcp -m comment --comment "default/web:http -> 10.244.1.11:8080" -m statistic --mode random --probability 0.33333333349 -m tcp -j DNAT --to-destination 10.244.1.11:8080"#,
            ),
            (
                "-j MARK --or-mark 0x4000",
                "-j MARK --set-xmark 0x4000/0x4000",
            ),
            (
                "-m mark ! --mark 0x4000/0x4000 -j RETURN",
                "-m mark ! --mark 0x4000/0x4000 -j RETURN",
            ),
            ("-j MARK --xor-mark 0x4000", "-j MARK --set-xmark 0x4000/0x0"),
            (
                r#"-m comment --comment "x has no endpoints" -m tcp -p tcp -d 10.96.0.11 --dport 80 -j REJECT"#,
                r#"-d 10.96.0.11/32 -p tcp -m comment --comment "x has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable"#,
            ),
            (
                "-m recent --name KUBE-SEP-X --rcheck --seconds 10800 --reap -j KUBE-SEP-X",
                "-m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-X --mask 255.255.255.255 --rsource -j KUBE-SEP-X",
            ),
            (
                r#"-m comment --comment "a" ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"#,
                "! -s 10.244.0.0/16 -m comment --comment a -j KUBE-MARK-MASQ",
            ),
        ];
        for (planner, saved) in pairs {
            assert_eq!(
                Rule::parse(planner).canonical(),
                Rule::parse(saved).canonical(),
                "{planner}"
            );
        }
        assert_ne!(
            Rule::parse("-d 10.0.0.1 -j DROP").canonical(),
            Rule::parse("-d 10.0.0.2 -j DROP").canonical()
        );
    }

    /// Rule shapes the planner emits, with the spelling iptables-save (1.8,
    /// legacy and nft alike) gives them back; pairs taken from the golden
    /// plans loaded into a real kernel (tests/normalize_netns.rs).
    #[test]
    fn every_planner_rule_shape_matches_its_saved_spelling() {
        let pairs = [
            // udp / sctp dispatch with an unquoted single-word comment.
            (
                r#"-m comment --comment "kube-system/dns:dns-sctp cluster IP" -m sctp -p sctp -d 172.30.0.10 --dport 53 -j KUBE-SVC-HZ73NAJGZTXWZUS4"#,
                r#"-d 172.30.0.10/32 -p sctp -m comment --comment "kube-system/dns:dns-sctp cluster IP" -m sctp --dport 53 -j KUBE-SVC-HZ73NAJGZTXWZUS4"#,
            ),
            (
                "-m comment --comment ns11/np:p80 -m udp -p udp --dport 30051 -j KUBE-EXT-W2GP53KUIJT7PYOK",
                r#"-p udp -m comment --comment "ns11/np:p80" -m udp --dport 30051 -j KUBE-EXT-W2GP53KUIJT7PYOK"#,
            ),
            // Masquerade check: negated source before the destination.
            (
                r#"-m comment --comment "ns/s:p cluster IP" -m tcp -p tcp -d 172.30.0.10 --dport 53 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ"#,
                r#"! -s 10.0.0.0/8 -d 172.30.0.10/32 -p tcp -m comment --comment "ns/s:p cluster IP" -m tcp --dport 53 -j KUBE-MARK-MASQ"#,
            ),
            // Probabilities: ten digits in, eleven out.
            (
                r#"-m comment --comment "a -> 10.180.0.10:53" -m statistic --mode random --probability 0.5000000000 -m tcp -p tcp -j DNAT --to-destination 10.180.0.10:53"#,
                r#"-p tcp -m comment --comment "a -> 10.180.0.10:53" -m statistic --mode random --probability 0.50000000000 -m tcp -j DNAT --to-destination 10.180.0.10:53"#,
            ),
            (
                "-m statistic --mode random --probability 0.0039215686 -j KUBE-SEP-X",
                "-m statistic --mode random --probability 0.00392156839 -j KUBE-SEP-X",
            ),
            // Recent: --set / --update with the defaults the kernel adds.
            (
                r#"-m comment --comment "a -> 10.180.6.6:80" -m recent --name KUBE-SEP-XUKPIZM2I4RCMN36 --update --seconds 10800 --reap -m tcp -p tcp -j DNAT --to-destination 10.180.6.6:80"#,
                r#"-p tcp -m comment --comment "a -> 10.180.6.6:80" -m recent --update --seconds 10800 --reap --name KUBE-SEP-XUKPIZM2I4RCMN36 --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.180.6.6:80"#,
            ),
            (
                "-m comment --comment ns6/sticky:p80 -m recent --name KUBE-SEP-77LXHHCFSM7GOGGL --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.6:80",
                r#"-p tcp -m comment --comment "ns6/sticky:p80" -m recent --set --name KUBE-SEP-77LXHHCFSM7GOGGL --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.180.0.6:80"#,
            ),
            // addrtype, with and without a negated destination.
            (
                r#"-m comment --comment "x" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS"#,
                r#"! -d 127.0.0.0/8 -m comment --comment x -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"#,
            ),
            (
                r#"-m comment --comment "e has no endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30044 -j REJECT"#,
                r#"-p tcp -m comment --comment "e has no endpoints" -m addrtype --dst-type LOCAL -m tcp --dport 30044 -j REJECT --reject-with icmp-port-unreachable"#,
            ),
            // Interface match with a wildcard; a rule without a target.
            (
                r#"-m comment --comment "pod traffic" -i veth+ -j KUBE-SVC-4E6AMDTVI625QEQF"#,
                r#"-i veth+ -m comment --comment "pod traffic" -j KUBE-SVC-4E6AMDTVI625QEQF"#,
            ),
            (
                r#"-m comment --comment "other traffic will be dropped""#,
                r#"-m comment --comment "other traffic will be dropped""#,
            ),
            // Firewall DROP, conntrack negation, MASQUERADE --random-fully.
            (
                r#"-m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"#,
                r#"! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"#,
            ),
            (
                r#"-m comment --comment "snat" -j MASQUERADE --random-fully"#,
                "-m comment --comment snat -j MASQUERADE --random-fully",
            ),
            // IPv6: /128, bracketed DNAT target, icmp6 reject default.
            (
                r#"-m comment --comment "ns9/v6:p80 cluster IP" -m tcp -p tcp -d fd00:10:96::9 --dport 80 -j KUBE-SVC-MOQFNJPM3T2YGQNS"#,
                r#"-d fd00:10:96::9/128 -p tcp -m comment --comment "ns9/v6:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-MOQFNJPM3T2YGQNS"#,
            ),
            (
                "-m comment --comment ns9/v6:p80 -m tcp -p tcp -j DNAT --to-destination [fd00:10:244::9]:8080",
                r#"-p tcp -m comment --comment "ns9/v6:p80" -m tcp -j DNAT --to-destination [fd00:10:244::9]:8080"#,
            ),
            (
                "-m comment --comment ns9/v6:p80 -s fd00:10:244::9 -j KUBE-MARK-MASQ",
                r#"-s fd00:10:244::9/128 -m comment --comment "ns9/v6:p80" -j KUBE-MARK-MASQ"#,
            ),
            (
                r#"-m comment --comment "v6 has no endpoints" -m tcp -p tcp -d fd00::1 --dport 80 -j REJECT"#,
                r#"-d fd00::1/128 -p tcp -m comment --comment "v6 has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp6-port-unreachable"#,
            ),
            (
                "-m recent --name KUBE-SEP-X --rcheck --seconds 60 --reap -j KUBE-SEP-X",
                "-m recent --rcheck --seconds 60 --reap --name KUBE-SEP-X --mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource -j KUBE-SEP-X",
            ),
        ];
        for (planner, saved) in pairs {
            assert_eq!(normalize(planner), normalize(saved), "{planner}");
        }
    }

    #[test]
    fn real_differences_stay_different() {
        let base = r#"-m comment --comment "a -> 10.1.0.1:80" -m statistic --mode random --probability 0.5000000000 -m tcp -p tcp -j DNAT --to-destination 10.1.0.1:80"#;
        let variants = [
            base.replace("0.5000000000", "0.3333333333"),
            base.replace("10.1.0.1:80\" -m", "10.1.0.2:80\" -m"),
            base.replace(
                "--to-destination 10.1.0.1:80",
                "--to-destination 10.1.0.1:81",
            ),
            base.replace("-p tcp", "-p udp"),
            base.replace(" -m statistic --mode random --probability 0.5000000000", ""),
        ];
        for v in &variants {
            assert_ne!(normalize(base), normalize(v), "{v}");
        }
        let pairs = [
            ("-s 10.0.0.0/8 -j X", "! -s 10.0.0.0/8 -j X"),
            ("-d 10.0.0.1 -j X", "-d 10.0.0.0/24 -j X"),
            ("-j MARK --or-mark 0x4000", "-j MARK --set-xmark 0x4000/0x0"),
            ("-j MARK --or-mark 0x4000", "-j MARK --or-mark 0x8000"),
            (
                "-m recent --name A --set -j DNAT --to-destination 1.1.1.1:1",
                "-m recent --name A --rcheck -j DNAT --to-destination 1.1.1.1:1",
            ),
            ("-j REJECT", "-j REJECT --reject-with icmp-host-prohibited"),
            ("-j KUBE-SVC-A", "-j KUBE-SVC-B"),
            (
                "-m comment --comment \"a b\" -j X",
                "-m comment --comment a -j X",
            ),
        ];
        for (a, b) in pairs {
            assert_ne!(normalize(a), normalize(b), "{a} vs {b}");
        }
    }

    fn owned(rules: &[&str]) -> Vec<String> {
        rules.iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn chain_comparison_ordered_and_dispatch() {
        let a = "-m comment --comment a -d 10.0.0.1 -j KUBE-SVC-A";
        let a_saved = "-d 10.0.0.1/32 -m comment --comment a -j KUBE-SVC-A";
        let b = "-m comment --comment b -d 10.0.0.2 -j KUBE-SVC-B";
        let b_saved = "-d 10.0.0.2/32 -m comment --comment b -j KUBE-SVC-B";
        let np = "-m comment --comment np -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS";
        let np_saved = "-m comment --comment np -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS";

        assert!(same_rules(&owned(&[a, b]), &owned(&[a_saved, b_saved])));
        assert!(
            !same_rules(&owned(&[a, b]), &owned(&[b_saved, a_saved])),
            "order matters in service chains (probabilities)"
        );
        assert!(!same_rules(&owned(&[a, b]), &owned(&[a_saved])));
        assert!(same_rules::<String>(&[], &[]));

        // Dispatch: any order of the service rules, the NodePort jump last.
        assert!(same_rule_set(
            &owned(&[a, b, np]),
            &owned(&[b_saved, a_saved, np_saved]),
            1
        ));
        assert!(!same_rule_set(
            &owned(&[a, b, np]),
            &owned(&[np_saved, b_saved, a_saved]),
            1
        ));
        assert!(!same_rule_set(
            &owned(&[a, b, np]),
            &owned(&[a_saved, a_saved, np_saved]),
            1
        ));
        assert!(!same_rule_set(&owned(&[a]), &owned(&[a_saved]), 2));

        let key = |t: Table, c: &str| (t, c.to_string());
        let desired: BTreeMap<(Table, String), Vec<String>> = [
            (key(Table::Nat, "KUBE-SERVICES"), owned(&[a, b, np])),
            (key(Table::Nat, "KUBE-SVC-A"), owned(&[a])),
            (key(Table::Nat, "KUBE-SVC-B"), owned(&[b])),
            (key(Table::Nat, "KUBE-SVC-C"), owned(&[])),
            (key(Table::Filter, "KUBE-SERVICES"), owned(&[])),
            (key(Table::Filter, "KUBE-PROXY-CANARY"), owned(&[])),
        ]
        .into_iter()
        .collect();
        let kernel: BTreeMap<(Table, String), Vec<String>> = [
            (
                key(Table::Nat, "KUBE-SERVICES"),
                owned(&[b_saved, a_saved, np_saved]),
            ),
            (key(Table::Nat, "KUBE-SVC-A"), owned(&[a_saved])),
            (key(Table::Nat, "KUBE-SVC-B"), owned(&[a_saved])),
            (key(Table::Filter, "KUBE-SERVICES"), owned(&[b_saved])),
            (key(Table::Filter, "KUBE-PROXY-CANARY"), owned(&[])),
        ]
        .into_iter()
        .collect();
        let unchanged = unchanged_chains(&desired, &held_chains(kernel));
        assert_eq!(
            unchanged,
            [
                key(Table::Filter, "KUBE-PROXY-CANARY"),
                key(Table::Nat, "KUBE-SERVICES"),
                key(Table::Nat, "KUBE-SVC-A"),
            ]
            .into_iter()
            .collect::<BTreeSet<_>>(),
            "changed (SVC-B, filter KUBE-SERVICES) and missing (SVC-C) chains are rewritten"
        );
        assert!(is_dispatch(Table::Filter, "KUBE-PROXY-FIREWALL"));
        assert!(!is_dispatch(Table::Nat, "KUBE-PROXY-FIREWALL"));
    }

    #[test]
    fn held_chains_read_from_save_text_equal_those_of_parsed_rules() {
        let text = "*filter\n:KUBE-FORWARD - [0:0]\n-A KUBE-FORWARD -j ACCEPT\nCOMMIT\n\
                    *nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-A - [0:0]\n:KUBE-SVC-E - [0:0]\n\
                    -A PREROUTING -j KUBE-SERVICES\n\
                    -A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-A\n\
                    -A KUBE-SVC-A -p tcp -m tcp -j DNAT --to-destination 10.1.0.1:80\n\
                    -A KUBE-SVC-A -j KUBE-MARK-MASQ\nCOMMIT\n";
        for table in [Table::Nat, Table::Filter] {
            let parsed: BTreeMap<(Table, String), Vec<String>> =
                crate::runner::parse_save_tables(text)
                    .remove(table.as_str())
                    .unwrap_or_default()
                    .chains
                    .into_iter()
                    .map(|(c, r)| ((table, c), r))
                    .collect();
            let streamed = held_chains_in_save(table, text);
            assert_eq!(streamed, held_chains(parsed), "{table:?}");
        }
        let nat = held_chains_in_save(Table::Nat, text);
        assert!(matches!(
            nat.get(&(Table::Nat, "KUBE-SVC-E".to_string())),
            Some(HeldChain::Digest { rules: 0, .. })
        ));
        assert!(matches!(
            nat.get(&(Table::Nat, "KUBE-SERVICES".to_string())),
            Some(HeldChain::Rules(r)) if r.len() == 1
        ));
    }

    #[test]
    fn parse_structure() {
        let r = Rule::parse(
            r#"-m comment --comment "ns/s:p external IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j KUBE-EXT-X"#,
        );
        assert_eq!(r.comment(), Some("ns/s:p external IP"));
        assert_eq!(
            r.base.iter().find(|o| o.name == "-d").map(Opt::value),
            Some("1.2.3.4")
        );
        assert_eq!(
            r.module("tcp")
                .and_then(|m| m.opt("--dport"))
                .map(Opt::value),
            Some("80")
        );
        assert_eq!(r.target_name(), Some("KUBE-EXT-X"));
        assert_eq!(parse_mark("0x4000/0x4000"), Some((0x4000, 0x4000)));
        assert_eq!(tokenize(r#"a "b \"c\"" d"#), ["a", "b \"c\"", "d"]);
    }
}
