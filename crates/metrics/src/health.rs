//! Proxy health, after upstream `pkg/proxy/healthcheck/proxy_health.go`.
//!
//! Upstream's rules: a queued change that stays unapplied for longer than
//! `healthTimeout` (2 × syncPeriod) makes the proxy unhealthy; a successful
//! sync clears it; `/healthz` additionally fails while the Node is being
//! deleted (deletionTimestamp or the autoscaler's ToBeDeleted taint) and
//! `/livez` ignores the Node. One deliberate difference: `/healthz` fails
//! until the first successful sync, because load balancers use it to decide
//! whether to send traffic here and before that sync no rules exist. `/livez`
//! treats startup as a queued change instead, so a slow initial list does not
//! get kproxy restarted, but one that never syncs does after the timeout.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use kproxy_model::IpFamily;
use serde::Serialize;

/// The taint the cluster autoscaler puts on a Node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether a Node may receive load-balancer traffic: not being deleted and
/// not tainted for deletion by the autoscaler (upstream's definition).
pub fn node_eligible<'a>(
    deletion_timestamp_set: bool,
    taint_keys: impl IntoIterator<Item = &'a str>,
) -> bool {
    !deletion_timestamp_set && !taint_keys.into_iter().any(|k| k == TO_BE_DELETED_TAINT)
}

/// Wall-clock source, injectable so health logic is tested without sleeping.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The real clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to; for tests.
#[derive(Debug)]
pub struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    pub fn new(start: SystemTime) -> ManualClock {
        ManualClock(Mutex::new(start))
    }

    pub fn advance(&self, by: Duration) {
        let mut t = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *t += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug)]
struct State {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
    node_eligible: bool,
}

struct Shared {
    clock: Arc<dyn Clock>,
    timeout: Duration,
    families: Vec<IpFamily>,
    state: Mutex<State>,
}

/// Shared health of the proxy. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct HealthState {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for HealthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthState")
            .field("timeout", &self.shared.timeout)
            .field("state", &*self.lock())
            .finish()
    }
}

/// Per-family entry of the `status` map, as upstream's `ProxierHealth`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxierHealth {
    pub last_updated: String,
    pub healthy: bool,
}

/// The JSON body of `/healthz` and `/livez`, field for field upstream's
/// `ProxyHealth` (Go `time.Time` marshals as RFC 3339 with nanoseconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyHealth {
    pub last_updated: String,
    pub current_time: String,
    /// Only on `/healthz`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_eligible: Option<bool>,
    /// The proxier's health, without the Node's eligibility.
    pub healthy: bool,
    /// Per IP family ("IPv4", "IPv6"); empty (omitted) before the first sync.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub status: BTreeMap<&'static str, ProxierHealth>,
}

/// An answer for one probe: the HTTP status and the JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthAnswer {
    /// 200 or 503.
    pub code: u16,
    pub body: ProxyHealth,
}

impl HealthAnswer {
    pub fn ok(&self) -> bool {
        self.code == 200
    }

    pub fn json(&self) -> String {
        // Plain strings, bools and a map of them: serialization cannot fail.
        serde_json::to_string(&self.body).unwrap_or_default()
    }
}

/// What Go's zero `time.Time` marshals to.
const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// Formats like Go's `time.Time` JSON (RFC 3339, trailing zeros trimmed), in UTC.
pub fn format_time(t: SystemTime) -> String {
    match jiff::Timestamp::try_from(t) {
        Ok(ts) => ts.to_string(),
        Err(_) => GO_ZERO_TIME.to_string(),
    }
}

impl HealthState {
    /// `health_timeout` is upstream's 2 × syncPeriod; `families` are the IP
    /// families the (single) proxier programs, reported in `status`.
    pub fn new(health_timeout: Duration, families: Vec<IpFamily>) -> HealthState {
        HealthState::with_clock(health_timeout, families, Arc::new(SystemClock))
    }

