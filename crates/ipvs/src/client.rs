//! A synchronous IPVS client over generic netlink.

use std::fmt;
use std::io;

use kproxy_model::IpFamily;
use netlink_packet_core::{DecodeError, NetlinkDeserializable};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlHeader, GenlMessage};
use netlink_sys::protocols::NETLINK_GENERIC;

use crate::codec::{
    Destination, Info, IpvsAttr, IpvsCommand, IpvsMessage, Service, ServiceKey, Timeouts,
    IPVS_GENL_NAME,
};
use crate::errno::errno_text;
use crate::nl::{NlError, NlSocket};

/// What the client was doing when something failed; `Display` names the
/// service and destination, e.g. `adding destination 10.0.0.2:8080 to TCP 10.96.0.10:80`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    ResolveFamily,
    ListServices,
    GetService(ServiceKey),
    AddService(ServiceKey),
    UpdateService(ServiceKey),
    DeleteService(ServiceKey),
    ListDestinations(ServiceKey),
    AddDestination(ServiceKey, std::net::SocketAddr),
    UpdateDestination(ServiceKey, std::net::SocketAddr),
    DeleteDestination(ServiceKey, std::net::SocketAddr),
    Flush,
    GetTimeouts,
    SetTimeouts,
    GetInfo,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operation::ResolveFamily => {
                write!(f, "resolving generic netlink family {IPVS_GENL_NAME}")
            }
            Operation::ListServices => f.write_str("listing IPVS services"),
            Operation::GetService(s) => write!(f, "getting service {s}"),
            Operation::AddService(s) => write!(f, "adding service {s}"),
            Operation::UpdateService(s) => write!(f, "updating service {s}"),
            Operation::DeleteService(s) => write!(f, "deleting service {s}"),
            Operation::ListDestinations(s) => write!(f, "listing destinations of {s}"),
            Operation::AddDestination(s, d) => write!(f, "adding destination {d} to {s}"),
            Operation::UpdateDestination(s, d) => write!(f, "updating destination {d} of {s}"),
            Operation::DeleteDestination(s, d) => write!(f, "deleting destination {d} from {s}"),
            Operation::Flush => f.write_str("flushing IPVS"),
            Operation::GetTimeouts => f.write_str("getting IPVS timeouts"),
            Operation::SetTimeouts => f.write_str("setting IPVS timeouts"),
            Operation::GetInfo => f.write_str("getting IPVS info"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    /// The kernel has no "IPVS" generic netlink family.
    #[error("IPVS is not available in this kernel: load ip_vs or use --mode=iptables")]
    NotAvailable,
    /// The kernel refused a request.
    #[error("{op}: {}", errno_text(*.errno))]
    Kernel { op: Operation, errno: i32 },
    #[error("{op}: netlink socket: {source}")]
    Io {
        op: Operation,
        #[source]
        source: io::Error,
    },
    #[error("{op}: malformed reply from the kernel: {source}")]
    Decode {
        op: Operation,
        #[source]
        source: DecodeError,
    },
    /// Refused before sending: the kernel would answer with a bare EINVAL.
    #[error("{op}: {reason}")]
    Invalid { op: Operation, reason: String },
}

