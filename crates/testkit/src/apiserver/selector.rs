//! Label and field selectors with the grammar of the real API server.

use std::collections::BTreeSet;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unable to parse requirement: {0}")]
pub struct SelectorError(pub String);

/// One label requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Exists(String),
    DoesNotExist(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

impl Requirement {
    fn matches(&self, labels: &serde_json::Map<String, Value>) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        match self {
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            // As upstream: a missing label satisfies `!=` and `notin`.
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, set) => get(k).is_some_and(|v| set.contains(v)),
            Requirement::NotIn(k, set) => !get(k).is_some_and(|v| set.contains(v)),
            Requirement::GreaterThan(k, n) => get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v > *n),
            Requirement::LessThan(k, n) => get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v < *n),
        }
    }
}

/// A parsed label selector: all requirements must hold. Empty matches all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Not,
    Eq,
    DoubleEq,
    NotEq,
    Gt,
    Lt,
    Open,
    Close,
    Comma,
}

fn lex(input: &str) -> Result<Vec<Token>, SelectorError> {
    let mut tokens = Vec::new();
    let chars: Vec<char> = input.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            c if c.is_whitespace() => i += 1,
            '!' if next == Some('=') => {
                tokens.push(Token::NotEq);
                i += 2;
            }
            '!' => {
                tokens.push(Token::Not);
                i += 1;
            }
            '=' if next == Some('=') => {
                tokens.push(Token::DoubleEq);
                i += 2;
            }
            '=' => {
                tokens.push(Token::Eq);
                i += 1;
            }
            '>' => {
                tokens.push(Token::Gt);
                i += 1;
            }
            '<' => {
                tokens.push(Token::Lt);
                i += 1;
            }
            '(' => {
                tokens.push(Token::Open);
                i += 1;
            }
            ')' => {
                tokens.push(Token::Close);
                i += 1;
            }
            ',' => {
                tokens.push(Token::Comma);
                i += 1;
            }
            _ => {
                let start = i;
                while i < chars.len() && !"!=<>(), \t\n\r".contains(chars[i]) {
                    i += 1;
                }
                tokens.push(Token::Ident(chars[start..i].iter().collect()));
            }
        }
    }
    Ok(tokens)
}

fn valid_key(k: &str) -> bool {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c))
    });
    name_ok && prefix_ok
}

fn valid_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        match self.next() {
            Some(Token::Ident(k)) if valid_key(&k) => Ok(k),
            Some(Token::Ident(k)) => Err(SelectorError(format!("invalid label key {k:?}"))),
            other => Err(SelectorError(format!(
                "expected a label key, found {other:?}"
            ))),
        }
    }

    fn value(&mut self) -> Result<String, SelectorError> {
        // An empty value (`k=` or `k in (a,)`) is legal.
        let v = match self.peek() {
            Some(Token::Ident(v)) => v.clone(),
            _ => return Ok(String::new()),
        };
        self.pos += 1;
        if valid_value(&v) {
            Ok(v)
        } else {
            Err(SelectorError(format!("invalid label value {v:?}")))
        }
    }

    fn set(&mut self) -> Result<BTreeSet<String>, SelectorError> {
        if self.next() != Some(Token::Open) {
            return Err(SelectorError("expected '(' after set operator".into()));
        }
        let mut set = BTreeSet::new();
        loop {
            set.insert(self.value()?);
            match self.next() {
                Some(Token::Comma) => continue,
                Some(Token::Close) => return Ok(set),
                other => {
                    return Err(SelectorError(format!(
                        "expected ',' or ')', found {other:?}"
                    )))
                }
            }
        }
    }

    fn integer(&mut self) -> Result<i64, SelectorError> {
        match self.next() {
            Some(Token::Ident(v)) => v
                .parse()
                .map_err(|_| SelectorError(format!("{v:?} is not an integer"))),
            other => Err(SelectorError(format!(
                "expected an integer, found {other:?}"
            ))),
        }
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        if self.peek() == Some(&Token::Not) {
            self.pos += 1;
            return Ok(Requirement::DoesNotExist(self.key()?));
        }
        let key = self.key()?;
        match self.peek().cloned() {
            None | Some(Token::Comma) => Ok(Requirement::Exists(key)),
            Some(Token::Eq | Token::DoubleEq) => {
                self.pos += 1;
                Ok(Requirement::Equals(key, self.value()?))
            }
            Some(Token::NotEq) => {
                self.pos += 1;
                Ok(Requirement::NotEquals(key, self.value()?))
            }
            Some(Token::Gt) => {
                self.pos += 1;
                Ok(Requirement::GreaterThan(key, self.integer()?))
            }
            Some(Token::Lt) => {
                self.pos += 1;
                Ok(Requirement::LessThan(key, self.integer()?))
            }
            Some(Token::Ident(op)) if op == "in" => {
                self.pos += 1;
                Ok(Requirement::In(key, self.set()?))
            }
            Some(Token::Ident(op)) if op == "notin" => {
                self.pos += 1;
                Ok(Requirement::NotIn(key, self.set()?))
            }
            Some(other) => Err(SelectorError(format!(
                "unexpected {other:?} after key {key:?}"
            ))),
        }
    }
}

