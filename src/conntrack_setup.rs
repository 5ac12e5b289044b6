//! kube-proxy's conntrack tuning (`--conntrack-*`, `conntrack.*`): the
//! table size and the TCP/UDP timeouts, written to /proc/sys at start.
//!
//! The table size (`nf_conntrack_max`) is global to the host and writable
//! only from the initial network namespace; kproxy runs there as a
//! DaemonSet with hostNetwork. Anywhere else (a test's namespace) it is left
//! alone rather than failing. Timeouts are per namespace.

use kproxy_iptables::netutil::{read_sysctl, write_sysctl};
use tracing::{info, warn};

use crate::config::ConntrackSettings;

/// Applies `settings`, logging what changed. Failures are warnings: kproxy
/// works with the kernel's values, as upstream does when it cannot set them.
pub fn apply(settings: &ConntrackSettings) {
    if settings.max_per_core > 0 && in_initial_netns() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        let max = (u64::from(settings.max_per_core) * cpus).max(u64::from(settings.min));
        set_at_least("net.netfilter.nf_conntrack_max", max);
    }
    let timeouts = [
        (
            "net.netfilter.nf_conntrack_tcp_timeout_established",
            settings.tcp_established_timeout,
        ),
        (
            "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
            settings.tcp_close_wait_timeout,
        ),
        (
            "net.netfilter.nf_conntrack_udp_timeout",
            settings.udp_timeout,
        ),
        (
            "net.netfilter.nf_conntrack_udp_timeout_stream",
            settings.udp_stream_timeout,
        ),
    ];
    for (key, timeout) in timeouts {
        if let Some(t) = timeout.filter(|t| !t.is_zero()) {
            set_exact(key, t.as_secs().max(1));
        }
    }
    if settings.tcp_be_liberal {
        set_exact("net.netfilter.nf_conntrack_tcp_be_liberal", 1);
    }
}

/// Raises a limit; never lowers one an operator set higher (upstream).
fn set_at_least(key: &str, value: u64) {
    match read_sysctl(key).map(|v| v.parse::<u64>()) {
        Ok(Ok(current)) if current >= value => {}
        _ => set_exact(key, value),
    }
}

fn set_exact(key: &str, value: u64) {
    let wanted = value.to_string();
    match read_sysctl(key) {
        Ok(current) if current == wanted => {}
        Ok(current) => match write_sysctl(key, &wanted) {
            Ok(()) => {
                info!(sysctl = key, from = %current, to = %wanted, "conntrack setting applied")
            }
            Err(err) => {
                warn!(sysctl = key, error = %err, "cannot apply conntrack setting; keeping the kernel's")
            }
        },
        // nf_conntrack not loaded yet: nothing to tune, and no error.
        Err(err) => warn!(sysctl = key, error = %err, "cannot read conntrack setting"),
    }
}

/// Whether this process is in the host's (PID 1's) network namespace.
fn in_initial_netns() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/net"),
        std::fs::read_link("/proc/1/ns/net"),
    ) {
        (Ok(own), Ok(init)) => own == init,
        _ => false,
    }
}
