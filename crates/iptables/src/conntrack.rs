//! Stale UDP conntrack cleanup over netlink (ctnetlink).
//!
//! UDP has no connection teardown: once a flow to a service is in the
//! conntrack table, its packets keep going to the endpoint the first packet
//! was NATed to (or nowhere, if the service had no endpoints then) for as
//! long as the client keeps sending. After an endpoint change those flows
//! must be deleted so the next packet is NATed afresh. Like upstream's
//! `pkg/proxy/conntrack/cleanup.go`, we dump the table and delete exactly
//! the flows whose original destination is a service address (or a
//! NodePort) and whose reply source is not a serving endpoint. We compare
//! the reply source as ip:port where upstream compares the IP only, so a
//! flow NATed to an endpoint whose port changed is caught too. The table is
//! never flushed.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use kproxy_model::IpFamily;
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::protocols::NETLINK_NETFILTER;
use tracing::{debug, warn};

use crate::netutil::{self, NetlinkSocket, NetutilError};

/// `CTA_ZONE`: flows in a non-default zone are only found with their zone.
const CTA_ZONE: u16 = 18;

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("conntrack netlink: {0}")]
    Netlink(#[from] NetutilError),
}

/// One UDP service port of one family, as the cleanup needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UdpServiceTarget {
    /// Cluster IP, external IPs and load-balancer IPs.
    pub service_addrs: Vec<IpAddr>,
    /// The service port.
    pub port: u16,
    /// The NodePort, matched on any local address.
    pub node_port: Option<u16>,
    /// Endpoints (ip:targetPort) that still serve: their flows are kept.
    pub serving: Vec<SocketAddr>,
}

/// A conntrack entry reduced to what the cleanup looks at, plus what is
/// needed to delete it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub protocol: u8,
    pub orig_src: SocketAddr,
    pub orig_dst: SocketAddr,
    pub reply_src: SocketAddr,
    orig_tuple: Vec<Tuple>,
    zone: Option<ConntrackAttribute>,
}

const IPPROTO_UDP: u8 = 17;

/// Deletes stale UDP conntrack entries of the current network namespace.
#[derive(Debug, Default)]
pub struct ConntrackCleaner {
    _private: (),
}

impl ConntrackCleaner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Dumps the UDP flows of `family` and deletes those to a service
    /// address on its port (or to a local address on its NodePort) whose
    /// reply source is not in the target's `serving` list. Returns how many
    /// were deleted; flows that vanished meanwhile are not counted.
    pub fn delete_stale_udp(
        &self,
        family: IpFamily,
        targets: &[UdpServiceTarget],
    ) -> Result<usize, ConntrackError> {
        if targets.is_empty() {
            return Ok(0);
        }
        let mut socket = NetlinkSocket::new(NETLINK_NETFILTER)?;
        let flows = dump(&mut socket, family)?;
        let local: Option<BTreeSet<IpAddr>> = if targets.iter().any(|t| t.node_port.is_some()) {
            match netutil::local_addresses() {
                Ok(addrs) => Some(addrs.into_iter().map(|(_, net)| net.addr()).collect()),
                Err(e) => {
                    // Upstream matches NodePort flows on the port alone;
                    // without the address list we do the same.
                    warn!(error = %e, "cannot list local addresses; matching NodePort flows by port only");
                    None
                }
            }
        } else {
            None
        };
        let mut deleted = 0;
        for flow in stale_flows(&flows, targets, local.as_ref()) {
            match socket.request(delete_message(family, flow), NLM_F_ACK) {
                Ok(_) => {
                    debug!(orig_dst = %flow.orig_dst, reply_src = %flow.reply_src, "deleted stale UDP conntrack entry");
                    deleted += 1;
                }
                Err(NetutilError::Kernel(e)) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(deleted)
    }
}

fn nf_family(family: IpFamily) -> NetfilterProtoFamily {
    match family {
        IpFamily::V4 => NetfilterProtoFamily::IPv4,
        IpFamily::V6 => NetfilterProtoFamily::IPv6,
    }
}

/// Dumps the conntrack table of `family` (the kernel filters by the
/// nfgenmsg family) and keeps the UDP flows.
fn dump(socket: &mut NetlinkSocket, family: IpFamily) -> Result<Vec<Flow>, ConntrackError> {
    let request = NetfilterMessage::new(
        NetfilterHeader::new(nf_family(family), 0, 0),
        ConntrackMessage::Get(vec![]),
    );
    let replies = socket.request(request, NLM_F_DUMP)?;
    Ok(replies
        .into_iter()
        .filter_map(|m| match m.inner {
            NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)) => parse_flow(attrs),
            _ => None,
        })
        .filter(|f| f.protocol == IPPROTO_UDP && IpFamily::of(&f.orig_dst.ip()) == family)
        .collect())
}

