//! The IPVS generic-netlink codec: our own message types for the kernel's
//! "IPVS" family (include/uapi/linux/ip_vs.h), on netlink-packet-generic.
//!
//! Pure: no sockets here. Every layout fact is checked by the golden-bytes
//! tests at the bottom of this file.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kproxy_model::IpFamily;
use netlink_packet_core::{
    emit_u16, emit_u16_be, emit_u32, parse_string, parse_u16, parse_u16_be, parse_u32, parse_u64,
    DecodeError, DefaultNla, Emitable, Nla, NlaBuffer, NlasIterator, Parseable,
    ParseableParametrized,
};
use netlink_packet_generic::{GenlFamily, GenlHeader};

/// The generic netlink family name and version (`IPVS_GENL_NAME`, `IPVS_GENL_VERSION`).
pub const IPVS_GENL_NAME: &str = "IPVS";
pub const IPVS_GENL_VERSION: u8 = 1;

/// Linux address families as the kernel's IPVS attributes carry them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

// First-level attributes (IPVS_CMD_ATTR_*).
const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;
const CMD_ATTR_TIMEOUT_TCP: u16 = 4;
const CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const CMD_ATTR_TIMEOUT_UDP: u16 = 6;

// GET_INFO reply attributes (IPVS_INFO_ATTR_*); same numbers as the command
// attributes, told apart by the reply's command (SET_INFO).
const INFO_ATTR_VERSION: u16 = 1;
const INFO_ATTR_CONN_TAB_SIZE: u16 = 2;

// Service attributes (IPVS_SVC_ATTR_*).
const SVC_ATTR_AF: u16 = 1;
const SVC_ATTR_PROTOCOL: u16 = 2;
const SVC_ATTR_ADDR: u16 = 3;
const SVC_ATTR_PORT: u16 = 4;
const SVC_ATTR_FWMARK: u16 = 5;
const SVC_ATTR_SCHED_NAME: u16 = 6;
const SVC_ATTR_FLAGS: u16 = 7;
const SVC_ATTR_TIMEOUT: u16 = 8;
const SVC_ATTR_NETMASK: u16 = 9;
const SVC_ATTR_STATS: u16 = 10;
const SVC_ATTR_STATS64: u16 = 12;

// Destination attributes (IPVS_DEST_ATTR_*).
const DEST_ATTR_ADDR: u16 = 1;
const DEST_ATTR_PORT: u16 = 2;
const DEST_ATTR_FWD_METHOD: u16 = 3;
const DEST_ATTR_WEIGHT: u16 = 4;
const DEST_ATTR_U_THRESH: u16 = 5;
const DEST_ATTR_L_THRESH: u16 = 6;
const DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const DEST_ATTR_INACT_CONNS: u16 = 8;
const DEST_ATTR_PERSIST_CONNS: u16 = 9;
const DEST_ATTR_STATS: u16 = 10;
const DEST_ATTR_ADDR_FAMILY: u16 = 11;
const DEST_ATTR_STATS64: u16 = 12;

// Statistics attributes (IPVS_STATS_ATTR_*).
const STATS_ATTR_CONNS: u16 = 1;
const STATS_ATTR_INPKTS: u16 = 2;
const STATS_ATTR_OUTPKTS: u16 = 3;
const STATS_ATTR_INBYTES: u16 = 4;
const STATS_ATTR_OUTBYTES: u16 = 5;
const STATS_ATTR_CPS: u16 = 6;
const STATS_ATTR_INPPS: u16 = 7;
const STATS_ATTR_OUTPPS: u16 = 8;
const STATS_ATTR_INBPS: u16 = 9;
const STATS_ATTR_OUTBPS: u16 = 10;

/// `IP_VS_SCHEDNAME_MAXLEN`: the name plus its NUL must fit in 16 bytes.
pub const SCHED_NAME_MAX_LEN: usize = 15;

/// `IP_VS_CONN_F_FWD_MASK`.
const FWD_MASK: u32 = 0x0007;

const NLA_F_NESTED: u16 = 0x8000;

/// A generic-netlink command of the IPVS family (`IPVS_CMD_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpvsCommand {
    NewService,
    SetService,
    DelService,
    GetService,
    NewDest,
    SetDest,
    DelDest,
    GetDest,
    NewDaemon,
    DelDaemon,
    GetDaemon,
    SetConfig,
    GetConfig,
    /// Only the reply to [`IpvsCommand::GetInfo`] uses it.
    SetInfo,
    GetInfo,
    Zero,
    Flush,
}

impl IpvsCommand {
    pub fn code(self) -> u8 {
        match self {
            IpvsCommand::NewService => 1,
            IpvsCommand::SetService => 2,
            IpvsCommand::DelService => 3,
            IpvsCommand::GetService => 4,
            IpvsCommand::NewDest => 5,
            IpvsCommand::SetDest => 6,
            IpvsCommand::DelDest => 7,
            IpvsCommand::GetDest => 8,
            IpvsCommand::NewDaemon => 9,
            IpvsCommand::DelDaemon => 10,
            IpvsCommand::GetDaemon => 11,
            IpvsCommand::SetConfig => 12,
            IpvsCommand::GetConfig => 13,
            IpvsCommand::SetInfo => 14,
            IpvsCommand::GetInfo => 15,
            IpvsCommand::Zero => 16,
            IpvsCommand::Flush => 17,
        }
    }

    pub fn from_code(code: u8) -> Option<IpvsCommand> {
        Some(match code {
            1 => IpvsCommand::NewService,
            2 => IpvsCommand::SetService,
            3 => IpvsCommand::DelService,
            4 => IpvsCommand::GetService,
            5 => IpvsCommand::NewDest,
            6 => IpvsCommand::SetDest,
            7 => IpvsCommand::DelDest,
            8 => IpvsCommand::GetDest,
            9 => IpvsCommand::NewDaemon,
            10 => IpvsCommand::DelDaemon,
            11 => IpvsCommand::GetDaemon,
            12 => IpvsCommand::SetConfig,
            13 => IpvsCommand::GetConfig,
            14 => IpvsCommand::SetInfo,
            15 => IpvsCommand::GetInfo,
            16 => IpvsCommand::Zero,
            17 => IpvsCommand::Flush,
            _ => return None,
        })
    }
}

/// The transport protocol of a virtual service (IPPROTO_* numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpvsProtocol {
    Tcp,
    Udp,
    Sctp,
    /// Anything else found in the kernel (someone used ipvsadm by hand).
    Other(u16),
}

impl IpvsProtocol {
    pub fn number(self) -> u16 {
        match self {
            IpvsProtocol::Tcp => 6,
            IpvsProtocol::Udp => 17,
            IpvsProtocol::Sctp => 132,
            IpvsProtocol::Other(n) => n,
        }
    }

