//! API server outage: traffic never stops while the API server is away,
//! and everything that changed meanwhile (deletions included) is in the
//! kernel shortly after it returns — with no duplicate or stale rules.
//!
//! `KPROXY_RELIABILITY_OUTAGE_SECS` sets the outage (default 60 s, as CI).

mod common;
#[path = "fixtures/reliability/support.rs"]
mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_model::fixtures::SvcBuilder;
use kproxy_testkit::netns::{tcp_echo_server, tcp_request, NODE_IP_V4};
use support::*;

/// How soon after the API server returns every change must be in the kernel.
const RECOVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    /// The server returns with the same history; nothing changed meanwhile.
    SameHistory,
    /// The server returns with a new history (every resourceVersion kproxy
    /// knows is gone: 410, relist) and objects were deleted, added and
    /// changed meanwhile: only a relist can find the deletions.
    ResetHistory,
    /// Same history, objects deleted, added and changed meanwhile: the
    /// resumed watch replays them.
    ChangedWhileAway,
}

/// `Cluster::start_kproxy`'s flags, minus the kubeconfig.
fn fresh_args() -> Vec<String> {
    vec![
        format!("--hostname-override={NODE}"),
        "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56".to_string(),
        "--iptables-min-sync-period=0s".to_string(),
    ]
}

