//! kproxy configuration: flags (`cli`), kube-proxy's config file (`file`),
//! and the fully resolved, validated [`Settings`].
//!
//! Precedence: an explicit flag beats the config file, which beats the
//! kube-proxy defaults. (kube-proxy itself ignores most flags once `--config`
//! is given; kproxy lets explicit flags win so a node can override one value
//! without editing the shared ConfigMap.)
//!
//! Entry point: [`load_settings`], which returns a [`Command`]:
//! `Run`/`Cleanup` carry the settings, `Print` carries `--help`/`--version`
//! text for stdout (exit 0). Errors are one line; `main` prints
//! `kproxy: <error>` and exits 2.

mod duration;
mod error;
mod file;
mod resolve;

use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
/// The least time between two syncs: adaptive unless the operator set one.
pub use kproxy_watch::MinSyncInterval;

pub use error::ConfigError;

use crate::cli::{self, Parsed};

/// What the binary should do.
#[derive(Debug)]
pub enum Command {
    /// Run the proxy.
    Run(Box<Settings>),
    /// `--cleanup`: remove kproxy/kube-proxy rules, then exit.
    Cleanup(Box<Settings>),
    /// `--help` / `--version`: print this to stdout and exit 0.
    Print(String),
    /// `kproxy dump|diff|trace`: a debugging tool with the settings the
    /// proxy would run with.
    Tool(Box<Settings>, cli::ToolCommand),
}

