//! What changed since the last sync.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Instant, SystemTime};

use kproxy_model::ServiceKey;

/// The annotation the EndpointSlice controller sets to the time of the
/// change that caused the slice's last update.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Changes accumulated since the last [`crate::WatchHandle::take_pending`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// Services whose Service object or EndpointSlices changed (added,
    /// updated or deleted, including while the API server was away).
    pub services: BTreeSet<ServiceKey>,
    /// When the oldest of these changes arrived (monotonic), for the sync
    /// trigger and "queued for too long" health checks.
    pub oldest_queued: Option<Instant>,
    /// The same moment as wall-clock time, for metrics.
    pub oldest_queued_at: Option<SystemTime>,
    /// The own Node changed in a way that may matter (labels, spec,
    /// addresses, deletion, existence).
    pub node_changed: bool,
    /// A complete list (the first one or a relist) was swapped in: the
    /// backend must do a full sync.
    pub relisted: bool,
    /// Per changed service, when the change was triggered: the
    /// `endpoints.kubernetes.io/last-change-trigger-time` of changed slices,
    /// and the arrival time of Service changes. For
    /// `network_programming_duration_seconds` once the sync is applied.
    /// Times from before the watch started are left out (on startup every
    /// slice carries an old annotation; upstream skips those too).
    pub trigger_times: BTreeMap<ServiceKey, Vec<SystemTime>>,
}

impl Pending {
    /// Something is waiting to be synced.
    pub fn has_changes(&self) -> bool {
        !self.services.is_empty() || self.node_changed || self.relisted
    }

    /// Records the arrival of a change (keeps the oldest time).
    pub(crate) fn queued(&mut self, at: Instant, at_system: SystemTime) {
        if self.oldest_queued.is_none() {
            self.oldest_queued = Some(at);
            self.oldest_queued_at = Some(at_system);
        }
    }

    pub(crate) fn add_trigger_time(&mut self, key: &ServiceKey, t: SystemTime) {
        self.trigger_times.entry(key.clone()).or_default().push(t);
    }
}

/// Parses the RFC 3339 value of [`LAST_CHANGE_TRIGGER_TIME`].
pub fn parse_trigger_time(value: &str) -> Option<SystemTime> {
    value.parse::<jiff::Timestamp>().ok().map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn parses_rfc3339_trigger_times() {
        let t = parse_trigger_time("2024-01-02T03:04:05Z");
        assert_eq!(t, Some(UNIX_EPOCH + Duration::from_secs(1_704_164_645)));
        let t = parse_trigger_time("2024-01-02T03:04:05.5+01:00");
        assert_eq!(
            t,
            Some(UNIX_EPOCH + Duration::from_millis(1_704_164_645_500 - 3_600_000))
        );
        assert_eq!(parse_trigger_time("yesterday"), None);
        assert_eq!(parse_trigger_time(""), None);
    }

    #[test]
    fn queued_keeps_the_oldest_time() {
        let mut p = Pending::default();
        assert!(!p.has_changes());
        let t0 = Instant::now();
        let s0 = SystemTime::now();
        p.queued(t0, s0);
        p.queued(t0 + Duration::from_secs(5), s0 + Duration::from_secs(5));
        assert_eq!(p.oldest_queued, Some(t0));
        assert_eq!(p.oldest_queued_at, Some(s0));
        p.relisted = true;
        assert!(p.has_changes());
    }
}
