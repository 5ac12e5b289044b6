//! Callbacks for the binary's metrics and health, so this crate does not
//! depend on the metrics crate.

use std::time::SystemTime;

/// Told about watch activity. Called from the watcher tasks, outside any
/// lock; implementations must be cheap and must not block.
pub trait WatchObserver: Send + Sync {
    /// A Service event changed the cache (upstream's
    /// `sync_proxy_rules_service_changes_total`).
    fn service_changed(&self) {}
    /// An EndpointSlice event changed the cache (upstream's
    /// `sync_proxy_rules_endpoint_changes_total`).
    fn endpoint_slice_changed(&self) {}
    /// A change was queued for the next sync, at `at`. Called for every
    /// queued change (upstream sets `sync_proxy_rules_last_queued_timestamp_seconds`
    /// each time; health keeps only the oldest unapplied one).
    fn change_queued(&self, at: SystemTime) {
        let _ = at;
    }
    /// A watcher completed a list after its first one (reconnect after an
    /// expired resourceVersion or an outage). `kind` is "Service",
    /// "EndpointSlice" or "Node".
    fn relisted(&self, kind: &str) {
        let _ = kind;
    }
    /// A watcher failed; it retries with backoff.
    fn watch_error(&self, kind: &str, err: &str) {
        let _ = (kind, err);
    }
}

/// Ignores everything; for tests and tools.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopObserver;

impl WatchObserver for NoopObserver {}
