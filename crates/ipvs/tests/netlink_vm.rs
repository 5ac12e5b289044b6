//! The IPVS client against a real kernel, compared with ipvsadm.
//! Runs inside the VM (`scripts/test-ipvs-vm.sh`); skips elsewhere unless
//! `KPROXY_REQUIRE_IPVS=1`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use common::{client_view, enter_ipvs_netns, ipvsadm_view, sh};
use kproxy_ipvs::{
    Destination, IpvsClient, IpvsError, IpvsProtocol, Operation, Service, ServiceFlags, Timeouts,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn client() -> IpvsClient {
    IpvsClient::new().expect("IPVS client")
}

#[test]
fn info_matches_ipvsadm() {
    if !enter_ipvs_netns() {
        return;
    }
    let info = client().info().unwrap();
    let first = sh("ipvsadm -Ln | head -n1");
    assert_eq!(
        first.trim(),
        format!(
            "IP Virtual Server version {} (size={})",
            info.version_string(),
            info.conn_tab_size
        )
    );
}

/// Services of every protocol and family, persistence, several schedulers
/// and a fwmark service, with destinations: what we add is what the kernel
/// has, seen through our dump and through ipvsadm.
#[test]
fn services_and_destinations_round_trip() {
    if !enter_ipvs_netns() {
        return;
    }
    let mut c = client();
    let mut fwm = Service::new(IpvsProtocol::Tcp, ip("0.0.0.0"), 0);
    fwm.fwmark = 7;
    let mut masked = Service::new(IpvsProtocol::Tcp, ip("10.96.0.14"), 8443).with_persistence(60);
    masked.netmask = Service::ipv4_netmask("255.255.255.0".parse().unwrap());
    let services = vec![
        Service::new(IpvsProtocol::Tcp, ip("10.96.0.10"), 80),
        Service::new(IpvsProtocol::Udp, ip("10.96.0.10"), 53).with_scheduler("wrr"),
        Service::new(IpvsProtocol::Sctp, ip("10.96.0.11"), 9999).with_scheduler("sh"),
        Service::new(IpvsProtocol::Tcp, ip("10.96.0.12"), 443)
            .with_scheduler("lc")
            .with_persistence(10800),
        Service::new(IpvsProtocol::Tcp, ip("fd00::10"), 80).with_scheduler("wlc"),
        Service::new(IpvsProtocol::Udp, ip("fd00::a"), 53)
            .with_scheduler("mh")
            .with_persistence(300),
        Service::new(IpvsProtocol::Sctp, ip("fd00::11"), 36412).with_scheduler("sed"),
        masked,
        fwm,
    ];
    let mut want_dests: BTreeMap<String, Vec<Destination>> = BTreeMap::new();
    for (i, s) in services.iter().enumerate() {
        c.add_service(s).unwrap_or_else(|e| panic!("{e}"));
        let dests: Vec<Destination> = if s.family == kproxy_model::IpFamily::V6 {
            vec![
                Destination::new(ip(&format!("fd00:1::{}", i + 1)), 8080),
                Destination::new(ip(&format!("fd00:1::{}", i + 100)), 8081).with_weight(3),
            ]
        } else {
            vec![
                Destination::new(ip(&format!("10.0.{i}.2")), 8080),
                Destination::new(ip(&format!("10.0.{i}.3")), 8080).with_weight(7),
            ]
        };
        for d in &dests {
            c.add_destination(s, d).unwrap_or_else(|e| panic!("{e}"));
        }
        want_dests.insert(s.key().to_string(), dests);
    }

    // Our dump returns exactly what we added.
    let got = c.list_services().unwrap();
    assert_eq!(got.len(), services.len());
    for s in &services {
        let k = got
            .iter()
            .find(|g| g.key() == s.key())
            .unwrap_or_else(|| panic!("{s} missing from {got:?}"));
        assert_eq!(
            (&k.scheduler, k.flags, k.timeout, k.netmask),
            (&s.scheduler, s.flags, s.timeout, s.netmask),
            "{s}"
        );
        assert_eq!(c.get_service(s).unwrap().map(|g| g.key()), Some(s.key()));
        let mut dests = c.list_destinations(s).unwrap();
        dests.sort_by_key(|d| d.socket_addr());
        let mut want = want_dests[&s.key().to_string()].clone();
        want.sort_by_key(|d| d.socket_addr());
        assert_eq!(dests, want, "{s}");
    }

    // ipvsadm agrees, line by line (with and without --persistent-conn).
    assert_eq!(client_view(&mut c, false), ipvsadm_view(""));
    assert_eq!(client_view(&mut c, true), ipvsadm_view("--persistent-conn"));
    let view = ipvsadm_view("");
    for line in [
        "TCP 10.96.0.10:80 rr",
        "UDP [fd00::a]:53 mh persistent 300",
        "TCP 10.96.0.12:443 lc persistent 10800",
        "TCP 10.96.0.14:8443 rr persistent 60 mask 255.255.255.0",
        "SCTP 10.96.0.11:9999 sh",
        "FWM 7 rr",
    ] {
        assert!(view.contains_key(line), "{line:?} not in {view:#?}");
    }
    assert!(view["TCP 10.96.0.10:80 rr"].contains("-> 10.0.0.3:8080 Masq 7 0 0"));
    assert!(view["UDP [fd00::a]:53 mh persistent 300"].contains("-> [fd00:1::6]:8080 Masq 1 0 0"));
}

#[test]
fn updates_and_deletes() {
    if !enter_ipvs_netns() {
        return;
    }
    let mut c = client();
    let svc = Service::new(IpvsProtocol::Tcp, ip("10.96.0.20"), 80);
    let d1 = Destination::new(ip("10.0.0.2"), 8080);
    let d2 = Destination::new(ip("10.0.0.3"), 8080);
    c.add_service(&svc).unwrap();
    c.add_destination(&svc, &d1).unwrap();
    c.add_destination(&svc, &d2).unwrap();

    // weight to 0 (graceful termination) and back
    c.update_destination(&svc, &d1.clone().with_weight(0))
        .unwrap();
    let view = ipvsadm_view("");
    assert!(
        view["TCP 10.96.0.20:80 rr"].contains("-> 10.0.0.2:8080 Masq 0 0 0"),
        "{view:#?}"
    );
    let weights: BTreeMap<_, _> = c
        .list_destinations(&svc)
        .unwrap()
        .into_iter()
        .map(|d| (d.socket_addr(), d.weight))
        .collect();
    assert_eq!(weights[&d1.socket_addr()], 0);
    assert_eq!(weights[&d2.socket_addr()], 1);

    // scheduler and persistence change in place
    let changed = svc.clone().with_scheduler("wrr").with_persistence(600);
    c.update_service(&changed).unwrap();
    let view = ipvsadm_view("");
    assert!(
        view.contains_key("TCP 10.96.0.20:80 wrr persistent 600"),
        "{view:#?}"
    );
    assert_eq!(
        view["TCP 10.96.0.20:80 wrr persistent 600"].len(),
        2,
        "dests kept"
    );
    // and off again: the flag is cleared, not just left alone
    c.update_service(&svc).unwrap();
    let got = c.get_service(&svc).unwrap().unwrap();
    assert!(!got.flags.contains(ServiceFlags::PERSISTENT));
    assert!(ipvsadm_view("").contains_key("TCP 10.96.0.20:80 rr"));

    c.delete_destination(&svc, &d1).unwrap();
    let dests = c.list_destinations(&svc).unwrap();
    assert_eq!(dests.len(), 1);
    assert_eq!(dests[0].socket_addr(), d2.socket_addr());

    c.delete_service(&svc).unwrap();
    assert_eq!(c.get_service(&svc).unwrap(), None);
    assert!(c.list_services().unwrap().is_empty());
    assert!(ipvsadm_view("").is_empty());
}

#[test]
fn kernel_errors_are_typed_and_name_the_objects() {
    if !enter_ipvs_netns() {
        return;
    }
    let mut c = client();
    let svc = Service::new(IpvsProtocol::Tcp, ip("10.96.0.10"), 80);
    let dest = Destination::new(ip("10.0.0.2"), 8080);
    c.add_service(&svc).unwrap();
    c.add_destination(&svc, &dest).unwrap();

    let e = c.add_service(&svc).unwrap_err();
    assert!(e.is_exists(), "{e:?}");
    assert_eq!(
        e.to_string(),
        "adding service TCP 10.96.0.10:80: File exists (EEXIST)"
    );

    let e = c.add_destination(&svc, &dest).unwrap_err();
    assert!(matches!(
        &e,
        IpvsError::Kernel { op: Operation::AddDestination(k, d), errno }
            if *k == svc.key() && *d == dest.socket_addr() && *errno == libc::EEXIST
    ));
    assert_eq!(
        e.to_string(),
        "adding destination 10.0.0.2:8080 to TCP 10.96.0.10:80: File exists (EEXIST)"
    );

    let missing = Service::new(IpvsProtocol::Udp, ip("10.96.0.99"), 53);
    let e = c.delete_service(&missing).unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
    assert_eq!(e.errno(), Some(libc::ESRCH));
    assert_eq!(
        e.to_string(),
        "deleting service UDP 10.96.0.99:53: No such process (ESRCH)"
    );

    let e = c
        .delete_destination(&svc, &Destination::new(ip("10.0.0.9"), 8080))
        .unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
    assert_eq!(
        e.to_string(),
        "deleting destination 10.0.0.9:8080 from TCP 10.96.0.10:80: No such file or directory (ENOENT)"
    );

    let e = c
        .update_destination(&svc, &Destination::new(ip("10.0.0.9"), 8080))
        .unwrap_err();
    assert!(e.is_not_found(), "{e:?}");

    // The kernel looks schedulers up by module name; a bogus one is ENOENT.
    let bogus = Service::new(IpvsProtocol::Tcp, ip("10.96.0.30"), 80).with_scheduler("nosuch");
    let e = c.add_service(&bogus).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOENT), "{e}");
    assert!(
        e.to_string()
            .starts_with("adding service TCP 10.96.0.30:80: "),
        "{e}"
    );

    // Invalid requests never reach the kernel.
    let e = c
        .add_service(&svc.clone().with_scheduler("x".repeat(16)))
        .unwrap_err();
    assert!(matches!(e, IpvsError::Invalid { .. }), "{e:?}");

    // None of that disturbed what was there.
    assert_eq!(client_view(&mut c, false), ipvsadm_view(""));
    assert_eq!(ipvsadm_view("").len(), 1);
}

