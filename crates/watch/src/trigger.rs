//! When to sync: upstream's BoundedFrequencyRunner, as a pure state machine
//! ([`TriggerTiming::decide`]) and a thin async wrapper ([`SyncTrigger`]);
//! the min interval is fixed (upstream's) or adapts to the last sync's
//! duration ([`MinSyncInterval`]).

use std::fmt;
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

/// How soon after one sync the next may start when changes are pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MinSyncInterval {
    /// At least this long between the starts of two syncs (upstream
    /// `minSyncPeriod`, set by the operator).
    Fixed(Duration),
    /// Twice the previous sync's duration between the starts of two
    /// syncs, clamped to [`Self::ADAPTIVE_FLOOR`]..=[`Self::ADAPTIVE_CEILING`]:
    /// never later than the fixed default would fire, bursts still
    /// coalesce, under churn the loop syncs at most about half the time,
    /// and a change waits about window + sync instead of 1 s + sync.
    /// From the start, not the end: a sync's cost grows with its batch
    /// (10k services, iptables-nft: ≈ 0.1–0.2 s + 0.2–0.3 ms per changed
    /// service), and with 3 × sync between starts the batch at 1000
    /// changes/s grew until the 1 s ceiling; with 2 × it settles near 0.3 s
    /// unless the machine is loaded (benches/README.md).
    Adaptive,
}

impl MinSyncInterval {
    /// The least coalescing window: bursts still merge into one sync.
    pub const ADAPTIVE_FLOOR: Duration = Duration::from_millis(250);
    /// Upstream's default `minSyncPeriod`: the adaptive interval never
    /// exceeds it.
    pub const ADAPTIVE_CEILING: Duration = Duration::from_secs(1);
    /// The interval is this many times the previous sync's duration.
    const ADAPTIVE_FACTOR: u32 = 2;

    /// The earliest start of the next sync after `last`; `None` if that
    /// overflows `Instant` (a huge fixed interval: never).
    fn next_start(self, last: LastSync) -> Option<Instant> {
        match self {
            MinSyncInterval::Fixed(interval) => last.started.checked_add(interval),
            MinSyncInterval::Adaptive => {
                // Not reported (yet): as if the sync took no time.
                let took = last.took.unwrap_or(Duration::ZERO);
                let window = took
                    .saturating_mul(Self::ADAPTIVE_FACTOR)
                    .clamp(Self::ADAPTIVE_FLOOR, Self::ADAPTIVE_CEILING);
                last.started.checked_add(window)
            }
        }
    }
}

impl fmt::Display for MinSyncInterval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MinSyncInterval::Fixed(d) if d.is_zero() => f.write_str("0s"),
            MinSyncInterval::Fixed(d) => write!(f, "{d:?}"),
            MinSyncInterval::Adaptive => write!(
                f,
                "adaptive {:?}\u{2013}{:?}",
                Self::ADAPTIVE_FLOOR,
                Self::ADAPTIVE_CEILING
            ),
        }
    }
}

/// The previous sync, as the timing rules see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastSync {
    /// When the trigger fired for it.
    pub started: Instant,
    /// How long it took, once the sync loop reported it.
    pub took: Option<Duration>,
}

impl LastSync {
    /// A sync started at `started` whose duration is not known yet.
    pub fn started_at(started: Instant) -> Self {
        LastSync {
            started,
            took: None,
        }
    }

    pub fn took(self, took: Duration) -> Self {
        LastSync {
            took: Some(took),
            ..self
        }
    }
}

/// The timing rules of the sync trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TriggerTiming {
    min_interval: MinSyncInterval,
    max_interval: Duration,
}

impl TriggerTiming {
    /// A fixed `min_interval`: the least time between the starts of two
    /// syncs (upstream `minSyncPeriod`); `max_interval` is the most
    /// (`syncPeriod`).
    pub fn new(min_interval: Duration, max_interval: Duration) -> Self {
        Self::with_min(MinSyncInterval::Fixed(min_interval), max_interval)
    }

    /// `max_interval` is raised to the (largest) min interval if smaller,
    /// and to 1 ms so a zero cannot turn the trigger into a busy loop.
    pub fn with_min(min_interval: MinSyncInterval, max_interval: Duration) -> Self {
        let floor = match min_interval {
            MinSyncInterval::Fixed(d) => d,
            MinSyncInterval::Adaptive => MinSyncInterval::ADAPTIVE_CEILING,
        };
        TriggerTiming {
            min_interval,
            max_interval: max_interval.max(floor).max(Duration::from_millis(1)),
        }
    }