    pub fn with_clock(
        health_timeout: Duration,
        families: Vec<IpFamily>,
        clock: Arc<dyn Clock>,
    ) -> HealthState {
        let start = clock.now();
        HealthState {
            shared: Arc::new(Shared {
                clock,
                timeout: health_timeout,
                families,
                state: Mutex::new(State {
                    last_updated: None,
                    // Startup is work pending: see the module comment.
                    oldest_pending: Some(start),
                    // Eligible until a Node event says otherwise, as upstream.
                    node_eligible: true,
                }),
            }),
        }
    }

    pub fn health_timeout(&self) -> Duration {
        self.shared.timeout
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic (plain field writes).
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A change needing a sync was received. Only the oldest unapplied one
    /// counts, as upstream.
    pub fn queued_update(&self) {
        let now = self.shared.clock.now();
        let mut s = self.lock();
        s.oldest_pending.get_or_insert(now);
    }

    /// A sync succeeded: everything queued so far is applied.
    pub fn updated(&self) {
        let now = self.shared.clock.now();
        let mut s = self.lock();
        s.oldest_pending = None;
        s.last_updated = Some(now);
    }

    /// Records the Node's eligibility (see [`node_eligible`]).
    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    pub fn node_eligible(&self) -> bool {
        self.lock().node_eligible
    }

    /// The proxier's health, ignoring the Node: synced at least once and no
    /// change left unapplied past the timeout. Used for `serviceProxyHealthy`.
    pub fn is_healthy(&self) -> bool {
        let now = self.shared.clock.now();
        let s = self.lock();
        s.last_updated.is_some() && !self.stale(&s, now)
    }

    fn stale(&self, s: &State, now: SystemTime) -> bool {
        s.oldest_pending.is_some_and(|queued| {
            now.duration_since(queued).unwrap_or(Duration::ZERO) >= self.shared.timeout
        })
    }

    /// The `/healthz` answer.
    pub fn healthz(&self) -> HealthAnswer {
        self.answer(true)
    }

    /// The `/livez` answer.
    pub fn livez(&self) -> HealthAnswer {
        self.answer(false)
    }

    fn answer(&self, healthz: bool) -> HealthAnswer {
        let now = self.shared.clock.now();
        let s = self.lock();
        let stale = self.stale(&s, now);
        let proxier_healthy = if healthz {
            s.last_updated.is_some() && !stale
        } else {
            !stale
        };
        let ok = proxier_healthy && (!healthz || s.node_eligible);

        let status = match s.last_updated {
            Some(t) => self
                .shared
                .families
                .iter()
                .map(|f| {
                    (
                        f.api_name(),
                        ProxierHealth {
                            last_updated: format_time(t),
                            healthy: proxier_healthy,
                        },
                    )
                })
                .collect(),
            None => BTreeMap::new(),
        };
        // Upstream reports "now" as lastUpdated when healthy, for
        // compatibility with releases where it meant "last loop run".
        let last_updated = if ok {
            format_time(now)
        } else {
            s.last_updated
                .map(format_time)
                .unwrap_or_else(|| GO_ZERO_TIME.to_string())
        };
        HealthAnswer {
            code: if ok { 200 } else { 503 },
            body: ProxyHealth {
                last_updated,
                current_time: format_time(now),
                node_eligible: healthz.then_some(s.node_eligible),
                healthy: proxier_healthy,
                status,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const TIMEOUT: Duration = Duration::from_secs(60);

    fn setup() -> (Arc<ManualClock>, HealthState) {
        let clock = Arc::new(ManualClock::new(
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        ));
        let h = HealthState::with_clock(TIMEOUT, vec![IpFamily::V4, IpFamily::V6], clock.clone());
        (clock, h)
    }

    #[test]
    fn before_first_sync_healthz_fails_livez_waits_for_timeout() {
        let (clock, h) = setup();
        let hz = h.healthz();
        assert_eq!(hz.code, 503);
        assert!(!hz.body.healthy);
        assert_eq!(hz.body.last_updated, GO_ZERO_TIME);
        assert!(hz.body.status.is_empty());
        assert!(!h.is_healthy());
        assert_eq!(h.livez().code, 200);

        clock.advance(TIMEOUT - Duration::from_secs(1));
        assert_eq!(h.livez().code, 200);
        clock.advance(Duration::from_secs(1));
        assert_eq!(h.livez().code, 503);
        assert_eq!(h.healthz().code, 503);
    }

    #[test]
    fn healthy_after_sync() {
        let (clock, h) = setup();
        h.updated();
        clock.advance(Duration::from_secs(3600));
        // Nothing queued: healthy however long ago the last sync was.
        let hz = h.healthz();
        assert_eq!(hz.code, 200);
        assert!(hz.body.healthy);
        assert_eq!(hz.body.node_eligible, Some(true));
        assert_eq!(hz.body.last_updated, hz.body.current_time);
        assert_eq!(hz.body.current_time, "2023-11-14T23:13:20Z");
        assert_eq!(hz.body.status["IPv4"].last_updated, "2023-11-14T22:13:20Z");
        assert!(hz.body.status["IPv6"].healthy);
        assert_eq!(h.livez().code, 200);
        assert!(h.is_healthy());
    }

    #[test]
    fn queued_update_goes_stale_after_timeout() {
        let (clock, h) = setup();
        h.updated();
        clock.advance(Duration::from_secs(10));
        h.queued_update();
        clock.advance(TIMEOUT / 2);
        // A later queued update does not reset the oldest one.
        h.queued_update();
        assert_eq!(h.healthz().code, 200);
        clock.advance(TIMEOUT / 2 - Duration::from_millis(1));
        assert_eq!(h.healthz().code, 200);
        clock.advance(Duration::from_millis(1));

        let hz = h.healthz();
        assert_eq!(hz.code, 503);
        assert!(!hz.body.healthy);
        assert_eq!(hz.body.last_updated, "2023-11-14T22:13:20Z");
        assert!(!hz.body.status["IPv4"].healthy);
        assert_eq!(h.livez().code, 503);
        assert!(!h.is_healthy());

        h.updated();
        assert_eq!(h.healthz().code, 200);
        assert_eq!(h.livez().code, 200);
    }

    #[test]
    fn node_deletion_fails_healthz_not_livez() {
        let (_clock, h) = setup();
        h.updated();
        h.set_node_eligible(false);
        let hz = h.healthz();
        assert_eq!(hz.code, 503);
        assert_eq!(hz.body.node_eligible, Some(false));
        // The proxier itself is fine.
        assert!(hz.body.healthy);
        let lz = h.livez();
        assert_eq!(lz.code, 200);
        assert_eq!(lz.body.node_eligible, None);
        assert!(h.is_healthy());
        h.set_node_eligible(true);
        assert_eq!(h.healthz().code, 200);
    }

    #[test]
    fn node_eligibility_rules() {
        assert!(node_eligible(false, ["node.kubernetes.io/unschedulable"]));
        assert!(!node_eligible(true, []));
        assert!(!node_eligible(false, [TO_BE_DELETED_TAINT]));
    }

    #[test]
    fn json_has_upstream_field_names() {
        let (_clock, h) = setup();
        h.updated();
        let json = h.healthz().json();
        // Same field order as Go's encoding of upstream's struct.
        let order: Vec<usize> = [
            "\"lastUpdated\":",
            "\"currentTime\":",
            "\"nodeEligible\":",
            "\"healthy\":",
            "\"status\":",
        ]
        .iter()
        .map(|k| json.find(k).unwrap_or(usize::MAX))
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{json}");
        assert!(order.iter().all(|&i| i != usize::MAX), "{json}");
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(v.as_object().map(|o| o.len()), Some(5));
        assert_eq!(v["status"]["IPv4"]["healthy"], true);
        let lz: serde_json::Value = serde_json::from_str(&h.livez().json()).expect("json");
        assert!(lz.get("nodeEligible").is_none());
    }

    #[test]
    fn formats_like_go() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 120_000_000);
        assert_eq!(format_time(t), "2023-11-14T22:13:20.12Z");
    }
}