/// Enough services and destinations that the dumps span several datagrams.
#[test]
fn large_dumps_span_several_messages() {
    if !enter_ipvs_netns() {
        return;
    }
    let mut c = client();
    let n = 400;
    for i in 0..n {
        let svc = Service::new(
            if i % 2 == 0 {
                IpvsProtocol::Tcp
            } else {
                IpvsProtocol::Udp
            },
            ip(&format!("10.97.{}.{}", i / 250, i % 250 + 1)),
            1000 + i as u16,
        );
        c.add_service(&svc).unwrap();
    }
    let big = Service::new(IpvsProtocol::Tcp, ip("10.98.0.1"), 80);
    c.add_service(&big).unwrap();
    for i in 0..300u32 {
        let d = Destination::new(ip(&format!("10.1.{}.{}", i / 250, i % 250 + 1)), 8080)
            .with_weight(i % 5 + 1);
        c.add_destination(&big, &d).unwrap();
    }
    let services = c.list_services().unwrap();
    assert_eq!(services.len(), n + 1);
    let parts = c.last_reply_datagrams();
    assert!(parts > 1, "a {n}-service dump fit in {parts} datagram(s)");
    let unique: BTreeSet<_> = services.iter().map(|s| s.key()).collect();
    assert_eq!(unique.len(), n + 1, "no service twice");
    let dests = c.list_destinations(&big).unwrap();
    assert_eq!(dests.len(), 300);
    assert!(c.last_reply_datagrams() > 1);
    assert_eq!(
        dests.iter().map(|d| d.weight as u64).sum::<u64>(),
        (0..300u64).map(|i| i % 5 + 1).sum::<u64>()
    );
    let count = sh("ipvsadm -Ln | grep -cE '^(TCP|UDP)'");
    assert_eq!(count.trim(), (n + 1).to_string());
    assert_eq!(client_view(&mut c, false), ipvsadm_view(""));

    c.flush().unwrap();
    assert!(c.list_services().unwrap().is_empty());
    assert!(ipvsadm_view("").is_empty());
}

