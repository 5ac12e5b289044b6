//! The pure diff: desired virtual servers vs the kernel's table → ordered
//! operations.
//!
//! Order: add services, update changed services (scheduler/persistence),
//! add missing real servers, restore the weight of returning ones, and only
//! then take real servers away (weight 0 for draining, delete) and delete
//! services. So a service never passes through zero real servers while one
//! is replaced.
//!
//! Graceful termination of a real server that should go away (upstream's
//! `graceful_termination.go`): UDP/SCTP ones are deleted at once (their
//! flows die on the next packet with `expire_nodest_conn=1`); TCP ones are
//! deleted when ActiveConn + InactConn is 0, else set to weight 0 and
//! checked again later, and deleted anyway once they drained longer than the
//! bound.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::codec::{Destination, IpvsProtocol, Service, ServiceFlags, ServiceKey};
use crate::planner::DesiredService;

/// A virtual server as read from the kernel, with its real servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentService {
    pub service: Service,
    pub dests: Vec<Destination>,
}

/// One change to the kernel's IPVS table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    AddService(Service),
    UpdateService(Service),
    AddDest(Service, Destination),
    /// Set weight/forwarding back to the desired values (a draining real
    /// server that came back, or one someone edited).
    UpdateDest(Service, Destination),
    /// Weight 0: no new connections; deleted later.
    DrainDest(Service, Destination),
    DelDest(Service, Destination),
    DelService(Service),
}

impl Op {
    /// Order of the phases (see the module docs).
    fn phase(&self) -> u8 {
        match self {
            Op::AddService(_) => 0,
            Op::UpdateService(_) => 1,
            Op::AddDest(..) => 2,
            Op::UpdateDest(..) => 3,
            Op::DrainDest(..) => 4,
            Op::DelDest(..) => 5,
            Op::DelService(_) => 6,
        }
    }

    pub fn service(&self) -> &Service {
        match self {
            Op::AddService(s)
            | Op::UpdateService(s)
            | Op::DelService(s)
            | Op::AddDest(s, _)
            | Op::UpdateDest(s, _)
            | Op::DrainDest(s, _)
            | Op::DelDest(s, _) => s,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AddService(s) => write!(f, "add {s} {}", s.scheduler),
            Op::UpdateService(s) => write!(f, "update {s} {}", s.scheduler),
            Op::AddDest(s, d) => write!(f, "add {s} -> {}", d.socket_addr()),
            Op::UpdateDest(s, d) => write!(f, "weight {s} -> {} = {}", d.socket_addr(), d.weight),
            Op::DrainDest(s, d) => write!(f, "drain {s} -> {}", d.socket_addr()),
            Op::DelDest(s, d) => write!(f, "delete {s} -> {}", d.socket_addr()),
            Op::DelService(s) => write!(f, "delete {s}"),
        }
    }
}

/// When each draining real server (weight 0) started draining.
pub type DrainState = BTreeMap<(ServiceKey, SocketAddr), Instant>;

/// Graceful-termination inputs of a diff.
#[derive(Clone, Copy, Debug)]
pub struct DrainPolicy<'a> {
    pub now: Instant,
    pub started: &'a DrainState,
    pub timeout: Duration,
}

/// Whether a real server of `protocol` drains before deletion (TCP only,
/// as upstream's `IsRsGracefulTerminationNeeded`).
pub fn drains(protocol: IpvsProtocol) -> bool {
    !matches!(protocol, IpvsProtocol::Udp | IpvsProtocol::Sctp)
}

/// The service settings differ in what kproxy sets.
fn service_differs(want: &Service, have: &Service) -> bool {
    let persistent = |s: &Service| s.flags.contains(ServiceFlags::PERSISTENT);
    want.scheduler != have.scheduler
        || persistent(want) != persistent(have)
        || (persistent(want) && (want.timeout != have.timeout || want.netmask != have.netmask))
}

fn dest_differs(want: &Destination, have: &Destination) -> bool {
    want.weight != have.weight
        || want.fwd_method != have.fwd_method
        || want.upper_threshold != have.upper_threshold
        || want.lower_threshold != have.lower_threshold
}

