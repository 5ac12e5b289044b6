//! The metric registry: upstream kube-proxy's names, help texts, types and
//! buckets (from `pkg/proxy/metrics/metrics.go`), plus kproxy's own.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kproxy_model::{SyncKind, SyncReport};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, linear_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};
use std::sync::atomic::AtomicU64;

use crate::exposition;
use crate::process::ProcessCollector;

/// Content type of [`Metrics::encode`]'s output.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of [`Metrics::encode_openmetrics`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `SyncFailure::cause` the iptables backend uses when `iptables-restore`
/// refuses a ruleset; it feeds upstream's restore-failure counters.
pub const CAUSE_IPTABLES_RESTORE: &str = "iptables-restore";

type Label = [(&'static str, String); 1];
type F64Gauge = Gauge<f64, AtomicU64>;

fn label(key: &'static str, value: impl Into<String>) -> Label {
    [(key, value.into())]
}

/// Upstream's ExponentialBuckets(0.001, 2, 15): 1 ms … 16.384 s.
fn sync_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// Upstream's network programming buckets. Upstream's `MergeBuckets` starts
/// from a zero-length-one slice, so the first boundary is 0; kept for parity.
fn network_programming_buckets() -> Vec<f64> {
    std::iter::once(0.0)
        .chain(linear_buckets(0.25, 0.25, 2))
        .chain(linear_buckets(1.0, 1.0, 59))
        .chain(linear_buckets(60.0, 5.0, 12))
        .chain(linear_buckets(120.0, 30.0, 7))
        .collect()
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Metrics registered with their help text verbatim. `Registry::register`
/// appends a period to every help text, and upstream's have none.
#[derive(Debug)]
struct Verbatim {
    prefix: &'static str,
    families: Vec<(String, String, Box<dyn Metric>)>,
}

impl Verbatim {
    fn new(prefix: &'static str) -> Verbatim {
        Verbatim {
            prefix,
            families: Vec::new(),
        }
    }

    fn register(&mut self, name: &str, help: &str, metric: impl Metric) {
        self.families.push((
            format!("{}_{name}", self.prefix),
            help.to_string(),
            Box::new(metric),
        ));
    }
}

impl Collector for Verbatim {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, metric) in &self.families {
            let metric_encoder =
                encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            metric.encode(metric_encoder)?;
        }
        Ok(())
    }
}

struct Inner {
    registry: Registry,

    sync_duration: Histogram,
    sync_full_duration: Histogram,
    sync_partial_duration: Histogram,
    network_programming: Histogram,
    last_timestamp: F64Gauge,
    last_queued_timestamp: F64Gauge,
    endpoint_changes: Counter,
    service_changes: Counter,
    endpoint_changes_pending: Gauge,
    service_changes_pending: Gauge,
    iptables_total: Family<Label, Gauge>,
    restore_failures: Counter,
    partial_restore_failures: Counter,
    no_local_endpoints: Family<Label, Gauge>,
    healthz_total: Family<Label, Counter>,
    livez_total: Family<Label, Counter>,

    rejected: Family<Label, Counter>,
    sync_failures: Family<Label, Counter>,
    objects_written: Gauge,
    lock_wait: Histogram,
    conntrack_deleted: Counter,

    mode: String,
}

/// kproxy's metrics. Cheap to clone; every clone updates the same registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("mode", &self.inner.mode)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Builds the registry. `version` and `mode` ("iptables", "ipvs", ...)
    /// label `kproxy_build_info`.
    pub fn new(version: &str, mode: &str) -> Metrics {
        let mut root = Registry::default();

        let sync_duration = Histogram::new(sync_buckets());
        let sync_full_duration = Histogram::new(sync_buckets());
        let sync_partial_duration = Histogram::new(sync_buckets());
        let network_programming = Histogram::new(network_programming_buckets());
        let last_timestamp = F64Gauge::default();
        let last_queued_timestamp = F64Gauge::default();
        let endpoint_changes = Counter::default();
        let service_changes = Counter::default();
        let endpoint_changes_pending = Gauge::default();
        let service_changes_pending = Gauge::default();
        let iptables_total = Family::<Label, Gauge>::default();
        let restore_failures = Counter::default();
        let partial_restore_failures = Counter::default();
        let no_local_endpoints = Family::<Label, Gauge>::default();
        let healthz_total = Family::<Label, Counter>::default();
        let livez_total = Family::<Label, Counter>::default();

        // Counters are registered without `_total`: prometheus-client appends
        // it, so the exposed sample names match upstream exactly.
        {
            let mut kube = Verbatim::new("kubeproxy");
            let r = &mut kube;
            r.register(
                "sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                sync_duration.clone(),
            );
            r.register(
                "sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs",
                sync_full_duration.clone(),
            );
            r.register(
                "sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs",
                sync_partial_duration.clone(),
            );
            r.register(
                "network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                network_programming.clone(),
            );
            r.register(
                "sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
                last_timestamp.clone(),
            );
            r.register(
                "sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued",
                last_queued_timestamp.clone(),
            );
            r.register(
                "sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes",
                endpoint_changes_pending.clone(),
            );
            r.register(
                "sync_proxy_rules_endpoint_changes",
                "Cumulative proxy rules Endpoint changes",
                endpoint_changes.clone(),
            );
            r.register(
                "sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes",
                service_changes_pending.clone(),
            );
            r.register(
                "sync_proxy_rules_service_changes",
                "Cumulative proxy rules Service changes",
                service_changes.clone(),
            );
            r.register(
                "sync_proxy_rules_iptables_restore_failures",
                "Cumulative proxy iptables restore failures",
                restore_failures.clone(),
            );
            r.register(
                "sync_proxy_rules_iptables_partial_restore_failures",
                "Cumulative proxy iptables partial restore failures",
                partial_restore_failures.clone(),
            );
            // Upstream declares these two as gauges despite the `_total`
            // suffix; gauges keep their name as registered.
            r.register(
                "sync_proxy_rules_iptables_total",
                "Total number of iptables rules owned by kube-proxy",
                iptables_total.clone(),
            );
            r.register(
                "sync_proxy_rules_no_local_endpoints_total",
                "Number of services with a Local traffic policy and no endpoints",
                no_local_endpoints.clone(),
            );
            r.register(
                "proxy_healthz",
                "Cumulative proxy healthz HTTP status",
                healthz_total.clone(),
            );
            r.register(
                "proxy_livez",
                "Cumulative proxy livez HTTP status",
                livez_total.clone(),
            );
            root.register_collector(Box::new(kube));
        }

        let rejected = Family::<Label, Counter>::default();
        let sync_failures = Family::<Label, Counter>::default();
        let objects_written = Gauge::default();
        let lock_wait = Histogram::new(sync_buckets());
        let conntrack_deleted = Counter::default();
        let build_info = Family::<Vec<(&'static str, String)>, Gauge>::default();
        build_info
            .get_or_create(&vec![
                ("version", version.to_string()),
                ("mode", mode.to_string()),
            ])
            .set(1);
        {
            let mut own = Verbatim::new("kproxy");
            let r = &mut own;
            r.register(
                "rejected_objects",
                "API objects kproxy refused to program, by kind",
                rejected.clone(),
            );
            r.register(
                "sync_failures",
                "Syncs that left the kernel short of the desired state, by cause",
                sync_failures.clone(),
            );
            r.register(
                "sync_objects_written",
                "Rules (iptables) or kernel objects (IPVS) written by the last sync",
                objects_written.clone(),
            );
            r.register(
                "xtables_lock_wait_seconds",
                "Time a sync waited for the xtables lock, in seconds",
                lock_wait.clone(),
            );
            r.register(
                "conntrack_entries_deleted",
                "Conntrack entries deleted for stale endpoints",
                conntrack_deleted.clone(),
            );
            r.register(
                "build_info",
                "A metric with a constant '1' value labeled by kproxy version and proxy mode",
                build_info,
            );
            root.register_collector(Box::new(own));
        }

        root.register_collector(Box::new(ProcessCollector));

        Metrics {
            inner: Arc::new(Inner {
                registry: root,
                sync_duration,
                sync_full_duration,
                sync_partial_duration,
                network_programming,
                last_timestamp,
                last_queued_timestamp,
                endpoint_changes,
                service_changes,
                endpoint_changes_pending,
                service_changes_pending,
                iptables_total,
                restore_failures,
                partial_restore_failures,
                no_local_endpoints,
                healthz_total,
                livez_total,
                rejected,
                sync_failures,
                objects_written,
                lock_wait,
                conntrack_deleted,
                mode: mode.to_string(),
            }),
        }
    }

    /// The proxy mode this registry was built for (served on `/proxyMode`).
    pub fn mode(&self) -> &str {
        &self.inner.mode
    }

    /// Records one sync: its duration (always, as upstream does, failed or
    /// not), and on success the last-sync timestamp and rule gauges; on
    /// failure the failure counters.
    pub fn observe_sync(&self, report: &SyncReport) {
        self.observe_sync_at(report, SystemTime::now());
    }

    fn observe_sync_at(&self, report: &SyncReport, now: SystemTime) {
        let i = &self.inner;
        let secs = report.duration.as_secs_f64();
        i.sync_duration.observe(secs);
        match report.kind {
            SyncKind::Full => i.sync_full_duration.observe(secs),
            SyncKind::Partial => i.sync_partial_duration.observe(secs),
        }
        if let Some(wait) = report.lock_wait {
            i.lock_wait.observe(wait.as_secs_f64());
        }
        i.objects_written
            .set(i64::try_from(report.objects_written).unwrap_or(i64::MAX));
        // Computed from the desired state, so meaningful even if the write failed.
        for (policy, n) in &report.no_local_endpoints {
            i.no_local_endpoints
                .get_or_create(&label("traffic_policy", policy.as_str()))
                .set(to_i64(*n));
        }
        match &report.failure {
            None => {
                i.last_timestamp.set(unix_seconds(now));
                for (table, n) in &report.rules_per_table {
                    i.iptables_total
                        .get_or_create(&label("table", table.as_str()))
                        .set(to_i64(*n));
                }
            }
            Some(failure) => {
                i.sync_failures
                    .get_or_create(&label("cause", failure.cause.as_str()))
                    .inc();
                // As upstream: every refused restore counts, and every
                // failed partial sync counts (it forces a full one next).
                if failure.cause == CAUSE_IPTABLES_RESTORE {
                    i.restore_failures.inc();
                }
                if report.kind == SyncKind::Partial {
                    i.partial_restore_failures.inc();
                }
            }
        }
    }

    /// Records the latency from an EndpointSlice's
    /// `endpoints.kubernetes.io/last-change-trigger-time` to the sync that
    /// programmed it.
    pub fn observe_network_programming(&self, latency: Duration) {
        self.inner
            .network_programming
            .observe(latency.as_secs_f64());
    }

    /// Sets `sync_proxy_rules_last_queued_timestamp_seconds` to now; call
    /// whenever a change makes a sync necessary.
    pub fn sync_queued(&self) {
        self.inner
            .last_queued_timestamp
            .set(unix_seconds(SystemTime::now()));
    }

    /// Counts one Service change seen from the API server.
    pub fn service_changed(&self) {
        self.inner.service_changes.inc();
    }

    /// Counts one EndpointSlice change seen from the API server.
    pub fn endpoint_slice_changed(&self) {
        self.inner.endpoint_changes.inc();
    }

    /// Changes received but not yet synced.
    pub fn set_pending(&self, services: usize, endpoints: usize) {
        self.inner.service_changes_pending.set(to_i64(services));
        self.inner.endpoint_changes_pending.set(to_i64(endpoints));
    }

    /// Counts one API object kproxy refused (e.g. "Service", "EndpointSlice").
    pub fn rejected(&self, kind: &str) {
        self.inner
            .rejected
            .get_or_create(&label("kind", kind))
            .inc();
    }

    /// Counts deleted conntrack entries.
    pub fn conntrack_deleted(&self, n: u64) {
        self.inner.conntrack_deleted.inc_by(n);
    }

    /// Counts one `/healthz` answer on the healthz port.
    pub fn healthz_answered(&self, code: u16) {
        self.inner
            .healthz_total
            .get_or_create(&label("code", code.to_string()))
            .inc();
    }

    /// Counts one `/livez` answer on the healthz port.
    pub fn livez_answered(&self, code: u16) {
        self.inner
            .livez_total
            .get_or_create(&label("code", code.to_string()))
            .inc();
    }

    /// The Prometheus classic text exposition (0.0.4), the format the Go
    /// client serves by default; see [`TEXT_CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        exposition::openmetrics_to_classic(&self.encode_openmetrics())
    }

    /// The OpenMetrics 1.0 text exposition; see [`OPENMETRICS_CONTENT_TYPE`].
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; a collector error would only
        // truncate the output, which is logged rather than propagated.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kproxy_model::SyncFailure;

    fn report(kind: SyncKind, failure: Option<&str>) -> SyncReport {
        SyncReport {
            kind,
            duration: Duration::from_millis(30),
            objects_written: 42,
            rules_per_table: vec![("nat".into(), 100), ("filter".into(), 7)],
            no_local_endpoints: vec![("internal".into(), 1), ("external".into(), 2)],
            lock_wait: Some(Duration::from_millis(2)),
            failure: failure.map(|cause| SyncFailure {
                cause: cause.into(),
                message: "refused".into(),
            }),
        }
    }

    /// Every upstream family with its `# TYPE` line, as exposed in classic text.
    const UPSTREAM: &[(&str, &str)] = &[
        ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram"),
        (
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "histogram",
        ),
        (
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "histogram",
        ),
        (
            "kubeproxy_network_programming_duration_seconds",
            "histogram",
        ),
        ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge"),
        (
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "gauge",
        ),
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "counter",
        ),
        (
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "counter",
        ),
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "gauge",
        ),
        (
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "gauge",
        ),
        ("kubeproxy_sync_proxy_rules_iptables_total", "gauge"),
        (
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
            "counter",
        ),
        (
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
            "counter",
        ),
        (
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "gauge",
        ),
        ("kubeproxy_proxy_healthz_total", "counter"),
        ("kubeproxy_proxy_livez_total", "counter"),
        ("kproxy_rejected_objects_total", "counter"),
        ("kproxy_sync_failures_total", "counter"),
        ("kproxy_sync_objects_written", "gauge"),
        ("kproxy_xtables_lock_wait_seconds", "histogram"),
        ("kproxy_conntrack_entries_deleted_total", "counter"),
        ("kproxy_build_info", "gauge"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_cpu_seconds_total", "counter"),
        ("process_start_time_seconds", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
    ];

    fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == name_and_labels).then(|| value.parse().ok())?
        })
    }

    #[test]
    fn exposes_every_upstream_name_with_its_type() {
        let m = Metrics::new("0.1.0", "iptables");
        // Labelled families only show up once they have a child.
        m.observe_sync(&report(SyncKind::Full, None));
        m.healthz_answered(200);
        m.livez_answered(503);
        m.rejected("Service");
        m.observe_sync(&report(SyncKind::Full, Some("netlink")));
        let text = m.encode();
        for (name, ty) in UPSTREAM {
            let want = format!("# TYPE {name} {ty}\n");
            assert!(text.contains(&want), "missing {want:?} in\n{text}");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "missing HELP for {name}"
            );
        }
        assert!(!text.contains("# EOF"));
        assert!(!text.contains("# UNIT"));
        assert!(text.contains("kproxy_build_info{version=\"0.1.0\",mode=\"iptables\"} 1\n"));
    }

    #[test]
    fn help_texts_match_upstream() {
        let text = Metrics::new("v", "ipvs").encode();
        for line in [
            "# HELP kubeproxy_sync_proxy_rules_duration_seconds SyncProxyRules latency in seconds\n",
            "# HELP kubeproxy_network_programming_duration_seconds In Cluster Network Programming Latency in seconds\n",
            "# HELP kubeproxy_sync_proxy_rules_endpoint_changes_total Cumulative proxy rules Endpoint changes\n",
            "# HELP kubeproxy_sync_proxy_rules_iptables_restore_failures_total Cumulative proxy iptables restore failures\n",
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n",
        ] {
            assert!(text.contains(line), "missing {line:?}");
        }
    }

    #[test]
    fn sync_histograms_use_upstream_buckets() {
        let m = Metrics::new("v", "iptables");
        let text = m.encode();
        let want = [
            "0.001", "0.002", "0.004", "0.008", "0.016", "0.032", "0.064", "0.128", "0.256",
            "0.512", "1.024", "2.048", "4.096", "8.192", "16.384", "+Inf",
        ];
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        ] {
            let got: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("{name}_bucket{{le=\"")))
                .filter_map(|l| l.split('"').next())
                .collect();
            assert_eq!(got, want, "{name}");
            assert!(text.contains(&format!("{name}_sum 0")));
            assert!(text.contains(&format!("{name}_count 0")));
        }
    }

    #[test]
    fn network_programming_buckets_match_upstream() {
        let b = network_programming_buckets();
        assert_eq!(b.len(), 1 + 2 + 59 + 12 + 7);
        assert_eq!(&b[..4], &[0.0, 0.25, 0.5, 1.0]);
        assert_eq!(b[61], 59.0);
        assert_eq!(b[62], 60.0);
        assert_eq!(b[73], 115.0);
        assert_eq!(b[74], 120.0);
        assert_eq!(b[80], 300.0);
        let text = Metrics::new("v", "iptables").encode();
        // Integral boundaries are spelled as the Go client spells them.
        assert!(text.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"0\"} 0"));
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"} 0")
        );
        assert!(text.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"59\"} 0"));
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"300\"} 0")
        );
    }

    #[test]
    fn counters_and_gauges_move() {
        let m = Metrics::new("v", "iptables");
        m.service_changed();
        m.service_changed();
        m.endpoint_slice_changed();
        m.set_pending(3, 4);
        m.rejected("Service");
        m.rejected("Service");
        m.rejected("EndpointSlice");
        m.conntrack_deleted(5);
        m.conntrack_deleted(2);
        m.observe_network_programming(Duration::from_millis(1500));
        m.sync_queued();
        let t = m.encode();
        assert_eq!(
            sample(&t, "kubeproxy_sync_proxy_rules_service_changes_total"),
            Some(2.0)
        );
        assert_eq!(
            sample(&t, "kubeproxy_sync_proxy_rules_endpoint_changes_total"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "kubeproxy_sync_proxy_rules_service_changes_pending"),
            Some(3.0)
        );
        assert_eq!(
            sample(&t, "kubeproxy_sync_proxy_rules_endpoint_changes_pending"),
            Some(4.0)
        );
        assert_eq!(
            sample(&t, "kproxy_rejected_objects_total{kind=\"Service\"}"),
            Some(2.0)
        );
        assert_eq!(
            sample(&t, "kproxy_rejected_objects_total{kind=\"EndpointSlice\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "kproxy_conntrack_entries_deleted_total"),
            Some(7.0)
        );
        assert_eq!(
            sample(
                &t,
                "kubeproxy_network_programming_duration_seconds_bucket{le=\"1\"}"
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &t,
                "kubeproxy_network_programming_duration_seconds_bucket{le=\"2\"}"
            ),
            Some(1.0)
        );
        let queued = sample(
            &t,
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        );
        assert!(queued.is_some_and(|v| v > 1.6e9), "{queued:?}");
    }

    #[test]
    fn observe_sync_records_durations_rules_and_failures() {
        let m = Metrics::new("v", "iptables");
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        m.observe_sync_at(&report(SyncKind::Full, None), now);
        m.observe_sync_at(&report(SyncKind::Partial, None), now);
        m.observe_sync_at(
            &report(SyncKind::Partial, Some(CAUSE_IPTABLES_RESTORE)),
            now,
        );
        m.observe_sync_at(&report(SyncKind::Full, Some(CAUSE_IPTABLES_RESTORE)), now);
        m.observe_sync_at(&report(SyncKind::Full, Some("netlink")), now);
        let t = m.encode();
        assert_eq!(
            sample(&t, "kubeproxy_sync_proxy_rules_duration_seconds_count"),
            Some(5.0)
        );
        assert_eq!(
            sample(&t, "kubeproxy_sync_full_proxy_rules_duration_seconds_count"),
            Some(3.0)
        );
        assert_eq!(
            sample(
                &t,
                "kubeproxy_sync_partial_proxy_rules_duration_seconds_count"
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &t,
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.016\"}"
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &t,
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.032\"}"
            ),
            Some(5.0)
        );
        assert_eq!(
            sample(&t, "kubeproxy_sync_proxy_rules_last_timestamp_seconds"),
            Some(1.7e9)
        );
        assert_eq!(
            sample(
                &t,
                "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\"}"
            ),
            Some(100.0)
        );
        assert_eq!(
            sample(
                &t,
                "kubeproxy_sync_proxy_rules_iptables_total{table=\"filter\"}"
            ),
            Some(7.0)
        );
        assert_eq!(
            sample(
                &t,
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &t,
                "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &t,
                "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "kproxy_sync_failures_total{cause=\"iptables-restore\"}"),
            Some(2.0)
        );
        assert_eq!(
            sample(&t, "kproxy_sync_failures_total{cause=\"netlink\"}"),
            Some(1.0)
        );
        assert_eq!(sample(&t, "kproxy_sync_objects_written"), Some(42.0));
        assert_eq!(
            sample(&t, "kproxy_xtables_lock_wait_seconds_count"),
            Some(5.0)
        );
    }

    #[test]
    fn process_metrics_are_collected_at_scrape_time() {
        let t = Metrics::new("v", "iptables").encode();
        let rss = sample(&t, "process_resident_memory_bytes").unwrap_or(0.0);
        assert!(rss > 0.0, "rss {rss}");
        assert!(sample(&t, "process_virtual_memory_bytes").unwrap_or(0.0) >= rss);
        assert!(sample(&t, "process_open_fds").unwrap_or(0.0) >= 1.0);
        assert!(sample(&t, "process_max_fds").unwrap_or(0.0) >= 1.0);
        assert!(sample(&t, "process_cpu_seconds_total").is_some());
        assert!(sample(&t, "process_start_time_seconds").unwrap_or(0.0) > 1.6e9);
    }

    #[test]
    fn openmetrics_output_is_terminated() {
        let t = Metrics::new("v", "iptables").encode_openmetrics();
        assert!(t.ends_with("# EOF\n"));
        assert!(t.contains("# TYPE kubeproxy_sync_proxy_rules_service_changes counter\n"));
        assert!(t.contains("kubeproxy_sync_proxy_rules_service_changes_total 0\n"));
    }
}