impl IpvsError {
    /// The kernel's errno, for errors the kernel returned.
    pub fn errno(&self) -> Option<i32> {
        match self {
            IpvsError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// The object already exists (EEXIST).
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    /// The service (ESRCH) or destination (ENOENT) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self.errno(), Some(libc::ESRCH) | Some(libc::ENOENT))
    }

    fn from_nl(op: Operation, e: NlError) -> IpvsError {
        match e {
            NlError::Io(source) => IpvsError::Io { op, source },
            NlError::Kernel(errno) => IpvsError::Kernel { op, errno },
            NlError::Decode(source) => IpvsError::Decode { op, source },
        }
    }
}

/// A connection to the kernel's IPVS over generic netlink. One request at a
/// time; not thread-safe by design (`&mut self`).
pub struct IpvsClient {
    nl: NlSocket,
    family_id: u16,
}

impl IpvsClient {
    /// Opens a generic netlink socket and resolves the IPVS family id.
    pub fn new() -> Result<IpvsClient, IpvsError> {
        let op = Operation::ResolveFamily;
        let mut nl = NlSocket::new(NETLINK_GENERIC).map_err(|source| IpvsError::Io {
            op: op.clone(),
            source,
        })?;
        let ctrl = GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(IPVS_GENL_NAME.to_string())],
        };
        let mut family_id = None;
        let res = nl.request(
            GenlMessage::from_payload(ctrl),
            false,
            0,
            |header, payload| {
                let msg =
                    <GenlMessage<GenlCtrl> as NetlinkDeserializable>::deserialize(header, payload)?;
                for nla in msg.payload.nlas {
                    if let GenlCtrlAttrs::FamilyId(id) = nla {
                        family_id = Some(id);
                    }
                }
                Ok(())
            },
        );
        match res {
            // The controller answers ENOENT for a family nobody registered.
            Err(NlError::Kernel(libc::ENOENT)) => return Err(IpvsError::NotAvailable),
            Err(e) => return Err(IpvsError::from_nl(op, e)),
            Ok(()) => {}
        }
        let family_id = family_id.ok_or(IpvsError::NotAvailable)?;
        tracing::debug!(family_id, "resolved generic netlink family IPVS");
        Ok(IpvsClient { nl, family_id })
    }

    /// The dynamically assigned generic netlink family id of IPVS.
    pub fn family_id(&self) -> u16 {
        self.family_id
    }

    /// How many datagrams the kernel's last answer took (a large dump takes
    /// several). For diagnostics and tests.
    pub fn last_reply_datagrams(&self) -> usize {
        self.nl.last_datagrams
    }

    /// Sends one IPVS request and collects the data messages of the answer.
    fn exec(
        &mut self,
        op: Operation,
        msg: IpvsMessage,
        dump: bool,
        dest_family: Option<IpFamily>,
    ) -> Result<Vec<IpvsMessage>, IpvsError> {
        let family_id = self.family_id;
        let mut genl = GenlMessage::from_payload(msg);
        genl.set_resolved_family_id(family_id);
        let mut replies = Vec::new();
        self.nl
            .request(genl, dump, 0, |header, payload| {
                if header.message_type != family_id {
                    return Err(DecodeError::from(format!(
                        "unexpected netlink message type {}",
                        header.message_type
                    )));
                }
                let gh = GenlHeader::parse(payload)?;
                let body = payload.get(4..).unwrap_or_default();
                replies.push(IpvsMessage::parse_with_family(body, gh, dest_family)?);
                Ok(())
            })
            .map_err(|e| IpvsError::from_nl(op, e))?;
        Ok(replies)
    }

    /// Every virtual service in this network namespace (a dump that may
    /// span several datagrams).
    pub fn list_services(&mut self) -> Result<Vec<Service>, IpvsError> {
        let msgs = self.exec(
            Operation::ListServices,
            IpvsMessage::new(IpvsCommand::GetService, vec![]),
            true,
            None,
        )?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| {
                m.attrs.into_iter().find_map(|a| match a {
                    IpvsAttr::Service(s) => Some(s),
                    _ => None,
                })
            })
            .collect())
    }

    /// One service as the kernel has it; `Ok(None)` when it does not exist.
    pub fn get_service(&mut self, svc: &Service) -> Result<Option<Service>, IpvsError> {
        let res = self.exec(
            Operation::GetService(svc.key()),
            IpvsMessage::new(
                IpvsCommand::GetService,
                vec![IpvsAttr::Service(svc.clone())],
            ),
            false,
            None,
        );
        match res {
            Ok(msgs) => Ok(msgs.iter().find_map(|m| m.service().cloned())),
            Err(e) if e.errno() == Some(libc::ESRCH) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn validated(op: &Operation, r: Result<(), String>) -> Result<(), IpvsError> {
        r.map_err(|reason| IpvsError::Invalid {
            op: op.clone(),
            reason,
        })
    }

    fn simple(&mut self, op: Operation, msg: IpvsMessage) -> Result<(), IpvsError> {
        self.exec(op, msg, false, None).map(|_| ())
    }

    /// NEW_SERVICE; EEXIST if it is already there (use [`Self::update_service`]).
    pub fn add_service(&mut self, svc: &Service) -> Result<(), IpvsError> {
        let op = Operation::AddService(svc.key());
        Self::validated(&op, svc.validate())?;
        self.simple(
            op,
            IpvsMessage::new(
                IpvsCommand::NewService,
                vec![IpvsAttr::Service(svc.clone())],
            ),
        )
    }

    /// SET_SERVICE: changes scheduler, flags, timeout and netmask in place.
    pub fn update_service(&mut self, svc: &Service) -> Result<(), IpvsError> {
        let op = Operation::UpdateService(svc.key());
        Self::validated(&op, svc.validate())?;
        self.simple(
            op,
            IpvsMessage::new(
                IpvsCommand::SetService,
                vec![IpvsAttr::Service(svc.clone())],
            ),
        )
    }

    /// DEL_SERVICE (and with it its destinations); ESRCH if missing.
    pub fn delete_service(&mut self, svc: &Service) -> Result<(), IpvsError> {
        self.simple(
            Operation::DeleteService(svc.key()),
            IpvsMessage::new(
                IpvsCommand::DelService,
                vec![IpvsAttr::Service(svc.clone())],
            ),
        )
    }

    /// The real servers of `svc` (empty if the service does not exist: the
    /// kernel's dump does not tell the two apart).
    pub fn list_destinations(&mut self, svc: &Service) -> Result<Vec<Destination>, IpvsError> {
        let msgs = self.exec(
            Operation::ListDestinations(svc.key()),
            IpvsMessage::new(IpvsCommand::GetDest, vec![IpvsAttr::Service(svc.clone())]),
            true,
            Some(svc.family),
        )?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| {
                m.attrs.into_iter().find_map(|a| match a {
                    IpvsAttr::Dest(d) => Some(d),
                    _ => None,
                })
            })
            .collect())
    }

    fn dest_request(
        &mut self,
        cmd: IpvsCommand,
        op: Operation,
        svc: &Service,
        dest: &Destination,
    ) -> Result<(), IpvsError> {
        Self::validated(&op, dest.validate())?;
        self.simple(
            op,
            IpvsMessage::new(
                cmd,
                vec![IpvsAttr::Service(svc.clone()), IpvsAttr::Dest(dest.clone())],
            ),
        )
    }

    /// NEW_DEST; EEXIST if the real server is already there.
    pub fn add_destination(&mut self, svc: &Service, dest: &Destination) -> Result<(), IpvsError> {
        let op = Operation::AddDestination(svc.key(), dest.socket_addr());
        self.dest_request(IpvsCommand::NewDest, op, svc, dest)
    }

    /// SET_DEST: weight, thresholds, forwarding method.
    pub fn update_destination(
        &mut self,
        svc: &Service,
        dest: &Destination,
    ) -> Result<(), IpvsError> {
        let op = Operation::UpdateDestination(svc.key(), dest.socket_addr());
        self.dest_request(IpvsCommand::SetDest, op, svc, dest)
    }

    /// DEL_DEST; ENOENT if the real server is missing, ESRCH if the service is.
    pub fn delete_destination(
        &mut self,
        svc: &Service,
        dest: &Destination,
    ) -> Result<(), IpvsError> {
        let op = Operation::DeleteDestination(svc.key(), dest.socket_addr());
        self.simple(
            op,
            IpvsMessage::new(
                IpvsCommand::DelDest,
                vec![IpvsAttr::Service(svc.clone()), IpvsAttr::Dest(dest.clone())],
            ),
        )
    }

    /// Removes every service and destination. kproxy never calls this on
    /// start or stop (traffic must keep flowing); it is for cleanup tools and tests.
    pub fn flush(&mut self) -> Result<(), IpvsError> {
        self.simple(
            Operation::Flush,
            IpvsMessage::new(IpvsCommand::Flush, vec![]),
        )
    }

    pub fn get_timeouts(&mut self) -> Result<Timeouts, IpvsError> {
        let msgs = self.exec(
            Operation::GetTimeouts,
            IpvsMessage::new(IpvsCommand::GetConfig, vec![]),
            false,
            None,
        )?;
        msgs.first()
            .map(IpvsMessage::timeouts)
            .ok_or_else(|| IpvsError::Decode {
                op: Operation::GetTimeouts,
                source: DecodeError::from("no GET_CONFIG reply"),
            })
    }

    /// SET_CONFIG; a 0 leaves that timeout unchanged (the kernel's rule).
    pub fn set_timeouts(&mut self, t: &Timeouts) -> Result<(), IpvsError> {
        self.simple(
            Operation::SetTimeouts,
            IpvsMessage::new(
                IpvsCommand::SetConfig,
                vec![
                    IpvsAttr::TimeoutTcp(t.tcp),
                    IpvsAttr::TimeoutTcpFin(t.tcp_fin),
                    IpvsAttr::TimeoutUdp(t.udp),
                ],
            ),
        )
    }

    /// The kernel's IPVS version and connection table size.
    pub fn info(&mut self) -> Result<Info, IpvsError> {
        let msgs = self.exec(
            Operation::GetInfo,
            IpvsMessage::new(IpvsCommand::GetInfo, vec![]),
            false,
            None,
        )?;
        msgs.iter()
            .find_map(IpvsMessage::info)
            .ok_or_else(|| IpvsError::Decode {
                op: Operation::GetInfo,
                source: DecodeError::from("GET_INFO reply without a version"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::IpvsProtocol;

    #[test]
    fn error_messages_name_the_objects() {
        let svc = Service::new(IpvsProtocol::Tcp, "10.96.0.10".parse().unwrap(), 80);
        let dest = Destination::new("10.0.0.2".parse().unwrap(), 8080);
        let e = IpvsError::Kernel {
            op: Operation::AddDestination(svc.key(), dest.socket_addr()),
            errno: libc::EEXIST,
        };
        assert_eq!(
            e.to_string(),
            "adding destination 10.0.0.2:8080 to TCP 10.96.0.10:80: File exists (EEXIST)"
        );
        assert!(e.is_exists());
        assert!(!e.is_not_found());

        let v6 = Service::new(IpvsProtocol::Udp, "fd00::10".parse().unwrap(), 53);
        let e = IpvsError::Kernel {
            op: Operation::DeleteService(v6.key()),
            errno: libc::ESRCH,
        };
        assert_eq!(
            e.to_string(),
            "deleting service UDP [fd00::10]:53: No such process (ESRCH)"
        );
        assert!(e.is_not_found());

        assert_eq!(
            IpvsError::NotAvailable.to_string(),
            "IPVS is not available in this kernel: load ip_vs or use --mode=iptables"
        );
    }

    #[test]
    fn invalid_requests_are_refused_before_sending() {
        // No socket needed: validation happens first. Build the error the way
        // the client does to check the text.
        let svc =
            Service::new(IpvsProtocol::Tcp, "10.96.0.10".parse().unwrap(), 80).with_scheduler("");
        let op = Operation::AddService(svc.key());
        let e = IpvsClient::validated(&op, svc.validate()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "adding service TCP 10.96.0.10:80: empty scheduler name"
        );
    }
}