/// Fully resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub mode: ProxyMode,
    /// kproxy's own: which iptables binaries to drive.
    pub iptables_backend: IptablesBackend,
    /// The `--config` file the settings were read from, if any.
    pub config_file: Option<PathBuf>,
    /// `--kubeconfig`, else `clientConnection.kubeconfig`; `None` means
    /// in-cluster configuration.
    pub kubeconfig: Option<PathBuf>,
    /// `--master`: API server URL overriding the kubeconfig's server.
    pub master: Option<String>,
    /// Node name: `--hostname-override`, `hostnameOverride`, `$NODE_NAME`,
    /// else the machine hostname; trimmed and lowercased.
    pub node_name: String,
    /// kube-proxy's "primary node IP" override (`--bind-address`); nothing
    /// binds to it. Default 0.0.0.0 (which means "unset").
    pub bind_address: IpAddr,
    /// `None` = metrics server disabled (`--metrics-bind-address=`).
    pub metrics_bind_address: Option<SocketAddr>,
    /// `None` = health server disabled (`--healthz-bind-address=`).
    pub healthz_bind_address: Option<SocketAddr>,
    /// Pod CIDRs from `--cluster-cidr`/`clusterCIDR`: at most one per family.
    pub cluster_cidrs: Vec<IpNet>,
    pub detect_local_mode: DetectLocalMode,
    /// `detect_local_mode` with its parameters resolved.
    pub detect_local: LocalDetection,
    /// Empty = NodePorts on every local address.
    pub nodeport_addresses: Vec<NodePortAddress>,
    pub iptables: IptablesSettings,
    pub ipvs: IpvsSettings,
    pub conntrack: ConntrackSettings,
    pub log_format: LogFormat,
    /// kube-proxy/klog style verbosity, 0..=10.
    pub verbosity: u8,
    /// Compute and log, apply nothing.
    pub dry_run: bool,
    /// Config fields and flags that were set but that kproxy does not act on
    /// (e.g. `winkernel.networkName`, `--oom-score-adj`); `main` logs them.
    pub ignored_fields: Vec<String>,
    /// Non-fatal observations for the log, e.g. detection disabled because no
    /// cluster CIDR is set (upstream logs the same and carries on).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Iptables,
    Ipvs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IptablesBackend {
    /// Pick whichever backend already holds rules / the system default.
    Auto,
    Legacy,
    Nft,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectLocalMode {
    ClusterCidr,
    NodeCidr,
    BridgeInterface,
    InterfaceNamePrefix,
}

/// How the proxier recognises traffic from local pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalDetection {
    /// ClusterCIDR mode without a cluster CIDR: nothing is treated as local
    /// (upstream's no-op detector).
    None,
    /// Source address in one of these (one per family).
    ClusterCidr(Vec<IpNet>),
    /// Source address in the Node object's `spec.podCIDRs` (known at runtime).
    NodeCidr,
    /// Input interface is this bridge (`-i br0`).
    BridgeInterface(String),
    /// Input interface starts with this prefix (`-i veth+`).
    InterfaceNamePrefix(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodePortAddress {
    Cidr(IpNet),
    /// The Node object's primary IP(s).
    Primary,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesSettings {
    pub sync_period: Duration,
    pub min_sync_period: MinSyncInterval,
    /// 0..=31; the mark is `1 << masquerade_bit`.
    pub masquerade_bit: u8,
    pub masquerade_all: bool,
    pub localhost_nodeports: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsSettings {
    pub scheduler: IpvsScheduler,
    pub sync_period: Duration,
    pub min_sync_period: Duration,
    pub strict_arp: bool,
    pub exclude_cidrs: Vec<IpNet>,
    /// `None` = leave the kernel's value as is.
    pub tcp_timeout: Option<Duration>,
    pub tcp_fin_timeout: Option<Duration>,
    pub udp_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConntrackSettings {
    /// 0 = leave nf_conntrack_max as is (and ignore `min`).
    pub max_per_core: u32,
    pub min: u32,
    /// `None` = leave the sysctl as is.
    pub tcp_established_timeout: Option<Duration>,
    pub tcp_close_wait_timeout: Option<Duration>,
    pub udp_timeout: Option<Duration>,
    pub udp_stream_timeout: Option<Duration>,
    pub tcp_be_liberal: bool,
}

/// IPVS schedulers kube-proxy accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpvsScheduler {
    Rr,
    Wrr,
    Lc,
    Wlc,
    Lblc,
    Lblcr,
    Sh,
    Dh,
    Sed,
    Nq,
    Mh,
}

impl IpvsScheduler {
    pub const ALL: [IpvsScheduler; 11] = [
        Self::Rr,
        Self::Wrr,
        Self::Lc,
        Self::Wlc,
        Self::Lblc,
        Self::Lblcr,
        Self::Sh,
        Self::Dh,
        Self::Sed,
        Self::Nq,
        Self::Mh,
    ];

    /// The kernel's scheduler name (IPVS_SVC_ATTR_SCHED_NAME).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rr => "rr",
            Self::Wrr => "wrr",
            Self::Lc => "lc",
            Self::Wlc => "wlc",
            Self::Lblc => "lblc",
            Self::Lblcr => "lblcr",
            Self::Sh => "sh",
            Self::Dh => "dh",
            Self::Sed => "sed",
            Self::Nq => "nq",
            Self::Mh => "mh",
        }
    }
}

impl fmt::Display for IpvsScheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Settings {
    /// Sync periods of the selected mode: (sync, min sync).
    pub fn sync_periods(&self) -> (Duration, MinSyncInterval) {
        match self.mode {
            ProxyMode::Iptables => (self.iptables.sync_period, self.iptables.min_sync_period),
            // IPVS keeps upstream's default of 0 (sync on every change):
            // nothing to shorten there.
            ProxyMode::Ipvs => (
                self.ipvs.sync_period,
                MinSyncInterval::Fixed(self.ipvs.min_sync_period),
            ),
        }
    }
}

/// Parse argv (first item = program name) plus the `--config` file into a
/// [`Command`], reading `$NODE_NAME` and the machine hostname as needed.
pub fn load_settings<I, T>(args: I) -> Result<Command, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    load_settings_with(args, &resolve::SystemEnv)
}

/// [`load_settings`] with an injectable environment (tests).
fn load_settings_with<I, T>(args: I, env: &dyn resolve::Env) -> Result<Command, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match cli::parse(args)? {
        Parsed::Print(text) => return Ok(Command::Print(text)),
        Parsed::Flags(cli) => cli,
    };
    let config_path = cli
        .config
        .as_deref()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    let file = match &config_path {
        Some(p) => Some(file::load(p)?),
        None => None,
    };
    let cleanup = resolve::flag_bool(&cli.cleanup, "cleanup")?.unwrap_or(false);
    let settings = resolve::resolve(&cli, config_path, file.as_ref(), env)?;
    if let Some(tool) = cli.tool.clone() {
        if cleanup {
            return Err(ConfigError::Usage(
                "--cleanup cannot be combined with a subcommand (see --help)".to_string(),
            ));
        }
        return Ok(Command::Tool(Box::new(settings), tool));
    }
    Ok(if cleanup {
        Command::Cleanup(Box::new(settings))
    } else {
        Command::Run(Box::new(settings))
    })
}

#[cfg(test)]
mod tests;