#[test]
fn timeouts_get_and_set() {
    if !enter_ipvs_netns() {
        return;
    }
    let mut c = client();
    let parse = || -> Timeouts {
        // "Timeout (tcp tcpfin udp): 900 120 300"
        let out = sh("ipvsadm -L --timeout");
        let nums: Vec<u32> = out
            .rsplit(':')
            .next()
            .unwrap()
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        Timeouts {
            tcp: nums[0],
            tcp_fin: nums[1],
            udp: nums[2],
        }
    };
    assert_eq!(c.get_timeouts().unwrap(), parse());
    let t = Timeouts {
        tcp: 901,
        tcp_fin: 121,
        udp: 301,
    };
    c.set_timeouts(&t).unwrap();
    assert_eq!(c.get_timeouts().unwrap(), t);
    assert_eq!(parse(), t);
    // 0 leaves a value alone
    c.set_timeouts(&Timeouts {
        tcp: 0,
        tcp_fin: 0,
        udp: 55,
    })
    .unwrap();
    assert_eq!(
        parse(),
        Timeouts {
            tcp: 901,
            tcp_fin: 121,
            udp: 55
        }
    );
}

/// The other side of the coin, for kernels without IPVS (the dev host): the
/// client says so in the words the operator needs.
#[test]
fn not_available_without_ip_vs() {
    if std::path::Path::new("/sys/module/ip_vs").exists() {
        return; // IPVS is here; the tests above cover it
    }
    match IpvsClient::new() {
        Err(e @ IpvsError::NotAvailable) => assert_eq!(
            e.to_string(),
            "IPVS is not available in this kernel: load ip_vs or use --mode=iptables"
        ),
        Err(e) => panic!("expected NotAvailable, got {e:?}"),
        Ok(_) => panic!("IPVS family resolved although ip_vs is not loaded"),
    }
}
