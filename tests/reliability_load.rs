//! kproxy under sustained load, and `/healthz` when syncs stall.
//!
//! `reliability_load_endpoint_churn`: kproxy (iptables mode, in a node
//! namespace) with `KPROXY_LOAD_SERVICES` services while the API server
//! changes `KPROXY_LOAD_RATE` (1000) EndpointSlices per second for
//! `KPROXY_LOAD_SECS`. CI: 2000 services for 2 minutes (about 3 minutes in
//! all on 2 cores); `KPROXY_SOAK=1`: the full size, 10 000 services for 10
//! minutes (setting up 10 000 services alone takes ~5 minutes with a debug
//! kproxy and fake API server, too long for CI). Passes when RSS
//! stays flat after warm-up (VmRSS at ~30 s against the end), `/healthz`
//! answers 200 at every poll, and after the load stops nothing stays
//! pending: `kubeproxy_sync_proxy_rules_endpoint_changes_pending` is 0 and
//! the last change is in the kernel within `DRAIN`.
//!
//! `reliability_load_healthz_follows_stalled_syncs`: every `iptables-restore`
//! kproxy runs fails (a PATH shim, only for kproxy's process) while changes
//! keep coming: `/healthz` turns 503 within the health timeout
//! (2 × `--iptables-sync-period`) and 200 again soon after restores work.
//!
//! kproxy runs as the test profile builds it (debug under `cargo test`): a
//! debug kproxy is several times slower than a release one, so keeping up
//! here leaves a release build headroom, and CI needs no second build.

mod common;
#[path = "fixtures/reliability/support.rs"]
mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use kproxy_testkit::kproxy::KproxyProcess;
use support::*;

/// RSS may grow by this much between warm-up and the end (allocator
/// fragmentation, a larger peak sync buffer); a leak of one small object
/// per change (120k changes) exceeds it.
const RSS_SLACK_PCT: u64 = 15;
const RSS_SLACK_MIN_KB: u64 = 12 * 1024;
/// After the load stops, the last change must be in the kernel within this.
const DRAIN: Duration = Duration::from_secs(30);

fn vm_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn cluster_ip(i: usize) -> String {
    format!("10.96.{}.{}", 1 + i / 250, 1 + i % 250)
}

/// The `k`-th endpoint address handed out (remote pods: no SEP chains).
fn endpoint_ip(k: usize) -> IpAddr {
    let n = u32::try_from(k % 0x7_0000).unwrap_or(0);
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 248, 0, 1)) + n))
}