    pub fn from_number(n: u16) -> IpvsProtocol {
        match n {
            6 => IpvsProtocol::Tcp,
            17 => IpvsProtocol::Udp,
            132 => IpvsProtocol::Sctp,
            n => IpvsProtocol::Other(n),
        }
    }
}

impl From<kproxy_model::Protocol> for IpvsProtocol {
    fn from(p: kproxy_model::Protocol) -> Self {
        match p {
            kproxy_model::Protocol::Tcp => IpvsProtocol::Tcp,
            kproxy_model::Protocol::Udp => IpvsProtocol::Udp,
            kproxy_model::Protocol::Sctp => IpvsProtocol::Sctp,
        }
    }
}

impl fmt::Display for IpvsProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpvsProtocol::Tcp => f.write_str("TCP"),
            IpvsProtocol::Udp => f.write_str("UDP"),
            IpvsProtocol::Sctp => f.write_str("SCTP"),
            IpvsProtocol::Other(n) => write!(f, "protocol {n}"),
        }
    }
}

/// Virtual service flags (`IP_VS_SVC_F_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceFlags(pub u32);

impl ServiceFlags {
    /// Session affinity: a client sticks to one real server for `timeout` seconds.
    pub const PERSISTENT: ServiceFlags = ServiceFlags(0x0001);
    /// Kernel bookkeeping ("in the hash table"); never sent, stripped on decode.
    pub const HASHED: ServiceFlags = ServiceFlags(0x0002);
    pub const ONE_PACKET: ServiceFlags = ServiceFlags(0x0004);
    pub const SCHED1: ServiceFlags = ServiceFlags(0x0008);
    pub const SCHED2: ServiceFlags = ServiceFlags(0x0010);
    pub const SCHED3: ServiceFlags = ServiceFlags(0x0020);
    /// `sh` scheduler: fall back to another server when the chosen one is unavailable.
    pub const SH_FALLBACK: ServiceFlags = ServiceFlags::SCHED1;
    /// `sh` scheduler: hash the source port too.
    pub const SH_PORT: ServiceFlags = ServiceFlags::SCHED2;

    pub const fn empty() -> ServiceFlags {
        ServiceFlags(0)
    }

    pub const fn contains(self, other: ServiceFlags) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn union(self, other: ServiceFlags) -> ServiceFlags {
        ServiceFlags(self.0 | other.0)
    }
}

impl std::ops::BitOr for ServiceFlags {
    type Output = ServiceFlags;
    fn bitor(self, rhs: ServiceFlags) -> ServiceFlags {
        self.union(rhs)
    }
}

/// How packets reach a real server (`IP_VS_CONN_F_*` forwarding methods).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ForwardMethod {
    /// NAT (`-m`), what kube-proxy uses.
    #[default]
    Masquerade,
    Local,
    Tunnel,
    /// Direct routing (`-g`).
    DirectRoute,
    Bypass,
    /// Bits 5..7 are reserved; kept so a decode never fails on them.
    Other(u32),
}

impl ForwardMethod {
    pub fn code(self) -> u32 {
        match self {
            ForwardMethod::Masquerade => 0,
            ForwardMethod::Local => 1,
            ForwardMethod::Tunnel => 2,
            ForwardMethod::DirectRoute => 3,
            ForwardMethod::Bypass => 4,
            ForwardMethod::Other(n) => n & FWD_MASK,
        }
    }

    pub fn from_code(n: u32) -> ForwardMethod {
        match n & FWD_MASK {
            0 => ForwardMethod::Masquerade,
            1 => ForwardMethod::Local,
            2 => ForwardMethod::Tunnel,
            3 => ForwardMethod::DirectRoute,
            4 => ForwardMethod::Bypass,
            n => ForwardMethod::Other(n),
        }
    }
}

/// Counters and rates of a service or destination. Taken from the 64-bit
/// attribute set when the kernel sends it, else from the older 32/64-bit one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Stats {
    pub conns: u64,
    pub in_packets: u64,
    pub out_packets: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
    pub cps: u64,
    pub in_pps: u64,
    pub out_pps: u64,
    pub in_bps: u64,
    pub out_bps: u64,
}

/// A virtual service. Identified by (family, protocol, addr, port) or, when
/// `fwmark` is non-zero, by (family, fwmark).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Service {
    pub family: IpFamily,
    pub protocol: IpvsProtocol,
    pub addr: IpAddr,
    pub port: u16,
    /// Firewall-mark service when non-zero (then protocol/addr/port are not sent).
    pub fwmark: u32,
    /// Scheduler name: rr, wrr, lc, wlc, lblc, lblcr, sh, dh, sed, nq, mh, ...
    pub scheduler: String,
    pub flags: ServiceFlags,
    /// Persistence timeout in seconds (meaningful with [`ServiceFlags::PERSISTENT`]).
    pub timeout: u32,
    /// Persistence netmask exactly as the kernel stores it: for IPv4 the mask's
    /// bytes in network order (see [`Service::ipv4_netmask`]), for IPv6 a prefix length.
    pub netmask: u32,
    /// Filled in by dumps; ignored when sending.
    pub stats: Stats,
}

impl Service {
    /// A plain (non-persistent) service with the scheduler `rr` and a
    /// host-wide persistence mask, like kube-proxy creates.
    pub fn new(protocol: IpvsProtocol, addr: IpAddr, port: u16) -> Service {
        let family = IpFamily::of(&addr);
        Service {
            family,
            protocol,
            addr,
            port,
            fwmark: 0,
            scheduler: "rr".to_string(),
            flags: ServiceFlags::empty(),
            timeout: 0,
            netmask: Service::full_netmask(family),
            stats: Stats::default(),
        }
    }

    /// The persistence netmask that keeps whole client addresses apart
    /// (/32 or /128), as upstream kube-proxy sets it.
    pub fn full_netmask(family: IpFamily) -> u32 {
        match family {
            IpFamily::V4 => Service::ipv4_netmask(Ipv4Addr::BROADCAST),
            IpFamily::V6 => 128,
        }
    }

    /// The kernel's representation of an IPv4 persistence netmask.
    pub fn ipv4_netmask(mask: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(mask.octets())
    }

    /// Turns on ClientIP session affinity for `timeout` seconds.
    pub fn with_persistence(mut self, timeout: u32) -> Service {
        self.flags = self.flags | ServiceFlags::PERSISTENT;
        self.timeout = timeout;
        self
    }

    pub fn with_scheduler(mut self, scheduler: impl Into<String>) -> Service {
        self.scheduler = scheduler.into();
        self
    }

