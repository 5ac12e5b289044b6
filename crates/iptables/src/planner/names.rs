//! Chain names, computed exactly as upstream kube-proxy does so that a node
//! switched between kube-proxy and kproxy keeps (and cleans up) the same chains.

use data_encoding::BASE32;
use sha2::{Digest, Sha256};

use kproxy_model::ServicePortName;

pub const SVC_PREFIX: &str = "KUBE-SVC-";
pub const SVL_PREFIX: &str = "KUBE-SVL-";
pub const EXT_PREFIX: &str = "KUBE-EXT-";
pub const FW_PREFIX: &str = "KUBE-FW-";
pub const SEP_PREFIX: &str = "KUBE-SEP-";
/// Written by kube-proxy before 1.24; only ever deleted.
pub const XLB_PREFIX: &str = "KUBE-XLB-";

/// The first 16 characters of base32(sha256(input)). 16 base32 characters
/// are exactly the first 10 bytes of the digest, so only those are encoded.
fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    BASE32.encode(&digest[..10])
}

/// The per-service-port chains (upstream's `portProtoHash` over
/// `servicePortName.String() + lowercase protocol`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortChains {
    pub svc: String,
    pub svl: String,
    pub ext: String,
    pub fw: String,
    /// `ServicePortName.String()` + protocol: the prefix of every SEP hash input.
    sep_seed: String,
}

impl PortChains {
    pub fn new(name: &ServicePortName) -> Self {
        let seed = format!("{}{}", name, name.protocol.lower_name());
        let hash = hash16(&seed);
        PortChains {
            svc: format!("{SVC_PREFIX}{hash}"),
            svl: format!("{SVL_PREFIX}{hash}"),
            ext: format!("{EXT_PREFIX}{hash}"),
            fw: format!("{FW_PREFIX}{hash}"),
            sep_seed: seed,
        }
    }

    /// `KUBE-SEP-` for the endpoint `addr` (`ip:port`, `[ip6]:port`), as
    /// upstream's `servicePortEndpointChainName`.
    pub fn sep(&self, addr: &str) -> String {
        let mut input = String::with_capacity(self.sep_seed.len() + addr.len());
        input.push_str(&self.sep_seed);
        input.push_str(addr);
        format!("{SEP_PREFIX}{}", hash16(&input))
    }
}

/// True for a nat chain kproxy (or kube-proxy) creates per service port:
/// one of our prefixes followed by exactly 16 base32 characters. Anything
/// else, even if it starts with `KUBE-`, belongs to someone else.
pub fn is_service_chain(name: &str) -> bool {
    [
        SVC_PREFIX, SVL_PREFIX, EXT_PREFIX, FW_PREFIX, SEP_PREFIX, XLB_PREFIX,
    ]
    .iter()
    .any(|p| {
        name.strip_prefix(p).is_some_and(|rest| {
            rest.len() == 16
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kproxy_model::{Protocol, ServiceKey};

    fn spn(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortName {
        ServicePortName {
            service: ServiceKey::new(ns, name),
            port: port.into(),
            protocol,
        }
    }

    // Expected values are from upstream's proxier_test.go (TestOverallIPTablesRules).
    #[test]
    fn names_match_upstream() {
        let c = PortChains::new(&spn("ns1", "svc1", "p80", Protocol::Tcp));
        assert_eq!(c.svc, "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(c.sep("10.180.0.1:80"), "KUBE-SEP-SXIVWICOYRO3J4NJ");
        let c5 = PortChains::new(&spn("ns5", "svc5", "p80", Protocol::Tcp));
        assert_eq!(c5.fw, "KUBE-FW-NUKIZ6OKUXPJNT4C");
        assert_eq!(c5.ext, "KUBE-EXT-NUKIZ6OKUXPJNT4C");
        let c2 = PortChains::new(&spn("ns2", "svc2", "p80", Protocol::Tcp));
        assert_eq!(c2.ext, "KUBE-EXT-GNZBNJ2PO5MGZ6GT");
        assert_eq!(c2.sep("10.180.0.2:80"), "KUBE-SEP-RS4RBKLTHTF2IUXJ");
    }

    #[test]
    fn protocol_changes_the_hash_and_names_fit() {
        let t = PortChains::new(&spn("ns", "dns", "53", Protocol::Tcp));
        let u = PortChains::new(&spn("ns", "dns", "53", Protocol::Udp));
        assert_ne!(t.svc, u.svc);
        for n in [&t.svc, &t.svl, &t.ext, &t.fw, &t.sep("[fd00::1]:53")] {
            assert!(n.len() <= 28, "{n}");
            assert!(is_service_chain(n), "{n}");
        }
    }

    #[test]
    fn ownership_is_strict() {
        assert!(!is_service_chain("KUBE-SERVICES"));
        assert!(!is_service_chain("KUBE-EXTERNAL-SERVICES"));
        assert!(!is_service_chain("KUBE-SVC-mine"));
        assert!(!is_service_chain("KUBE-SVC-XPGD46QRK7WJZT7OX"));
        assert!(is_service_chain("KUBE-XLB-XPGD46QRK7WJZT7O"));
    }
}