/// p-quantile (upper bucket bound) of a Prometheus histogram in `body`.
fn histogram_quantile(body: &str, name: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(f64, f64)> = body
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

fn metric(k: &KproxyProcess, sample: &str) -> f64 {
    k.metric(sample).ok().flatten().unwrap_or(f64::NAN)
}

#[test]
fn reliability_load_endpoint_churn() {
    let test = "reliability_load_endpoint_churn";
    let Some(c) = Cluster::new(test, 1, 0) else {
        return;
    };
    let soak = std::env::var_os("KPROXY_SOAK").is_some_and(|v| v == "1");
    let services = env_usize("KPROXY_LOAD_SERVICES", if soak { 10_000 } else { 2_000 });
    let rate = env_usize("KPROXY_LOAD_RATE", 1000).max(1);
    let duration = env_secs("KPROXY_LOAD_SECS", if soak { 600 } else { 120 });
    let warm_up = Duration::from_secs(30).min(duration / 2);
    // A watcher that lags must not fall out of the history (410 and a
    // relist of everything): keep a generous window.
    c.api.set_event_window(rate * 120);

    let setup = Instant::now();
    for i in 0..services {
        let name = format!("s{i}");
        c.apply_service(&cluster_ip_service(&name, &cluster_ip(i), 80).build());
        c.apply_slice(&slice_for(
            &name,
            "IPv4",
            &[
                (endpoint_ip(2 * i), REMOTE_NODE),
                (endpoint_ip(2 * i + 1), REMOTE_NODE),
            ],
        ));
    }
    let mut k = c.start_kproxy(&[]);
    k.wait_until(Duration::from_secs(300), "all services programmed", |k| {
        Ok(
            k.metric("kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\"}")?
                .is_some_and(|n| n >= (3 * services) as f64),
        )
    })
    .expect("initial sync");
    let setup = setup.elapsed();
    let pid = k.pid();
    let rss_start = vm_rss_kb(pid).expect("VmRSS");
    let changes_before = metric(&k, "kubeproxy_sync_proxy_rules_endpoint_changes_total");
    let syncs_before = metric(&k, "kubeproxy_sync_proxy_rules_duration_seconds_count");

    // The load: `rate` slice updates per second, in 10 ms batches, each
    // moving one service's endpoints to two new addresses.
    let stop = AtomicBool::new(false);
    let sent = AtomicUsize::new(0);
    let mut rss_warm = 0;
    let mut health_polls = 0usize;
    let mut unhealthy: Vec<(Duration, String)> = Vec::new();
    let mut max_pending = 0f64;
    let started = Instant::now();
    let last_change = std::thread::scope(|s| {
        let generator = s.spawn(|| {
            let mut k_next = 2 * services;
            let mut last = (0, endpoint_ip(0));
            let tick = Duration::from_millis(10);
            let mut due = 0f64;
            let begin = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                due += rate as f64 * tick.as_secs_f64();
                while due >= 1.0 {
                    let n = sent.load(Ordering::Relaxed);
                    let i = n % services;
                    let (a, b) = (endpoint_ip(k_next), endpoint_ip(k_next + 1));
                    k_next += 2;
                    c.apply_slice(&slice_for(
                        &format!("s{i}"),
                        "IPv4",
                        &[(a, REMOTE_NODE), (b, REMOTE_NODE)],
                    ));
                    last = (i, b);
                    sent.fetch_add(1, Ordering::Relaxed);
                    due -= 1.0;
                }
                let next = tick * u32::try_from(begin.elapsed().as_millis() / 10 + 1).unwrap_or(0);
                if let Some(rest) = next.checked_sub(begin.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            last
        });
        while started.elapsed() < duration {
            std::thread::sleep(Duration::from_millis(500));
            health_polls += 1;
            match k.get_healthz("/healthz") {
                Ok((200, _)) => {}
                Ok((code, body)) => unhealthy.push((started.elapsed(), format!("{code} {body}"))),
                Err(e) => unhealthy.push((started.elapsed(), e.to_string())),
            }
            max_pending = max_pending.max(metric(
                &k,
                "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            ));
            if rss_warm == 0 && started.elapsed() >= warm_up {
                rss_warm = vm_rss_kb(pid).unwrap_or(0);
            }
            assert!(k.is_running(), "kproxy exited under load:\n{}", k.log());
        }
        stop.store(true, Ordering::Relaxed);
        generator.join().expect("load generator")
    });
    let load_for = started.elapsed();
    let sent = sent.load(Ordering::Relaxed);

    // Drain: nothing pending, the last change in the kernel.
    let (svc, ip) = last_change;
    let needle = format!("--to-destination {ip}:8080");
    let drained = poll(DRAIN, || {
        metric(&k, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0.0
            && c.iptables_save("nat").contains(&needle)
    });
    let rss_end = vm_rss_kb(pid).unwrap_or(0);
    let (_, body) = k.get_metrics("/metrics").expect("metrics");
    let p99 = histogram_quantile(
        &body,
        "kubeproxy_network_programming_duration_seconds",
        0.99,
    );
    let p50 = histogram_quantile(&body, "kubeproxy_network_programming_duration_seconds", 0.5);
    let changes = metric(&k, "kubeproxy_sync_proxy_rules_endpoint_changes_total") - changes_before;
    let syncs = metric(&k, "kubeproxy_sync_proxy_rules_duration_seconds_count") - syncs_before;
    let partial_p99 = histogram_quantile(
        &body,
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        0.99,
    );
    let slack = (rss_warm * RSS_SLACK_PCT / 100).max(RSS_SLACK_MIN_KB);
    figure(
        test,
        &format!(
            "{services} services, {sent} endpoint changes in {:.0} s ({:.0}/s, target {rate}/s); \
             setup {:.0} s; {changes} changes counted in {syncs} syncs; \
             RSS {} MiB after the initial sync, {} MiB at {} s, {} MiB at the end (slack {} MiB); \
             /healthz {health_polls} polls, {} not 200; max pending {max_pending}; \
             drained {}; network programming p50 <= {} s, p99 <= {} s; partial sync p99 <= {} s",
            load_for.as_secs_f64(),
            sent as f64 / load_for.as_secs_f64(),
            setup.as_secs_f64(),
            rss_start / 1024,
            rss_warm / 1024,
            warm_up.as_secs(),
            rss_end / 1024,
            slack / 1024,
            unhealthy.len(),
            drained.map_or("no".to_string(), |d| format!("in {:.1} s", d.as_secs_f64())),
            p50.map_or("-".into(), |v| v.to_string()),
            p99.map_or("-".into(), |v| v.to_string()),
            partial_p99.map_or("-".into(), |v| v.to_string()),
        ),
    );
    assert!(
        sent as f64 >= 0.8 * rate as f64 * duration.as_secs_f64(),
        "the generator fell behind ({sent} changes): the load was not applied"
    );
    assert!(
        unhealthy.is_empty(),
        "/healthz not OK under load: {unhealthy:?}"
    );
    assert!(
        drained.is_some(),
        "backlog: {svc}'s last change ({needle}) not in the kernel, or changes still pending, \
         {DRAIN:?} after the load stopped"
    );
    assert!(
        rss_warm > 0 && rss_end <= rss_warm + slack,
        "RSS grew from {rss_warm} kB at {warm_up:?} to {rss_end} kB (slack {slack} kB)"
    );
    assert!(k.is_running());
}

/// A directory with failing stand-ins for every `*-restore` program kproxy
/// may run, active while `flag` exists; otherwise they run the real one.
fn restore_shims(dir: &Path, flag: &Path) {
    for family in ["iptables", "ip6tables"] {
        for variant in ["", "-legacy", "-nft"] {
            let name = format!("{family}{variant}-restore");
            let real = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(|d| Path::new(d).join(&name))
                .find(|p| p.exists());
            let Some(real) = real else { continue };
            let script = format!(
                "#!/bin/sh\nif [ -e '{}' ]; then echo '{name}: refused by the test shim' >&2; exit 1; fi\nexec '{}' \"$@\"\n",
                flag.display(),
                real.display()
            );
            let path = dir.join(&name);
            std::fs::write(&path, script).expect("write shim");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .expect("chmod shim");
        }
    }
}

#[test]
fn reliability_load_healthz_follows_stalled_syncs() {
    let test = "reliability_load_healthz_follows_stalled_syncs";
    let Some(c) = Cluster::new(test, 1, 0) else {
        return;
    };
    let period = Duration::from_secs(2);
    let timeout = 2 * period;
    let services = 200;
    for i in 0..services {
        let name = format!("s{i}");
        c.apply_service(&cluster_ip_service(&name, &cluster_ip(i), 80).build());
        c.apply_slice(&slice_for(&name, "IPv4", &[(endpoint_ip(i), REMOTE_NODE)]));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let shims = dir.path().join("bin");
    std::fs::create_dir(&shims).expect("shim dir");
    let flag = dir.path().join("refuse");
    restore_shims(&shims, &flag);
    let path = format!(
        "{}:{}",
        shims.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    let bin = wrapper(dir.path(), &[("PATH", &path)], "");
    let args = [
        format!("--kubeconfig={}", c.kubeconfig.path().display()),
        format!("--hostname-override={NODE}"),
        "--cluster-cidr=10.244.0.0/16".to_string(),
        "--iptables-min-sync-period=0s".to_string(),
        format!("--iptables-sync-period={}s", period.as_secs()),
    ];
    let mut k = KproxyProcess::spawn(&bin, Some(c.node()), &args).expect("spawn kproxy");
    k.wait_healthy(WAIT).expect("healthy before the stall");

    // Changes keep coming (5/s) while every restore fails.
    let healthz = |k: &KproxyProcess| matches!(k.get_healthz("/healthz"), Ok((200, _)));
    let stop = AtomicBool::new(false);
    let (to_unhealthy, to_healthy, failures) = std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let i = n % services;
                c.apply_slice(&slice_for(
                    &format!("s{i}"),
                    "IPv4",
                    &[(endpoint_ip(services + n), REMOTE_NODE)],
                ));
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        std::thread::sleep(Duration::from_secs(1));
        assert!(healthz(&k), "healthy under light load before the stall");
        std::fs::write(&flag, b"").expect("flag");
        let to_unhealthy = poll(timeout + Duration::from_secs(10), || !healthz(&k));
        let failures = metric(
            &k,
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
        );
        // Stay stalled a little: it must stay unhealthy, not flap.
        std::thread::sleep(Duration::from_secs(1));
        let still_unhealthy = !healthz(&k);
        std::fs::remove_file(&flag).expect("unflag");
        let to_healthy = poll(timeout + Duration::from_secs(10), || healthz(&k));
        stop.store(true, Ordering::Relaxed);
        assert!(
            to_unhealthy.is_none() || still_unhealthy,
            "/healthz flapped back to 200 while every restore failed"
        );
        (to_unhealthy, to_healthy, failures)
    });
    let log = k.log();
    figure(
        test,
        &format!(
            "health timeout {} s (2 x --iptables-sync-period); unhealthy {} after restores started failing \
             ({failures} restore failures counted); healthy again {} after they work",
            timeout.as_secs(),
            to_unhealthy.map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64())),
            to_healthy.map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64())),
        ),
    );
    assert!(
        log.contains("refused by the test shim"),
        "the shim never ran: kproxy does not find iptables-restore through PATH?\n{log}"
    );
    let to_unhealthy = to_unhealthy.expect("/healthz stayed 200 while no sync succeeded");
    assert!(
        to_unhealthy <= timeout + Duration::from_secs(3),
        "/healthz turned unhealthy only after {to_unhealthy:?} (timeout {timeout:?})"
    );
    assert!(
        to_unhealthy >= timeout - Duration::from_millis(500),
        "/healthz turned unhealthy after {to_unhealthy:?}, before the health timeout {timeout:?}"
    );
    let to_healthy = to_healthy.expect("/healthz did not recover once restores worked");
    assert!(
        to_healthy <= period + Duration::from_secs(3),
        "recovery took {to_healthy:?}"
    );
    assert!(failures >= 1.0, "no restore failure counted");
    assert!(k.is_running());
}
