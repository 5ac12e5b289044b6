//! The interface every backend (iptables, ipvs) implements.

use std::time::Duration;

use crate::types::{Changes, ProxyState};

/// Whether a sync rewrote everything kproxy owns or only what changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum SyncKind {
    Full,
    Partial,
}

impl SyncKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncKind::Full => "full",
            SyncKind::Partial => "partial",
        }
    }
}

/// Why a sync did not bring the kernel to the desired state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SyncFailure {
    /// Short machine-readable cause, e.g. "iptables-restore", "netlink".
    pub cause: String,
    /// Human-readable detail naming what was refused (e.g. the offending rule line).
    pub message: String,
}

/// What a sync did. Every sync returns one; the binary turns it into logs,
/// metrics and health.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SyncReport {
    pub kind: SyncKind,
    pub duration: Duration,
    /// Rules (iptables) or kernel objects (IPVS services, destinations,
    /// addresses) written by this sync.
    pub objects_written: usize,
    /// Rules now installed, per table (`nat`, `filter`, `ipvs`, ...), for
    /// `kubeproxy_sync_proxy_rules_iptables_total{table}`.
    pub rules_per_table: Vec<(String, usize)>,
    /// Service ports with no local endpoints under a Local policy, by traffic
    /// policy ("internal", "external"), for
    /// `kubeproxy_sync_proxy_rules_no_local_endpoints_total`.
    pub no_local_endpoints: Vec<(String, usize)>,
    /// Time spent waiting for the xtables lock or similar, if known.
    pub lock_wait: Option<Duration>,
    /// `None` when the kernel now matches the desired state.
    pub failure: Option<SyncFailure>,
}

impl SyncReport {
    pub fn succeeded(&self) -> bool {
        self.failure.is_none()
    }
}

/// A backend that brings the kernel to a [`ProxyState`].
///
/// Calls are blocking and made from one dedicated sync thread.
pub trait Proxier: Send {
    /// "iptables", "ipvs", "dry-run".
    fn mode(&self) -> &'static str;

    /// Brings the kernel to `state`. `changes` says which service ports
    /// differ from the previous call; the backend decides whether it can do
    /// a partial sync (it must do a full one on its first call, after a
    /// failure, when `changes.force_full` is set, or when it finds its rules
    /// were tampered with). A failed sync must leave the previously applied
    /// rules in place.
    fn sync(&mut self, state: &ProxyState, changes: &Changes) -> SyncReport;
}