impl LabelSelector {
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let mut p = Parser {
            tokens: lex(input)?,
            pos: 0,
        };
        let mut requirements = Vec::new();
        if p.tokens.is_empty() {
            return Ok(Self { requirements });
        }
        loop {
            requirements.push(p.requirement()?);
            match p.next() {
                None => return Ok(Self { requirements }),
                Some(Token::Comma) => continue,
                Some(other) => {
                    return Err(SelectorError(format!(
                        "expected ',' between requirements, found {other:?}"
                    )))
                }
            }
        }
    }

    /// Matches against an object's `metadata.labels`.
    pub fn matches(&self, obj: &Value) -> bool {
        let empty = serde_json::Map::new();
        let labels = obj
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        self.requirements.iter().all(|r| r.matches(labels))
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// The fields a field selector may name (others are rejected, as upstream
/// rejects fields a kind does not index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Name,
    Namespace,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRequirement {
    pub field: Field,
    pub value: String,
    pub negated: bool,
}

/// A parsed field selector: all requirements must hold. Empty matches all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    pub requirements: Vec<FieldRequirement>,
}

/// Splits on `sep` outside backslash escapes.
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                if let Some(last) = parts.last_mut() {
                    last.push('\\');
                    last.push(n);
                }
            }
        } else if c == sep {
            parts.push(String::new());
        } else if let Some(last) = parts.last_mut() {
            last.push(c);
        }
    }
    parts
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl FieldSelector {
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        if input.trim().is_empty() {
            return Ok(Self { requirements });
        }
        for part in split_unescaped(input, ',') {
            let (field, value, negated) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, false)
            } else {
                return Err(SelectorError(format!(
                    "invalid field selector requirement {part:?}"
                )));
            };
            let field = match field.trim() {
                "metadata.name" => Field::Name,
                "metadata.namespace" => Field::Namespace,
                other => return Err(SelectorError(format!("field label not supported: {other}"))),
            };
            requirements.push(FieldRequirement {
                field,
                value: unescape(value.trim()),
                negated,
            });
        }
        Ok(Self { requirements })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.requirements.iter().all(|r| {
            let pointer = match r.field {
                Field::Name => "/metadata/name",
                Field::Namespace => "/metadata/namespace",
            };
            let actual = obj.pointer(pointer).and_then(Value::as_str).unwrap_or("");
            (actual == r.value) != r.negated
        })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}})
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_every_operator() {
        let s = LabelSelector::parse("a, !b ,c=1,d==2,e!=3,f in (x, y),g notin (z),h>4,i<5,j=")
            .unwrap();
        assert_eq!(
            s.requirements,
            vec![
                Requirement::Exists("a".into()),
                Requirement::DoesNotExist("b".into()),
                Requirement::Equals("c".into(), "1".into()),
                Requirement::Equals("d".into(), "2".into()),
                Requirement::NotEquals("e".into(), "3".into()),
                Requirement::In("f".into(), set(&["x", "y"])),
                Requirement::NotIn("g".into(), set(&["z"])),
                Requirement::GreaterThan("h".into(), 4),
                Requirement::LessThan("i".into(), 5),
                Requirement::Equals("j".into(), "".into()),
            ]
        );
    }

    #[test]
    fn kube_proxy_selector() {
        let s = LabelSelector::parse(
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
        )
        .unwrap();
        assert!(s.matches(&obj(json!({"app": "x"}))));
        assert!(s.matches(&json!({"metadata": {"name": "nolabels"}})));
        assert!(!s.matches(&obj(json!({"service.kubernetes.io/headless": ""}))));
        assert!(!s.matches(&obj(
            json!({"service.kubernetes.io/service-proxy-name": "x"})
        )));
    }

    #[test]
    fn matching_semantics() {
        let labels = obj(json!({"app": "web", "tier": "fe", "n": "7"}));
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&labels);
        assert!(m(""));
        assert!(m("app"));
        assert!(!m("!app"));
        assert!(m("app=web,tier==fe"));
        assert!(!m("app=web,tier=be"));
        assert!(m("app!=db"));
        assert!(m("missing!=x"));
        assert!(m("app in (db,web)"));
        assert!(!m("app notin (db,web)"));
        assert!(m("missing notin (a)"));
        assert!(!m("missing in (a)"));
        assert!(m("n>6,n<8"));
        assert!(!m("n>7"));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "a=b=c", "in (a", "a in b", "a in (b", "!", "a b", "a=(", "a>x", ",a", "a,", "-bad",
            "a=-bad",
        ] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn field_selectors() {
        let o = obj(json!({}));
        let m = |s: &str| FieldSelector::parse(s).unwrap().matches(&o);
        assert!(m(""));
        assert!(m("metadata.name=a"));
        assert!(m("metadata.name==a,metadata.namespace=ns"));
        assert!(!m("metadata.name=b"));
        assert!(m("metadata.name!=b"));
        assert!(!m("metadata.namespace!=ns"));
        assert!(FieldSelector::parse("spec.foo=1").is_err());
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}
