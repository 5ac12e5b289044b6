//! The running proxy: API client, watchers, the sync loop, HTTP servers and
//! signals. This is the binary's edge, so errors are `anyhow` here.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use kproxy_metrics::{
    node_eligible, DebugState, HealthState, Metrics, ServiceHealthServers, ServiceHealthTarget,
};
use kproxy_model::{Proxier, ProxyState, StateBuilder, SyncKind, SyncReport};
use kproxy_watch::{Pending, TriggerReason, WatchConfig, WatchHandle, WatchObserver};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::backend;
use crate::config::Settings;

/// Runs kproxy until SIGTERM or SIGINT. Rules are left in place on exit:
/// traffic keeps flowing while kproxy restarts.
pub fn run(settings: Settings) -> Result<()> {
    limit_malloc_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kproxy")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(settings))
}

async fn run_async(settings: Settings) -> Result<()> {
    for field in &settings.ignored_fields {
        warn!(field = %field, "accepted but not acted on by kproxy");
    }
    for warning in &settings.warnings {
        warn!("{warning}");
    }
    let (sync_period, min_sync_period) = settings.sync_periods();
    info!("min sync period: {min_sync_period}");

    // Everything that can fail on bad configuration fails before anything
    // is started, each with an error naming its cause; the backend, which
    // touches the kernel (sysctls), comes last.
    let client = kube_client(&settings).await?;
    let metrics_listener = bind(settings.metrics_bind_address, "--metrics-bind-address").await?;
    let healthz_listener = bind(settings.healthz_bind_address, "--healthz-bind-address").await?;
    let proxier = backend::build(&settings)?;
    if !settings.dry_run {
        crate::conntrack_setup::apply(&settings.conntrack);
    }
    let families = backend::families(&settings);
    let metrics = Metrics::new(env!("CARGO_PKG_VERSION"), proxier.mode());
    let health = HealthState::new(2 * sync_period, families);
    // Rejected objects become Events (rate-limited; see tools::events).
    let events = crate::tools::events::EventSink::spawn(client.clone(), &settings.node_name);

    let builder = Arc::new(Mutex::new(StateBuilder::new(settings.node_name.clone())));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut servers = Vec::new();
    if let Some(listener) = metrics_listener {
        info!(address = %local_addr(&listener), "serving /metrics and /debug/state");
        let debug_state = debug_state(builder.clone());
        servers.push(tokio::spawn(kproxy_metrics::serve_metrics(
            listener,
            metrics.clone(),
            debug_state,
            shutdown_signal(shutdown_rx.clone()),
        )));
    }
    if let Some(listener) = healthz_listener {
        info!(address = %local_addr(&listener), "serving /healthz and /livez");
        servers.push(tokio::spawn(kproxy_metrics::serve_healthz(
            listener,
            health.clone(),
            metrics.clone(),
            shutdown_signal(shutdown_rx.clone()),
        )));
    }

    let observer = Arc::new(Observer {
        metrics: metrics.clone(),
        health: health.clone(),
    });
    let watch = WatchHandle::spawn(
        client,
        WatchConfig {
            node_name: settings.node_name.clone(),
            min_sync_interval: min_sync_period,
            sync_period,
        },
        observer,
    );
    info!(
        node = %settings.node_name,
        mode = proxier.mode(),
        "waiting for Services and EndpointSlices to be listed before the first sync"
    );

    let service_health = ServiceHealthServers::new(
        vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
        health.clone(),
        tokio::runtime::Handle::current(),
    );
    let sync_loop = SyncLoop {
        watch,
        builder,
        proxier,
        metrics,
        health,
        service_health,
        retry_delay: None,
        last_full: None,
        sync_period,
        events,
    };
    let mut sync_task = tokio::spawn(sync_loop.run(shutdown_rx.clone()));

    let signal = wait_for_signal().await;
    info!(signal, "shutting down; rules stay in place");
    // The sync loop finishes an apply in progress before it looks at the
    // shutdown flag, so the kernel never sees half a transaction.
    let _ = shutdown_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(20), &mut sync_task).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => error!(error = %err, "sync loop ended abnormally"),
        Err(_) => {
            warn!("the in-flight sync did not finish within 20s; exiting anyway");
            sync_task.abort();
        }
    }
    for server in servers {
        match tokio::time::timeout(Duration::from_secs(5), server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => warn!(error = %err, "HTTP server failed"),
            Ok(Err(err)) => warn!(error = %err, "HTTP server task failed"),
            Err(_) => warn!("HTTP server did not stop within 5s"),
        }
    }
    Ok(())
}

