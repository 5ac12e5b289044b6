//! kproxy restart and crash: SIGTERM and SIGKILL while clients open new
//! connections every 20 ms and hold long-lived ones. Established connections
//! survive, no new connection fails, no conntrack entry of the service is
//! flushed, and the first sync of the new process adopts the rules in place
//! (packet counters of unchanged service chains survive).

mod common;
#[path = "fixtures/reliability/support.rs"]
mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use kproxy_model::fixtures::SvcBuilder;
use kproxy_testkit::netns::{tcp_echo_server, tcp_request, Netns, NODE_IP_V4};
use support::*;

/// `conntrack -L` entries (one per line) towards `dst` in `ns`.
fn conntrack_entries(ns: &Netns, dst: &str) -> Vec<String> {
    let out = ns
        .exec(["conntrack", "-L", "-p", "tcp", "--orig-dst", dst])
        .expect("conntrack -L");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("tcp"))
        .map(str::to_string)
        .collect()
}

fn established_with_sport(entries: &[String], sport: u16) -> bool {
    let needle = format!("sport={sport} ");
    entries
        .iter()
        .any(|e| e.contains("ESTABLISHED") && e.contains(&needle))
}

fn restart(test: &str, crash: bool, check_adoption: bool) {
    let Some(c) = Cluster::new(test, 4, 0) else {
        return;
    };
    let (p1, p2, p3) = (c.topo.pod(1).ip(), c.topo.pod(2).ip(), c.topo.pod(3).ip());
    let _backends: Vec<_> = (1..3)
        .map(|i| tcp_echo_server(&c.topo.pod(i).ns, sock(c.topo.pod(i).ip(), 8080)).unwrap())
        .collect();
    // Pod 3 holds long-lived connections (service "hold").
    let _hold = EchoLines::start(&c.topo.pod(3).ns, sock(p3, 8080));
    let both = [(p1, NODE), (p2, NODE)];
    c.apply_service(&cluster_ip_service("web", "10.96.0.10", 80).build());
    c.apply_slice(&slice_for("web", "IPv4", &both));
    c.apply_service(
        &SvcBuilder::new("default", "np")
            .cluster_ip("10.96.0.11")
            .type_("NodePort")
            .node_port("http", 80, "TCP", 30080)
            .build(),
    );
    c.apply_slice(&slice_for("np", "IPv4", &both));
    c.apply_service(&cluster_ip_service("hold", "10.96.0.20", 80).build());
    c.apply_slice(&slice_for("hold", "IPv4", &[(p3, NODE)]));

    let mut k = c.start_kproxy(&[]);
    let pod = &c.topo.pod(0).ns;
    let node_port = SocketAddr::new(IpAddr::V4(NODE_IP_V4), 30080);
    eventually("services answer", || {
        tcp_request(pod, sock([10, 96, 0, 10], 80)).is_ok()
            && tcp_request(&c.topo.client, node_port).is_ok()
    });
    let mut held: Vec<Established> = (0..5)
        .map(|_| Established::open(pod, sock([10, 96, 0, 20], 80)))
        .collect();
    let s_cluster = Stream::start(pod, sock([10, 96, 0, 10], 80), Duration::from_millis(20));
    let s_node = Stream::start(&c.topo.client, node_port, Duration::from_millis(20));
    s_cluster.wait_for_requests(25);
    s_node.wait_for_requests(25);

    // Before: conntrack entries of the held connections and rule counters.
    let before_ct = conntrack_entries(c.node(), "10.96.0.20");
    for e in &held {
        assert!(
            established_with_sport(&before_ct, e.local.port()),
            "no conntrack entry for {} before the restart: {before_ct:?}",
            e.local
        );
    }
    let web_before_ct = conntrack_entries(c.node(), "10.96.0.10").len();
    let save_c = c
        .node()
        .exec_ok(["iptables-save", "-c", "-t", "nat"])
        .unwrap();
    let web_chain = svc_chain(&save_c, "default/web:http").expect("web's KUBE-SVC chain");
    let hold_chain = svc_chain(&save_c, "default/hold:http").expect("hold's KUBE-SVC chain");
    let rules_before = owned_rules(&save(c.node(), "iptables-save"));

    // Stop or crash, and start again while the clients keep going.
    let stopped_at = Instant::now();
    if crash {
        k.kill().expect("SIGKILL");
    } else {
        let status = k.terminate(Duration::from_secs(25)).expect("SIGTERM");
        assert!(status.success(), "SIGTERM exit status {status}");
    }
    // Counters read once no kproxy runs any more: the new one must keep them.
    let save_c = c
        .node()
        .exec_ok(["iptables-save", "-c", "-t", "nat"])
        .unwrap();
    let hold_packets_before: u64 = rule_packets(&save_c, &hold_chain).iter().sum();
    let web_packets_before: u64 = rule_packets(&save_c, &web_chain).iter().sum();
    std::thread::sleep(Duration::from_millis(500));
    let mut k2 = c.start_kproxy(&[]);
    let down_for = stopped_at.elapsed();
    // Let a full sync period's worth of traffic go through the new rules.
    std::thread::sleep(Duration::from_secs(2));

    for e in &mut held {
        e.ping()
            .unwrap_or_else(|err| panic!("held connection {} broke: {err}", e.local));
    }
    let after_ct = conntrack_entries(c.node(), "10.96.0.20");
    for e in &held {
        assert!(
            established_with_sport(&after_ct, e.local.port()),
            "conntrack entry of {} lost across the restart: {after_ct:?}",
            e.local
        );
    }
    let web_after_ct = conntrack_entries(c.node(), "10.96.0.10").len();
    let save_c = c
        .node()
        .exec_ok(["iptables-save", "-c", "-t", "nat"])
        .unwrap();
    let hold_packets_after: u64 = rule_packets(&save_c, &hold_chain).iter().sum();
    let web_packets_after: u64 = rule_packets(&save_c, &web_chain).iter().sum();
    let rules_after = owned_rules(&save(c.node(), "iptables-save"));

    let s1 = s_cluster.finish();
    let s2 = s_node.finish();
    let log = k2.log();
    figure(
        test,
        &format!(
            "{} requests, {} failed (ClusterIP {}/{}, NodePort {}/{}); kproxy down {:.0} ms (to healthy); \
             5/5 held connections alive; web conntrack entries {web_before_ct} -> {web_after_ct}; \
             hold chain packets {hold_packets_before} -> {hold_packets_after}, web chain {web_packets_before} -> {web_packets_after}",
            s1.sent + s2.sent,
            s1.failed() + s2.failed(),
            s1.sent,
            s1.failed(),
            s2.sent,
            s2.failed(),
            down_for.as_secs_f64() * 1e3,
        ),
    );
    assert!(
        s1.failures.is_empty() && s2.failures.is_empty(),
        "new connections failed across the restart: {:?} {:?}",
        s1.failures,
        s2.failures
    );
    assert!(
        rules_after == rules_before,
        "rules differ after the restart:\n{}",
        diff(&rules_after, &rules_before)
    );
    assert!(
        hold_packets_before > 0 && web_packets_before > 0,
        "counters were never counted: the test is blind"
    );
    if check_adoption {
        assert!(
            hold_packets_after >= hold_packets_before,
            "the restart reset the packet counters of the unchanged chain {hold_chain} \
             ({hold_packets_before} -> {hold_packets_after}): rules were rebuilt, not adopted"
        );
        assert!(
            web_packets_after >= web_packets_before,
            "the restart reset the packet counters of the unchanged chain {web_chain} \
             ({web_packets_before} -> {web_packets_after})"
        );
        let adopted = log
            .lines()
            .find(|l| l.contains("adopted the unchanged chains"))
            .unwrap_or_else(|| {
                panic!("the new process does not log that it adopted the rules in place:\n{log}")
            });
        figure(test, &format!("first sync after the restart: {adopted}"));
    }
    assert!(k2.is_running());
}

#[test]
fn reliability_restart_sigterm() {
    restart("reliability_restart_sigterm", false, false);
}

#[test]
fn reliability_restart_sigkill() {
    restart("reliability_restart_sigkill", true, false);
}

/// The first sync of a new process compares the planned chains with
/// `iptables-save` (normalised, `kproxy_iptables::normalize`) and writes
/// none of the unchanged ones, so their rule counters keep counting.
#[test]
fn reliability_restart_adopts_unchanged_chains() {
    restart("reliability_restart_adopts_unchanged_chains", false, true);
}
