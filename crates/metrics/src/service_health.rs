//! Per-service `healthCheckNodePort` servers for `externalTrafficPolicy:
//! Local` load balancers, after upstream `service_health.go`: 200 while the
//! service has local endpoints and the proxy is healthy, else 503, so the
//! load balancer only sends traffic to nodes that can serve it locally.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::Router;
use tokio::sync::watch;

use crate::health::HealthState;
use crate::http::json_response;

/// What one healthCheckNodePort reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealthTarget {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the service on this node.
    pub local_endpoints: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceHealthError {
    #[error("health check node port 0 is not a port")]
    PortZero,
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A port that could not be opened; retried on the next [`ServiceHealthServers::sync`].
#[derive(Debug)]
pub struct PortError {
    pub port: u16,
    pub target: ServiceHealthTarget,
    pub error: ServiceHealthError,
}

struct Instance {
    target: Arc<RwLock<ServiceHealthTarget>>,
    addrs: Vec<SocketAddr>,
    // Dropping the sender stops this port's servers.
    _stop: watch::Sender<()>,
}

/// The set of open healthCheckNodePort listeners.
pub struct ServiceHealthServers {
    bind: Vec<IpAddr>,
    health: HealthState,
    runtime: tokio::runtime::Handle,
    open: BTreeMap<u16, Instance>,
}

impl std::fmt::Debug for ServiceHealthServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHealthServers")
            .field("bind", &self.bind)
            .field("ports", &self.open.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ServiceHealthServers {
    /// `bind`: the addresses each port listens on; `[::]` listens on every
    /// address of both families (as upstream's default), or pass the node
    /// IPs matching `nodePortAddresses`. Servers run on `runtime`, so
    /// [`sync`](Self::sync) may be called from a plain (sync) thread.
    pub fn new(
        bind: Vec<IpAddr>,
        health: HealthState,
        runtime: tokio::runtime::Handle,
    ) -> ServiceHealthServers {
        ServiceHealthServers {
            bind,
            health,
            runtime,
            open: BTreeMap::new(),
        }
    }

    /// Ports currently served.
    pub fn ports(&self) -> Vec<u16> {
        self.open.keys().copied().collect()
    }

    /// The addresses a served port listens on.
    pub fn local_addrs(&self, port: u16) -> &[SocketAddr] {
        self.open.get(&port).map_or(&[], |i| i.addrs.as_slice())
    }

    /// Opens and closes listeners to match `desired` (healthCheckNodePort →
    /// what it reports); updates the reported service and endpoint count of
    /// ports that stay open. A port that cannot be opened is reported and
    /// left closed, never fatal; the next call retries it.
    pub fn sync(&mut self, desired: &BTreeMap<u16, ServiceHealthTarget>) -> Vec<PortError> {
        self.open.retain(|port, inst| {
            let keep = desired.contains_key(port);
            if !keep {
                tracing::info!(port, addrs = ?inst.addrs, "closing service health check");
            }
            keep
        });

        let mut errors = Vec::new();
        for (&port, target) in desired {
            if let Some(inst) = self.open.get(&port) {
                let mut t = inst.target.write().unwrap_or_else(PoisonError::into_inner);
                if *t != *target {
                    *t = target.clone();
                }
                continue;
            }
            match self.open_port(port, target) {
                Ok(inst) => {
                    tracing::info!(
                        port,
                        service = %format!("{}/{}", target.namespace, target.name),
                        "opened service health check"
                    );
                    self.open.insert(port, inst);
                }
                Err(error) => {
                    tracing::warn!(
                        port,
                        service = %format!("{}/{}", target.namespace, target.name),
                        %error,
                        "failed to start service health check"
                    );
                    errors.push(PortError {
                        port,
                        target: target.clone(),
                        error,
                    });
                }
            }
        }
        errors
    }

    fn open_port(
        &self,
        port: u16,
        target: &ServiceHealthTarget,
    ) -> Result<Instance, ServiceHealthError> {
        if port == 0 {
            return Err(ServiceHealthError::PortZero);
        }
        let _runtime = self.runtime.enter();
        // Bind everything first so a failure leaves nothing half-open.
        let mut listeners = Vec::with_capacity(self.bind.len());
        for ip in &self.bind {
            let addr = SocketAddr::new(*ip, port);
            let listener =
                bind(addr).map_err(|source| ServiceHealthError::Listen { addr, source })?;
            listeners.push(listener);
        }

        let target = Arc::new(RwLock::new(target.clone()));
        let (stop, stop_rx) = watch::channel(());
        let app = Router::new()
            .fallback(service_health_handler)
            .with_state(ServiceApp {
                target: target.clone(),
                health: self.health.clone(),
            });
        let mut addrs = Vec::with_capacity(listeners.len());
        for listener in listeners {
            let addr = listener
                .local_addr()
                .unwrap_or(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port));
            addrs.push(addr);
            let app = app.clone();
            let mut stop_rx = stop_rx.clone();
            self.runtime.spawn(async move {
                // Resolves when the Instance (the sender) is dropped.
                let shutdown = async move {
                    let _ = stop_rx.changed().await;
                };
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
                {
                    tracing::warn!(%addr, error = %e, "service health check server failed");
                }
            });
        }
        Ok(Instance {
            target,
            addrs,
            _stop: stop,
        })
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    // Registering with the reactor needs the runtime context.
    tokio::net::TcpListener::from_std(std_listener)
}

#[derive(Clone)]
struct ServiceApp {
    target: Arc<RwLock<ServiceHealthTarget>>,
    health: HealthState,
}

async fn service_health_handler(State(app): State<ServiceApp>) -> Response {
    let target = app
        .target
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let healthy = app.health.is_healthy();
    let status = if target.local_endpoints != 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let weight = HeaderValue::from(target.local_endpoints);
    json_response(
        status,
        service_health_body(&target, healthy),
        &[("x-load-balancing-endpoint-weight", weight)],
    )
}

/// Upstream's body, byte for byte (tab-indented, no trailing newline).
fn service_health_body(t: &ServiceHealthTarget, healthy: bool) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string());
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        q(&t.namespace),
        q(&t.name),
        t.local_endpoints,
        healthy
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_matches_upstream_layout() {
        let t = ServiceHealthTarget {
            namespace: "default".into(),
            name: "web".into(),
            local_endpoints: 2,
        };
        let body = service_health_body(&t, true);
        assert_eq!(
            body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let v: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
        assert_eq!(v["service"]["name"], "web");
    }
}
