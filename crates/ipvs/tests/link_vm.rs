//! kube-ipvs0, sysctls and real traffic through a service we program, in
//! the VM (`scripts/test-ipvs-vm.sh`); skips elsewhere unless `KPROXY_REQUIRE_IPVS=1`.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use common::{enter_ipvs_netns, sh, sh_ok};
use ipnet::IpNet;
use kproxy_ipvs::sysctl::SysctlAction;
use kproxy_ipvs::{
    apply_sysctls, ipvs_sysctls, Destination, IpvsClient, IpvsProtocol, LinkClient, LinkError,
    Service, SysctlOptions, SysctlOutcome, DEFAULT_DUMMY_NAME,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// `ip -o addr show dev NAME` without link-local addresses.
fn ip_addr_show(dev: &str) -> BTreeSet<IpNet> {
    sh(&format!("ip -o addr show dev {dev}"))
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            while let Some(tok) = w.next() {
                if tok == "inet" || tok == "inet6" {
                    return w.next().map(net);
                }
            }
            None
        })
        .filter(|n| !n.to_string().starts_with("fe80:"))
        .collect()
}

#[test]
fn kube_ipvs0_lifecycle_and_address_sync() {
    if !enter_ipvs_netns() {
        return;
    }
    let mut l = LinkClient::new().unwrap();
    assert_eq!(l.get_link(DEFAULT_DUMMY_NAME).unwrap(), None);
    let idx = l.ensure_dummy(DEFAULT_DUMMY_NAME).unwrap();
    assert!(idx > 0);
    let link = sh("ip -o -d link show kube-ipvs0");
    assert!(link.starts_with(&format!("{idx}: kube-ipvs0:")), "{link}");
    assert!(link.contains(",UP"), "{link}");
    assert!(link.contains("dummy"), "{link}");
    // idempotent, and brings a downed interface back up
    sh("ip link set kube-ipvs0 down");
    assert_eq!(l.ensure_dummy(DEFAULT_DUMMY_NAME).unwrap(), idx);
    assert!(sh("ip -o link show kube-ipvs0").contains(",UP"));

    // another interface whose addresses must survive every sync
    sh("ip link add other0 type dummy && ip addr add 10.96.0.1/32 dev other0 && ip addr add 192.0.2.1/24 dev other0");
    let other_before = ip_addr_show("other0");

    let desired: BTreeSet<IpAddr> = [ip("10.96.0.1"), ip("10.96.0.2"), ip("fd00::1")].into();
    let rep = l.sync_addresses(idx, &desired).unwrap();
    assert_eq!(
        rep.added,
        vec![net("10.96.0.1/32"), net("10.96.0.2/32"), net("fd00::1/128")]
    );
    assert!(rep.removed.is_empty());
    let want: BTreeSet<IpNet> =
        [net("10.96.0.1/32"), net("10.96.0.2/32"), net("fd00::1/128")].into();
    assert_eq!(ip_addr_show("kube-ipvs0"), want);
    assert_eq!(l.list_addresses(idx).unwrap(), want);
    // IPv6 was added without DAD: not tentative
    let v6 = sh("ip -o -6 addr show dev kube-ipvs0 to fd00::1/128");
    assert!(!v6.contains("tentative"), "{v6}");

    // nothing to do the second time
    let rep = l.sync_addresses(idx, &desired).unwrap();
    assert!(rep.added.is_empty() && rep.removed.is_empty(), "{rep:?}");

    // strays (a wrong prefix, an address nobody asked for) go; the rest stays
    sh("ip addr add 10.200.0.1/24 dev kube-ipvs0 && ip addr add 10.96.0.3/24 dev kube-ipvs0");
    let desired: BTreeSet<IpAddr> = [ip("10.96.0.2"), ip("10.96.0.3"), ip("fd00::2")].into();
    let rep = l.sync_addresses(idx, &desired).unwrap();
    assert_eq!(rep.added, vec![net("10.96.0.3/32"), net("fd00::2/128")]);
    assert_eq!(
        rep.removed,
        vec![
            net("10.96.0.1/32"),
            net("10.96.0.3/24"),
            net("10.200.0.1/24"),
            net("fd00::1/128")
        ]
    );
    let want: BTreeSet<IpNet> =
        [net("10.96.0.2/32"), net("10.96.0.3/32"), net("fd00::2/128")].into();
    assert_eq!(ip_addr_show("kube-ipvs0"), want);
    assert_eq!(ip_addr_show("other0"), other_before);

    // empty desired set clears it
    let rep = l.sync_addresses(idx, &BTreeSet::new()).unwrap();
    assert_eq!(rep.removed.len(), 3);
    assert!(ip_addr_show("kube-ipvs0").is_empty());

    // a non-dummy interface of that name is refused, not reused or deleted
    let e = l.ensure_dummy("lo").unwrap_err();
    assert!(matches!(e, LinkError::NotDummy { .. }), "{e:?}");
    assert!(l.delete_dummy("lo").is_err());

    assert!(l.delete_dummy(DEFAULT_DUMMY_NAME).unwrap());
    assert!(!sh_ok("ip link show kube-ipvs0"));
    assert!(!l.delete_dummy(DEFAULT_DUMMY_NAME).unwrap());
    assert_eq!(ip_addr_show("other0"), other_before);
}

