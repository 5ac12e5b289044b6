//! kproxy-metrics: upstream kube-proxy's metrics and health semantics, and
//! the HTTP servers exposing them.
//!
//! - [`Metrics`]: the Prometheus registry (`kubeproxy_*` with upstream's
//!   names, help texts, types and buckets; `kproxy_*`; `process_*`).
//! - [`HealthState`]: `/healthz` and `/livez` logic with an injectable clock.
//! - [`serve_metrics`], [`serve_healthz`]: the two HTTP servers.
//! - [`ServiceHealthServers`]: per-service healthCheckNodePort listeners.

mod exposition;
pub mod health;
pub mod http;
pub mod metrics;
mod process;
pub mod service_health;

pub use health::{
    format_time, node_eligible, Clock, HealthAnswer, HealthState, ManualClock, ProxierHealth,
    ProxyHealth, SystemClock, TO_BE_DELETED_TAINT,
};
pub use http::{healthz_router, metrics_router, serve_healthz, serve_metrics, DebugState};
pub use metrics::{Metrics, CAUSE_IPTABLES_RESTORE, OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE};
pub use service_health::{
    PortError, ServiceHealthError, ServiceHealthServers, ServiceHealthTarget,
};