    /// The identity of the service, for comparisons that ignore settings and stats.
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            family: self.family,
            protocol: self.protocol,
            addr: self.addr,
            port: self.port,
            fwmark: self.fwmark,
        }
    }

    /// Checks what the kernel would reject with a bare EINVAL, so the error
    /// can say what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.fwmark == 0 && IpFamily::of(&self.addr) != self.family {
            return Err(format!(
                "address {} is not {}",
                self.addr,
                self.family.api_name()
            ));
        }
        if self.scheduler.is_empty() {
            return Err("empty scheduler name".to_string());
        }
        if self.scheduler.len() > SCHED_NAME_MAX_LEN || self.scheduler.contains('\0') {
            return Err(format!(
                "scheduler name {:?} is longer than {SCHED_NAME_MAX_LEN} bytes or contains NUL",
                self.scheduler
            ));
        }
        if self.family == IpFamily::V6 && self.netmask > 128 {
            return Err(format!("IPv6 persistence prefix {} > 128", self.netmask));
        }
        Ok(())
    }
}

/// What identifies a virtual service in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub family: IpFamily,
    pub protocol: IpvsProtocol,
    pub addr: IpAddr,
    pub port: u16,
    pub fwmark: u32,
}

impl fmt::Display for ServiceKey {
    /// `TCP 10.96.0.10:80`, `UDP [fd00::a]:53`, `FWM 7 (IPv4)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.fwmark != 0 {
            write!(f, "FWM {} ({})", self.fwmark, self.family)
        } else {
            write!(
                f,
                "{} {}",
                self.protocol,
                std::net::SocketAddr::new(self.addr, self.port)
            )
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.key().fmt(f)
    }
}

/// A real server of a virtual service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    pub addr: IpAddr,
    pub port: u16,
    pub fwd_method: ForwardMethod,
    /// 0 = quiescent: no new connections (graceful termination).
    pub weight: u32,
    /// Connection thresholds; 0 = unlimited.
    pub upper_threshold: u32,
    pub lower_threshold: u32,
    /// Filled in by dumps; ignored when sending.
    pub active_conns: u32,
    pub inactive_conns: u32,
    pub persist_conns: u32,
    /// The family of `addr`; sent so the kernel does not assume the service's.
    pub addr_family: IpFamily,
    pub stats: Stats,
}

impl Destination {
    /// A NAT real server with weight 1 and no thresholds, like kube-proxy creates.
    pub fn new(addr: IpAddr, port: u16) -> Destination {
        Destination {
            addr,
            port,
            fwd_method: ForwardMethod::Masquerade,
            weight: 1,
            upper_threshold: 0,
            lower_threshold: 0,
            active_conns: 0,
            inactive_conns: 0,
            persist_conns: 0,
            addr_family: IpFamily::of(&addr),
            stats: Stats::default(),
        }
    }

    pub fn with_weight(mut self, weight: u32) -> Destination {
        self.weight = weight;
        self
    }

    pub fn socket_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.addr, self.port)
    }

    pub fn validate(&self) -> Result<(), String> {
        if IpFamily::of(&self.addr) != self.addr_family {
            return Err(format!(
                "address {} is not {}",
                self.addr,
                self.addr_family.api_name()
            ));
        }
        // The kernel stores the weight in an int and rejects negatives.
        if self.weight > i32::MAX as u32 {
            return Err(format!("weight {} is out of range", self.weight));
        }
        if self.upper_threshold != 0 && self.lower_threshold > self.upper_threshold {
            return Err(format!(
                "lower threshold {} above upper threshold {}",
                self.lower_threshold, self.upper_threshold
            ));
        }
        Ok(())
    }
}

/// The kernel's connection timeouts in seconds. On SET_CONFIG, 0 leaves a
/// value unchanged (the kernel's own rule).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Timeouts {
    pub tcp: u32,
    pub tcp_fin: u32,
    pub udp: u32,
}

/// The reply to GET_INFO.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Info {
    /// `IP_VS_VERSION_CODE`, e.g. 0x010201.
    pub version: u32,
    /// Size of the connection hash table.
    pub conn_tab_size: u32,
}

impl Info {
    /// "1.2.1", as `ipvsadm` prints it.
    pub fn version_string(&self) -> String {
        format!(
            "{}.{}.{}",
            (self.version >> 16) & 0xff,
            (self.version >> 8) & 0xff,
            self.version & 0xff
        )
    }
}

/// One first-level attribute of an IPVS message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpvsAttr {
    Service(Service),
    Dest(Destination),
    TimeoutTcp(u32),
    TimeoutTcpFin(u32),
    TimeoutUdp(u32),
    /// Only in SET_INFO (the reply to GET_INFO).
    InfoVersion(u32),
    InfoConnTabSize(u32),
    /// Anything we do not model (daemon attributes, future additions).
    Other(DefaultNla),
}

/// An IPVS generic-netlink payload: a command and its attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsMessage {
    pub cmd: IpvsCommand,
    pub attrs: Vec<IpvsAttr>,
}

impl IpvsMessage {
    pub fn new(cmd: IpvsCommand, attrs: Vec<IpvsAttr>) -> IpvsMessage {
        IpvsMessage { cmd, attrs }
    }

    pub fn service(&self) -> Option<&Service> {
        self.attrs.iter().find_map(|a| match a {
            IpvsAttr::Service(s) => Some(s),
            _ => None,
        })
    }

    pub fn dest(&self) -> Option<&Destination> {
        self.attrs.iter().find_map(|a| match a {
            IpvsAttr::Dest(d) => Some(d),
            _ => None,
        })
    }

    /// The timeouts of a GET_CONFIG reply (absent ones are 0).
    pub fn timeouts(&self) -> Timeouts {
        let mut t = Timeouts::default();
        for a in &self.attrs {
            match a {
                IpvsAttr::TimeoutTcp(v) => t.tcp = *v,
                IpvsAttr::TimeoutTcpFin(v) => t.tcp_fin = *v,
                IpvsAttr::TimeoutUdp(v) => t.udp = *v,
                _ => {}
            }
        }
        t
    }

    /// The info of a GET_INFO reply, if it carries a version.
    pub fn info(&self) -> Option<Info> {
        let mut version = None;
        let mut conn_tab_size = 0;
        for a in &self.attrs {
            match a {
                IpvsAttr::InfoVersion(v) => version = Some(*v),
                IpvsAttr::InfoConnTabSize(v) => conn_tab_size = *v,
                _ => {}
            }
        }
        version.map(|version| Info {
            version,
            conn_tab_size,
        })
    }