#[test]
fn sysctls_apply_to_the_real_proc() {
    if !enter_ipvs_netns() {
        return;
    }
    let list = ipvs_sysctls(SysctlOptions {
        strict_arp: true,
        kernel_version: kproxy_ipvs::sysctl::parse_kernel_release(&sh("uname -r")),
    });
    let root = Path::new("/proc/sys");
    sh("sysctl -qw net.ipv4.vs.conntrack=0 net.ipv4.ip_forward=0 net.ipv4.conf.all.arp_ignore=0");
    let rep = apply_sysctls(root, &list).unwrap();
    for r in &rep {
        if r.sysctl.action == SysctlAction::Ensure {
            let now = std::fs::read_to_string(root.join(r.sysctl.path)).unwrap();
            assert_eq!(now.trim(), r.sysctl.value, "{r}");
        }
    }
    let changed: Vec<&str> = rep
        .iter()
        .filter(|r| matches!(r.outcome, SysctlOutcome::Changed { .. }))
        .map(|r| r.sysctl.path)
        .collect();
    for p in [
        "net/ipv4/vs/conntrack",
        "net/ipv4/ip_forward",
        "net/ipv4/conf/all/arp_ignore",
    ] {
        assert!(
            changed.contains(&p),
            "{p} not reported as changed: {changed:?}"
        );
    }
    assert_eq!(sh("sysctl -n net.ipv4.vs.conntrack").trim(), "1");
    let again = apply_sysctls(root, &list).unwrap();
    assert!(again
        .iter()
        .all(|r| !matches!(r.outcome, SysctlOutcome::Changed { .. })));
}

/// Real TCP through a service programmed with our client: client netns →
/// VIP on kube-ipvs0 → IPVS NAT → real server netns (after
/// shared/vm/examples/ipvs-traffic.sh). The test's own namespace is the node.
#[test]
fn traffic_flows_through_our_service() {
    if !enter_ipvs_netns() {
        return;
    }
    let tag = std::process::id();
    let (srv, cli) = (format!("srv{tag}"), format!("cli{tag}"));
    sh(&format!(
        "set -e
         ip netns add {srv}
         ip link add vs{tag} type veth peer name vsi{tag}
         ip link set vsi{tag} netns {srv}
         ip addr add 10.0.0.1/24 dev vs{tag}; ip link set vs{tag} up
         ip -n {srv} addr add 10.0.0.2/24 dev vsi{tag}; ip -n {srv} link set vsi{tag} up
         ip -n {srv} link set lo up; ip -n {srv} route add default via 10.0.0.1
         ip netns add {cli}
         ip link add vc{tag} type veth peer name vci{tag}
         ip link set vci{tag} netns {cli}
         ip addr add 10.1.0.1/24 dev vc{tag}; ip link set vc{tag} up
         ip -n {cli} addr add 10.1.0.2/24 dev vci{tag}; ip -n {cli} link set vci{tag} up
         ip -n {cli} link set lo up; ip -n {cli} route add default via 10.1.0.1
         mkdir -p /tmp/www{tag} && echo 'hello from real server 10.0.0.2' > /tmp/www{tag}/index.html
         ip netns exec {srv} busybox httpd -p 10.0.0.2:8080 -h /tmp/www{tag}"
    ));
    apply_sysctls(
        Path::new("/proc/sys"),
        &ipvs_sysctls(SysctlOptions::default()),
    )
    .unwrap();

    let mut l = LinkClient::new().unwrap();
    let idx = l.ensure_dummy(DEFAULT_DUMMY_NAME).unwrap();
    l.sync_addresses(idx, &[ip("10.96.0.10")].into()).unwrap();
    let mut c = IpvsClient::new().unwrap();
    let svc = Service::new(IpvsProtocol::Tcp, ip("10.96.0.10"), 80);
    let dest = Destination::new(ip("10.0.0.2"), 8080);
    c.add_service(&svc).unwrap();
    c.add_destination(&svc, &dest).unwrap();

    let curl = |from: &str| -> Option<String> {
        let cmd = format!("{from} curl -sS -m 5 http://10.96.0.10/");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let via_cli = curl(&format!("ip netns exec {cli}")).expect("curl from the client netns");
    assert_eq!(via_cli.trim(), "hello from real server 10.0.0.2");
    let local = curl("").expect("curl from the node itself");
    assert_eq!(local.trim(), "hello from real server 10.0.0.2");

    // the kernel counted connections on our real server
    let d = &c.list_destinations(&svc).unwrap()[0];
    assert!(
        d.active_conns + d.inactive_conns >= 1,
        "no connections recorded: {d:?}"
    );

    // weight 0: no new connections are scheduled to it
    c.update_destination(&svc, &dest.clone().with_weight(0))
        .unwrap();
    assert_eq!(
        curl(&format!("ip netns exec {cli}")),
        None,
        "quiesced server still got traffic"
    );
    c.update_destination(&svc, &dest).unwrap();
    assert!(curl(&format!("ip netns exec {cli}")).is_some());

    // without the VIP on kube-ipvs0 the client's traffic is not local any more
    l.sync_addresses(idx, &BTreeSet::new()).unwrap();
    assert_eq!(curl(&format!("ip netns exec {cli}")), None);

    sh(&format!("ip netns del {srv}; ip netns del {cli}"));
}