    pub fn min_interval(&self) -> MinSyncInterval {
        self.min_interval
    }

    pub fn max_interval(&self) -> Duration {
        self.max_interval
    }

    /// Decides at `now`, given whether both lists are done (`synced`),
    /// whether changes are pending, and the previous sync.
    ///
    /// A change after a long idle time fires at once: the min interval is
    /// measured from the last sync, not from the change, so only bursts
    /// within the interval are delayed (and coalesced into one sync).
    pub fn decide(
        &self,
        now: Instant,
        synced: bool,
        pending: bool,
        last_sync: Option<LastSync>,
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
            return match self.min_interval.next_start(last) {
                Some(at) if now >= at => Decision::Fire(TriggerReason::Changes),
                Some(at) => Decision::WaitUntil(at),
                None => Decision::WaitForChange,
            };
        }
        // From the end of the last sync once it is known, as upstream's
        // BoundedFrequencyRunner resets its timer after a run: a full sync
        // longer than the period (50k services on iptables-nft) must not be
        // followed by another at once, forever.
        let since = last
            .took
            .and_then(|took| last.started.checked_add(took))
            .unwrap_or(last.started);
        match since.checked_add(self.max_interval) {
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
    last_sync: Option<LastSync>,
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
        self.last_sync.map(|l| l.started)
    }

    /// Reports how long the sync started by the last `next` took; the
    /// adaptive interval is derived from it.
    pub fn sync_done(&mut self, took: Duration) {
        if let Some(last) = &mut self.last_sync {
            last.took = Some(took);
        }
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
                    self.last_sync = Some(LastSync::started_at(now));
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

    /// A previous sync started at `t` (its duration not reported).
    fn at(t: Instant) -> Option<LastSync> {
        Some(LastSync::started_at(t))
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
            t.decide(t0 + secs(3600), false, true, at(t0)),
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
            t.decide(t0 + secs(10), true, true, at(t0)),
            Decision::Fire(TriggerReason::Changes)
        );
        // Exactly at the min interval fires too.
        assert_eq!(
            t.decide(t0 + MIN, true, true, at(t0)),
            Decision::Fire(TriggerReason::Changes)
        );
    }

    #[test]
    fn burst_within_min_interval_waits_for_its_end() {
        let t0 = Instant::now();
        let t = timing();
        let now = t0 + Duration::from_millis(200);
        assert_eq!(
            t.decide(now, true, true, at(t0)),
            Decision::WaitUntil(t0 + MIN)
        );
        // More changes in the burst do not move the deadline.
        let later = t0 + Duration::from_millis(900);
        assert_eq!(
            t.decide(later, true, true, at(t0)),
            Decision::WaitUntil(t0 + MIN)
        );
    }

