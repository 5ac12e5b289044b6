//! Helpers of the IPVS-mode tests (tests/ipvs_*.rs), which run inside the
//! IPVS VM (`scripts/test-ipvs-vm.sh`): whether IPVS is there, the IPVS
//! table as `ipvsadm` shows it, kube-ipvs0's addresses, and kproxy started
//! in IPVS mode.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use kproxy_ipvs::IpvsClient;
use kproxy_testkit::kproxy::KproxyProcess;
use kproxy_testkit::netns::Netns;

use super::{Cluster, NODE};

/// The VM emulates its CPU (no KVM): an iptables run takes ~0.3 s there.
pub const WAIT: Duration = Duration::from_secs(120);

/// Whether this kernel has IPVS. Without it the caller returns (the test
/// is skipped, with a line saying so), unless `KPROXY_REQUIRE_IPVS=1`,
/// which turns that into a failure.
pub fn ipvs_present() -> bool {
    let required = std::env::var("KPROXY_REQUIRE_IPVS").as_deref() == Ok("1");
    let present = Path::new("/sys/module/ip_vs").exists();
    assert!(
        present || !required,
        "KPROXY_REQUIRE_IPVS=1 but this kernel has no IPVS"
    );
    if !present {
        eprintln!("skipped: no IPVS in this kernel (run scripts/test-ipvs-vm.sh)");
    }
    present
}

/// Bridged pod-to-pod service traffic needs br_netfilter with
/// bridge-nf-call-iptables, as on real nodes: otherwise a backend's reply
/// to a pod on the same bridge bypasses IPVS and is never un-NATed.
pub fn enable_br_netfilter(node: &Netns) {
    let _ = std::process::Command::new("modprobe")
        .arg("br_netfilter")
        .status();
    node.set_sysctl("net/bridge/bridge-nf-call-iptables", "1")
        .unwrap();
}

/// kproxy's flags in IPVS mode against the fake API server's `kubeconfig`.
pub fn ipvs_args(kubeconfig: &Path) -> Vec<String> {
    vec![
        "--mode=ipvs".to_string(),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--hostname-override={NODE}"),
        "--cluster-cidr=10.244.0.0/16".to_string(),
        "--ipvs-min-sync-period=0s".to_string(),
    ]
}

impl Cluster {
    /// Starts kproxy in IPVS mode in the node namespace with
    /// [`ipvs_args`] plus `extra` and waits until it has synced once.
    pub fn start_kproxy_ipvs(&self, extra: &[&str]) -> KproxyProcess<'_> {
        let mut args = ipvs_args(self.kubeconfig.path());
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn_kproxy(&args)
    }
}

/// `ipvsadm -Ln` in `ns` as virtual server → set of "addr weight" real servers.
pub fn ipvs_table(ns: &Netns) -> BTreeMap<String, BTreeSet<String>> {
    let out = ns.sh("ipvsadm -Ln").unwrap();
    let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut cur = String::new();
    for line in out.lines().skip(3) {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["->", addr, _fwd, weight, ..] => {
                map.entry(cur.clone())
                    .or_default()
                    .insert(format!("{addr} {weight}"));
            }
            [proto, addr, ..] => {
                cur = format!("{proto} {addr}");
                map.entry(cur.clone()).or_default();
            }
            _ => {}
        }
    }
    map
}

/// An IPVS netlink client for `ns`'s table, to poll it for timing: an
/// `ipvsadm` run costs the VM's single emulated CPU more than kproxy's
/// whole sync, which the poll would then slow down.
pub fn ipvs_client(ns: &Netns) -> IpvsClient {
    ns.run_in(IpvsClient::new).unwrap().unwrap()
}

/// [`ipvs_table`] read through `client` (kproxy's own netlink code:
/// contents are checked with `ipvsadm`, this is for timing).
pub fn ipvs_table_netlink(client: &mut IpvsClient) -> BTreeMap<String, BTreeSet<String>> {
    let mut map = BTreeMap::new();
    for s in client.list_services().unwrap() {
        let dests = client
            .list_destinations(&s)
            .unwrap()
            .iter()
            .map(|d| format!("{} {}", d.socket_addr(), d.weight))
            .collect();
        map.insert(
            format!("{} {}", s.protocol, SocketAddr::new(s.addr, s.port)),
            dests,
        );
    }
    map
}

/// `ipvsadm -Ln` in `ns` without the connection counts, which change with
/// traffic: virtual servers with scheduler and flags, real servers with
/// forwarding method and weight.
pub fn ipvs_listing(ns: &Netns) -> Vec<String> {
    ns.sh("ipvsadm -Ln")
        .unwrap()
        .lines()
        .skip(3)
        .map(|line| {
            let w: Vec<&str> = line.split_whitespace().collect();
            match w.first() {
                Some(&"->") => w.iter().take(4).copied().collect::<Vec<_>>().join(" "),
                _ => w.join(" "),
            }
        })
        .collect()
}

/// `ipvsadm -Ln` line of one real server, e.g. "-> 10.244.1.10:8080 Masq 0 1 0".
pub fn dest_line(ns: &Netns, vs: &str, dest: &str) -> Option<String> {
    let out = ns.sh("ipvsadm -Ln").unwrap();
    let mut in_vs = false;
    for line in out.lines() {
        let l = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if !l.starts_with("->") {
            in_vs = l.starts_with(vs);
        } else if in_vs && l.starts_with(&format!("-> {dest} ")) {
            return Some(l);
        }
    }
    None
}

/// The IPv4 addresses on kube-ipvs0, e.g. "10.96.0.10/32".
pub fn kube_ipvs0(ns: &Netns) -> BTreeSet<String> {
    ns.sh("ip -o -4 addr show dev kube-ipvs0")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.iter()
                .position(|t| *t == "inet")
                .and_then(|i| w.get(i + 1))
                .map(|s| s.to_string())
        })
        .collect()
}

/// Waits (polling every 100 ms) until `f` holds, for at most [`WAIT`].
pub fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