/// (src, dst, protocol) of a tuple.
fn tuple_addrs(tuples: &[Tuple]) -> Option<(SocketAddr, SocketAddr, u8)> {
    let (mut src, mut dst, mut sport, mut dport, mut proto) = (None, None, None, None, None);
    for t in tuples {
        match t {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(n) => proto = Some(u8::from(*n)),
                        ProtoTuple::SourcePort(n) => sport = Some(*n),
                        ProtoTuple::DestinationPort(n) => dport = Some(*n),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((
        SocketAddr::new(src?, sport.unwrap_or(0)),
        SocketAddr::new(dst?, dport.unwrap_or(0)),
        proto?,
    ))
}

fn parse_flow(attrs: Vec<ConntrackAttribute>) -> Option<Flow> {
    let mut orig = None;
    let mut reply = None;
    let mut zone = None;
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = Some(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = Some(t),
            ConntrackAttribute::Other(ref nla)
                if netlink_packet_core::Nla::kind(nla) == CTA_ZONE =>
            {
                zone = Some(a)
            }
            _ => {}
        }
    }
    let orig = orig?;
    let (orig_src, orig_dst, protocol) = tuple_addrs(&orig)?;
    let (reply_src, _, _) = tuple_addrs(&reply?)?;
    Some(Flow {
        protocol,
        orig_src,
        orig_dst,
        reply_src,
        orig_tuple: orig,
        zone,
    })
}

/// The filter, pure: the flows among `flows` a cleanup deletes. `local` is
/// the set of local addresses for NodePort matching (`None`: any address).
pub fn stale_flows<'a>(
    flows: &'a [Flow],
    targets: &[UdpServiceTarget],
    local: Option<&BTreeSet<IpAddr>>,
) -> Vec<&'a Flow> {
    let serves = |t: &UdpServiceTarget, src: &SocketAddr| {
        t.serving
            .iter()
            .any(|s| s.ip() == src.ip() && s.port() == src.port())
    };
    flows
        .iter()
        .filter(|f| f.protocol == IPPROTO_UDP)
        .filter(|f| {
            let dst = f.orig_dst;
            targets.iter().any(|t| {
                let to_service = dst.port() == t.port && t.service_addrs.contains(&dst.ip());
                let to_node_port =
                    t.node_port == Some(dst.port()) && local.is_none_or(|l| l.contains(&dst.ip()));
                (to_service || to_node_port) && !serves(t, &f.reply_src)
            })
        })
        .collect()
}

/// The `IPCTNL_MSG_CT_DELETE` request for `flow`: its original tuple as the
/// kernel reported it (and its zone, if any).
fn delete_message(family: IpFamily, flow: &Flow) -> NetfilterMessage {
    let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(flow.orig_tuple.clone())];
    attrs.extend(flow.zone.clone());
    NetfilterMessage::new(
        NetfilterHeader::new(nf_family(family), 0, 0),
        ConntrackMessage::Delete(attrs),
    )
}

