//! Syntax checks for the fields that end up in backends' rule text.
//!
//! Everything that leaves the model (names, addresses, ports) passes one of
//! these checks first, so a hostile object (quotes, newlines, `-j ACCEPT`)
//! can never be spliced into an iptables-restore line or a netlink message.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

/// One invalid field of one object: `field value problem`, e.g.
/// `spec.clusterIP "10.0.0.300" is not an IP address`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value} {problem}")]
pub struct FieldError {
    pub field: String,
    /// Already quoted and truncated (see [`quote`]).
    pub value: String,
    pub problem: String,
}

impl FieldError {
    pub fn new(
        field: impl Into<String>,
        value: impl fmt::Debug,
        problem: impl Into<String>,
    ) -> Self {
        FieldError {
            field: field.into(),
            value: quote_debug(value),
            problem: problem.into(),
        }
    }

    /// For string values: quoted with escapes, truncated.
    pub fn str(field: impl Into<String>, value: &str, problem: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            value: quote(value),
            problem: problem.into(),
        }
    }
}

/// Joins field errors into one rejection reason.
pub fn reason(errors: &[FieldError]) -> String {
    // A hostile object can carry thousands of bad fields; a log line only
    // needs the first few.
    const MAX: usize = 5;
    let mut out = errors
        .iter()
        .take(MAX)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if errors.len() > MAX {
        out.push_str(&format!("; and {} more", errors.len() - MAX));
    }
    out
}

/// Longest value shown in a rejection, in characters.
const MAX_SHOWN: usize = 80;

/// A string as it may appear in a log line: Rust-escaped (no raw newlines
/// or quotes), quoted and truncated.
pub fn quote(s: &str) -> String {
    if s.chars().count() <= MAX_SHOWN {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX_SHOWN).collect();
        format!("{head:?}…")
    }
}

fn quote_debug(v: impl fmt::Debug) -> String {
    let s = format!("{v:?}");
    if s.chars().count() <= MAX_SHOWN {
        s
    } else {
        let head: String = s.chars().take(MAX_SHOWN).collect();
        format!("{head}…")
    }
}

/// A name that is safe to show even when invalid (for [`crate::Rejection`]).
pub fn display_name(s: &str) -> String {
    if is_dns1123_subdomain(s) {
        s.to_string()
    } else {
        quote(s)
    }
}

/// RFC 1123 label: 1..=63 of `[a-z0-9-]`, starting and ending alphanumeric.
/// Namespaces, Service names and Service port names.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
/// EndpointSlice names.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// IANA service name (RFC 6335): 1..=15 of `[a-z0-9-]`, at least one
/// letter, no leading, trailing or doubled hyphen. Named target ports.
pub fn is_iana_svc_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(u8::is_ascii_lowercase)
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !s.contains("--")
}

/// Parses an IP address as Kubernetes does (`ParseIPSloppy`): IPv4 octets
/// may carry leading zeros (read as decimal), and IPv4-mapped IPv6
/// addresses count as IPv4.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    parse_ipv4_sloppy(s).map(IpAddr::V4)
}

fn parse_ipv4_sloppy(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        *octet = p.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

/// Parses a CIDR as Kubernetes does (`ParseCIDRSloppy`): the address part
/// as [`parse_ip`], host bits cleared.
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    let (addr, len) = s.split_once('/')?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let prefix: u8 = len.parse().ok()?;
    // Parse without canonicalising: "::ffff:1.2.3.4/120" is an IPv6 CIDR.
    let ip = match addr.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => IpAddr::V4(parse_ipv4_sloppy(addr)?),
    };
    IpNet::new(ip, prefix).ok().map(|n| n.trunc())
}

/// A port number 1..=65535.
pub fn port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!(is_dns1123_label("a"));
        assert!(is_dns1123_label("kube-system"));
        assert!(is_dns1123_label("0abc9"));
        assert!(is_dns1123_label(&"a".repeat(63)));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(!is_dns1123_label(""));
        assert!(!is_dns1123_label("-a"));
        assert!(!is_dns1123_label("a-"));
        assert!(!is_dns1123_label("A"));
        assert!(!is_dns1123_label("a.b"));
        assert!(!is_dns1123_label("a b"));
        assert!(!is_dns1123_label("a\"b"));
        assert!(!is_dns1123_label("x\n-j ACCEPT"));
    }

    #[test]
    fn subdomains() {
        assert!(is_dns1123_subdomain("svc-abc12"));
        assert!(is_dns1123_subdomain("a.b.c"));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(!is_dns1123_subdomain(".a"));
        assert!(!is_dns1123_subdomain(""));
        assert!(!is_dns1123_subdomain(&"a.".repeat(127)));
    }

    #[test]
    fn iana() {
        assert!(is_iana_svc_name("http"));
        assert!(is_iana_svc_name("h2c-1"));
        assert!(!is_iana_svc_name("1234"));
        assert!(!is_iana_svc_name("a--b"));
        assert!(!is_iana_svc_name("abcdefghijklmnop"));
        assert!(!is_iana_svc_name("-a"));
    }

    #[test]
    fn ips() {
        assert_eq!(parse_ip("10.0.0.1"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(parse_ip("010.000.0.01"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(parse_ip("::ffff:1.2.3.4"), Some("1.2.3.4".parse().unwrap()));
        assert_eq!(parse_ip("fd00::1"), Some("fd00::1".parse().unwrap()));
        assert_eq!(parse_ip("10.0.0.300"), None);
        assert_eq!(parse_ip("10.0.0"), None);
        assert_eq!(parse_ip(" 10.0.0.1"), None);
        assert_eq!(parse_ip("10.0.0.1 -j ACCEPT"), None);
        assert_eq!(parse_ip(""), None);
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.1.2.3/8"),
            Some("10.0.0.0/8".parse().unwrap())
        );
        assert_eq!(parse_cidr("fd00::1/64"), Some("fd00::/64".parse().unwrap()));
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
        assert_eq!(parse_cidr("10.0.0.0"), None);
        assert_eq!(parse_cidr("10.0.0.0/"), None);
        assert_eq!(parse_cidr("10.0.0.0/+8"), None);
    }

    #[test]
    fn quoting_escapes_and_truncates() {
        assert_eq!(quote("a\"b\n"), r#""a\"b\n""#);
        let long = "x".repeat(500);
        let q = quote(&long);
        assert!(q.len() < 100, "{q}");
        assert!(q.ends_with('…'));
    }

    #[test]
    fn ports() {
        assert_eq!(port(0), None);
        assert_eq!(port(-1), None);
        assert_eq!(port(65536), None);
        assert_eq!(port(65535), Some(65535));
        assert_eq!(port(1), Some(1));
    }
}
