//! Conflicts between Services over one NodePort or one destination address.
//!
//! The API server keeps NodePorts and ClusterIPs unique, but a stale cache
//! (or an external IP / load-balancer IP anyone may set) can still give two
//! Services the same NodePort and protocol, or the same `IP:port/protocol`
//! as a ClusterIP, external IP or load-balancer IP. Both rules would land in
//! the same dispatch chain and whichever happened to come first would win —
//! an order that depends on sync history.
//!
//! The model decides instead: the older Service (creationTimestamp, then
//! namespace/name, then port name) keeps the contested port or address; the
//! newer one loses only that part, with a rejection naming both. An index
//! from each contested key to its claimants keeps this O(affected): when a
//! Service changes or goes away, only the Services sharing one of its keys
//! are recomputed, and a loser gets the part back as soon as it wins.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use jiff::Timestamp;

use crate::types::{Protocol, ServicePort, ServicePortName};

/// Something only one service port may have.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Claim {
    /// A NodePort: one per protocol on the node, whatever the family.
    NodePort { port: u16, protocol: Protocol },
    /// A destination `IP:port/protocol`: a ClusterIP, external IP or
    /// load-balancer IP, all matched in the same dispatch chain.
    Address {
        ip: IpAddr,
        port: u16,
        protocol: Protocol,
    },
}

impl fmt::Display for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Claim::NodePort { port, protocol } => write!(f, "nodePort {port}/{protocol}"),
            Claim::Address { ip, port, protocol } => {
                write!(f, "{}/{protocol}", SocketAddr::new(*ip, *port))
            }
        }
    }
}

/// A service port claiming something; the smallest claimant wins.
///
/// Ordered by age: a known creation time before an unknown one, earlier
/// before later, then by namespace, name, port name and protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Claimant {
    unknown_age: bool,
    created: Option<Timestamp>,
    pub(crate) name: ServicePortName,
}

impl Claimant {
    pub(crate) fn new(created: Option<Timestamp>, name: ServicePortName) -> Self {
        Claimant {
            unknown_age: created.is_none(),
            created,
            name,
        }
    }

    /// Why `self` wins against `other`, for the loser's rejection.
    fn precedence_over(&self, other: &Claimant) -> &'static str {
        if self.unknown_age == other.unknown_age && self.created == other.created {
            "created at the same time, first by namespace/name"
        } else {
            "created earlier"
        }
    }
}

/// The things a service port (a template straight from the Service, before
/// any conflict is resolved) claims.
pub(crate) fn claims_of(sp: &ServicePort) -> Vec<Claim> {
    let address = |ip: IpAddr| Claim::Address {
        ip,
        port: sp.port,
        protocol: sp.name.protocol,
    };
    let mut out = Vec::with_capacity(2 + sp.external_ips.len() + sp.load_balancer_ips.len());
    out.push(address(sp.cluster_ip));
    for ip in sp.external_ips.iter().chain(&sp.load_balancer_ips) {
        let c = address(*ip);
        if !out.contains(&c) {
            out.push(c);
        }
    }
    if let Some(port) = sp.node_port {
        out.push(Claim::NodePort {
            port,
            protocol: sp.name.protocol,
        });
    }
    out
}

/// Every contested key with its claimants.
#[derive(Debug, Default)]
pub(crate) struct Index {
    /// Claimants sorted, without duplicates. Nearly every key has exactly
    /// one: a Vec holds it in one small allocation, where a BTreeSet's
    /// leaf node would take room for eleven (≈ 1.2 kB per service).
    by_claim: HashMap<Claim, Vec<Claimant>>,
}

impl Index {
    pub(crate) fn add(&mut self, claim: &Claim, claimant: &Claimant) {
        let set = self.by_claim.entry(claim.clone()).or_default();
        if let Err(at) = set.binary_search(claimant) {
            // `insert` alone would reserve room for four.
            set.reserve_exact(1);
            set.insert(at, claimant.clone());
        }
    }

    pub(crate) fn remove(&mut self, claim: &Claim, claimant: &Claimant) {
        if let Some(set) = self.by_claim.get_mut(claim) {
            if let Ok(at) = set.binary_search(claimant) {
                set.remove(at);
            }
            if set.is_empty() {
                self.by_claim.remove(claim);
            }
        }
    }

    /// Every claimant of `claim`.
    pub(crate) fn claimants(&self, claim: &Claim) -> impl Iterator<Item = &Claimant> {
        self.by_claim.get(claim).into_iter().flatten()
    }

    /// `None` when `me` holds `claim` (or nobody registered it); else the
    /// reason `me` lost it, naming the winner.
    pub(crate) fn lost(&self, claim: &Claim, me: &Claimant) -> Option<String> {
        let winner = self.by_claim.get(claim)?.first()?;
        if winner == me {
            return None;
        }
        let what = match claim {
            Claim::NodePort { .. } => format!("{claim}"),
            Claim::Address { .. } => format!("address {claim}"),
        };
        let port = if me.name.port.is_empty() {
            String::new()
        } else {
            format!("port {}: ", me.name.port)
        };
        if winner.name.service == me.name.service {
            // Only NodePorts: two ports of one Service never share an address.
            return Some(format!(
                "{port}{what} is also claimed by port {:?} of this Service, which keeps it",
                winner.name.port
            ));
        }
        Some(format!(
            "{port}{what} is also claimed by Service {} ({}), which keeps it; not programmed for this Service",
            winner.name.service,
            winner.precedence_over(me)
        ))
    }
}
