//! When to sync: upstream's BoundedFrequencyRunner, as a pure state machine
//! ([`TriggerTiming::decide`]) and a thin async wrapper ([`SyncTrigger`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::shared::Shared;

/// Why [`SyncTrigger::next`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TriggerReason {
    /// The first sync after Services and EndpointSlices were listed.
    Initial,
    /// Changes are pending.
    Changes,
    /// Nothing changed for `max_interval`: a forced (full) resync.
    Periodic,
}

/// What the trigger should do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Fire(TriggerReason),
    /// Nothing to do before this moment (unless a change arrives).
    WaitUntil(Instant),
    /// Nothing to do until a change arrives.
    WaitForChange,
}

/// The timing rules of the sync trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TriggerTiming {
    min_interval: Duration,
    max_interval: Duration,
}

impl TriggerTiming {
    /// `min_interval` is the least time between the starts of two syncs
    /// (upstream `minSyncPeriod`), `max_interval` the most (`syncPeriod`).
    /// `max_interval` is raised to `min_interval` if smaller, and to 1 ms
    /// so a zero cannot turn the trigger into a busy loop.
    pub fn new(min_interval: Duration, max_interval: Duration) -> Self {
        TriggerTiming {
            min_interval,
            max_interval: max_interval.max(min_interval).max(Duration::from_millis(1)),
        }
    }

    pub fn min_interval(&self) -> Duration {
        self.min_interval
    }

    pub fn max_interval(&self) -> Duration {
        self.max_interval
    }

    /// Decides at `now`, given whether both lists are done (`synced`),
    /// whether changes are pending, and when the previous sync started.
    ///
    /// A change after a long idle time fires at once: the min interval is
    /// measured from the last sync, not from the change, so only bursts
    /// within the interval are delayed (and coalesced into one sync).
    pub fn decide(
        &self,
        now: Instant,
        synced: bool,
        pending: bool,
        last_sync: Option<Instant>,
    ) -> Decision {
        if !synced {
            return Decision::WaitForChange;
        }
        let Some(last) = last_sync else {
            return Decision::Fire(TriggerReason::Initial);
        };
        if pending {
            // A huge interval that overflows `Instant` means "not before
            // the periodic deadline", which overflows too: wait for changes.
            return match last.checked_add(self.min_interval) {
                Some(at) if now >= at => Decision::Fire(TriggerReason::Changes),
                Some(at) => Decision::WaitUntil(at),
                None => Decision::WaitForChange,
            };
        }
        match last.checked_add(self.max_interval) {
            Some(at) if now >= at => Decision::Fire(TriggerReason::Periodic),
            Some(at) => Decision::WaitUntil(at),
            None => Decision::WaitForChange,
        }
    }
}

/// Awaits the next moment to sync. Create it with
/// [`crate::WatchHandle::trigger`]; use one per sync loop (each trigger
/// tracks its own last sync). Once the handle is dropped the watchers stop
/// and the trigger only fires periodically.
pub struct SyncTrigger {
    timing: TriggerTiming,
    last_sync: Option<Instant>,
    shared: Arc<Shared>,
}

impl SyncTrigger {
    pub(crate) fn new(timing: TriggerTiming, shared: Arc<Shared>) -> Self {
        SyncTrigger {
            timing,
            last_sync: None,
            shared,
        }
    }

    pub fn timing(&self) -> TriggerTiming {
        self.timing
    }

    /// When the last sync was started (when `next` last returned).
    pub fn last_sync(&self) -> Option<Instant> {
        self.last_sync
    }

