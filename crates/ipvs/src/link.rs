//! kube-ipvs0: the dummy interface that holds every service address, so
//! the kernel treats them as local and IPVS sees the packets.
//!
//! Same synchronous style as the IPVS client: netlink-packet-route messages
//! over a netlink-sys socket.

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{DecodeError, NetlinkDeserializable, NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{
    AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::errno::errno_text;
use crate::nl::{NlError, NlSocket};

/// The interface upstream kube-proxy binds service addresses to.
pub const DEFAULT_DUMMY_NAME: &str = "kube-ipvs0";

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{op}: {}{}", errno_text(*.errno), hint(*.errno))]
    Kernel { op: String, errno: i32 },
    #[error("{op}: netlink socket: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("{op}: malformed reply from the kernel: {source}")]
    Decode {
        op: String,
        #[source]
        source: DecodeError,
    },
    #[error("interface {name} exists but is a {kind} interface, not dummy")]
    NotDummy { name: String, kind: String },
    #[error("interface name {0:?} is empty or longer than 15 bytes")]
    BadName(String),
}

fn hint(errno: i32) -> &'static str {
    if errno == libc::EOPNOTSUPP {
        " (is the dummy driver available? modprobe dummy)"
    } else {
        ""
    }
}

impl LinkError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            LinkError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    fn from_nl(op: String, e: NlError) -> LinkError {
        match e {
            NlError::Io(source) => LinkError::Io { op, source },
            NlError::Kernel(errno) => LinkError::Kernel { op, errno },
            NlError::Decode(source) => LinkError::Decode { op, source },
        }
    }
}

/// What [`LinkClient::sync_addresses`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressSync {
    pub added: Vec<IpNet>,
    pub removed: Vec<IpNet>,
}

/// The host prefix of an address: /32 or /128.
pub fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// A link we found, for [`LinkClient::get_link`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfoSummary {
    pub index: u32,
    pub up: bool,
    /// "dummy", "veth", ...; empty for links without a kind (lo, physical NICs).
    pub kind: String,
}

pub struct LinkClient {
    nl: NlSocket,
}

impl LinkClient {
    pub fn new() -> Result<LinkClient, LinkError> {
        let nl = NlSocket::new(NETLINK_ROUTE).map_err(|source| LinkError::Io {
            op: "opening an rtnetlink socket".to_string(),
            source,
        })?;
        Ok(LinkClient { nl })
    }

    fn run(
        &mut self,
        op: impl FnOnce() -> String,
        msg: RouteNetlinkMessage,
        dump: bool,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, LinkError> {
        let mut out = Vec::new();
        self.nl
            .request(msg, dump, flags, |header, payload| {
                out.push(RouteNetlinkMessage::deserialize(header, payload)?);
                Ok(())
            })
            .map_err(|e| LinkError::from_nl(op(), e))?;
        Ok(out)
    }

    /// The link called `name`, if any.
    pub fn get_link(&mut self, name: &str) -> Result<Option<LinkInfoSummary>, LinkError> {
        check_name(name)?;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        let res = self.run(
            || format!("looking up interface {name}"),
            RouteNetlinkMessage::GetLink(msg),
            false,
            0,
        );
        let msgs = match res {
            Ok(m) => m,
            Err(e) if e.errno() == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(msgs.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => Some(summarize(&link)),
            _ => None,
        }))
    }