    /// Parses a payload (after the genl header). `dest_family` is the
    /// service's family, used for destinations from kernels too old to send
    /// `IPVS_DEST_ATTR_ADDR_FAMILY`.
    pub fn parse_with_family(
        buf: &[u8],
        header: GenlHeader,
        dest_family: Option<IpFamily>,
    ) -> Result<IpvsMessage, DecodeError> {
        let cmd = IpvsCommand::from_code(header.cmd)
            .ok_or_else(|| DecodeError::from(format!("unknown IPVS command {}", header.cmd)))?;
        let mut attrs = Vec::new();
        for nla in NlasIterator::new(buf) {
            let nla = nla?;
            let kind = nla.kind() & !NLA_F_NESTED;
            let value = nla.value();
            let attr = if cmd == IpvsCommand::SetInfo {
                match kind {
                    INFO_ATTR_VERSION => IpvsAttr::InfoVersion(parse_u32(value)?),
                    INFO_ATTR_CONN_TAB_SIZE => IpvsAttr::InfoConnTabSize(parse_u32(value)?),
                    _ => IpvsAttr::Other(DefaultNla::parse(&nla)?),
                }
            } else {
                match kind {
                    CMD_ATTR_SERVICE => IpvsAttr::Service(parse_service(value)?),
                    CMD_ATTR_DEST => IpvsAttr::Dest(parse_dest(value, dest_family)?),
                    CMD_ATTR_TIMEOUT_TCP => IpvsAttr::TimeoutTcp(parse_u32(value)?),
                    CMD_ATTR_TIMEOUT_TCP_FIN => IpvsAttr::TimeoutTcpFin(parse_u32(value)?),
                    CMD_ATTR_TIMEOUT_UDP => IpvsAttr::TimeoutUdp(parse_u32(value)?),
                    _ => IpvsAttr::Other(DefaultNla::parse(&nla)?),
                }
            };
            attrs.push(attr);
        }
        Ok(IpvsMessage { cmd, attrs })
    }
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        IPVS_GENL_NAME
    }

    fn command(&self) -> u8 {
        self.cmd.code()
    }

    fn version(&self) -> u8 {
        IPVS_GENL_VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        IpvsMessage::parse_with_family(buf, header, None)
    }
}

// ---------------------------------------------------------------- emitting

/// A flat attribute with a fixed value, used to build nested attributes.
enum Leaf {
    U16(u16, u16),
    U16Be(u16, u16),
    U32(u16, u32),
    Bytes(u16, Vec<u8>),
    /// NUL-terminated string.
    Str(u16, String),
}

