//! Support for tests that need a kernel with IPVS (run inside the VM by
//! `scripts/test-ipvs-vm.sh`).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use kproxy_ipvs::{Destination, ForwardMethod, IpvsClient, Service, ServiceFlags};
use kproxy_model::IpFamily;

/// Returns false (after printing why) when this kernel has no IPVS, unless
/// `KPROXY_REQUIRE_IPVS=1`, which turns that into a failure so a CI run in
/// the VM cannot skip silently. Otherwise moves the calling thread (libtest
/// runs each test on its own thread) into a fresh network namespace: IPVS
/// tables, links and sysctls are per namespace, so tests cannot see each
/// other and leave nothing behind.
pub fn enter_ipvs_netns() -> bool {
    let required = std::env::var("KPROXY_REQUIRE_IPVS").as_deref() == Ok("1");
    let present = std::path::Path::new("/sys/module/ip_vs").exists();
    if !present {
        assert!(
            !required,
            "KPROXY_REQUIRE_IPVS=1 but this kernel has no IPVS (ip_vs not loaded)"
        );
        eprintln!("skipped: no IPVS in this kernel");
        return false;
    }
    // SAFETY: unshare(2) takes no pointers and touches no memory; with
    // CLONE_NEWNET it only switches this thread's network namespace, which
    // Rust's runtime does not depend on.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    sh("ip link set lo up");
    true
}

/// Runs a shell command in the current thread's namespace; panics with its
/// output if it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawn sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a shell command and returns whether it succeeded.
pub fn sh_ok(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn norm(line: &str) -> String {
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `ipvsadm -Ln [extra]` as service line → set of real-server lines,
/// whitespace-normalised.
pub fn ipvsadm_view(extra: &str) -> BTreeMap<String, BTreeSet<String>> {
    let out = sh(&format!("ipvsadm -Ln {extra}"));
    let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current = String::new();
    for line in out.lines().skip(3) {
        let l = norm(line);
        if l.is_empty() {
            continue;
        }
        if l.starts_with("->") {
            map.entry(current.clone()).or_default().insert(l);
        } else {
            current = l.clone();
            map.entry(l).or_default();
        }
    }
    map
}

/// A service line as ipvsadm prints it.
pub fn ipvsadm_service_line(s: &Service) -> String {
    let mut l = if s.fwmark != 0 {
        format!("FWM {} {}", s.fwmark, s.scheduler)
    } else {
        format!(
            "{} {} {}",
            s.protocol,
            std::net::SocketAddr::new(s.addr, s.port),
            s.scheduler
        )
    };
    if s.flags.contains(ServiceFlags::PERSISTENT) {
        l.push_str(&format!(" persistent {}", s.timeout));
        if s.netmask != Service::full_netmask(s.family) {
            // ipvsadm prints an IPv4 mask dotted, an IPv6 one as a prefix length
            match s.family {
                IpFamily::V4 => l.push_str(&format!(
                    " mask {}",
                    std::net::Ipv4Addr::from(s.netmask.to_ne_bytes())
                )),
                IpFamily::V6 => l.push_str(&format!(" mask {}", s.netmask)),
            }
        }
    }
    l
}

fn fwd_name(f: ForwardMethod) -> &'static str {
    match f {
        ForwardMethod::Masquerade => "Masq",
        ForwardMethod::Local => "Local",
        ForwardMethod::Tunnel => "Tunnel",
        ForwardMethod::DirectRoute => "Route",
        _ => "?",
    }
}

/// A real-server line as `ipvsadm -Ln` (or with `--persistent-conn`) prints it.
pub fn ipvsadm_dest_line(d: &Destination, persistent_conn: bool) -> String {
    if persistent_conn {
        // ipvsadm drops the Forward column in this mode
        format!(
            "-> {} {} {} {} {}",
            d.socket_addr(),
            d.weight,
            d.persist_conns,
            d.active_conns,
            d.inactive_conns
        )
    } else {
        format!(
            "-> {} {} {} {} {}",
            d.socket_addr(),
            fwd_name(d.fwd_method),
            d.weight,
            d.active_conns,
            d.inactive_conns
        )
    }
}

/// Our client's view of the kernel, rendered like [`ipvsadm_view`].
pub fn client_view(
    client: &mut IpvsClient,
    persistent_conn: bool,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut map = BTreeMap::new();
    for s in client.list_services().expect("list services") {
        let dests = client
            .list_destinations(&s)
            .expect("list destinations")
            .iter()
            .map(|d| ipvsadm_dest_line(d, persistent_conn))
            .collect();
        map.insert(ipvsadm_service_line(&s), dests);
    }
    map
}