/// What to do with a real server that should not be there.
fn retire(svc: &Service, d: &Destination, drain: &DrainPolicy<'_>) -> Option<Op> {
    let conns = u64::from(d.active_conns) + u64::from(d.inactive_conns);
    if !drains(svc.protocol) || conns == 0 {
        return Some(Op::DelDest(svc.clone(), d.clone()));
    }
    match drain.started.get(&(svc.key(), d.socket_addr())) {
        Some(since) if drain.now.saturating_duration_since(*since) >= drain.timeout => {
            Some(Op::DelDest(svc.clone(), d.clone()))
        }
        _ if d.weight != 0 => Some(Op::DrainDest(svc.clone(), d.clone().with_weight(0))),
        // Draining, connections left, within the bound: wait.
        _ => None,
    }
}

/// The operations that bring `current` to `desired`.
///
/// `current` must hold every kernel service whose key is in `desired` (a
/// missing one is added). Services in `current` that are not desired are
/// deleted only if `is_ours` says so; other people's are never touched.
pub fn diff(
    desired: &BTreeMap<ServiceKey, DesiredService>,
    current: &[CurrentService],
    is_ours: &dyn Fn(&Service) -> bool,
    drain: &DrainPolicy<'_>,
) -> Vec<Op> {
    let mut ops = Vec::new();
    let have: BTreeMap<ServiceKey, &CurrentService> =
        current.iter().map(|c| (c.service.key(), c)).collect();
    for (key, want) in desired {
        let Some(cur) = have.get(key) else {
            ops.push(Op::AddService(want.service.clone()));
            ops.extend(
                want.dests
                    .values()
                    .map(|d| Op::AddDest(want.service.clone(), d.clone())),
            );
            continue;
        };
        if service_differs(&want.service, &cur.service) {
            ops.push(Op::UpdateService(want.service.clone()));
        }
        let cur_dests: BTreeMap<SocketAddr, &Destination> =
            cur.dests.iter().map(|d| (d.socket_addr(), d)).collect();
        for (addr, d) in &want.dests {
            match cur_dests.get(addr) {
                None => ops.push(Op::AddDest(want.service.clone(), d.clone())),
                Some(c) if dest_differs(d, c) => {
                    ops.push(Op::UpdateDest(want.service.clone(), d.clone()))
                }
                Some(_) => {}
            }
        }
        for (addr, d) in &cur_dests {
            if !want.dests.contains_key(addr) {
                ops.extend(retire(&want.service, d, drain));
            }
        }
    }
    let gone: BTreeSet<&ServiceKey> = have.keys().filter(|k| !desired.contains_key(k)).collect();
    for key in gone {
        if let Some(cur) = have.get(key) {
            if is_ours(&cur.service) {
                ops.push(Op::DelService(cur.service.clone()));
            }
        }
    }
    // Stable: within a phase the desired order (sorted keys) is kept.
    ops.sort_by_key(Op::phase);
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::tests::ip;
    use crate::planner::VsKind;
    use kproxy_model::{IpFamily, Protocol, ServiceKey as SvcName, ServicePortName};

    fn svc(proto: IpvsProtocol, addr: &str, port: u16) -> Service {
        Service::new(proto, ip(addr), port)
    }

    fn dest(addr: &str, port: u16) -> Destination {
        Destination::new(ip(addr), port)
    }

    fn desired(s: &Service, dests: &[Destination]) -> (ServiceKey, DesiredService) {
        (
            s.key(),
            DesiredService {
                service: s.clone(),
                dests: dests.iter().map(|d| (d.socket_addr(), d.clone())).collect(),
                port_name: ServicePortName {
                    service: SvcName::new("default", "x"),
                    port: String::new(),
                    protocol: Protocol::Tcp,
                },
                port_family: IpFamily::V4,
                kind: VsKind::ClusterIp,
            },
        )
    }

    fn no_drain() -> DrainState {
        DrainState::new()
    }

    fn policy(started: &DrainState) -> DrainPolicy<'_> {
        DrainPolicy {
            now: Instant::now(),
            started,
            timeout: Duration::from_secs(300),
        }
    }

    fn names(ops: &[Op]) -> Vec<String> {
        ops.iter().map(|o| o.to_string()).collect()
    }

    #[test]
    fn from_empty_adds_service_then_dests() {
        let s = svc(IpvsProtocol::Tcp, "10.96.0.10", 80);
        let want: BTreeMap<_, _> = [desired(
            &s,
            &[dest("10.244.1.2", 8080), dest("10.244.1.3", 8080)],
        )]
        .into();
        let st = no_drain();
        let ops = diff(&want, &[], &|_| true, &policy(&st));
        assert_eq!(
            names(&ops),
            vec![
                "add TCP 10.96.0.10:80 rr",
                "add TCP 10.96.0.10:80 -> 10.244.1.2:8080",
                "add TCP 10.96.0.10:80 -> 10.244.1.3:8080"
            ]
        );
        // applying the result changes nothing
        let cur = vec![CurrentService {
            service: s.clone(),
            dests: vec![dest("10.244.1.2", 8080), dest("10.244.1.3", 8080)],
        }];
        assert!(diff(&want, &cur, &|_| true, &policy(&st)).is_empty());
    }

    #[test]
    fn replacement_adds_before_it_removes() {
        let s = svc(IpvsProtocol::Udp, "10.96.0.10", 53);
        let gone = svc(IpvsProtocol::Tcp, "10.96.0.99", 80);
        let want: BTreeMap<_, _> = [desired(&s, &[dest("10.244.1.9", 53)])].into();
        let cur = vec![
            CurrentService {
                service: gone.clone(),
                dests: vec![dest("10.244.1.5", 80)],
            },
            CurrentService {
                service: s.clone(),
                dests: vec![dest("10.244.1.2", 53)],
            },
        ];
        let st = no_drain();
        let ops = diff(&want, &cur, &|_| true, &policy(&st));
        assert_eq!(
            names(&ops),
            vec![
                "add UDP 10.96.0.10:53 -> 10.244.1.9:53",
                "delete UDP 10.96.0.10:53 -> 10.244.1.2:53",
                "delete TCP 10.96.0.99:80"
            ]
        );
    }

    #[test]
    fn others_services_are_left_alone() {
        let theirs = svc(IpvsProtocol::Tcp, "192.168.1.1", 80);
        let cur = vec![CurrentService {
            service: theirs.clone(),
            dests: vec![dest("192.168.1.2", 80)],
        }];
        let st = no_drain();
        let ops = diff(
            &BTreeMap::new(),
            &cur,
            &|s| s.addr != ip("192.168.1.1"),
            &policy(&st),
        );
        assert!(ops.is_empty(), "{ops:?}");
        let ops = diff(&BTreeMap::new(), &cur, &|_| true, &policy(&st));
        assert_eq!(names(&ops), vec!["delete TCP 192.168.1.1:80"]);
    }

    #[test]
    fn scheduler_and_persistence_changes_update_in_place() {
        let have = svc(IpvsProtocol::Tcp, "10.96.0.10", 80);
        let mut kernel = have.clone();
        kernel.flags = ServiceFlags::HASHED; // the kernel reports this bit
        let cur = vec![CurrentService {
            service: kernel,
            dests: vec![],
        }];
        let st = no_drain();
        let same: BTreeMap<_, _> = [desired(&have, &[])].into();
        assert!(diff(&same, &cur, &|_| true, &policy(&st)).is_empty());
        let want: BTreeMap<_, _> = [desired(&have.clone().with_scheduler("lc"), &[])].into();
        assert_eq!(
            names(&diff(&want, &cur, &|_| true, &policy(&st))),
            vec!["update TCP 10.96.0.10:80 lc"]
        );
        let want: BTreeMap<_, _> = [desired(&have.clone().with_persistence(60), &[])].into();
        assert_eq!(
            names(&diff(&want, &cur, &|_| true, &policy(&st))),
            vec!["update TCP 10.96.0.10:80 rr"]
        );
    }

    #[test]
    fn tcp_real_servers_drain_then_go() {
        let s = svc(IpvsProtocol::Tcp, "10.96.0.10", 80);
        let want: BTreeMap<_, _> = [desired(&s, &[dest("10.244.1.3", 8080)])].into();
        let mut busy = dest("10.244.1.2", 8080);
        busy.active_conns = 1;
        let cur = |d: Destination| {
            vec![CurrentService {
                service: s.clone(),
                dests: vec![d, dest("10.244.1.3", 8080)],
            }]
        };
        let st = no_drain();
        // connections: weight 0
        let ops = diff(&want, &cur(busy.clone()), &|_| true, &policy(&st));
        assert_eq!(
            ops,
            vec![Op::DrainDest(s.clone(), busy.clone().with_weight(0))]
        );
        // draining, still busy, within the bound: nothing
        let mut started = DrainState::new();
        started.insert((s.key(), busy.socket_addr()), Instant::now());
        let drained = busy.clone().with_weight(0);
        assert!(diff(&want, &cur(drained.clone()), &|_| true, &policy(&started)).is_empty());
        // past the bound: deleted anyway
        let p = DrainPolicy {
            now: Instant::now() + Duration::from_secs(301),
            started: &started,
            timeout: Duration::from_secs(300),
        };
        assert_eq!(
            diff(&want, &cur(drained.clone()), &|_| true, &p),
            vec![Op::DelDest(s.clone(), drained.clone())]
        );
        // no connections left: deleted
        let mut idle = drained.clone();
        idle.active_conns = 0;
        assert_eq!(
            diff(&want, &cur(idle.clone()), &|_| true, &policy(&started)),
            vec![Op::DelDest(s.clone(), idle)]
        );
        // inactive connections count too
        let mut inact = drained;
        inact.active_conns = 0;
        inact.inactive_conns = 2;
        assert!(diff(&want, &cur(inact), &|_| true, &policy(&started)).is_empty());
    }

    #[test]
    fn udp_and_sctp_go_at_once_and_returning_server_gets_weight_back() {
        for proto in [IpvsProtocol::Udp, IpvsProtocol::Sctp] {
            let s = svc(proto, "10.96.0.10", 53);
            let mut busy = dest("10.244.1.2", 53);
            busy.active_conns = 3;
            let cur = vec![CurrentService {
                service: s.clone(),
                dests: vec![busy.clone()],
            }];
            let want: BTreeMap<_, _> = [desired(&s, &[])].into();
            let st = no_drain();
            assert_eq!(
                diff(&want, &cur, &|_| true, &policy(&st)),
                vec![Op::DelDest(s.clone(), busy)]
            );
        }
        let s = svc(IpvsProtocol::Tcp, "10.96.0.10", 80);
        let mut draining = dest("10.244.1.2", 8080).with_weight(0);
        draining.active_conns = 1;
        let cur = vec![CurrentService {
            service: s.clone(),
            dests: vec![draining],
        }];
        let want: BTreeMap<_, _> = [desired(&s, &[dest("10.244.1.2", 8080)])].into();
        let st = no_drain();
        assert_eq!(
            diff(&want, &cur, &|_| true, &policy(&st)),
            vec![Op::UpdateDest(s.clone(), dest("10.244.1.2", 8080))]
        );
    }

    #[test]
    fn phases_are_ordered_across_services() {
        let a = svc(IpvsProtocol::Tcp, "10.96.0.1", 80);
        let b = svc(IpvsProtocol::Tcp, "10.96.0.2", 80);
        let c = svc(IpvsProtocol::Tcp, "10.96.0.3", 80);
        let want: BTreeMap<_, _> = [
            desired(&a, &[dest("10.244.0.1", 80)]),
            desired(&b.clone().with_scheduler("sh"), &[dest("10.244.0.3", 80)]),
            desired(&c, &[dest("10.244.0.4", 80)]),
        ]
        .into();
        let cur = vec![
            CurrentService {
                service: a.clone(),
                dests: vec![dest("10.244.0.9", 80)],
            },
            CurrentService {
                service: b.clone(),
                dests: vec![dest("10.244.0.3", 80).with_weight(0)],
            },
            CurrentService {
                service: svc(IpvsProtocol::Tcp, "10.96.0.4", 80),
                dests: vec![],
            },
        ];
        let st = no_drain();
        let ops = diff(&want, &cur, &|_| true, &policy(&st));
        let phases: Vec<u8> = ops.iter().map(Op::phase).collect();
        let mut sorted = phases.clone();
        sorted.sort();
        assert_eq!(phases, sorted);
        assert_eq!(
            names(&ops),
            vec![
                "add TCP 10.96.0.3:80 rr",
                "update TCP 10.96.0.2:80 sh",
                "add TCP 10.96.0.1:80 -> 10.244.0.1:80",
                "add TCP 10.96.0.3:80 -> 10.244.0.4:80",
                "weight TCP 10.96.0.2:80 -> 10.244.0.3:80 = 1",
                "delete TCP 10.96.0.1:80 -> 10.244.0.9:80",
                "delete TCP 10.96.0.4:80",
            ]
        );
    }
}