fn outage(test: &str, scenario: Scenario) {
    let Some(c) = Cluster::new(test, 3, 0) else {
        return;
    };
    let duration = env_secs("KPROXY_RELIABILITY_OUTAGE_SECS", 60);
    let (p1, p2) = (c.topo.pod(1).ip(), c.topo.pod(2).ip());
    let _backends: Vec<_> = (1..3)
        .map(|i| tcp_echo_server(&c.topo.pod(i).ns, sock(c.topo.pod(i).ip(), 8080)).unwrap())
        .collect();
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
    c.apply_service(&cluster_ip_service("doomed", "10.96.0.12", 80).build());
    c.apply_slice(&slice_for("doomed", "IPv4", &[(p1, NODE)]));
    c.apply_service(&cluster_ip_service("moved", "10.96.0.13", 80).build());
    c.apply_slice(&slice_for("moved", "IPv4", &[(p1, NODE)]));

    let mut k = c.start_kproxy(&[]);
    let pod = &c.topo.pod(0).ns;
    eventually("web and np answer", || {
        tcp_request(pod, sock([10, 96, 0, 10], 80)).is_ok()
            && tcp_request(
                &c.topo.client,
                SocketAddr::new(IpAddr::V4(NODE_IP_V4), 30080),
            )
            .is_ok()
    });
    let cluster_ip = Stream::start(pod, sock([10, 96, 0, 10], 80), Duration::from_millis(20));
    let node_port = Stream::start(
        &c.topo.client,
        SocketAddr::new(IpAddr::V4(NODE_IP_V4), 30080),
        Duration::from_millis(20),
    );
    cluster_ip.wait_for_requests(10);
    node_port.wait_for_requests(10);

    // The outage.
    let addr = c.api.addr();
    c.runtime.block_on(c.api.stop());
    let outage_start = Instant::now();
    let (sent0, failed0) = (
        cluster_ip.sent() + node_port.sent(),
        cluster_ip.failed() + node_port.failed(),
    );
    if scenario != Scenario::SameHistory {
        // While away: one service deleted, one added, one's endpoints moved.
        c.api
            .delete::<Service>("default", "doomed")
            .expect("delete doomed");
        c.api
            .delete::<EndpointSlice>("default", "doomed-1")
            .expect("delete doomed slice");
        c.apply_service(&cluster_ip_service("newcomer", "10.96.0.14", 80).build());
        c.apply_slice(&slice_for("newcomer", "IPv4", &[(p2, NODE)]));
        c.apply_slice(&slice_for("moved", "IPv4", &[(p2, NODE)]));
    }
    if scenario == Scenario::ResetHistory {
        c.api.reset_history();
    }
    std::thread::sleep(duration);
    assert!(
        matches!(k.get_healthz("/healthz"), Ok((200, _))),
        "/healthz must stay OK while the API server is away and nothing is pending"
    );
    let outage_sent = cluster_ip.sent() + node_port.sent() - sent0;
    let outage_failed = cluster_ip.failed() + node_port.failed() - failed0;

    // The API server returns on the same address.
    let listener = c
        .node()
        .run_in(move || std::net::TcpListener::bind(addr))
        .expect("enter node ns")
        .expect("rebind the API address");
    {
        let _guard = c.runtime.enter();
        c.api.restart_on(listener).expect("restart API server");
    }
    let back = Instant::now();
    let outage_len = back - outage_start;

    let expect_changes = scenario != Scenario::SameHistory;
    let p1s = format!("{p1}:8080");
    let p2s = format!("{p2}:8080");
    let recovered = poll(Duration::from_secs(60), || {
        let nat = c.iptables_save("nat");
        if !expect_changes {
            return true;
        }
        let moved_to_p2 = nat
            .lines()
            .any(|l| l.contains("default/moved:http") && l.contains(&p2s));
        let moved_off_p1 = !nat
            .lines()
            .any(|l| l.contains("default/moved:http") && l.contains(&p1s));
        !nat.contains("default/doomed:")
            && nat.contains("default/newcomer:http")
            && moved_to_p2
            && moved_off_p1
    })
    .unwrap_or_else(|| {
        panic!(
            "changes made during the outage never reached the kernel:\n{}\nlog:\n{}",
            c.iptables_save("nat"),
            k.log()
        )
    });
    if scenario == Scenario::ResetHistory {
        eventually("kproxy relisted after 410", || {
            k.log().contains("relist complete")
        });
    }

    // Keep the traffic going a little after the return, then account.
    std::thread::sleep(Duration::from_secs(2));
    let s1 = cluster_ip.finish();
    let s2 = node_port.finish();
    if expect_changes {
        assert_eq!(
            tcp_request(pod, sock([10, 96, 0, 14], 80)).expect("newcomer answers"),
            c.topo.pod(2).ns.name()
        );
        assert_eq!(
            tcp_request(pod, sock([10, 96, 0, 13], 80)).expect("moved answers"),
            c.topo.pod(2).ns.name()
        );
        assert!(
            tcp_request(pod, sock([10, 96, 0, 12], 80)).is_err(),
            "the deleted service must not answer any more"
        );
    }

    // No duplicate or stale rules: the same as a fresh kproxy on a fresh
    // namespace produces for the same objects.
    let got4 = owned_rules(&save(c.node(), "iptables-save"));
    let got6 = owned_rules(&save(c.node(), "ip6tables-save"));
    let (want4, want6) = fresh_rules(&c.api, &c.runtime, &fresh_args());
    assert!(
        got4 == want4,
        "IPv4 rules differ from a fresh kproxy's:\n{}",
        diff(&got4, &want4)
    );
    assert!(
        got6 == want6,
        "IPv6 rules differ from a fresh kproxy's:\n{}",
        diff(&got6, &want6)
    );

    figure(
        test,
        &format!(
            "outage {:.1}s; requests during outage {outage_sent} failed {outage_failed}; \
             total {} failed {} (ClusterIP {}/{}, NodePort {}/{}); changes in kernel {:.0} ms after return",
            outage_len.as_secs_f64(),
            s1.sent + s2.sent,
            s1.failed() + s2.failed(),
            s1.sent,
            s1.failed(),
            s2.sent,
            s2.failed(),
            recovered.as_secs_f64() * 1e3
        ),
    );
    assert_eq!(
        outage_failed, 0,
        "requests failed during the outage: {:?} {:?}",
        s1.failures, s2.failures
    );
    assert!(
        s1.failures.is_empty() && s2.failures.is_empty(),
        "requests failed: {:?} {:?}",
        s1.failures,
        s2.failures
    );
    assert!(outage_sent > 0, "the client sent nothing during the outage");
    if expect_changes {
        assert!(
            recovered <= RECOVERY,
            "changes reached the kernel {recovered:?} after the API server returned (limit {RECOVERY:?}); log:\n{}",
            k.log()
        );
    }
    assert!(k.is_running(), "kproxy exited:\n{}", k.log());
}

#[test]
fn reliability_outage_same_history() {
    outage("reliability_outage_same_history", Scenario::SameHistory);
}

#[test]
fn reliability_outage_reset_history_relists() {
    outage(
        "reliability_outage_reset_history_relists",
        Scenario::ResetHistory,
    );
}

#[test]
fn reliability_outage_changes_while_away() {
    outage(
        "reliability_outage_changes_while_away",
        Scenario::ChangedWhileAway,
    );
}