/// The one place that turns pending changes into kernel state.
struct SyncLoop {
    watch: WatchHandle,
    builder: Arc<Mutex<StateBuilder>>,
    proxier: Box<dyn Proxier>,
    metrics: Metrics,
    health: HealthState,
    service_health: ServiceHealthServers,
    /// Set after a failed sync: retry (as a full sync) after this long even
    /// if nothing changes, doubling up to the sync period.
    retry_delay: Option<Duration>,
    sync_period: Duration,
    /// Posts Events about rejected objects.
    events: crate::tools::events::EventSink,
    /// When the last full sync ended and how long it took.
    last_full: Option<(Instant, Duration)>,
}

/// Full syncs at least this long are repeated less often than every sync
/// period (see [`periodic_full_due`]). Well above what slow machines take
/// at ordinary sizes (the IPVS test VM: 5–10 s), where a full resync every
/// period is what repairs foreign changes quickly.
const LONG_FULL_SYNC: Duration = Duration::from_secs(60);

/// Whether a periodic sync rewrites everything. Every sync period, as
/// kproxy always did, unless a full sync takes [`LONG_FULL_SYNC`] or more
/// (50k services on iptables-nft 1.8.9: ≈ 3 minutes): then at most a tenth
/// of the time goes to them, and the periodic syncs in between are partial
/// (pending changes, the canary check; a flushed table still gets a full
/// sync at once). Upstream rewrites everything only hourly.
fn periodic_full_due(
    since_last_full: Duration,
    last_full_took: Duration,
    period: Duration,
) -> bool {
    let interval = if last_full_took >= LONG_FULL_SYNC {
        period.max(last_full_took.saturating_mul(10))
    } else {
        period
    };
    since_last_full >= interval
}

impl SyncLoop {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut trigger = self.watch.trigger();
        loop {
            let reason = tokio::select! {
                reason = trigger.next() => reason,
                _ = sleep_opt(self.retry_delay) => TriggerReason::Changes,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            let started = Instant::now();
            let pending = self.watch.take_pending();
            let report = tokio::task::block_in_place(|| {
                let report = self.sync_once(reason, &pending);
                if report.kind == SyncKind::Full {
                    release_free_memory();
                }
                report
            });
            self.after_sync(&report, &pending);
            // The adaptive min sync interval follows the sync's cost.
            trigger.sync_done(started.elapsed());
            if *shutdown.borrow() {
                return;
            }
        }
    }

