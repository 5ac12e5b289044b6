//! Foreign changes: another process deletes one of kproxy's chains, flushes
//! the nat table, adds its own rules and chain, or holds the xtables lock.
//! kproxy restores its own rules within one sync period, never removes the
//! foreign ones, and waits for the lock, loses nothing and reports the wait.

mod common;
#[path = "fixtures/reliability/support.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use kproxy_testkit::kproxy::KproxyProcess;
use kproxy_testkit::netns::{tcp_echo_server, tcp_request, Netns};
use support::*;

const SYNC_PERIOD: Duration = Duration::from_secs(3);

/// Foreign rules: (table, chain, rulespec), checked with `iptables -C`.
const FOREIGN: &[(&str, &str, &str)] = &[
    (
        "nat",
        "PREROUTING",
        "-s 203.0.113.0/24 -m comment --comment foreign-pre -j RETURN",
    ),
    (
        "nat",
        "POSTROUTING",
        "-s 203.0.113.0/24 -m comment --comment foreign-post -j RETURN",
    ),
    (
        "filter",
        "INPUT",
        "-s 203.0.113.0/24 -m comment --comment foreign-in -j ACCEPT",
    ),
    (
        "filter",
        "FORWARD",
        "-s 203.0.113.0/24 -m comment --comment foreign-fwd -j FOREIGN-CHAIN",
    ),
    (
        "filter",
        "FOREIGN-CHAIN",
        "-m comment --comment foreign-own -j ACCEPT",
    ),
];