/// A UDP flow as the kernel would report it (for tests of the filter).
pub fn udp_flow(orig_src: SocketAddr, orig_dst: SocketAddr, reply_src: SocketAddr) -> Flow {
    let tuple = |src: SocketAddr, dst: SocketAddr| {
        vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(src.ip()),
                IPTuple::DestinationAddress(dst.ip()),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::Udp),
                ProtoTuple::SourcePort(src.port()),
                ProtoTuple::DestinationPort(dst.port()),
            ]),
        ]
    };
    Flow {
        protocol: IPPROTO_UDP,
        orig_src,
        orig_dst,
        reply_src,
        orig_tuple: tuple(orig_src, orig_dst),
        zone: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn filter_matches_upstream_semantics() {
        let client = sa("192.168.50.2:40000");
        let flows = vec![
            // 0: to the service, answered by a serving endpoint: kept.
            udp_flow(client, sa("10.96.0.10:53"), sa("10.244.1.10:5353")),
            // 1: to the service, answered by a gone endpoint: deleted.
            udp_flow(client, sa("10.96.0.10:53"), sa("10.244.1.11:5353")),
            // 2: created while there were no endpoints (not NATed): deleted.
            udp_flow(client, sa("10.96.0.10:53"), sa("10.96.0.10:53")),
            // 3: endpoint IP right but its port changed: deleted.
            udp_flow(client, sa("10.96.0.10:53"), sa("10.244.1.10:9999")),
            // 4: another port of the same IP: not ours, kept.
            udp_flow(client, sa("10.96.0.10:54"), sa("10.244.1.11:5353")),
            // 5: external IP of the service, stale: deleted.
            udp_flow(client, sa("203.0.113.7:53"), sa("10.244.1.11:5353")),
            // 6: NodePort on a local address, stale: deleted.
            udp_flow(client, sa("192.168.50.1:30053"), sa("10.244.1.11:5353")),
            // 7: same port to a remote address: not a NodePort flow, kept.
            udp_flow(client, sa("198.51.100.1:30053"), sa("198.51.100.1:30053")),
            // 8: NodePort, serving: kept.
            udp_flow(client, sa("192.168.50.1:30053"), sa("10.244.1.10:5353")),
        ];
        let targets = [UdpServiceTarget {
            service_addrs: vec![
                "10.96.0.10".parse().unwrap(),
                "203.0.113.7".parse().unwrap(),
            ],
            port: 53,
            node_port: Some(30053),
            serving: vec![sa("10.244.1.10:5353")],
        }];
        let local: BTreeSet<IpAddr> = ["192.168.50.1".parse().unwrap()].into();
        let stale: Vec<usize> = stale_flows(&flows, &targets, Some(&local))
            .into_iter()
            .map(|f| flows.iter().position(|g| std::ptr::eq(f, g)).unwrap())
            .collect();
        assert_eq!(stale, vec![1, 2, 3, 5, 6]);
        // Without the local address list, NodePorts match on the port (upstream).
        assert_eq!(stale_flows(&flows, &targets, None).len(), 6);
        // No endpoints at all: every flow to the service goes.
        let none = [UdpServiceTarget {
            serving: vec![],
            ..targets[0].clone()
        }];
        assert_eq!(stale_flows(&flows, &none, Some(&local)).len(), 7);
    }

    /// The delete request, byte for byte (nlmsghdr, nfgenmsg, nested
    /// CTA_TUPLE_ORIG), as ctnetlink expects it.
    #[test]
    fn delete_message_golden_bytes() {
        let flow = udp_flow(
            sa("192.168.50.2:40000"),
            sa("10.96.0.10:53"),
            sa("10.244.1.11:5353"),
        );
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        header.sequence_number = 7;
        let mut msg = NetlinkMessage::new(
            header,
            NetlinkPayload::from(delete_message(IpFamily::V4, &flow)),
        );
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            72, 0, 0, 0,            // nlmsg_len
            0x02, 0x01,             // type: NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
            0x05, 0x00,             // flags: REQUEST | ACK
            7, 0, 0, 0,             // seq
            0, 0, 0, 0,             // pid
            2, 0, 0, 0,             // nfgenmsg: AF_INET, version 0, res_id 0
            52, 0, 0x01, 0x80,      // CTA_TUPLE_ORIG | NLA_F_NESTED
            20, 0, 0x01, 0x80,      //   CTA_TUPLE_IP | NLA_F_NESTED
            8, 0, 1, 0, 192, 168, 50, 2, // CTA_IP_V4_SRC
            8, 0, 2, 0, 10, 96, 0, 10,   // CTA_IP_V4_DST
            28, 0, 0x02, 0x80,      //   CTA_TUPLE_PROTO | NLA_F_NESTED
            5, 0, 1, 0, 17, 0, 0, 0,     // CTA_PROTO_NUM UDP (+pad)
            6, 0, 2, 0, 0x9c, 0x40, 0, 0, // CTA_PROTO_SRC_PORT 40000 BE
            6, 0, 3, 0, 0, 53, 0, 0,     // CTA_PROTO_DST_PORT 53 BE
        ];
        assert_eq!(buf, expected);
    }
}