    fn sync_once(&mut self, reason: TriggerReason, pending: &Pending) -> SyncReport {
        let builder_lock = self.builder.clone();
        let mut builder = builder_lock.lock().unwrap_or_else(PoisonError::into_inner);
        let mut applied = self.watch.apply_to(&mut builder, pending);
        let periodic_full = reason == TriggerReason::Periodic
            && self
                .last_full
                .is_none_or(|(end, took)| periodic_full_due(end.elapsed(), took, self.sync_period));
        if periodic_full || self.retry_delay.is_some() {
            applied.changes.force_full = true;
        }
        for rejection in &applied.new_rejections {
            // Log line with `service="ns/name"`, and an Event on the object.
            let service = crate::tools::events::rejection_service(rejection, &pending.services);
            crate::tools::events::log_rejection(rejection, service.as_deref());
            self.events.rejected(rejection);
            self.metrics.rejected(&rejection.kind.to_string());
        }
        let state = builder.state();
        self.update_node_eligibility(state);
        if applied.changes.force_full {
            // Before the full plan too: the first one follows the initial
            // lists, whose pages and objects are garbage by now.
            release_free_memory();
        }
        let report = self.proxier.sync(state, &applied.changes);
        if report.kind == SyncKind::Full && report.succeeded() {
            self.last_full = Some((Instant::now(), report.duration));
        }
        if report.succeeded() {
            self.update_service_health(state);
        }
        debug!(
            reason = ?reason,
            kind = report.kind.as_str(),
            duration_ms = report.duration.as_secs_f64() * 1e3,
            written = report.objects_written,
            changed_ports = applied.changes.ports.len(),
            "sync done"
        );
        report
    }

    fn after_sync(&mut self, report: &SyncReport, pending: &Pending) {
        self.metrics.observe_sync(report);
        self.metrics.set_pending(0, 0);
        match &report.failure {
            None => {
                self.health.updated();
                self.retry_delay = None;
                let now = SystemTime::now();
                for times in pending.trigger_times.values() {
                    for t in times {
                        if let Ok(latency) = now.duration_since(*t) {
                            self.metrics.observe_network_programming(latency);
                        }
                    }
                }
            }
            Some(failure) => {
                // Until a sync succeeds the kernel is behind: health must
                // see a pending update even if no new change arrives.
                self.health.queued_update();
                let delay = self
                    .retry_delay
                    .map_or(Duration::from_secs(1), |d| (d * 2).min(self.sync_period));
                self.retry_delay = Some(delay);
                error!(
                    cause = %failure.cause,
                    error = %failure.message,
                    retry_in_ms = delay.as_millis() as u64,
                    "sync failed; the previous rules stay in place, retrying as a full sync"
                );
            }
        }
    }

    fn update_node_eligibility(&self, state: &ProxyState) {
        let taints = self
            .watch
            .node()
            .and_then(|n| n.spec.clone())
            .and_then(|s| s.taints);
        let keys = taints.iter().flatten().map(|t| t.key.as_str());
        self.health
            .set_node_eligible(node_eligible(state.node.deleting, keys));
    }

    fn update_service_health(&mut self, state: &ProxyState) {
        let mut desired = BTreeMap::new();
        for sp in state.ipv4.values().chain(state.ipv6.values()) {
            if let Some(port) = sp.health_check_node_port {
                let target = desired.entry(port).or_insert_with(|| ServiceHealthTarget {
                    namespace: sp.name.service.namespace.clone(),
                    name: sp.name.service.name.clone(),
                    local_endpoints: 0,
                });
                target.local_endpoints = target.local_endpoints.max(sp.endpoints.local.len());
            }
        }
        for err in self.service_health.sync(&desired) {
            warn!(
                port = err.port,
                service = %format!("{}/{}", err.target.namespace, err.target.name),
                error = %err.error,
                "cannot serve healthCheckNodePort; retrying on the next sync"
            );
        }
    }
}

/// glibc gives each thread that allocates its own arena, up to 8 per core.
/// Watch events, syncs and `block_in_place` land on changing threads, and
/// memory freed in one arena is not reused by another: under churn RSS at
/// 10k services crept from 78 to 104 MiB, with two arenas it stays at 85
/// (benches/README.md). Two, not one, so the watchers and the sync do not
/// contend on a single lock. An operator's `MALLOC_ARENA_MAX` wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt(3) takes two plain integers and only changes
        // glibc's allocator parameters under its own lock (MT-Safe); it
        // runs before the runtime starts any thread, and no Rust memory is
        // borrowed or invalidated by it.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Returns the heap pages freed by a full sync to the kernel. A full sync
