//! Chooses and builds the Proxier for the configured mode, and `--cleanup`.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{bail, Context, Result};
use kproxy_iptables::netutil;
use kproxy_iptables::planner::{LocalDetector, NodePortAddresses, PlannerConfig};
use kproxy_iptables::proxier::{FamilyConfig, IptablesProxier};
use kproxy_iptables::runner::{Backend, BackendPreference};
use kproxy_model::{IpFamily, Proxier};
use tracing::{info, warn};

use crate::config::{IptablesBackend, LocalDetection, NodePortAddress, ProxyMode, Settings};
use crate::dry_run::DryRunProxier;

/// The backend for `settings`. A mode without a backend is an error, never
/// a silent no-op.
pub fn build(settings: &Settings) -> Result<Box<dyn Proxier>> {
    if settings.dry_run {
        return Ok(Box::new(DryRunProxier::default()));
    }
    match settings.mode {
        ProxyMode::Iptables => build_iptables(settings),
        ProxyMode::Ipvs => build_ipvs(settings),
    }
}

/// The IP families this node can serve: IPv6 only where the kernel has it
/// and ip6tables is installed (a single-stack node is normal, not an error).
pub fn families(settings: &Settings) -> Vec<IpFamily> {
    if settings.dry_run {
        return IpFamily::ALL.to_vec();
    }
    let mut families = vec![IpFamily::V4];
    let ipv6_kernel = Path::new("/proc/net/if_inet6").exists();
    let ip6tables = [
        "ip6tables-restore",
        "ip6tables-nft-restore",
        "ip6tables-legacy-restore",
    ]
    .iter()
    .any(|p| on_path(p));
    if ipv6_kernel && ip6tables {
        families.push(IpFamily::V6);
    } else {
        info!(
            ipv6_kernel,
            ip6tables, "IPv6 not available: serving IPv4 only"
        );
    }
    families
}

fn build_iptables(settings: &Settings) -> Result<Box<dyn Proxier>> {
    let families = families(settings);
    let local = netutil::local_addresses().context("listing the node's addresses")?;
    let mut configs = Vec::new();
    for family in families {
        let mut planner = PlannerConfig::new(family);
        planner.masquerade_bit = settings.iptables.masquerade_bit;
        planner.masquerade_all = settings.iptables.masquerade_all;
        planner.localhost_nodeports = settings.iptables.localhost_nodeports;
        planner.conntrack_tcp_be_liberal = settings.conntrack.tcp_be_liberal;
        planner.nodeport_addresses = nodeport_addresses(settings, family, &local);
        let mut detect_local_from_node = false;
        planner.local_detector = match &settings.detect_local {
            LocalDetection::None => LocalDetector::None,
            LocalDetection::ClusterCidr(cidrs) => LocalDetector::Cidrs(
                cidrs
                    .iter()
                    .filter(|c| IpFamily::of_net(c) == family)
                    .copied()
                    .collect(),
            ),
            LocalDetection::NodeCidr => {
                detect_local_from_node = true;
                LocalDetector::None
            }
            LocalDetection::BridgeInterface(name) => LocalDetector::Bridge(name.clone()),
            LocalDetection::InterfaceNamePrefix(prefix) => {
                LocalDetector::InterfacePrefix(prefix.clone())
            }
        };
        if family == IpFamily::V4
            && planner.localhost_nodeports
            && planner.nodeport_addresses == NodePortAddresses::AllLocal
        {
            // NodePorts on 127.0.0.1 need route_localnet, as upstream sets it.
            match netutil::ensure_route_localnet() {
                Ok(true) => info!("set net.ipv4.conf.all.route_localnet=1 for localhost NodePorts"),
                Ok(false) => {}
                Err(err) => {
                    warn!(error = %err, "cannot enable route_localnet: localhost NodePorts will not work")
                }
            }
        }
        let mut config = FamilyConfig::new(planner);
        config.detect_local_from_node = detect_local_from_node;
        configs.push(config);
    }
    let proxier = IptablesProxier::detect(configs, backend_preference(settings.iptables_backend))
        .context("--mode=iptables")?;
    Ok(Box::new(proxier))
}

