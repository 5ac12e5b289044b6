//! Node facts the iptables backend needs: the addresses of the current
//! network namespace (over rtnetlink, synchronously) and sysctls.
//!
//! Everything works on the network namespace of the calling thread, which is
//! how tests run it inside a namespace.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

#[derive(Debug, thiserror::Error)]
pub enum NetutilError {
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("netlink request failed: {0}")]
    Kernel(#[source] std::io::Error),
    #[error("could not decode a netlink reply: {0}")]
    Decode(String),
    #[error("sysctl {key}: {source}")]
    Sysctl {
        key: String,
        #[source]
        source: std::io::Error,
    },
}

/// A netlink socket for one request/response exchange at a time.
pub(crate) struct NetlinkSocket {
    socket: Socket,
    seq: u32,
}

impl NetlinkSocket {
    pub(crate) fn new(protocol: isize) -> Result<Self, NetutilError> {
        let mut socket = Socket::new(protocol).map_err(NetutilError::Socket)?;
        socket.bind_auto().map_err(NetutilError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetutilError::Socket)?;
        Ok(NetlinkSocket { socket, seq: 0 })
    }

    /// Sends `payload` with `flags` (REQUEST is added) and collects the
    /// replies until DONE (dumps) or the ACK (with `NLM_F_ACK`). A kernel
    /// error becomes `Err(NetutilError::Kernel(errno))`.
    pub(crate) fn request<M>(&mut self, payload: M, flags: u16) -> Result<Vec<M>, NetutilError>
    where
        M: NetlinkSerializable + NetlinkDeserializable,
    {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(NetutilError::Socket)?;

        let multi = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(NetutilError::Socket)?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<M>::deserialize(&data[offset..])
                    .map_err(|e| NetutilError::Decode(e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(NetutilError::Decode("zero-length netlink message".into()));
                }
                offset += len;
                if reply.header.sequence_number != seq {
                    continue; // a late reply to an earlier request
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        if e.code.is_some() {
                            return Err(NetutilError::Kernel(e.to_io()));
                        }
                        // An ACK ends a non-dump request.
                        return Ok(out);
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        out.push(m);
                        if !multi && flags & NLM_F_ACK == 0 {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Every address of the current network namespace with the name of its
/// interface, e.g. `("eth0", 192.168.50.1/24)`, loopback included.
pub fn local_addresses() -> Result<Vec<(String, IpNet)>, NetutilError> {
    let mut socket = NetlinkSocket::new(NETLINK_ROUTE)?;
    let links = socket.request(
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        NLM_F_DUMP,
    )?;
    let names: BTreeMap<u32, String> = links
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => {
                let name = link.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })?;
                Some((link.header.index, name))
            }
            _ => None,
        })
        .collect();
    let addrs = socket.request(
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        NLM_F_DUMP,
    )?;
    let mut out = Vec::new();
    for m in addrs {
        let RouteNetlinkMessage::NewAddress(addr) = m else {
            continue;
        };
        // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer
        // on point-to-point links and the only one IPv6 sends.
        let local = addr.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = addr.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        let Some(ip) = local.or(address) else {
            continue;
        };
        let Ok(net) = IpNet::new(ip, addr.header.prefix_len) else {
            continue;
        };
        let name = names
            .get(&addr.header.index)
            .cloned()
            .unwrap_or_else(|| format!("if{}", addr.header.index));
        out.push((name, net));
    }
    Ok(out)
}

/// The local IPs that fall in any of `cidrs` (`--nodeport-addresses`), in
/// the order of `local`, without duplicates. An empty `cidrs` means all.
pub fn addresses_in(cidrs: &[IpNet], local: &[(String, IpNet)]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for (_, net) in local {
        let ip = net.addr();
        if (cidrs.is_empty() || cidrs.iter().any(|c| c.contains(&ip))) && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

fn sysctl_path(key: &str) -> PathBuf {
    // "net.ipv4.conf.all.route_localnet" or "net/ipv4/conf/all/route_localnet".
    // Interface names may contain dots only in the slash form.
    let rel = if key.contains('/') {
        key.to_string()
    } else {
        key.replace('.', "/")
    };
    PathBuf::from("/proc/sys").join(rel)
}

/// Reads a sysctl of the current network namespace, trimmed.
pub fn read_sysctl(key: &str) -> Result<String, NetutilError> {
    std::fs::read_to_string(sysctl_path(key))
        .map(|s| s.trim().to_string())
        .map_err(|source| NetutilError::Sysctl {
            key: key.to_string(),
            source,
        })
}

/// Writes a sysctl of the current network namespace.
pub fn write_sysctl(key: &str, value: &str) -> Result<(), NetutilError> {
    std::fs::write(sysctl_path(key), value).map_err(|source| NetutilError::Sysctl {
        key: key.to_string(),
        source,
    })
}

/// Sets `net.ipv4.conf.all.route_localnet=1` unless already set (NodePorts
/// on 127.0.0.1 need it); returns whether it changed anything.
pub fn ensure_route_localnet() -> Result<bool, NetutilError> {
    const KEY: &str = "net.ipv4.conf.all.route_localnet";
    if read_sysctl(KEY)? == "1" {
        return Ok(false);
    }
    write_sysctl(KEY, "1")?;
    Ok(true)
}

/// `net.bridge.bridge-nf-call-iptables`: `None` when br_netfilter is not
/// loaded (bridged pod-to-pod traffic then bypasses iptables).
pub fn bridge_nf_call_iptables() -> Option<bool> {
    read_sysctl("net/bridge/bridge-nf-call-iptables")
        .ok()
        .map(|v| v == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_addresses_by_cidr() {
        let local = vec![
            ("lo".to_string(), "127.0.0.1/8".parse().unwrap()),
            ("eth0".to_string(), "192.168.50.1/24".parse().unwrap()),
            ("eth1".to_string(), "fd00::1/64".parse().unwrap()),
            ("eth2".to_string(), "192.168.50.1/24".parse().unwrap()),
        ];
        let cidrs: Vec<IpNet> = vec!["192.168.0.0/16".parse().unwrap()];
        assert_eq!(
            addresses_in(&cidrs, &local),
            vec!["192.168.50.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(addresses_in(&[], &local).len(), 3);
    }

    #[test]
    fn sysctl_keys_in_both_spellings() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward"),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/rp_filter"),
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.100/rp_filter")
        );
    }
}
