//! kproxy-watch: kube-rs watchers for Services, EndpointSlices and the own
//! Node, change tracking since the last sync, and the sync trigger.
//!
//! The binary spawns a [`WatchHandle`], waits for [`WatchHandle::wait_synced`],
//! then loops: `trigger.next().await`, [`WatchHandle::take_pending`],
//! [`WatchHandle::apply_to`] its `StateBuilder`, and hands the resulting
//! [`kproxy_model::Changes`] to the Proxier.

mod cache;
mod handle;
mod observer;
mod pending;
mod shared;
mod trigger;

pub use cache::{SyncStatus, SERVICE_NAME_LABEL};
pub use handle::{Applied, WatchConfig, WatchHandle, LABEL_SELECTOR};
pub use observer::{NoopObserver, WatchObserver};
pub use pending::{parse_trigger_time, Pending, LAST_CHANGE_TRIGGER_TIME};
pub use trigger::{Decision, LastSync, MinSyncInterval, SyncTrigger, TriggerReason, TriggerTiming};