impl Nla for Leaf {
    fn value_len(&self) -> usize {
        match self {
            Leaf::U16(..) | Leaf::U16Be(..) => 2,
            Leaf::U32(..) => 4,
            Leaf::Bytes(_, b) => b.len(),
            Leaf::Str(_, s) => s.len() + 1,
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Leaf::U16(k, _)
            | Leaf::U16Be(k, _)
            | Leaf::U32(k, _)
            | Leaf::Bytes(k, _)
            | Leaf::Str(k, _) => *k,
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        // emit_* only fail on a short buffer, and netlink-packet-core sizes the
        // buffer from value_len() above, so the results carry no information.
        match self {
            Leaf::U16(_, v) => {
                let _ = emit_u16(buffer, *v);
            }
            Leaf::U16Be(_, v) => {
                let _ = emit_u16_be(buffer, *v);
            }
            Leaf::U32(_, v) => {
                let _ = emit_u32(buffer, *v);
            }
            Leaf::Bytes(_, b) => buffer[..b.len()].copy_from_slice(b),
            Leaf::Str(_, s) => {
                buffer[..s.len()].copy_from_slice(s.as_bytes());
                buffer[s.len()] = 0;
            }
        }
    }
}

fn family_code(f: IpFamily) -> u16 {
    match f {
        IpFamily::V4 => AF_INET,
        IpFamily::V6 => AF_INET6,
    }
}

fn addr_bytes(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The service attributes, in the order libipvs sends them. Always the full
/// set: NEW/SET_SERVICE require SCHED_NAME, FLAGS, TIMEOUT and NETMASK, and
/// the other commands ignore what they do not need.
fn service_leaves(s: &Service) -> Vec<Leaf> {
    let mut v = vec![Leaf::U16(SVC_ATTR_AF, family_code(s.family))];
    if s.fwmark != 0 {
        v.push(Leaf::U32(SVC_ATTR_FWMARK, s.fwmark));
    } else {
        v.push(Leaf::U16(SVC_ATTR_PROTOCOL, s.protocol.number()));
        v.push(Leaf::Bytes(SVC_ATTR_ADDR, addr_bytes(&s.addr)));
        v.push(Leaf::U16Be(SVC_ATTR_PORT, s.port));
    }
    v.push(Leaf::Str(SVC_ATTR_SCHED_NAME, s.scheduler.clone()));
    // struct ip_vs_flags { u32 flags; u32 mask; }. HASHED is the kernel's
    // own state: setting it on NEW_SERVICE makes the kernel skip hashing the
    // service, so it is never set and masked out.
    let hashed = ServiceFlags::HASHED.0;
    let mut flags = Vec::with_capacity(8);
    flags.extend_from_slice(&(s.flags.0 & !hashed).to_ne_bytes());
    flags.extend_from_slice(&(!hashed).to_ne_bytes());
    v.push(Leaf::Bytes(SVC_ATTR_FLAGS, flags));
    v.push(Leaf::U32(SVC_ATTR_TIMEOUT, s.timeout));
    v.push(Leaf::U32(SVC_ATTR_NETMASK, s.netmask));
    v
}

/// NEW/SET_DEST require FWD_METHOD, WEIGHT, U_THRESH and L_THRESH.
fn dest_leaves(d: &Destination) -> Vec<Leaf> {
    vec![
        Leaf::Bytes(DEST_ATTR_ADDR, addr_bytes(&d.addr)),
        Leaf::U16Be(DEST_ATTR_PORT, d.port),
        Leaf::U32(DEST_ATTR_FWD_METHOD, d.fwd_method.code()),
        Leaf::U32(DEST_ATTR_WEIGHT, d.weight),
        Leaf::U32(DEST_ATTR_U_THRESH, d.upper_threshold),
        Leaf::U32(DEST_ATTR_L_THRESH, d.lower_threshold),
        Leaf::U16(DEST_ATTR_ADDR_FAMILY, family_code(d.addr_family)),
    ]
}

impl Nla for IpvsAttr {
    fn value_len(&self) -> usize {
        match self {
            IpvsAttr::Service(s) => service_leaves(s).as_slice().buffer_len(),
            IpvsAttr::Dest(d) => dest_leaves(d).as_slice().buffer_len(),
            IpvsAttr::TimeoutTcp(_)
            | IpvsAttr::TimeoutTcpFin(_)
            | IpvsAttr::TimeoutUdp(_)
            | IpvsAttr::InfoVersion(_)
            | IpvsAttr::InfoConnTabSize(_) => 4,
            IpvsAttr::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            // The kernel parses these with nla_parse_nested, which does not
            // require NLA_F_NESTED; libipvs sets it, and so do we.
            IpvsAttr::Service(_) => CMD_ATTR_SERVICE | NLA_F_NESTED,
            IpvsAttr::Dest(_) => CMD_ATTR_DEST | NLA_F_NESTED,
            IpvsAttr::TimeoutTcp(_) => CMD_ATTR_TIMEOUT_TCP,
            IpvsAttr::TimeoutTcpFin(_) => CMD_ATTR_TIMEOUT_TCP_FIN,
            IpvsAttr::TimeoutUdp(_) => CMD_ATTR_TIMEOUT_UDP,
            IpvsAttr::InfoVersion(_) => INFO_ATTR_VERSION,
            IpvsAttr::InfoConnTabSize(_) => INFO_ATTR_CONN_TAB_SIZE,
            IpvsAttr::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            IpvsAttr::Service(s) => service_leaves(s).as_slice().emit(buffer),
            IpvsAttr::Dest(d) => dest_leaves(d).as_slice().emit(buffer),
            IpvsAttr::TimeoutTcp(v)
            | IpvsAttr::TimeoutTcpFin(v)
            | IpvsAttr::TimeoutUdp(v)
            | IpvsAttr::InfoVersion(v)
            | IpvsAttr::InfoConnTabSize(v) => {
                let _ = emit_u32(buffer, *v);
            }
            IpvsAttr::Other(nla) => nla.emit_value(buffer),
        }
    }
}

// ---------------------------------------------------------------- parsing

/// The value of an attribute, borrowed from the message buffer itself (so
/// it can outlive the `NlaBuffer` view). `NlasIterator` has checked the length.
fn nla_value(nla: NlaBuffer<&[u8]>) -> &[u8] {
    let len = usize::from(nla.length());
    nla.into_inner().get(4..len).unwrap_or_default()
}

fn parse_family(value: &[u8]) -> Result<IpFamily, DecodeError> {
    match parse_u16(value)? {
        AF_INET => Ok(IpFamily::V4),
        AF_INET6 => Ok(IpFamily::V6),
        other => Err(DecodeError::from(format!(
            "unsupported address family {other}"
        ))),
    }
}

/// Addresses come as 4 or 16 bytes from requests and as a 16-byte
/// `union nf_inet_addr` from dumps; the family decides which bytes count.
fn parse_addr(value: &[u8], family: IpFamily) -> Result<IpAddr, DecodeError> {
    match family {
        IpFamily::V4 => {
            let b: [u8; 4] = value
                .get(..4)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| DecodeError::invalid_ip_address(value.len()))?;
            Ok(IpAddr::V4(Ipv4Addr::from(b)))
        }
        IpFamily::V6 => {
            let b: [u8; 16] = value
                .try_into()
                .map_err(|_| DecodeError::invalid_ip_address(value.len()))?;
            Ok(IpAddr::V6(Ipv6Addr::from(b)))
        }
    }
}

fn unspecified(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpFamily::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

fn parse_stats(value: &[u8], wide: bool) -> Result<Stats, DecodeError> {
    let mut s = Stats::default();
    for nla in NlasIterator::new(value) {
        let nla = nla?;
        let v = nla.value();
        // STATS64 is all u64; STATS has u64 byte counters and u32 for the rest.
        let n = |is64: bool| -> Result<u64, DecodeError> {
            if is64 || wide {
                parse_u64(v)
            } else {
                parse_u32(v).map(u64::from)
            }
        };
        match nla.kind() {
            STATS_ATTR_CONNS => s.conns = n(false)?,
            STATS_ATTR_INPKTS => s.in_packets = n(false)?,
            STATS_ATTR_OUTPKTS => s.out_packets = n(false)?,
            STATS_ATTR_INBYTES => s.in_bytes = n(true)?,
            STATS_ATTR_OUTBYTES => s.out_bytes = n(true)?,
            STATS_ATTR_CPS => s.cps = n(false)?,
            STATS_ATTR_INPPS => s.in_pps = n(false)?,
            STATS_ATTR_OUTPPS => s.out_pps = n(false)?,
            STATS_ATTR_INBPS => s.in_bps = n(false)?,
            STATS_ATTR_OUTBPS => s.out_bps = n(false)?,
            _ => {} // PAD and future counters
        }
    }
    Ok(s)
}

fn parse_service(buf: &[u8]) -> Result<Service, DecodeError> {
    let mut family = None;
    let mut protocol = None;
    let mut addr_raw: Option<&[u8]> = None;
    let mut port = 0;
    let mut fwmark = 0;
    let mut scheduler = String::new();
    let mut flags = ServiceFlags::empty();
    let mut timeout = 0;
    let mut netmask = 0;
    let mut stats = None;
    let mut stats64 = None;
    for nla in NlasIterator::new(buf) {
        let nla = nla?;
        let kind = nla.kind() & !NLA_F_NESTED;
        let v = nla_value(nla);
        match kind {
            SVC_ATTR_AF => family = Some(parse_family(v)?),
            SVC_ATTR_PROTOCOL => protocol = Some(IpvsProtocol::from_number(parse_u16(v)?)),
            SVC_ATTR_ADDR => addr_raw = Some(v),
            SVC_ATTR_PORT => port = parse_u16_be(v)?,
            SVC_ATTR_FWMARK => fwmark = parse_u32(v)?,
            SVC_ATTR_SCHED_NAME => scheduler = parse_string(v)?,
            SVC_ATTR_FLAGS => {
                let f = v
                    .get(..4)
                    .ok_or_else(|| DecodeError::from("IPVS_SVC_ATTR_FLAGS shorter than 4 bytes"))?;
                flags = ServiceFlags(parse_u32(f)? & !ServiceFlags::HASHED.0);
            }
            SVC_ATTR_TIMEOUT => timeout = parse_u32(v)?,
            SVC_ATTR_NETMASK => netmask = parse_u32(v)?,
            SVC_ATTR_STATS => stats = Some(parse_stats(v, false)?),
            SVC_ATTR_STATS64 => stats64 = Some(parse_stats(v, true)?),
            _ => {} // PE_NAME and future attributes
        }
    }
    let family = family.ok_or_else(|| DecodeError::from("service without IPVS_SVC_ATTR_AF"))?;
    let addr = match addr_raw {
        Some(raw) => parse_addr(raw, family)?,
        None => unspecified(family),
    };
    Ok(Service {
        family,
        // A fwmark service is TCP in the kernel's eyes (ip_vs_genl_parse_service).
        protocol: protocol.unwrap_or(IpvsProtocol::Tcp),
        addr,
        port,
        fwmark,
        scheduler,
        flags,
        timeout,
        netmask,
        stats: stats64.or(stats).unwrap_or_default(),
    })
}

fn parse_dest(buf: &[u8], family_hint: Option<IpFamily>) -> Result<Destination, DecodeError> {
    let mut addr_raw: Option<&[u8]> = None;
    let mut d = Destination::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
    d.weight = 0;
    let mut family = None;
    let mut stats = None;
    let mut stats64 = None;
    for nla in NlasIterator::new(buf) {
        let nla = nla?;
        let kind = nla.kind() & !NLA_F_NESTED;
        let v = nla_value(nla);
        match kind {
            DEST_ATTR_ADDR => addr_raw = Some(v),
            DEST_ATTR_PORT => d.port = parse_u16_be(v)?,
            DEST_ATTR_FWD_METHOD => d.fwd_method = ForwardMethod::from_code(parse_u32(v)?),
            DEST_ATTR_WEIGHT => d.weight = parse_u32(v)?,
            DEST_ATTR_U_THRESH => d.upper_threshold = parse_u32(v)?,
            DEST_ATTR_L_THRESH => d.lower_threshold = parse_u32(v)?,
            DEST_ATTR_ACTIVE_CONNS => d.active_conns = parse_u32(v)?,
            DEST_ATTR_INACT_CONNS => d.inactive_conns = parse_u32(v)?,
            DEST_ATTR_PERSIST_CONNS => d.persist_conns = parse_u32(v)?,
            DEST_ATTR_STATS => stats = Some(parse_stats(v, false)?),
            DEST_ATTR_ADDR_FAMILY => family = Some(parse_family(v)?),
            DEST_ATTR_STATS64 => stats64 = Some(parse_stats(v, true)?),
            _ => {} // tunnel settings and future attributes
        }
    }
    let raw =
        addr_raw.ok_or_else(|| DecodeError::from("destination without IPVS_DEST_ATTR_ADDR"))?;
    let family = match (family, family_hint, raw.len()) {
        (Some(f), _, _) => f,
        (None, Some(f), _) => f,
        (None, None, 4) => IpFamily::V4,
        (None, None, n) => {
            return Err(DecodeError::from(format!(
                "destination address of {n} bytes without IPVS_DEST_ATTR_ADDR_FAMILY"
            )))
        }
    };
    d.addr = parse_addr(raw, family)?;
    d.addr_family = family;
    d.stats = stats64.or(stats).unwrap_or_default();
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NLM_F_ACK, NLM_F_REQUEST};
    use netlink_packet_generic::GenlMessage;

    fn emit(msg: &IpvsMessage) -> Vec<u8> {
        let mut buf = vec![0xAA; msg.buffer_len()];
        msg.emit(&mut buf);
        buf
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    /// Hand-checked against ip_vs.h: IPVS_CMD_ATTR_SERVICE = 1 (nested),
    /// IPVS_SVC_ATTR_AF 1 u16, PROTOCOL 2 u16, ADDR 3, PORT 4 (be16),
    /// SCHED_NAME 6 (NUL string), FLAGS 7 {flags, mask}, TIMEOUT 8, NETMASK 9.
    #[test]
    fn new_service_tcp_v4_golden() {
        let svc = Service::new(IpvsProtocol::Tcp, v4(10, 96, 0, 10), 80);
        let msg = IpvsMessage::new(
            IpvsCommand::NewService,
            vec![IpvsAttr::Service(svc.clone())],
        );
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            // nested SERVICE: len 72, type 1 | NLA_F_NESTED
            72, 0, 0x01, 0x80,
            6, 0, 1, 0,   2, 0, 0, 0,              // AF = AF_INET (2), padded
            6, 0, 2, 0,   6, 0, 0, 0,              // PROTOCOL = IPPROTO_TCP (6)
            8, 0, 3, 0,   10, 96, 0, 10,           // ADDR = 10.96.0.10
            6, 0, 4, 0,   0, 80, 0, 0,             // PORT = 80, network order
            7, 0, 6, 0,   b'r', b'r', 0, 0,        // SCHED_NAME = "rr\0", padded
            12, 0, 7, 0,  0, 0, 0, 0,  0xfd, 0xff, 0xff, 0xff, // FLAGS {0, ~HASHED}
            8, 0, 8, 0,   0, 0, 0, 0,              // TIMEOUT = 0
            8, 0, 9, 0,   0xff, 0xff, 0xff, 0xff,  // NETMASK = 255.255.255.255
        ];
        assert_eq!(emit(&msg), want);
        assert_eq!(msg.command(), 1);
        assert_eq!(msg.version(), 1);
        assert_eq!(IpvsMessage::family_name(), "IPVS");

        // and it decodes back to the same service
        let back = IpvsMessage::parse_with_param(&want, GenlHeader { cmd: 1, version: 1 }).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn persistent_udp_v6_service_golden() {
        let addr: IpAddr = "fd00::a".parse().unwrap();
        let svc = Service::new(IpvsProtocol::Udp, addr, 53)
            .with_scheduler("wrr")
            .with_persistence(10800);
        let msg = IpvsMessage::new(IpvsCommand::SetService, vec![IpvsAttr::Service(svc)]);
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            84, 0, 0x01, 0x80,
            6, 0, 1, 0,   10, 0, 0, 0,             // AF_INET6 = 10
            6, 0, 2, 0,   17, 0, 0, 0,             // IPPROTO_UDP = 17
            20, 0, 3, 0,  0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a,
            6, 0, 4, 0,   0, 53, 0, 0,
            8, 0, 6, 0,   b'w', b'r', b'r', 0,
            12, 0, 7, 0,  1, 0, 0, 0,  0xfd, 0xff, 0xff, 0xff, // PERSISTENT
            8, 0, 8, 0,   0x30, 0x2a, 0, 0,        // 10800 s
            8, 0, 9, 0,   128, 0, 0, 0,            // /128
        ];
        assert_eq!(emit(&msg), want);
        assert_eq!(msg.command(), 2);
    }

    #[test]
    fn fwmark_service_sends_no_address() {
        let mut svc = Service::new(IpvsProtocol::Tcp, v4(0, 0, 0, 0), 0);
        svc.fwmark = 7;
        let bytes = emit(&IpvsMessage::new(
            IpvsCommand::DelService,
            vec![IpvsAttr::Service(svc.clone())],
        ));
        #[rustfmt::skip]
        let head: &[u8] = &[
            56, 0, 0x01, 0x80,
            6, 0, 1, 0, 2, 0, 0, 0,
            8, 0, 5, 0, 7, 0, 0, 0,                // FWMARK = 7
            7, 0, 6, 0, b'r', b'r', 0, 0,
        ];
        assert_eq!(&bytes[..head.len()], head);
        let back =
            IpvsMessage::parse_with_param(&bytes, GenlHeader { cmd: 3, version: 1 }).unwrap();
        assert_eq!(back.service(), Some(&svc));
        assert_eq!(svc.key().to_string(), "FWM 7 (IPv4)");
    }

    /// IPVS_CMD_ATTR_DEST = 2; DEST_ATTR ADDR 1, PORT 2 (be16), FWD_METHOD 3,
    /// WEIGHT 4, U_THRESH 5, L_THRESH 6, ADDR_FAMILY 11.
    #[test]
    fn new_dest_golden() {
        let svc = Service::new(IpvsProtocol::Tcp, v4(10, 96, 0, 10), 80);
        let dest = Destination::new(v4(10, 0, 0, 2), 8080).with_weight(5);
        let msg = IpvsMessage::new(
            IpvsCommand::NewDest,
            vec![IpvsAttr::Service(svc), IpvsAttr::Dest(dest.clone())],
        );
        let bytes = emit(&msg);
        #[rustfmt::skip]
        let want_dest: Vec<u8> = vec![
            60, 0, 0x02, 0x80,
            8, 0, 1, 0,   10, 0, 0, 2,
            6, 0, 2, 0,   0x1f, 0x90, 0, 0,        // 8080 = 0x1f90, network order
            8, 0, 3, 0,   0, 0, 0, 0,              // MASQ
            8, 0, 4, 0,   5, 0, 0, 0,              // weight 5
            8, 0, 5, 0,   0, 0, 0, 0,
            8, 0, 6, 0,   0, 0, 0, 0,
            6, 0, 11, 0,  2, 0, 0, 0,              // ADDR_FAMILY = AF_INET
        ];
        assert_eq!(&bytes[72..], &want_dest[..]);
        let back =
            IpvsMessage::parse_with_param(&bytes, GenlHeader { cmd: 5, version: 1 }).unwrap();
        assert_eq!(back, msg);
        assert_eq!(back.dest(), Some(&dest));
    }

    #[test]
    fn timeouts_and_flush_golden() {
        let msg = IpvsMessage::new(
            IpvsCommand::SetConfig,
            vec![
                IpvsAttr::TimeoutTcp(900),
                IpvsAttr::TimeoutTcpFin(120),
                IpvsAttr::TimeoutUdp(300),
            ],
        );
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            8, 0, 4, 0, 0x84, 0x03, 0, 0,
            8, 0, 5, 0, 120, 0, 0, 0,
            8, 0, 6, 0, 0x2c, 0x01, 0, 0,
        ];
        assert_eq!(emit(&msg), want);
        assert_eq!(msg.command(), 12);
        let flush = IpvsMessage::new(IpvsCommand::Flush, vec![]);
        assert_eq!(flush.command(), 17);
        assert!(emit(&flush).is_empty());
        assert_eq!(IpvsMessage::new(IpvsCommand::GetInfo, vec![]).command(), 15);
        assert_eq!(
            IpvsMessage::new(IpvsCommand::GetConfig, vec![]).command(),
            13
        );
        let back = IpvsMessage::parse_with_param(
            &want,
            GenlHeader {
                cmd: 13,
                version: 1,
            },
        )
        .unwrap();
        assert_eq!(
            back.timeouts(),
            Timeouts {
                tcp: 900,
                tcp_fin: 120,
                udp: 300
            }
        );
    }

