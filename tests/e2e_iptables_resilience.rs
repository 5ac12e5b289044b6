//! The real kproxy binary in iptables mode under adversity: tables flushed
//! by someone else, restarts, partial syncs, `--cleanup`, and a restore the
//! kernel refuses.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use kproxy_model::fixtures::SvcBuilder;
use kproxy_testkit::netns::{tcp_peer_server, Netns};

const ONE_SYNC: Duration = Duration::from_secs(2);

fn who(ns: &Netns, dst: SocketAddr) -> String {
    peer_request(ns, dst)
        .unwrap_or_else(|e| panic!("{dst}: {e:#}"))
        .0
}

fn web(c: &Cluster, name: &str, ip: &str, pods: &[usize]) {
    c.apply_service(
        &SvcBuilder::new("default", name)
            .cluster_ip(ip)
            .port_full(svc_port("http", 80, "TCP", 8080, None))
            .build(),
    );
    c.apply_slice(&slice_with(
        name,
        "1",
        "IPv4",
        &[("http", 8080, "TCP")],
        pods.iter()
            .map(|i| ep_on(c.topo.pod(*i).ip(), NODE))
            .collect(),
    ));
}

/// `iptables-restore --noflush` of `text` in the node namespace.
fn restore_in(ns: &Netns, text: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), "iptables-restore", "--noflush"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("iptables-restore");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write restore input");
    let out = child.wait_with_output().expect("iptables-restore");
    assert!(
        out.status.success(),
        "iptables-restore {text:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The nat rule of KUBE-SERVICES for `ip` (without `-A KUBE-SERVICES`).
fn dispatch_rule(save: &str, ip: &str) -> Option<String> {
    rules_of(save, "KUBE-SERVICES")
        .into_iter()
        .map(strip_counters)
        .find(|r| r.contains(&format!("-d {ip}/32")))
        .map(|r| r.trim_start_matches("-A KUBE-SERVICES ").to_string())
}

fn svc_chain(save: &str, service: &str) -> String {
    service_chains(save, service)
        .into_iter()
        .find(|c| c.starts_with("KUBE-SVC-"))
        .unwrap_or_else(|| panic!("no KUBE-SVC chain of {service}:\n{save}"))
}

const FOREIGN_PRE: &str = "-s 192.0.2.0/24 -m comment --comment foreign-prerouting -j RETURN";
const FOREIGN_FWD: &str = "-s 192.0.2.0/24 -m comment --comment foreign-forward -j DROP";

#[test]
fn flushed_tables_are_restored_within_a_sync_period() {
    let Some(c) = Cluster::new("flushed_tables_are_restored_within_a_sync_period", 2, 0) else {
        return;
    };
    let p1 = c.topo.pod(1);
    let _server = tcp_peer_server(&p1.ns, sock(p1.ip(), 8080)).unwrap();
    web(&c, "web", "10.96.7.1", &[1]);
    c.iptables(&format!("-t nat -I PREROUTING {FOREIGN_PRE}"))
        .unwrap();
    c.iptables(&format!("-t filter -I FORWARD {FOREIGN_FWD}"))
        .unwrap();
    let period = Duration::from_secs(2);
    let _k = c.start_kproxy(&["--iptables-sync-period=2s"]);
    let client = &c.topo.pod(0).ns;
    let vip = sock([10, 96, 7, 1], 80);
    assert_eq!(who(client, vip), c.pod_name(1));
    let limit = period + Duration::from_millis(1500);
    let restored = |c: &Cluster| {
        let nat = c.iptables_save("nat");
        service_chains(&nat, "default/web")
            .iter()
            .any(|ch| ch.starts_with("KUBE-SVC-"))
            && matches!(peer_request(client, vip), Ok((w, _)) if w == c.pod_name(1))
    };
    let foreign_kept = |c: &Cluster| {
        let nat = c.iptables_save("nat");
        let filter = c.iptables_save("filter");
        assert!(
            nat.contains(&format!("-A PREROUTING {FOREIGN_PRE}")),
            "{nat}"
        );
        assert!(
            filter.contains(&format!("-A FORWARD {FOREIGN_FWD}")),
            "{filter}"
        );
    };
    foreign_kept(&c);

    // Everything in nat flushed and deleted, canary included; the other
    // tool then puts its own PREROUTING rule back.
    c.iptables("-t nat -F").unwrap();
    c.iptables("-t nat -X").unwrap();
    c.iptables(&format!("-t nat -I PREROUTING {FOREIGN_PRE}"))
        .unwrap();
    assert!(!chains_of(&c.iptables_save("nat")).contains("KUBE-SERVICES"));
    let took = within(limit, "nat restored after a flush", || restored(&c));
    eprintln!("restored after a flush in {took:?}");
    foreign_kept(&c);

    // One service chain deleted, canary intact: repaired by the periodic
    // full sync.
    let nat = c.iptables_save("nat");
    let chain = svc_chain(&nat, "default/web");
    let rule = dispatch_rule(&nat, "10.96.7.1").expect("dispatch rule");
    restore_in(
        c.node(),
        &format!("*nat\n-D KUBE-SERVICES {rule}\n:{chain} - [0:0]\n-X {chain}\nCOMMIT\n"),
    );
    assert!(!chains_of(&c.iptables_save("nat")).contains(&chain));
    let took = within(limit, "a deleted service chain restored", || restored(&c));
    eprintln!("service chain restored in {took:?}");
    assert!(chains_of(&c.iptables_save("nat")).contains(&chain));
    foreign_kept(&c);
}

/// Runs `probe` in a loop until `stop`; returns (successes, failures, first errors).
fn probe_loop(
    stop: &AtomicBool,
    probe: impl Fn() -> Result<(), String>,
) -> (usize, usize, Vec<String>) {
    let (mut ok, mut failed, mut errors) = (0, 0, Vec::new());
    while !stop.load(Ordering::Relaxed) {
        match probe() {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(e);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (ok, failed, errors)
}

#[test]
fn restart_keeps_rules_connections_and_new_connections() {
    let Some(c) = Cluster::new("restart_keeps_rules_connections_and_new_connections", 2, 0) else {
        return;
    };
    let p1 = c.topo.pod(1);
    let _server = tcp_peer_server(&p1.ns, sock(p1.ip(), 8080)).unwrap();
    let _echo = tcp_line_echo_server(&p1.ns, sock(p1.ip(), 9090));
    c.apply_service(
        &SvcBuilder::new("default", "web")
            .cluster_ip("10.96.8.1")
            .port_full(svc_port("http", 80, "TCP", 8080, None))
            .port_full(svc_port("line", 90, "TCP", 9090, None))
            .build(),
    );
    c.apply_slice(&slice_with(
        "web",
        "1",
        "IPv4",
        &[("http", 8080, "TCP"), ("line", 9090, "TCP")],
        vec![ep_on(p1.ip(), NODE)],
    ));
    let mut k = c.start_kproxy(&[]);
    let client = &c.topo.pod(0).ns;
    let vip = sock([10, 96, 8, 1], 80);
    let pod1 = c.pod_name(1);
    assert_eq!(who(client, vip), pod1);

    // An established connection through the service.
    let stream = client
        .run_in(|| TcpStream::connect_timeout(&sock([10, 96, 8, 1], 90), Duration::from_secs(2)))
        .unwrap()
        .expect("connect to the line service");
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut roundtrip = |msg: &str| -> String {
        writer
            .write_all(format!("{msg}\n").as_bytes())
            .expect("send");
        let mut line = String::new();
        reader.read_line(&mut line).expect("echo");
        line.trim_end().to_string()
    };
    assert_eq!(roundtrip("before"), format!("{pod1} before"));

    // New connections in a loop, and a watch on the rules, during both
    // restarts.
    let stop = AtomicBool::new(false);
    let (conns, rules) = std::thread::scope(|s| {
        let conns = s.spawn(|| {
            probe_loop(&stop, || {
                match tcp_attempt(client, vip, Duration::from_secs(1)) {
                    Attempt::Answered(r) if r.starts_with(&pod1) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            })
        });
        let rules = s.spawn(|| {
            probe_loop(&stop, || {
                let save = c.iptables_save("nat");
                let chain = service_chains(&save, "default/web")
                    .into_iter()
                    .find(|ch| ch.starts_with("KUBE-SVC-"));
                match (chain, dispatch_rule(&save, "10.96.8.1")) {
                    (Some(ch), Some(rule))
                        if chains_of(&save).contains(&ch) && rule.contains("-j KUBE-SVC-") =>
                    {
                        Ok(())
                    }
                    _ => Err(format!("service rules missing:\n{save}")),
                }
            })
        });
        std::thread::sleep(Duration::from_millis(300));

        // SIGTERM: a clean exit that leaves the rules.
        let status = k.terminate(Duration::from_secs(10)).expect("SIGTERM");
        assert!(status.success(), "exit after SIGTERM: {status}");
        std::thread::sleep(Duration::from_millis(300));
        let mut k = c.start_kproxy(&[]);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(roundtrip("after-sigterm"), format!("{pod1} after-sigterm"));

        // SIGKILL: a crash.
        k.kill().expect("SIGKILL");
        std::thread::sleep(Duration::from_millis(300));
        let _k = c.start_kproxy(&[]);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(roundtrip("after-sigkill"), format!("{pod1} after-sigkill"));
        stop.store(true, Ordering::Relaxed);
        (
            conns.join().expect("prober"),
            rules.join().expect("rule watcher"),
        )
    });
    let (ok, failed, errors) = conns;
    eprintln!("restarts: {ok} new connections, {} rule checks", rules.0);
    assert_eq!(
        failed, 0,
        "new connections failed during restarts: {errors:?}"
    );
    assert!(ok > 20, "only {ok} connections tried");
    let (polls, missing, errors) = rules;
    assert_eq!(missing, 0, "service rules were missing: {errors:?}");
    assert!(polls > 10, "only {polls} rule checks");
}

#[test]
fn partial_sync_rewrites_only_the_changed_service() {
    let Some(c) = Cluster::new("partial_sync_rewrites_only_the_changed_service", 3, 0) else {
        return;
    };
    let (p1, p2) = (c.topo.pod(1), c.topo.pod(2));
    let _servers = [
        tcp_peer_server(&p1.ns, sock(p1.ip(), 8080)).unwrap(),
        tcp_peer_server(&p2.ns, sock(p2.ip(), 8080)).unwrap(),
    ];
    web(&c, "a", "10.96.9.1", &[1]);
    web(&c, "b", "10.96.9.2", &[1]);
    let k = c.start_kproxy(&[]);
    let client = &c.topo.pod(0).ns;
    for _ in 0..5 {
        assert_eq!(who(client, sock([10, 96, 9, 1], 80)), c.pod_name(1));
        assert_eq!(who(client, sock([10, 96, 9, 2], 80)), c.pod_name(1));
    }
    let partials = |k: &kproxy_testkit::kproxy::KproxyProcess| {
        k.metric("kubeproxy_sync_partial_proxy_rules_duration_seconds_count")
            .unwrap()
            .unwrap_or(0.0)
    };
    let before = c.iptables_save_counters("nat");
    let partials_before = partials(&k);
    let a_chains = service_chains(&before, "default/a");
    let b_chains = service_chains(&before, "default/b");
    let a_rules = |save: &str| -> Vec<String> {
        let mut v: Vec<String> = a_chains
            .iter()
            .flat_map(|ch| rules_of(save, ch))
            .map(str::to_string)
            .collect();
        v.extend(
            rules_of(save, "KUBE-SERVICES")
                .into_iter()
                .filter(|r| r.contains("default/a"))
                .map(str::to_string),
        );
        v
    };
    let a_before = a_rules(&before);
    assert!(a_before.len() >= 4, "{a_before:?}");
    assert!(
        a_before.iter().filter(|r| packets(r) >= 5).count() >= 2,
        "traffic to a shows in its counters: {a_before:?}"
    );

    // One endpoint more for b.
    c.apply_slice(&slice_with(
        "b",
        "1",
        "IPv4",
        &[("http", 8080, "TCP")],
        vec![ep_on(p1.ip(), NODE), ep_on(p2.ip(), NODE)],
    ));
    let b_svc = svc_chain(&before, "default/b");
    within(ONE_SYNC, "b's chain has the new endpoint", || {
        c.iptables_save("nat")
            .lines()
            .any(|l| l.starts_with(&format!("-A {b_svc} ")) && l.contains(&p2.ip().to_string()))
    });
    // The metrics are updated right after the restore.
    within(ONE_SYNC, "the partial sync is counted", || {
        partials(&k) > partials_before
    });
    let after = c.iptables_save_counters("nat");
    assert_eq!(
        partials(&k),
        partials_before + 1.0,
        "exactly one partial sync"
    );
    assert_eq!(
        a_rules(&after),
        a_before,
        "a's rules were rewritten (their counters changed)"
    );
    // b's dispatch rule was not touched either; its service chain was
    // rewritten, which resets its counters.
    let b_dispatch = |save: &str| -> Vec<String> {
        rules_of(save, "KUBE-SERVICES")
            .into_iter()
            .filter(|r| r.contains("default/b"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(b_dispatch(&after), b_dispatch(&before));
    let b_svc_rules = rules_of(&after, &b_svc);
    assert!(
        b_svc_rules.iter().all(|r| packets(r) == 0),
        "{b_svc_rules:?}"
    );
    // What was written: b's service chain and the new endpoint's chain.
    let b_after = service_chains(&after, "default/b");
    let new_chains: Vec<&String> = b_after.difference(&b_chains).collect();
    assert_eq!(new_chains.len(), 1, "one new SEP chain: {new_chains:?}");
    let written = b_svc_rules.len() + rules_of(&after, new_chains[0]).len();
    assert_eq!(
        k.metric("kproxy_sync_objects_written").unwrap(),
        Some(written as f64),
        "rules written by the partial sync"
    );
    let mut seen = std::collections::BTreeSet::new();
    within(ONE_SYNC, "b spreads over both endpoints", || {
        seen.insert(who(client, sock([10, 96, 9, 2], 80)));
        seen.len() == 2
    });
}

#[test]
fn cleanup_removes_every_kube_chain_and_is_idempotent() {
    let Some(c) = Cluster::new("cleanup_removes_every_kube_chain_and_is_idempotent", 1, 0) else {
        return;
    };
    let p0 = c.topo.pod(0);
    c.apply_service(
        &SvcBuilder::new("default", "lb")
            .type_("LoadBalancer")
            .cluster_ip("10.96.11.1")
            .port_full(svc_port("http", 80, "TCP", 8080, Some(30111)))
            .lb_ingress("192.168.60.11", None)
            .source_ranges(&["192.168.50.0/24"])
            .external_traffic_policy("Local")
            .health_check_node_port(30112)
            .build(),
    );
    c.apply_slice(&slice_with(
        "lb",
        "1",
        "IPv4",
        &[("http", 8080, "TCP")],
        vec![ep_on(p0.ip(), NODE)],
    ));
    web(&c, "empty", "10.96.11.2", &[]);
    c.iptables(&format!("-t nat -I PREROUTING {FOREIGN_PRE}"))
        .unwrap();
    c.iptables(&format!("-t filter -I FORWARD {FOREIGN_FWD}"))
        .unwrap();
    c.iptables("-t filter -N FOREIGN").unwrap();
    c.iptables("-t filter -A FOREIGN -s 192.0.2.7/32 -j DROP")
        .unwrap();
    c.iptables("-t filter -A INPUT -j FOREIGN").unwrap();
    let mut k = c.start_kproxy(&[]);
    for chain in ["KUBE-FW-", "KUBE-EXT-", "KUBE-SVL-", "KUBE-SEP-"] {
        assert!(
            c.iptables_save("nat").contains(&format!(":{chain}")),
            "kproxy wrote a {chain} chain"
        );
    }
    assert!(c.iptables_save("filter").contains("has no endpoints"));
    assert!(c.ip6tables_save("nat").contains(":KUBE-SERVICES"));
    assert!(k.terminate(Duration::from_secs(10)).unwrap().success());

    let run_cleanup = || {
        let out = c
            .node()
            .exec([env!("CARGO_BIN_EXE_kproxy"), "--cleanup"])
            .expect("kproxy --cleanup");
        assert!(
            out.status.success(),
            "kproxy --cleanup: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let dump = || -> String {
        let mut s = String::new();
        for bin in ["iptables-save", "ip6tables-save"] {
            for table in ["nat", "filter", "mangle"] {
                s.push_str(&c.node().exec_ok([bin, "-t", table]).expect("save"));
            }
        }
        // Counters and the generator comment vary between dumps.
        s.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                if l.starts_with(':') {
                    l.split(' ').next().unwrap_or(l)
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    run_cleanup();
    let after = dump();
    // kubelet's KUBE-FIREWALL (which kproxy fills for localhost NodePorts,
    // as upstream) is not ours to delete.
    let kubelet =
        |name: &str| name.starts_with("KUBE-FIREWALL") || name.starts_with("KUBE-KUBELET-CANARY");
    for line in after.lines() {
        if let Some(chain) = line.strip_prefix(':') {
            assert!(
                !chain.starts_with("KUBE-") || kubelet(chain),
                "chain {chain} left:\n{after}"
            );
        }
        if let Some((_, target)) = line.split_once(" -j KUBE-") {
            assert!(
                kubelet(&format!("KUBE-{target}")),
                "jump left: {line}\n{after}"
            );
        }
    }
    assert!(
        after.contains(&format!("-A PREROUTING {FOREIGN_PRE}")),
        "{after}"
    );
    assert!(
        after.contains(&format!("-A FORWARD {FOREIGN_FWD}")),
        "{after}"
    );
    assert!(
        after.contains("-A INPUT -j FOREIGN")
            && after.contains("-A FOREIGN -s 192.0.2.7/32 -j DROP")
    );

    run_cleanup();
    assert_eq!(dump(), after, "a second cleanup changes nothing");
}

#[test]
fn refused_restore_keeps_previous_rules_and_is_reported() {
    let Some(c) = Cluster::new("refused_restore_keeps_previous_rules_and_is_reported", 2, 0) else {
        return;
    };
    let p1 = c.topo.pod(1);
    let _server = tcp_peer_server(&p1.ns, sock(p1.ip(), 8080)).unwrap();
    web(&c, "a", "10.96.10.1", &[1]);
    web(&c, "b", "10.96.10.2", &[1]);
    let mut k = c.start_kproxy(&[]);
    let client = &c.topo.pod(0).ns;
    let b_vip = sock([10, 96, 10, 2], 80);
    assert_eq!(who(client, b_vip), c.pod_name(1));
    let failures = |k: &kproxy_testkit::kproxy::KproxyProcess| {
        k.metric("kubeproxy_sync_proxy_rules_iptables_restore_failures_total")
            .unwrap()
            .unwrap_or(0.0)
    };
    assert_eq!(failures(&k), 0.0);

    // Someone else jumps to b's service chain: deleting b makes kproxy's
    // `-X` of that chain fail, and with it the whole transaction.
    let nat = c.iptables_save("nat");
    let b_chain = svc_chain(&nat, "default/b");
    let foreign = format!("-s 198.51.100.1/32 -m comment --comment foreign-ref -j {b_chain}");
    c.iptables(&format!("-t nat -I PREROUTING {foreign}"))
        .unwrap();
    c.api
        .delete::<k8s_openapi::api::core::v1::Service>("default", "b")
        .expect("delete b");
    k.wait_until(ONE_SYNC, "a refused restore", |k| Ok(failures(k) >= 1.0))
        .expect("restore failure counted");
    // Nothing of the refused transaction was applied: b is still served.
    let nat = c.iptables_save("nat");
    assert!(
        dispatch_rule(&nat, "10.96.10.2").is_some(),
        "b's rule went:\n{nat}"
    );
    assert_eq!(
        who(client, b_vip),
        c.pod_name(1),
        "previous rules still in effect"
    );
    let log = k.log();
    assert!(
        log.lines()
            .any(|l| l.contains("refused line") && l.contains(&format!("-X {b_chain}"))),
        "the log names the refused line:\n{log}"
    );

    // kproxy recovers by itself (leaving the referenced chain alone), never
    // touching the foreign rule; a still works.
    within(
        Duration::from_secs(8),
        "b's dispatch rule removed after recovery",
        || dispatch_rule(&c.iptables_save("nat"), "10.96.10.2").is_none(),
    );
    k.wait_healthy(Duration::from_secs(5))
        .expect("healthy again");
    let nat = c.iptables_save("nat");
    assert!(nat.contains(&format!("-A PREROUTING {foreign}")), "{nat}");
    assert_eq!(who(client, sock([10, 96, 10, 1], 80)), c.pod_name(1));
}
