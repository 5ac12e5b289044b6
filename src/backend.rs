//! Chooses and builds the Proxier for the configured mode.

use anyhow::{bail, Result};
use kproxy_model::{IpFamily, Proxier};

use crate::config::{ProxyMode, Settings};
use crate::dry_run::DryRunProxier;

/// The backend for `settings`. A mode without a backend is an error, never
/// a silent no-op.
pub fn build(settings: &Settings) -> Result<Box<dyn Proxier>> {
    if settings.dry_run {
        return Ok(Box::new(DryRunProxier::default()));
    }
    match settings.mode {
        ProxyMode::Iptables => {
            bail!("--mode=iptables: the iptables backend is not built yet; use --dry-run")
        }
        ProxyMode::Ipvs => bail!("--mode=ipvs: the IPVS backend is not built yet; use --dry-run"),
    }
}

/// The IP families the backend serves, for health reporting.
pub fn families(_settings: &Settings) -> Vec<IpFamily> {
    IpFamily::ALL.to_vec()
}

/// `kproxy --cleanup`: removes everything kproxy (or kube-proxy) installed.
pub fn cleanup(_settings: &Settings) -> Result<()> {
    bail!("--cleanup: no backend is built yet")
}