/// `--nodeport-addresses` resolved to this node's addresses of `family`.
/// Unset means every local address.
fn nodeport_addresses(
    settings: &Settings,
    family: IpFamily,
    local: &[(String, ipnet::IpNet)],
) -> NodePortAddresses {
    if settings.nodeport_addresses.is_empty() {
        return NodePortAddresses::AllLocal;
    }
    let mut cidrs = Vec::new();
    for addr in &settings.nodeport_addresses {
        match addr {
            NodePortAddress::Cidr(cidr) if IpFamily::of_net(cidr) == family => cidrs.push(*cidr),
            NodePortAddress::Cidr(_) => {}
            NodePortAddress::Primary => {
                // The primary IP is the first global address of the family.
                if let Some((_, net)) = local
                    .iter()
                    .find(|(_, n)| IpFamily::of_net(n) == family && is_global(&n.addr()))
                {
                    cidrs.push(ipnet::IpNet::from(net.addr()));
                }
            }
        }
    }
    let ips = netutil::addresses_in(&cidrs, local);
    if ips.is_empty() {
        warn!(%family, "no local address matches --nodeport-addresses: no NodePorts in this family");
    }
    NodePortAddresses::Ips(ips)
}

fn is_global(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
        IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

fn backend_preference(backend: IptablesBackend) -> BackendPreference {
    match backend {
        IptablesBackend::Auto => BackendPreference::Auto,
        IptablesBackend::Legacy => BackendPreference::Legacy,
        IptablesBackend::Nft => BackendPreference::Nft,
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// `kproxy --cleanup`: removes everything kproxy or kube-proxy installed,
/// in every iptables backend present (a node may be migrating between
/// them), and leaves everything else alone.
pub fn cleanup(_settings: &Settings) -> Result<()> {
    let mut errors = Vec::new();
    // IPVS mode: virtual servers on kube-ipvs0 and node addresses, kube-ipvs0, IPVS-only chains.
    match kproxy_ipvs::cleanup() {
        Ok(report) => info!(
            services = report.ipvs_services_removed,
            dummy = report.dummy_removed,
            "IPVS cleanup done"
        ),
        Err(err) => errors.push(format!("ipvs: {err}")),
    }
    for family in IpFamily::ALL {
        let stem = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        for backend in [Backend::Legacy, Backend::Nft] {
            if !on_path(&format!("{stem}-{backend}-restore")) {
                continue;
            }
            match kproxy_iptables::cleanup::cleanup(family, backend) {
                Ok(report) => info!(
                    %family,
                    %backend,
                    rules = report.rules_removed.len(),
                    chains = report.chains_removed.len(),
                    "iptables cleanup done"
                ),
                Err(err) => errors.push(format!("{stem} ({backend}): {err}")),
            }
        }
    }
    if !errors.is_empty() {
        bail!("--cleanup: {}", errors.join("; "));
    }
    Ok(())
}

// ---- IPVS mode (owned by kproxy-ipvs) ----

/// `--mode=ipvs`: settings → [`kproxy_ipvs::IpvsConfig`].
fn build_ipvs(settings: &Settings) -> Result<Box<dyn Proxier>> {
    let mut node_ips = Vec::new();
    if !settings.nodeport_addresses.is_empty() {
        let local = netutil::local_addresses().context("listing the node's addresses")?;
        for family in IpFamily::ALL {
            if let NodePortAddresses::Ips(ips) = nodeport_addresses(settings, family, &local) {
                node_ips.extend(ips);
            }
        }
    }
    let cluster_cidrs = match &settings.detect_local {
        LocalDetection::ClusterCidr(cidrs) => cidrs.clone(),
        LocalDetection::None => Vec::new(),
        other => {
            warn!(detect_local = ?other, "--mode=ipvs detects local traffic by cluster CIDR only; using --cluster-cidr");
            settings.cluster_cidrs.clone()
        }
    };
    let config = kproxy_ipvs::IpvsConfig {
        scheduler: settings.ipvs.scheduler.as_str().to_string(),
        node_ips,
        masquerade_bit: settings.iptables.masquerade_bit,
        masquerade_all: settings.iptables.masquerade_all,
        cluster_cidrs,
        strict_arp: settings.ipvs.strict_arp,
        exclude_cidrs: settings.ipvs.exclude_cidrs.clone(),
        tcp_timeout: settings.ipvs.tcp_timeout,
        tcp_fin_timeout: settings.ipvs.tcp_fin_timeout,
        udp_timeout: settings.ipvs.udp_timeout,
        iptables_backend: backend_preference(settings.iptables_backend),
        ..kproxy_ipvs::IpvsConfig::default()
    };
    let proxier = kproxy_ipvs::IpvsProxier::new(config).context("--mode=ipvs")?;
    Ok(Box::new(proxier))
}