    /// A whole netlink request as it goes on the wire, with a resolved family id.
    #[test]
    fn full_netlink_frame() {
        let mut genl = GenlMessage::from_payload(IpvsMessage::new(IpvsCommand::Flush, vec![]));
        genl.set_resolved_family_id(0x1c);
        let mut nl = NetlinkMessage::from(genl);
        nl.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        nl.header.sequence_number = 7;
        nl.finalize();
        let mut buf = vec![0; nl.buffer_len()];
        nl.serialize(&mut buf);
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            20, 0, 0, 0,      // nlmsg_len
            0x1c, 0,          // nlmsg_type = family id
            5, 0,             // REQUEST | ACK
            7, 0, 0, 0,       // seq
            0, 0, 0, 0,       // port
            17, 1, 0, 0,      // genl: cmd FLUSH, version 1
        ];
        assert_eq!(buf, want);
        let _ = NetlinkHeader::default();
    }

    /// A service as the kernel dumps it (ip_vs_genl_fill_service): ADDR is the
    /// 16-byte union, FLAGS carries HASHED with mask ~0, and STATS/STATS64 follow.
    #[test]
    fn decode_dumped_service() {
        #[rustfmt::skip]
        let mut inner: Vec<u8> = vec![
            6, 0, 1, 0,   2, 0, 0, 0,
            6, 0, 2, 0,   132, 0, 0, 0,                       // SCTP
            20, 0, 3, 0,  10, 96, 0, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            6, 0, 4, 0,   0x01, 0xbb, 0, 0,                   // 443
            7, 0, 6, 0,   b's', b'h', 0, 0,
            12, 0, 7, 0,  0x0b, 0, 0, 0,  0xff, 0xff, 0xff, 0xff, // PERSISTENT|HASHED|SCHED1
            8, 0, 8, 0,   60, 0, 0, 0,
            8, 0, 9, 0,   0xff, 0xff, 0xff, 0xff,
        ];
        // STATS (nested, 10): conns u32 = 3, inbytes u64 = 1000
        #[rustfmt::skip]
        inner.extend_from_slice(&[
            24, 0, 10, 0x80,
            8, 0, 1, 0,  3, 0, 0, 0,
            12, 0, 4, 0, 0xe8, 0x03, 0, 0, 0, 0, 0, 0,
        ]);
        // STATS64 (nested, 12): conns u64 = 4 - wins over STATS
        #[rustfmt::skip]
        inner.extend_from_slice(&[
            16, 0, 12, 0x80,
            12, 0, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0,
        ]);
        let mut buf = Vec::new();
        buf.extend_from_slice(&((inner.len() + 4) as u16).to_ne_bytes());
        buf.extend_from_slice(&[0x01, 0x80]);
        buf.extend_from_slice(&inner);
        let msg = IpvsMessage::parse_with_param(&buf, GenlHeader { cmd: 1, version: 1 }).unwrap();
        let s = msg.service().unwrap();
        assert_eq!(s.family, IpFamily::V4);
        assert_eq!(s.protocol, IpvsProtocol::Sctp);
        assert_eq!(s.addr, v4(10, 96, 0, 11));
        assert_eq!(s.port, 443);
        assert_eq!(s.scheduler, "sh");
        assert_eq!(
            s.flags,
            ServiceFlags::PERSISTENT | ServiceFlags::SH_FALLBACK
        );
        assert_eq!(s.timeout, 60);
        assert_eq!(s.stats.conns, 4);
        assert_eq!(s.stats.in_bytes, 0);
        assert_eq!(s.to_string(), "SCTP 10.96.0.11:443");
    }

    #[test]
    fn decode_dumped_v6_dest_with_counters() {
        #[rustfmt::skip]
        let inner: Vec<u8> = vec![
            20, 0, 1, 0,  0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // 2001:db8::
            6, 0, 2, 0,   0, 80, 0, 0,
            8, 0, 3, 0,   3, 0x00, 0x01, 0,       // DROUTE plus unrelated high bits
            8, 0, 4, 0,   0, 0, 0, 0,
            8, 0, 5, 0,   100, 0, 0, 0,
            8, 0, 6, 0,   10, 0, 0, 0,
            8, 0, 7, 0,   2, 0, 0, 0,
            8, 0, 8, 0,   5, 0, 0, 0,
            8, 0, 9, 0,   1, 0, 0, 0,
            6, 0, 11, 0,  10, 0, 0, 0,
        ];
        let mut buf = vec![(inner.len() + 4) as u8, 0, 0x02, 0x80];
        buf.extend_from_slice(&inner);
        let msg = IpvsMessage::parse_with_param(&buf, GenlHeader { cmd: 5, version: 1 }).unwrap();
        let d = msg.dest().unwrap();
        assert_eq!(d.addr, "2001:db8::".parse::<IpAddr>().unwrap());
        assert_eq!(d.addr_family, IpFamily::V6);
        assert_eq!(d.port, 80);
        assert_eq!(d.fwd_method, ForwardMethod::DirectRoute);
        assert_eq!(d.weight, 0);
        assert_eq!((d.upper_threshold, d.lower_threshold), (100, 10));
        assert_eq!(
            (d.active_conns, d.inactive_conns, d.persist_conns),
            (2, 5, 1)
        );
    }

    #[test]
    fn dest_family_from_hint_when_kernel_omits_it() {
        // 16-byte v4 union without ADDR_FAMILY: undecidable alone ...
        #[rustfmt::skip]
        let inner: Vec<u8> = vec![
            20, 0, 1, 0,  10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            6, 0, 2, 0,   0x1f, 0x90, 0, 0,
        ];
        let mut buf = vec![(inner.len() + 4) as u8, 0, 0x02, 0x80];
        buf.extend_from_slice(&inner);
        let h = GenlHeader { cmd: 5, version: 1 };
        assert!(IpvsMessage::parse_with_param(&buf, h).is_err());
        // ... but fine with the service's family.
        let msg = IpvsMessage::parse_with_family(&buf, h, Some(IpFamily::V4)).unwrap();
        assert_eq!(
            msg.dest().unwrap().socket_addr().to_string(),
            "10.0.0.2:8080"
        );
    }

    #[test]
    fn decode_info_reply() {
        // GET_INFO is answered with cmd SET_INFO (14); attr 1 = version, 2 = table size
        let buf: Vec<u8> = vec![8, 0, 1, 0, 0x01, 0x02, 0x01, 0, 8, 0, 2, 0, 0, 0x10, 0, 0];
        let msg = IpvsMessage::parse_with_param(
            &buf,
            GenlHeader {
                cmd: 14,
                version: 1,
            },
        )
        .unwrap();
        let info = msg.info().unwrap();
        assert_eq!(info.version, 0x010201);
        assert_eq!(info.version_string(), "1.2.1");
        assert_eq!(info.conn_tab_size, 4096);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let h = GenlHeader { cmd: 1, version: 1 };
        // truncated attribute header
        assert!(IpvsMessage::parse_with_param(&[8, 0, 1], h).is_err());
        // length larger than buffer
        assert!(IpvsMessage::parse_with_param(&[40, 0, 1, 0x80, 0, 0, 0, 0], h).is_err());
        // service without AF
        assert!(
            IpvsMessage::parse_with_param(&[12, 0, 1, 0x80, 8, 0, 5, 0, 1, 0, 0, 0], h).is_err()
        );
        // AF with wrong size
        assert!(
            IpvsMessage::parse_with_param(&[12, 0, 1, 0x80, 8, 0, 1, 0, 2, 0, 0, 0], h).is_err()
        );
        // v6 service with a 4-byte address
        #[rustfmt::skip]
        let bad_addr = [20, 0, 1, 0x80, 6, 0, 1, 0, 10, 0, 0, 0, 8, 0, 3, 0, 1, 2, 3, 4];
        assert!(IpvsMessage::parse_with_param(&bad_addr, h).is_err());
        // unknown command
        assert!(IpvsMessage::parse_with_param(
            &[],
            GenlHeader {
                cmd: 99,
                version: 1
            }
        )
        .is_err());
        // every truncation of a valid message is handled
        let svc = Service::new(IpvsProtocol::Tcp, v4(1, 2, 3, 4), 1).with_persistence(5);
        let full = emit(&IpvsMessage::new(
            IpvsCommand::NewService,
            vec![IpvsAttr::Service(svc)],
        ));
        for n in 0..full.len() {
            let _ = IpvsMessage::parse_with_param(&full[..n], h);
        }
    }

    #[test]
    fn unknown_attributes_are_kept() {
        let buf: Vec<u8> = vec![8, 0, 3, 0x80, 1, 2, 3, 4];
        let msg = IpvsMessage::parse_with_param(
            &buf,
            GenlHeader {
                cmd: 11,
                version: 1,
            },
        )
        .unwrap();
        assert_eq!(msg.attrs.len(), 1);
        assert!(matches!(msg.attrs[0], IpvsAttr::Other(_)));
        assert_eq!(emit(&msg), buf);
    }

    #[test]
    fn validation() {
        let ok = Service::new(IpvsProtocol::Tcp, v4(1, 1, 1, 1), 80);
        assert!(ok.validate().is_ok());
        assert!(ok.clone().with_scheduler("").validate().is_err());
        assert!(ok
            .clone()
            .with_scheduler("a-very-long-sched")
            .validate()
            .is_err());
        let mut wrong_family = ok.clone();
        wrong_family.family = IpFamily::V6;
        assert!(wrong_family.validate().is_err());
        assert!(Destination::new(v4(1, 1, 1, 1), 1)
            .with_weight(u32::MAX)
            .validate()
            .is_err());
        let mut d = Destination::new(v4(1, 1, 1, 1), 1);
        d.addr_family = IpFamily::V6;
        assert!(d.validate().is_err());
        assert_eq!(
            Service::ipv4_netmask(Ipv4Addr::new(255, 255, 255, 0)).to_ne_bytes(),
            [255, 255, 255, 0]
        );
    }
}