    #[test]
    fn idle_waits_for_the_periodic_deadline_then_fires_periodic() {
        let t0 = Instant::now();
        let t = timing();
        assert_eq!(
            t.decide(t0 + secs(5), true, false, at(t0)),
            Decision::WaitUntil(t0 + MAX)
        );
        assert_eq!(
            t.decide(t0 + MAX, true, false, at(t0)),
            Decision::Fire(TriggerReason::Periodic)
        );
        // Pending changes at the deadline are reported as changes.
        assert_eq!(
            t.decide(t0 + MAX, true, true, at(t0)),
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
                last = Some(LastSync::started_at(now));
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

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_periodic_deadline_counts_from_the_end_of_the_last_sync() {
        let t = TriggerTiming::new(secs(1), secs(30));
        let t0 = Instant::now();
        // A 40 s sync: the next periodic one is 30 s after it ended.
        let last = LastSync::started_at(t0).took(secs(40));
        assert_eq!(
            t.decide(t0 + secs(41), true, false, Some(last)),
            Decision::WaitUntil(t0 + secs(70))
        );
        assert_eq!(
            t.decide(t0 + secs(70), true, false, Some(last)),
            Decision::Fire(TriggerReason::Periodic)
        );
        // Changes still only wait for the min interval.
        assert_eq!(
            t.decide(t0 + secs(41), true, true, Some(last)),
            Decision::Fire(TriggerReason::Changes)
        );
    }

    #[test]
    fn adaptive_window_follows_the_last_sync_duration() {
        let t = TriggerTiming::with_min(MinSyncInterval::Adaptive, MAX);
        let t0 = Instant::now();
        let last = |took: u64| Some(LastSync::started_at(t0).took(ms(took)));
        // (sync took, next sync may start) in ms after the sync's start:
        // clamp(2 × took, 250, 1000); a sync longer than that is followed
        // at once.
        for (took, next) in [
            (0, 250),
            (50, 250),
            (100, 250),
            (150, 300),
            (200, 400),
            (300, 600),
            (500, 1000),
            (900, 1000),
            (3000, 1000),
        ] {
            let just_done = t0 + ms(took);
            assert_eq!(
                t.decide(just_done, true, true, last(took)),
                if next > took {
                    Decision::WaitUntil(t0 + ms(next))
                } else {
                    Decision::Fire(TriggerReason::Changes)
                },
                "sync took {took} ms"
            );
            assert_eq!(
                t.decide(just_done.max(t0 + ms(next)), true, true, last(took)),
                Decision::Fire(TriggerReason::Changes),
                "sync took {took} ms"
            );
        }
        // Duration not reported: the floor from the start.
        assert_eq!(
            t.decide(t0, true, true, at(t0)),
            Decision::WaitUntil(t0 + ms(250))
        );
        // After idle a change still fires at once, and the periodic resync
        // keeps its period, from the end of the 100 ms sync.
        assert_eq!(
            t.decide(t0 + secs(5), true, true, last(100)),
            Decision::Fire(TriggerReason::Changes)
        );
        assert_eq!(
            t.decide(t0 + secs(5), true, false, last(100)),
            Decision::WaitUntil(t0 + ms(100) + MAX)
        );
    }

    #[test]
    fn fixed_interval_ignores_the_sync_duration() {
        let t0 = Instant::now();
        let last = Some(LastSync::started_at(t0).took(ms(100)));
        assert_eq!(
            timing().decide(t0 + ms(100), true, true, last),
            Decision::WaitUntil(t0 + MIN)
        );
        let zero = TriggerTiming::new(Duration::ZERO, MAX);
        assert_eq!(
            zero.decide(t0 + ms(100), true, true, last),
            Decision::Fire(TriggerReason::Changes)
        );
    }

    /// Sync starts and the longest wait of a change (arrival → end of the
    /// sync that programs it) under one change per ms for 20 s, a sync of
    /// `n` changes taking `cost(n)` ms; waits are counted after 10 s.
    fn churn(t: TriggerTiming, cost: impl Fn(u64) -> u64) -> (Vec<u64>, u64) {
        let t0 = Instant::now();
        let mut last: Option<LastSync> = None;
        let mut starts = Vec::new();
        // Changes pending: arrival of the oldest, and how many.
        let mut oldest: Option<u64> = None;
        let mut count = 0;
        let mut worst = 0;
        let mut now_ms = 0u64;
        while now_ms <= 20_000 {
            let now = t0 + ms(now_ms);
            if let Decision::Fire(_) = t.decide(now, true, oldest.is_some(), last) {
                starts.push(now_ms);
                let took = cost(count);
                if let Some(first) = oldest.filter(|_| now_ms > 10_000) {
                    worst = worst.max(now_ms + took - first);
                }
                // The loop is busy until the sync ends, then reports it;
                // the changes meanwhile are pending.
                last = Some(LastSync::started_at(now).took(ms(took)));
                oldest = Some(now_ms + 1);
                count = took;
                now_ms += took + 1;
                continue;
            }
            oldest.get_or_insert(now_ms);
            count += 1;
            now_ms += 1;
        }
        (starts, worst)
    }

    fn gaps(starts: &[u64]) -> Vec<u64> {
        starts.windows(2).skip(1).map(|w| w[1] - w[0]).collect()
    }

    #[test]
    fn under_churn_adaptive_syncs_sooner_than_the_fixed_second() {
        let adaptive = TriggerTiming::with_min(MinSyncInterval::Adaptive, MAX);
        // 150 ms syncs: 300 ms between starts, half the time syncing; a
        // change arriving just after a start waits for the next sync's end.
        let (starts, worst) = churn(adaptive, |_| 150);
        assert!(gaps(&starts).iter().all(|g| *g == 300), "{starts:?}");
        assert_eq!(worst, 300 + 150 - 1);
        // The fixed default waits a whole second between starts.
        let (starts, worst) = churn(timing(), |_| 150);
        assert!(gaps(&starts).iter().all(|g| *g == 1000), "{starts:?}");
        assert_eq!(worst, 1000 + 150 - 1);
        // Slow syncs: adaptive is never later than the fixed default.
        for took in [50, 333, 500, 1000, 1500] {
            let (a, _) = churn(adaptive, |_| took);
            let (f, _) = churn(timing(), |_| took);
            assert!(a.len() >= f.len(), "{took}: {} < {}", a.len(), f.len());
        }
    }

    #[test]
    fn under_churn_a_cost_per_change_settles_below_a_second() {
        // 10k services with iptables-nft, measured: ≈ 95 ms + 0.25 ms per
        // changed service. At 1000 changes/s the syncs settle near 0.2 s
        // and no change waits a second; the fixed second makes them wait
        // more than that.
        let cost = |n: u64| 95 + n / 4;
        let adaptive = TriggerTiming::with_min(MinSyncInterval::Adaptive, MAX);
        let (starts, worst) = churn(adaptive, cost);
        let settled: Vec<u64> = starts.into_iter().filter(|s| *s > 10_000).collect();
        let g = gaps(&settled);
        assert!(g.iter().all(|g| (350..=400).contains(g)), "{g:?}");
        assert!(worst < 600, "{worst}");
        let (_, worst) = churn(timing(), cost);
        assert!(worst > 1000, "{worst}");
    }

    #[test]
    fn min_interval_is_shown_for_the_start_log() {
        assert_eq!(
            MinSyncInterval::Adaptive.to_string(),
            "adaptive 250ms\u{2013}1s"
        );
        assert_eq!(MinSyncInterval::Fixed(secs(1)).to_string(), "1s");
        assert_eq!(MinSyncInterval::Fixed(ms(500)).to_string(), "500ms");
        assert_eq!(MinSyncInterval::Fixed(Duration::ZERO).to_string(), "0s");
    }

    #[test]
    fn intervals_are_sanitised() {
        let t = TriggerTiming::new(secs(5), secs(1));
        assert_eq!(t.max_interval(), secs(5));
        let t = TriggerTiming::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(t.max_interval(), Duration::from_millis(1));
        let t = TriggerTiming::with_min(MinSyncInterval::Adaptive, Duration::ZERO);
        assert_eq!(t.max_interval(), secs(1));
        // Overflowing intervals do not panic.
        let t = TriggerTiming::new(Duration::MAX, Duration::MAX);
        let t0 = Instant::now();
        assert_eq!(t.decide(t0, true, true, at(t0)), Decision::WaitForChange);
        assert_eq!(t.decide(t0, true, false, at(t0)), Decision::WaitForChange);
    }
}

#[cfg(test)]
mod async_tests {
    use super::*;
    use crate::cache::{Cache, Now};
    use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::runtime::watcher::Event;
    use std::time::SystemTime;
    use tokio::time::timeout;

    /// Version `rv` of a service: a different port per version, since only
    /// what kproxy programs makes a change.
    fn svc(name: &str, rv: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.0.0.1".into()),
                ports: Some(vec![ServicePort {
                    port: rv.parse().unwrap(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
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

    #[tokio::test]
    async fn adaptive_wrapper_uses_the_reported_sync_duration() {
        let shared = Arc::new(Shared::new(Cache::new("n", SystemTime::now())));
        let timing = TriggerTiming::with_min(MinSyncInterval::Adaptive, Duration::from_secs(30));
        let mut trigger = SyncTrigger::new(timing, shared.clone());
        shared.update(|c| c.service_event(Event::Init, Now::current()));
        shared.update(|c| c.service_event(Event::InitDone, Now::current()));
        shared.update(|c| c.slice_event(Event::Init, Now::current()));
        shared.update(|c| c.slice_event(Event::InitDone, Now::current()));
        let (reason, _) = fire(&mut trigger, Duration::from_secs(2)).await.unwrap();
        assert_eq!(reason, TriggerReason::Initial);
        shared.lock().take_pending();

        // Not reported: the 250 ms floor.
        change(&shared, "a", "1");
        let (_, took) = fire(&mut trigger, Duration::from_secs(2)).await.unwrap();
        assert!(took >= Duration::from_millis(200), "{took:?}");
        shared.lock().take_pending();

        // A 200 ms sync reported: the next starts 400 ms after its start.
        trigger.sync_done(Duration::from_millis(200));
        change(&shared, "a", "2");
        let (_, took) = fire(&mut trigger, Duration::from_secs(2)).await.unwrap();
        assert!(took >= Duration::from_millis(350), "{took:?}");
    }
}