fn ipt(ns: &Netns, args: &str) -> bool {
    ns.exec(args.split_whitespace())
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn add_foreign(ns: &Netns, tables: &[&str]) {
    if tables.contains(&"filter") {
        ipt(ns, "iptables -t filter -N FOREIGN-CHAIN");
    }
    for (table, chain, spec) in FOREIGN.iter().filter(|(t, _, _)| tables.contains(t)) {
        assert!(
            ipt(ns, &format!("iptables -t {table} -A {chain} {spec}")),
            "adding foreign rule {chain} {spec}"
        );
    }
}

fn foreign_intact(ns: &Netns, tables: &[&str]) -> Result<(), String> {
    for (table, chain, spec) in FOREIGN.iter().filter(|(t, _, _)| tables.contains(t)) {
        if !ipt(ns, &format!("iptables -t {table} -C {chain} {spec}")) {
            return Err(format!("foreign rule gone: -t {table} {chain} {spec}"));
        }
    }
    Ok(())
}

#[test]
fn reliability_foreign_changes_restored_and_foreign_rules_kept() {
    let test = "reliability_foreign_changes_restored_and_foreign_rules_kept";
    let Some(c) = Cluster::new(test, 2, 0) else {
        return;
    };
    let ip = c.topo.pod(1).ip();
    let _backend = tcp_echo_server(&c.topo.pod(1).ns, sock(ip, 8080)).unwrap();
    c.apply_service(&cluster_ip_service("web", "10.96.0.10", 80).build());
    c.apply_slice(&slice_for("web", "IPv4", &[(ip, NODE)]));
    c.apply_service(&cluster_ip_service("other", "10.96.0.11", 80).build());
    c.apply_slice(&slice_for("other", "IPv4", &[(ip, NODE)]));
    let node = c.node();
    add_foreign(node, &["nat", "filter"]);
    let k = c.start_kproxy(&[&format!(
        "--iptables-sync-period={}s",
        SYNC_PERIOD.as_secs()
    )]);
    let pod = &c.topo.pod(0).ns;
    eventually("web answers", || {
        tcp_request(pod, sock([10, 96, 0, 10], 80)).is_ok()
    });
    let ours = owned_rules(&save(node, "iptables-save"));
    let restored = |what: &str| -> Duration {
        let took = poll(SYNC_PERIOD * 2 + Duration::from_secs(2), || {
            owned_rules(&save(node, "iptables-save")) == ours
        })
        .unwrap_or_else(|| {
            panic!(
                "{what}: kproxy did not restore its rules:\n{}\nlog:\n{}",
                diff(&owned_rules(&save(node, "iptables-save")), &ours),
                k.log()
            )
        });
        figure(
            test,
            &format!("{what}: restored in {:.0} ms", took.as_secs_f64() * 1e3),
        );
        took
    };

    // Two full resyncs later the foreign rules are all still there.
    std::thread::sleep(SYNC_PERIOD * 2 + Duration::from_millis(500));
    foreign_intact(node, &["nat", "filter"]).unwrap();

    // 1. Someone deletes one of our service chains (and the jump to it).
    let nat = c.iptables_save("nat");
    let chain = svc_chain(&nat, "default/web:http").expect("web's chain");
    let jump_number = nat
        .lines()
        .filter(|l| l.starts_with("-A KUBE-SERVICES "))
        .position(|l| l.contains(&chain))
        .expect("jump to web's chain")
        + 1;
    assert!(ipt(
        node,
        &format!("iptables -t nat -D KUBE-SERVICES {jump_number}")
    ));
    assert!(ipt(node, &format!("iptables -t nat -F {chain}")));
    assert!(ipt(node, &format!("iptables -t nat -X {chain}")));
    let t1 = restored("deleted service chain");
    assert!(t1 <= SYNC_PERIOD + Duration::from_secs(1), "took {t1:?}");
    foreign_intact(node, &["nat", "filter"]).unwrap();

    // 2. Someone flushes every nat chain (rules gone, chains stay).
    assert!(ipt(node, "iptables -t nat -F"));
    let t2 = restored("nat table flushed (-F)");
    assert!(t2 <= SYNC_PERIOD + Duration::from_secs(1), "took {t2:?}");
    // The flush took the foreign nat rules too: they are not kproxy's to restore.
    foreign_intact(node, &["filter"]).unwrap();
    add_foreign(node, &["nat"]);

    // 3. Someone flushes and deletes every nat chain: the canary notices.
    assert!(ipt(node, "iptables -t nat -F"));
    assert!(ipt(node, "iptables -t nat -X"));
    let t3 = restored("nat table flushed and chains deleted (-F -X)");
    assert!(t3 <= SYNC_PERIOD + Duration::from_secs(1), "took {t3:?}");
    foreign_intact(node, &["filter"]).unwrap();
    add_foreign(node, &["nat"]);

    // Another full resync: foreign rules stay, traffic flows.
    std::thread::sleep(SYNC_PERIOD + Duration::from_millis(500));
    foreign_intact(node, &["nat", "filter"]).unwrap();
    assert_eq!(owned_rules(&save(node, "iptables-save")), ours);
    assert_eq!(
        tcp_request(pod, sock([10, 96, 0, 10], 80)).unwrap(),
        c.topo.pod(1).ns.name()
    );
}

#[test]
fn reliability_foreign_xtables_lock_held() {
    let test = "reliability_foreign_xtables_lock_held";
    let Some(c) = Cluster::new(test, 2, 0) else {
        return;
    };
    // A private lock file: the host's /run/xtables.lock is never touched.
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("xtables.lock");
    std::fs::write(&lock, b"").unwrap();
    let lock_s = lock.display().to_string();
    let bin = wrapper(dir.path(), &[("XTABLES_LOCKFILE", &lock_s)], "");
    let ip = c.topo.pod(1).ip();
    let _backend = tcp_echo_server(&c.topo.pod(1).ns, sock(ip, 8080)).unwrap();
    c.apply_service(&cluster_ip_service("web", "10.96.0.10", 80).build());
    c.apply_slice(&slice_for("web", "IPv4", &[(ip, NODE)]));
    let args = vec![
        format!("--kubeconfig={}", c.kubeconfig.path().display()),
        format!("--hostname-override={NODE}"),
        "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56".to_string(),
        "--iptables-min-sync-period=0s".to_string(),
        "--iptables-backend=legacy".to_string(),
    ];
    let mut k = KproxyProcess::spawn(Path::new(&bin), Some(c.node()), &args).unwrap();
    k.wait_healthy(WAIT).unwrap();
    let waits = |k: &KproxyProcess| {
        k.metric("kproxy_xtables_lock_wait_seconds_count")
            .ok()
            .flatten()
            .unwrap_or(0.0)
    };
    let waits_before = waits(&k);

    // Another process holds the lock for 5 s while a change arrives.
    let hold = Duration::from_secs(5);
    let mut holder = Command::new("flock")
        .arg(&lock)
        .args(["sleep", &hold.as_secs().to_string()])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let changed_at = Instant::now();
    c.apply_service(&cluster_ip_service("late", "10.96.0.11", 80).build());
    c.apply_slice(&slice_for("late", "IPv4", &[(ip, NODE)]));
    let legacy_nat = || {
        c.node()
            .exec_ok(["iptables-legacy-save", "-t", "nat"])
            .unwrap_or_default()
    };
    let applied = poll(Duration::from_secs(30), || {
        legacy_nat().contains("default/late:http")
    })
    .unwrap_or_else(|| panic!("the change was lost:\n{}", k.log()));
    let _ = holder.wait();
    assert!(
        applied + Duration::from_millis(300) >= hold - Duration::from_millis(500),
        "applied after {applied:?} although the lock was held for {hold:?}: was the lock file honoured?"
    );
    let pod = &c.topo.pod(0).ns;
    assert_eq!(
        tcp_request(pod, sock([10, 96, 0, 11], 80)).unwrap(),
        c.topo.pod(1).ns.name()
    );
    eventually("lock wait reported", || waits(&k) > waits_before);
    figure(
        test,
        &format!(
            "lock held {hold:?}; change applied {:.0} ms after it arrived; lock-wait count {waits_before} -> {}",
            changed_at.elapsed().min(applied).as_secs_f64() * 1e3,
            waits(&k)
        ),
    );
    assert!(k.is_running());
}
