//! Graceful shutdown: SIGTERM while an apply is in flight finishes that
//! apply (the kernel gets the whole transaction), leaves the rules in place
//! and exits 0 within a bound.

mod common;
#[path = "fixtures/reliability/support.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use kproxy_testkit::kproxy::KproxyProcess;
use kproxy_testkit::netns::{tcp_echo_server, tcp_request};
use support::*;

/// Services in the first (large, slow) apply.
const SERVICES: usize = 3000;
const EXIT_BOUND: Duration = Duration::from_secs(25);

#[test]
fn reliability_sigterm_during_apply_finishes_it() {
    let test = "reliability_sigterm_during_apply_finishes_it";
    let Some(c) = Cluster::new(test, 2, 0) else {
        return;
    };
    let ip = c.topo.pod(1).ip();
    let _backend = tcp_echo_server(&c.topo.pod(1).ns, sock(ip, 8080)).unwrap();
    for i in 0..SERVICES {
        let name = format!("svc-{i}");
        let cip = format!("10.97.{}.{}", i / 250, i % 250 + 1);
        c.apply_service(&cluster_ip_service(&name, &cip, 80).build());
        c.apply_slice(&slice_for(&name, "IPv4", &[(ip, NODE)]));
    }
    let args = vec![
        format!("--kubeconfig={}", c.kubeconfig.path().display()),
        format!("--hostname-override={NODE}"),
        "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56".to_string(),
        "--iptables-min-sync-period=0s".to_string(),
    ];
    let mut k = KproxyProcess::spawn(Path::new(&kproxy_bin()), Some(c.node()), &args).unwrap();
    // SIGTERM as soon as the first restore has started.
    k.wait_until(WAIT, "the first iptables-restore to start", |k| {
        Ok(k.log().contains("iptables-restore"))
    })
    .unwrap();
    let sent = Instant::now();
    let status = k.terminate(EXIT_BOUND).expect("exit within the bound");
    let took = sent.elapsed();
    let log = k.log();
    assert!(status.success(), "exit status {status}; log:\n{log}");
    let term = log.find("shutting down").expect("logs the shutdown");
    assert!(
        log[term..].contains("sync done") || log[..term].contains("sync done"),
        "no completed sync in the log:\n{log}"
    );
    // The whole transaction is in the kernel, and stays after the exit.
    let nat = c.iptables_save("nat");
    let svcs = nat
        .lines()
        .filter(|l| l.starts_with("-A KUBE-SERVICES") && l.contains("cluster IP"))
        .count();
    let sync_after_term = log[term..].contains("sync done");
    figure(
        test,
        &format!(
            "{SERVICES} services; SIGTERM {} the first apply; exit 0 after {:.0} ms; {svcs} service rules in place after exit",
            if sync_after_term { "during" } else { "right after" },
            took.as_secs_f64() * 1e3
        ),
    );
    assert_eq!(svcs, SERVICES, "the apply was cut short");
    assert_eq!(
        tcp_request(&c.topo.pod(0).ns, sock([10, 97, 11, 250], 80)).unwrap(),
        c.topo.pod(1).ns.name(),
        "rules must keep serving after kproxy exited"
    );
}
