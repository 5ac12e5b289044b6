//! State shared between the watcher tasks, the handle and the trigger.

use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::{watch, Notify};

use crate::cache::{Cache, Outcome};

pub(crate) struct Shared {
    /// A std mutex: it is never held across an await, only for one event or
    /// for cloning `Arc`s, so an async mutex would only add cost.
    cache: Mutex<Cache>,
    /// Woken on every change that may make the trigger fire.
    pub changed: Notify,
    /// True once Services and EndpointSlices have both been listed.
    synced: watch::Sender<bool>,
}

impl Shared {
    pub fn new(cache: Cache) -> Self {
        Shared {
            cache: Mutex::new(cache),
            changed: Notify::new(),
            synced: watch::Sender::new(false),
        }
    }

    /// The cache. A panic while it was held cannot leave it worse than
    /// stale, so a poisoned lock is still used.
    pub fn lock(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one event against the cache and wakes whoever waits for it.
    pub fn update(&self, f: impl FnOnce(&mut Cache) -> Outcome) -> Outcome {
        let (outcome, synced) = {
            let mut cache = self.lock();
            let outcome = f(&mut cache);
            (outcome, cache.synced())
        };
        if synced {
            self.synced
                .send_if_modified(|s| !std::mem::replace(s, true));
        }
        if outcome.queued || outcome.list_done.is_some() {
            self.changed.notify_waiters();
        }
        outcome
    }

    /// (synced, changes pending), for the trigger.
    pub fn status(&self) -> (bool, bool) {
        let cache = self.lock();
        (cache.synced(), cache.has_pending())
    }

    pub fn subscribe_synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }
}