/// at 10k services allocates and frees tens of MB (the first one also the
/// list pages); glibc keeps most of it in its arenas, so without this the
/// resident size ratchets up with each periodic full sync
/// (benches/README.md). Before and after full syncs (every 30 s by
/// default): after partial ones under churn it made no difference (RSS
/// 103 vs 104 MiB).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim(3) takes a plain integer, touches only glibc's
    // allocator state under its own arena locks, and is documented as safe
    // to call at any time from any thread (MT-Safe); no Rust memory is
    // borrowed or invalidated by it.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn sleep_opt(delay: Option<Duration>) {
    match delay {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Feeds watch activity into metrics and health.
struct Observer {
    metrics: Metrics,
    health: HealthState,
}

impl WatchObserver for Observer {
    fn service_changed(&self) {
        self.metrics.service_changed();
    }
    fn endpoint_slice_changed(&self) {
        self.metrics.endpoint_slice_changed();
    }
    fn change_queued(&self, _at: SystemTime) {
        self.metrics.sync_queued();
        self.health.queued_update();
    }
    fn relisted(&self, kind: &str) {
        info!(
            kind,
            "relisted after a watch interruption; next sync is full"
        );
    }
    fn watch_error(&self, kind: &str, err: &str) {
        warn!(
            kind,
            error = err,
            "watch failed; retrying with backoff, rules stay in place"
        );
    }
}

fn debug_state(builder: Arc<Mutex<StateBuilder>>) -> DebugState {
    Arc::new(move || {
        let builder = builder.lock().unwrap_or_else(PoisonError::into_inner);
        serde_json::to_string_pretty(builder.state())
            .unwrap_or_else(|err| format!("{{\"error\": \"cannot serialize state: {err}\"}}"))
    })
}

async fn bind(addr: Option<std::net::SocketAddr>, flag: &str) -> Result<Option<TcpListener>> {
    match addr {
        None => Ok(None),
        Some(addr) => TcpListener::bind(addr)
            .await
            .map(Some)
            .with_context(|| format!("{flag} {addr}: cannot listen")),
    }
}

fn local_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string())
}

async fn shutdown_signal(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        _ => {
            // Without signal handlers the default action (exit) applies,
            // which also leaves the rules in place.
            warn!("cannot install signal handlers");
            std::future::pending::<()>().await;
            return "none";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// The API client: `--kubeconfig` (or the config file's
/// `clientConnection.kubeconfig`), else in-cluster; `--master` overrides the
/// server address. Never the `kubernetes` Service VIP we program ourselves
/// is only used if the kubeconfig says so.
pub(crate) async fn kube_client(settings: &Settings) -> Result<kube::Client> {
    let mut config = match &settings.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}: cannot read", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("--kubeconfig {}: invalid", path.display()))?
        }
        None => kube::Config::incluster().context(
            "no --kubeconfig given and not running in a pod (in-cluster config unavailable)",
        )?,
    };
    if let Some(master) = &settings.master {
        config.cluster_url = master
            .parse()
            .with_context(|| format!("--master {master:?}: not a URL"))?;
    }
    kube::Client::try_from(config).context("building the Kubernetes API client")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_full_syncs_are_repeated_at_most_a_tenth_of_the_time() {
        let s = Duration::from_secs;
        // Short full syncs: every period, as always.
        assert!(periodic_full_due(s(30), s(4), s(30)));
        assert!(!periodic_full_due(s(29), s(4), s(30)));
        // A 3-minute full sync: the next one 30 minutes later.
        assert!(!periodic_full_due(s(30), s(180), s(30)));
        assert!(!periodic_full_due(s(1799), s(180), s(30)));
        assert!(periodic_full_due(s(1800), s(180), s(30)));
        // Slow but ordinary syncs keep the period; a long period still wins.
        assert!(periodic_full_due(s(30), s(10), s(30)));
        assert!(!periodic_full_due(s(100), s(60), s(3600)));
    }
}