    /// Returns when the caller should sync; the sync is taken to start now.
    /// Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> TriggerReason {
        loop {
            // Registered before reading the state, so a change between the
            // read and the wait still wakes us.
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let (synced, pending) = self.shared.status();
            let now = Instant::now();
            match self.timing.decide(now, synced, pending, self.last_sync) {
                Decision::Fire(reason) => {
                    self.last_sync = Some(now);
                    return reason;
                }
                Decision::WaitUntil(at) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                Decision::WaitForChange => notified.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);

    fn timing() -> TriggerTiming {
        TriggerTiming::new(MIN, MAX)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn never_fires_before_synced() {
        let t0 = Instant::now();
        let t = timing();
        assert_eq!(t.decide(t0, false, true, None), Decision::WaitForChange);
        assert_eq!(t.decide(t0, false, false, None), Decision::WaitForChange);
        // Even long after a sync: without both lists nothing fires.
        assert_eq!(
            t.decide(t0 + secs(3600), false, true, Some(t0)),
            Decision::WaitForChange
        );
    }

    #[test]
    fn first_sync_fires_as_soon_as_synced() {
        let t0 = Instant::now();
        let t = timing();
        assert_eq!(
            t.decide(t0, true, false, None),
            Decision::Fire(TriggerReason::Initial)
        );
        assert_eq!(
            t.decide(t0, true, true, None),
            Decision::Fire(TriggerReason::Initial)
        );
    }

    #[test]
    fn change_after_idle_fires_immediately() {
        let t0 = Instant::now();
        let t = timing();
        // Last sync 10 s ago, a change arrives now: no waiting at all.
        assert_eq!(
            t.decide(t0 + secs(10), true, true, Some(t0)),
            Decision::Fire(TriggerReason::Changes)
        );
        // Exactly at the min interval fires too.
        assert_eq!(
            t.decide(t0 + MIN, true, true, Some(t0)),
            Decision::Fire(TriggerReason::Changes)
        );
    }

    #[test]
    fn burst_within_min_interval_waits_for_its_end() {
        let t0 = Instant::now();
        let t = timing();
        let now = t0 + Duration::from_millis(200);
        assert_eq!(
            t.decide(now, true, true, Some(t0)),
            Decision::WaitUntil(t0 + MIN)
        );
        // More changes in the burst do not move the deadline.
        let later = t0 + Duration::from_millis(900);
        assert_eq!(
            t.decide(later, true, true, Some(t0)),
            Decision::WaitUntil(t0 + MIN)
        );
    }

    #[test]
    fn idle_waits_for_the_periodic_deadline_then_fires_periodic() {
        let t0 = Instant::now();
        let t = timing();
        assert_eq!(
            t.decide(t0 + secs(5), true, false, Some(t0)),
            Decision::WaitUntil(t0 + MAX)
        );
        assert_eq!(
            t.decide(t0 + MAX, true, false, Some(t0)),
            Decision::Fire(TriggerReason::Periodic)
        );
        // Pending changes at the deadline are reported as changes.
        assert_eq!(
            t.decide(t0 + MAX, true, true, Some(t0)),
            Decision::Fire(TriggerReason::Changes)
        );
    }

    #[test]
    fn a_simulated_run_coalesces_bursts_and_keeps_the_period() {
        // Drive the machine like the async wrapper does, with fake time.
        let t = timing();
        let t0 = Instant::now();
        let mut last = None;
        let mut fired = Vec::new();
        // Changes at these offsets (ms); each is pending until a sync.
        let changes = [0u64, 100, 300, 5000, 5100, 5200];
        let mut pending = false;
        let mut next_change = 0;
        let mut now_ms = 0u64;
        while now_ms <= 40_000 {
            while next_change < changes.len() && changes[next_change] <= now_ms {
                pending = true;
                next_change += 1;
            }
            let now = t0 + Duration::from_millis(now_ms);
            if let Decision::Fire(reason) = t.decide(now, true, pending, last) {
                fired.push((now_ms, reason));
                last = Some(now);
                pending = false;
            }
            now_ms += 50;
        }
        assert_eq!(
            fired,
            vec![
                (0, TriggerReason::Initial),
                // 100 and 300 are one burst, synced once at the 1 s mark.
                (1000, TriggerReason::Changes),
                // After 4 s of idle the next change fires at once...
                (5000, TriggerReason::Changes),
                // ...and its burst waits for the min interval.
                (6000, TriggerReason::Changes),
                (36000, TriggerReason::Periodic),
            ]
        );
    }

    #[test]
    fn intervals_are_sanitised() {
        let t = TriggerTiming::new(secs(5), secs(1));
        assert_eq!(t.max_interval(), secs(5));
        let t = TriggerTiming::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(t.max_interval(), Duration::from_millis(1));
        // Overflowing intervals do not panic.
        let t = TriggerTiming::new(Duration::MAX, Duration::MAX);
        let t0 = Instant::now();
        assert_eq!(t.decide(t0, true, true, Some(t0)), Decision::WaitForChange);
        assert_eq!(t.decide(t0, true, false, Some(t0)), Decision::WaitForChange);
    }
}

#[cfg(test)]
mod async_tests {
    use super::*;
    use crate::cache::{Cache, Now};
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::runtime::watcher::Event;
    use std::time::SystemTime;
    use tokio::time::timeout;

    fn svc(name: &str, rv: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn change(shared: &Shared, name: &str, rv: &str) {
        shared.update(|c| c.service_event(Event::Apply(svc(name, rv)), Now::current()));
    }

    /// Runs `trigger.next()` and returns its reason and how long it took,
    /// or `None` if it did not fire within `limit`.
    async fn fire(trigger: &mut SyncTrigger, limit: Duration) -> Option<(TriggerReason, Duration)> {
        let start = Instant::now();
        let reason = timeout(limit, trigger.next()).await.ok()?;
        Some((reason, start.elapsed()))
    }

    #[tokio::test]
    async fn wrapper_waits_for_lists_coalesces_and_resyncs() {
        let shared = Arc::new(Shared::new(Cache::new("n", SystemTime::now())));
        let min = Duration::from_millis(300);
        let max = Duration::from_millis(1500);
        let mut trigger = SyncTrigger::new(TriggerTiming::new(min, max), shared.clone());

        // Changes and one finished list are not enough.
        change(&shared, "a", "1");
        shared.update(|c| c.service_event(Event::Init, Now::current()));
        shared.update(|c| c.service_event(Event::InitDone, Now::current()));
        assert_eq!(fire(&mut trigger, Duration::from_millis(400)).await, None);

        // The slices list completes while we wait: fires at once.
        let waiter = {
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                shared.update(|c| c.slice_event(Event::Init, Now::current()));
                shared.update(|c| c.slice_event(Event::InitDone, Now::current()));
            })
        };
        let (reason, took) = fire(&mut trigger, Duration::from_secs(2)).await.unwrap();
        assert_eq!(reason, TriggerReason::Initial);
        assert!(took < Duration::from_millis(250), "{took:?}");
        waiter.await.unwrap();
        shared.lock().take_pending();

        // A burst right after a sync is held until the min interval, once.
        change(&shared, "a", "2");
        change(&shared, "b", "1");
        let (reason, took) = fire(&mut trigger, Duration::from_secs(2)).await.unwrap();
        assert_eq!(reason, TriggerReason::Changes);
        assert!(took >= Duration::from_millis(250), "{took:?}");
        let pending = shared.lock().take_pending();
        assert_eq!(pending.services.len(), 2);

        // After an idle period a change fires immediately.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let changer = {
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                change(&shared, "a", "3");
            })
        };
        let (reason, took) = fire(&mut trigger, Duration::from_secs(2)).await.unwrap();
        assert_eq!(reason, TriggerReason::Changes);
        assert!(took < Duration::from_millis(200), "{took:?}");
        changer.await.unwrap();
        shared.lock().take_pending();

        // Nothing pending: the periodic resync comes after max_interval.
        let (reason, took) = fire(&mut trigger, Duration::from_secs(3)).await.unwrap();
        assert_eq!(reason, TriggerReason::Periodic);
        assert!(took >= Duration::from_millis(1400), "{took:?}");
    }
}