    /// Makes sure a dummy interface `name` exists and is up; returns its index.
    /// Creating it may load the dummy module (the kernel asks modprobe).
    pub fn ensure_dummy(&mut self, name: &str) -> Result<u32, LinkError> {
        let link = match self.get_link(name)? {
            Some(link) => link,
            None => {
                let mut msg = LinkMessage::default();
                msg.header.flags = LinkFlags::Up;
                msg.header.change_mask = LinkFlags::Up;
                msg.attributes.push(LinkAttribute::IfName(name.to_string()));
                msg.attributes
                    .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                        InfoKind::Dummy,
                    )]));
                let res = self.run(
                    || format!("creating dummy interface {name}"),
                    RouteNetlinkMessage::NewLink(msg),
                    false,
                    NLM_F_CREATE | NLM_F_EXCL,
                );
                match res {
                    Ok(_) => tracing::info!(interface = name, "created dummy interface"),
                    // Someone else created it in between: fine if it is a dummy.
                    Err(e) if e.errno() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(e),
                }
                self.get_link(name)?.ok_or_else(|| LinkError::Kernel {
                    op: format!("creating dummy interface {name}"),
                    errno: libc::ENODEV,
                })?
            }
        };
        if link.kind != "dummy" {
            return Err(LinkError::NotDummy {
                name: name.to_string(),
                kind: if link.kind.is_empty() {
                    "plain".to_string()
                } else {
                    link.kind
                },
            });
        }
        if !link.up {
            let mut msg = LinkMessage::default();
            msg.header.index = link.index;
            msg.header.flags = LinkFlags::Up;
            msg.header.change_mask = LinkFlags::Up;
            self.run(
                || format!("setting interface {name} up"),
                RouteNetlinkMessage::SetLink(msg),
                false,
                0,
            )?;
        }
        Ok(link.index)
    }

    /// Deletes the dummy interface `name`; `Ok(false)` if there was none.
    /// Refuses to delete an interface that is not a dummy.
    pub fn delete_dummy(&mut self, name: &str) -> Result<bool, LinkError> {
        let Some(link) = self.get_link(name)? else {
            return Ok(false);
        };
        if link.kind != "dummy" {
            return Err(LinkError::NotDummy {
                name: name.to_string(),
                kind: link.kind,
            });
        }
        let mut msg = LinkMessage::default();
        msg.header.index = link.index;
        match self.run(
            || format!("deleting interface {name}"),
            RouteNetlinkMessage::DelLink(msg),
            false,
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The addresses on interface `ifindex` with their prefix lengths,
    /// except IPv6 link-local ones (the kernel's own, never ours).
    pub fn list_addresses(&mut self, ifindex: u32) -> Result<BTreeSet<IpNet>, LinkError> {
        let msgs = self.run(
            || format!("listing addresses of interface #{ifindex}"),
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            true,
            0,
        )?;
        let mut out = BTreeSet::new();
        for m in msgs {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            if a.header.index != ifindex {
                continue;
            }
            if let Some(net) = address_of(&a) {
                if !is_link_local(&net.addr()) {
                    out.insert(net);
                }
            }
        }
        Ok(out)
    }

    /// Makes the interface hold exactly `desired` as /32 and /128 addresses:
    /// adds the missing ones (IPv6 with `nodad`, so they are usable at once),
    /// removes every other address on that interface, and touches nothing else.
    pub fn sync_addresses(
        &mut self,
        ifindex: u32,
        desired: &BTreeSet<IpAddr>,
    ) -> Result<AddressSync, LinkError> {
        let want: BTreeSet<IpNet> = desired.iter().map(|ip| host_net(*ip)).collect();
        let have = self.list_addresses(ifindex)?;
        let mut report = AddressSync::default();
        // Remove first: an address present with the wrong prefix is re-added below.
        for net in have.difference(&want) {
            match self.del_address(ifindex, *net) {
                Ok(()) => report.removed.push(*net),
                // Already gone (someone else removed it): the goal is met.
                Err(e) if e.errno() == Some(libc::EADDRNOTAVAIL) => {}
                Err(e) => return Err(e),
            }
        }
        for net in want.difference(&have) {
            match self.add_address(ifindex, *net) {
                Ok(()) => report.added.push(*net),
                Err(e) if e.errno() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e),
            }
        }
        if !report.added.is_empty() || !report.removed.is_empty() {
            tracing::debug!(
                ifindex,
                added = report.added.len(),
                removed = report.removed.len(),
                "synced dummy interface addresses"
            );
        }
        Ok(report)
    }

    /// Adds one address (`ip addr add NET dev #ifindex`, IPv6 `nodad`).
    pub fn add_address(&mut self, ifindex: u32, net: IpNet) -> Result<(), LinkError> {
        let msg = address_message(ifindex, net);
        self.run(
            || format!("adding address {net} to interface #{ifindex}"),
            RouteNetlinkMessage::NewAddress(msg),
            false,
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(|_| ())
    }

    pub fn del_address(&mut self, ifindex: u32, net: IpNet) -> Result<(), LinkError> {
        let msg = address_message(ifindex, net);
        self.run(
            || format!("removing address {net} from interface #{ifindex}"),
            RouteNetlinkMessage::DelAddress(msg),
            false,
            0,
        )
        .map(|_| ())
    }
}

fn check_name(name: &str) -> Result<(), LinkError> {
    // IFNAMSIZ is 16 including the NUL.
    if name.is_empty()
        || name.len() > 15
        || name.contains(['/', '\0'])
        || name.contains(char::is_whitespace)
    {
        return Err(LinkError::BadName(name.to_string()));
    }
    Ok(())
}

fn summarize(link: &LinkMessage) -> LinkInfoSummary {
    let mut kind = String::new();
    for attr in &link.attributes {
        if let LinkAttribute::LinkInfo(infos) = attr {
            for info in infos {
                if let LinkInfo::Kind(k) = info {
                    kind = k.to_string();
                }
            }
        }
    }
    LinkInfoSummary {
        index: link.header.index,
        up: link.header.flags.contains(LinkFlags::Up),
        kind,
    }
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        IpAddr::V4(_) => false,
    }
}

/// IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on
/// point-to-point links); IPv6 only sends IFA_ADDRESS.
fn address_of(a: &AddressMessage) -> Option<IpNet> {
    let mut local = None;
    let mut address = None;
    for attr in &a.attributes {
        match attr {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    let ip = local.or(address)?;
    IpNet::new(ip, a.header.prefix_len).ok()
}

fn address_message(ifindex: u32, net: IpNet) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.index = ifindex;
    msg.header.prefix_len = net.prefix_len();
    msg.header.scope = AddressScope::Universe;
    let ip = net.addr();
    match ip {
        IpAddr::V4(_) => {
            msg.header.family = AddressFamily::Inet;
            msg.attributes.push(AddressAttribute::Local(ip));
            msg.attributes.push(AddressAttribute::Address(ip));
        }
        IpAddr::V6(_) => {
            msg.header.family = AddressFamily::Inet6;
            // No duplicate address detection: a service VIP must answer at
            // once, and nobody else on a dummy link can hold it.
            msg.header.flags = AddressHeaderFlags::Nodad;
            msg.attributes.push(AddressAttribute::Address(ip));
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_prefixes() {
        assert_eq!(
            host_net("10.96.0.1".parse().unwrap()).to_string(),
            "10.96.0.1/32"
        );
        assert_eq!(
            host_net("fd00::1".parse().unwrap()).to_string(),
            "fd00::1/128"
        );
    }

    #[test]
    fn address_messages() {
        let m = address_message(7, "fd00::1/128".parse().unwrap());
        assert_eq!(m.header.index, 7);
        assert_eq!(m.header.prefix_len, 128);
        assert_eq!(m.header.family, AddressFamily::Inet6);
        assert!(m.header.flags.contains(AddressHeaderFlags::Nodad));
        assert_eq!(address_of(&m), Some("fd00::1/128".parse().unwrap()));
        let m = address_message(3, "10.96.0.1/32".parse().unwrap());
        assert_eq!(m.header.family, AddressFamily::Inet);
        assert_eq!(address_of(&m), Some("10.96.0.1/32".parse().unwrap()));
    }

    #[test]
    fn link_local_is_recognised() {
        assert!(is_link_local(&"fe80::1".parse().unwrap()));
        assert!(!is_link_local(&"fd00::1".parse().unwrap()));
        assert!(!is_link_local(&"169.254.0.1".parse().unwrap()));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("kube-ipvs0").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a-very-long-interface").is_err());
        assert!(check_name("a b").is_err());
    }
}
