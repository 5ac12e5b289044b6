//! iptables rule specs as data: the planner's text (`-A CHAIN <spec>`) and
//! `iptables-save`'s spelling of the same rule parse into one [`Rule`], whose
//! [`Rule::canonical`] form is equal for both. The kernel reorders and
//! respells what it was given: `-d 10.0.0.1` comes back as `-d 10.0.0.1/32`
//! before the matches, `--probability 0.3333333333` as `0.33333333349`,
//! `-j MARK --or-mark 0x4000` as `--set-xmark 0x4000/0x4000`, and `-m recent`
//! gains its default `--mask`/`--rsource`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ipnet::IpNet;

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
