//! `--dry-run`: computes the state on every sync and logs a summary,
//! programming nothing. Lets an operator see what kproxy would do on a node
//! before letting it touch the kernel.

use std::time::Instant;

use kproxy_model::{Changes, Proxier, ProxyState, SyncKind, SyncReport};

#[derive(Debug, Default)]
pub struct DryRunProxier {
    synced_once: bool,
}

impl Proxier for DryRunProxier {
    fn mode(&self) -> &'static str {
        "dry-run"
    }

    fn sync(&mut self, state: &ProxyState, changes: &Changes) -> SyncReport {
        let started = Instant::now();
        let kind = if self.synced_once && !changes.force_full {
            SyncKind::Partial
        } else {
            SyncKind::Full
        };
        self.synced_once = true;
        tracing::info!(
            kind = kind.as_str(),
            service_ports = state.service_port_count(),
            endpoints = state.endpoint_count(),
            changed_ports = changes.ports.len(),
            rejected = state.rejections.len(),
            "dry run: state computed, nothing applied"
        );
        for (family, port) in &changes.ports {
            match state.family(*family).get(port) {
                Some(sp) => tracing::debug!(
                    service = %port,
                    %family,
                    cluster_ip = %sp.cluster_ip,
                    port = sp.port,
                    cluster_endpoints = sp.endpoints.cluster.len(),
                    local_endpoints = sp.endpoints.local.len(),
                    "dry run: service port changed"
                ),
                None => tracing::debug!(service = %port, %family, "dry run: service port removed"),
            }
        }
        SyncReport {
            kind,
            duration: started.elapsed(),
            objects_written: 0,
            rules_per_table: Vec::new(),
            no_local_endpoints: Vec::new(),
            lock_wait: None,
            failure: None,
        }
    }
}
