//! Merge flags, config file and defaults into [`Settings`], and validate.
//!
//! Flags are raw strings (see `cli`); config-file values are already typed
//! where serde could do it (durations, bools, ints) and raw where the same
//! parser as the flag is used (CIDRs, addresses, enum names). Every value
//! keeps its origin so errors name the flag or the field that set it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use super::duration::{format_go_duration, parse_go_duration};
use super::file::{GoDuration, KubeProxyConfiguration};
use super::{
    ConfigError, ConntrackSettings, DetectLocalMode, IptablesBackend, IptablesSettings,
    IpvsScheduler, IpvsSettings, LocalDetection, LogFormat, MinSyncInterval, NodePortAddress,
    ProxyMode, Settings,
};
use crate::cli::Cli;

// kube-proxy defaults (pkg/proxy/apis/config/v1alpha1/defaults.go).
const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);
const DEFAULT_IPTABLES_MIN_SYNC_PERIOD: Duration = Duration::from_secs(1);
const DEFAULT_MASQUERADE_BIT: u8 = 14;
const DEFAULT_CONNTRACK_MAX_PER_CORE: u32 = 32 * 1024;
const DEFAULT_CONNTRACK_MIN: u32 = 128 * 1024;
const DEFAULT_TCP_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_TCP_CLOSE_WAIT_TIMEOUT: Duration = Duration::from_secs(3600);
const HEALTHZ_PORT: u16 = 10256;
const METRICS_PORT: u16 = 10249;
const MAX_VERBOSITY: u8 = 10;

/// Process environment, injectable for tests.
pub(crate) trait Env {
    fn var(&self, name: &str) -> Option<String>;
    fn hostname(&self) -> Result<String, String>;
}

pub(crate) struct SystemEnv;

impl Env for SystemEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn hostname(&self) -> Result<String, String> {
        // What Go's os.Hostname reads on Linux; avoids unsafe gethostname(2).
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .map_err(|e| format!("reading /proc/sys/kernel/hostname: {e}"))
    }
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone, Copy)]
enum Origin {
    Flag(&'static str),
    File(&'static str),
    Default,
}

impl Origin {
    fn describe(self) -> String {
        match self {
            Origin::Flag(f) => format!("--{f}"),
            Origin::File(f) => f.to_string(),
            Origin::Default => "default".to_string(),
        }
    }
}

struct Ctx {
    /// Config file path as shown in messages.
    path: String,
}

impl Ctx {
    fn err(&self, origin: Origin, value: &str, reason: impl Into<String>) -> ConfigError {
        let reason = reason.into();
        match origin {
            Origin::Flag(flag) => ConfigError::Flag {
                flag,
                value: value.to_string(),
                reason,
            },
            Origin::File(field) => ConfigError::Field {
                path: self.path.clone(),
                field: field.to_string(),
                reason: format!("invalid value {value:?}: {reason}"),
            },
            // Defaults are valid on their own; only reachable through a bug.
            Origin::Default => ConfigError::Usage(format!("default value {value:?}: {reason}")),
        }
    }
}

/// A raw string from the flag if given (even empty), else from the file if
/// non-empty: kubeadm writes `""` for "default".
fn raw<'a>(
    flag: &'a Option<String>,
    flag_name: &'static str,
    file: Option<&'a str>,
    field: &'static str,
) -> Option<(&'a str, Origin)> {
    match flag {
        Some(v) => Some((v.as_str(), Origin::Flag(flag_name))),
        None => file
            .filter(|v| !v.trim().is_empty())
            .map(|v| (v, Origin::File(field))),
    }
}

fn parse_flag<T>(
    flag: &Option<String>,
    name: &'static str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, ConfigError> {
    flag.as_deref()
        .map(|v| {
            parse(v).map_err(|reason| ConfigError::Flag {
                flag: name,
                value: v.to_string(),
                reason,
            })
        })
        .transpose()
}

/// Go's strconv.ParseBool, which pflag uses for `--flag=value`.
pub(crate) fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err("expected true or false".to_string()),
    }
}

pub(crate) fn flag_bool(
    flag: &Option<String>,
    name: &'static str,
) -> Result<Option<bool>, ConfigError> {
    parse_flag(flag, name, parse_bool)
}

fn parse_duration_flag(s: &str) -> Result<Duration, String> {
    parse_go_duration(s.trim()).map_err(|e| format!("invalid duration: {e}"))
}

fn parse_mode(s: &str) -> Result<ProxyMode, String> {
    match s.trim() {
        "" | "iptables" => Ok(ProxyMode::Iptables),
        "ipvs" => Ok(ProxyMode::Ipvs),
        "nftables" => {
            Err("the nftables proxy mode is not supported by kproxy; use iptables or ipvs".into())
        }
        "kernelspace" => {
            Err("kernelspace is kube-proxy's Windows mode; kproxy supports iptables or ipvs".into())
        }
        "userspace" => {
            Err("the userspace proxy mode was removed from kube-proxy; use iptables or ipvs".into())
        }
        _ => Err("expected iptables or ipvs".into()),
    }
}

fn parse_backend(s: &str) -> Result<IptablesBackend, String> {
    match s.trim() {
        "" | "auto" => Ok(IptablesBackend::Auto),
        "legacy" => Ok(IptablesBackend::Legacy),
        "nft" => Ok(IptablesBackend::Nft),
        _ => Err("expected auto, legacy or nft".into()),
    }
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s.trim() {
        "" | "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected text or json".into()),
    }
}

fn parse_detect_local_mode(s: &str) -> Result<DetectLocalMode, String> {
    // Upstream names are case-sensitive.
    match s.trim() {
        "" | "ClusterCIDR" => Ok(DetectLocalMode::ClusterCidr),
        "NodeCIDR" => Ok(DetectLocalMode::NodeCidr),
        "BridgeInterface" => Ok(DetectLocalMode::BridgeInterface),
        "InterfaceNamePrefix" => Ok(DetectLocalMode::InterfaceNamePrefix),
        _ => Err("expected ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix".into()),
    }
}

fn parse_scheduler(s: &str) -> Result<IpvsScheduler, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(IpvsScheduler::Rr);
    }
    IpvsScheduler::ALL
        .into_iter()
        .find(|sch| sch.as_str() == s)
        .ok_or_else(|| {
            let names: Vec<&str> = IpvsScheduler::ALL.iter().map(|s| s.as_str()).collect();
            format!(
                "unknown IPVS scheduler, expected one of {}",
                names.join(", ")
            )
        })
}

/// One CIDR. Host bits are cleared, as Go's ParseCIDR does.
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let Some((addr, len)) = s.split_once('/') else {
        return Err(format!("{s:?} is not a CIDR (expected e.g. 10.244.0.0/16)"));
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| format!("prefix length {len:?} is out of range 0..={max}"))?;
    IpNet::new(addr, len)
        .map(|n| n.trunc())
        .map_err(|e| e.to_string())
}

fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty())
}

/// `clusterCIDR`: comma-separated, at most one per family.
fn parse_cluster_cidrs(s: &str) -> Result<Vec<IpNet>, String> {
    let cidrs = split_list(s)
        .map(parse_cidr)
        .collect::<Result<Vec<_>, _>>()?;
    let v4 = cidrs.iter().filter(|c| matches!(c, IpNet::V4(_))).count();
    let v6 = cidrs.len() - v4;
    if v4 > 1 || v6 > 1 {
        return Err(
            "at most one CIDR per IP family is allowed (e.g. 10.244.0.0/16,fd00:10:244::/56)"
                .into(),
        );
    }
    Ok(cidrs)
}

fn parse_cidr_list<'a>(items: impl Iterator<Item = &'a str>) -> Result<Vec<IpNet>, String> {
    items.flat_map(split_list).map(parse_cidr).collect()
}

fn parse_nodeport_addresses<'a>(
    items: impl Iterator<Item = &'a str>,
) -> Result<Vec<NodePortAddress>, String> {
    let entries: Vec<&str> = items.flat_map(split_list).collect();
    if entries.contains(&"primary") {
        if entries.len() > 1 {
            return Err("\"primary\" cannot be combined with other entries".into());
        }
        return Ok(vec![NodePortAddress::Primary]);
    }
    entries
        .into_iter()
        .map(|e| parse_cidr(e).map(NodePortAddress::Cidr))
        .collect()
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| "not an IP address".to_string())
}

/// `IP:port`, `[v6]:port`, or a bare IP that gets `default_port` (upstream's
/// AppendPortIfNeeded).
fn parse_bind_address(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| format!("expected IP:port or IP (e.g. 0.0.0.0:{default_port})"))
}

fn parse_verbosity(s: &str) -> Result<u8, String> {
    s.trim()
        .parse::<u8>()
        .ok()
        .filter(|v| *v <= MAX_VERBOSITY)
        .ok_or_else(|| format!("expected an integer from 0 to {MAX_VERBOSITY}"))
}

fn parse_masquerade_bit(s: &str) -> Result<u8, String> {
    s.trim()
        .parse::<i64>()
        .ok()
        .and_then(|v| u8::try_from(v).ok())
        .filter(|v| *v <= 31)
        .ok_or_else(|| "must be an integer from 0 to 31".to_string())
}

fn parse_count(s: &str) -> Result<u32, String> {
    let v: i64 = s.trim().parse().map_err(|_| "not an integer".to_string())?;
    if v < 0 {
        return Err("must not be negative".into());
    }
    // Upstream fields are int32.
    u32::try_from(v)
        .ok()
        .filter(|v| *v <= i32::MAX as u32)
        .ok_or_else(|| "too large".to_string())
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

fn file_dur(d: Option<GoDuration>) -> Option<Duration> {
    d.map(|d| d.0)
}

/// A sync period pair with origins, validated like upstream:
/// syncPeriod > 0 and minSyncPeriod <= syncPeriod.
fn sync_pair(
    ctx: &Ctx,
    sync: (Duration, Origin),
    min: (Duration, Origin),
) -> Result<(Duration, Duration), ConfigError> {
    let (sync_v, sync_o) = sync;
    let (min_v, min_o) = min;
    if sync_v.is_zero() {
        return Err(ctx.err(
            sync_o,
            &format_go_duration(sync_v),
            "must be greater than 0",
        ));
    }
    if min_v > sync_v {
        // Blame whichever value the user actually set.
        let (blame_o, blame_v, other_o, other_v, rel) = if matches!(min_o, Origin::Default) {
            (
                sync_o,
                sync_v,
                min_o,
                min_v,
                "must not be less than the minimum sync period",
            )
        } else {
            (
                min_o,
                min_v,
                sync_o,
                sync_v,
                "must not exceed the sync period",
            )
        };
        return Err(ctx.err(
            blame_o,
            &format_go_duration(blame_v),
            format!(
                "{rel} {} ({})",
                format_go_duration(other_v),
                other_o.describe()
            ),
        ));
    }
    Ok((sync_v, min_v))
}

/// Flag, else file (where `file_zero_is_default` treats 0 as unset, as
/// upstream defaulting does), else default.
fn pick_duration(
    flag: &Option<String>,
    flag_name: &'static str,
    file: Option<Duration>,
    field: &'static str,
    file_zero_is_default: bool,
    default: Duration,
) -> Result<(Duration, Origin), ConfigError> {
    if let Some(v) = parse_flag(flag, flag_name, parse_duration_flag)? {
        return Ok((v, Origin::Flag(flag_name)));
    }
    match file {
        Some(d) if !(file_zero_is_default && d.is_zero()) => Ok((d, Origin::File(field))),
        _ => Ok((default, Origin::Default)),
    }
}

/// Optional timeouts where 0 means "leave the kernel value as is".
/// `file_default` applies when the file has the field null/absent.
fn pick_timeout(
    flag: &Option<String>,
    flag_name: &'static str,
    file: Option<Option<Duration>>,
    file_default: Option<Duration>,
) -> Result<Option<Duration>, ConfigError> {
    if let Some(v) = parse_flag(flag, flag_name, parse_duration_flag)? {
        return Ok(nonzero(v));
    }
    Ok(match file {
        Some(Some(d)) => nonzero(d),
        _ => file_default,
    })
}

pub(crate) fn resolve(
    cli: &Cli,
    config_file: Option<PathBuf>,
    file: Option<&KubeProxyConfiguration>,
    env: &dyn Env,
) -> Result<Settings, ConfigError> {
    let empty = KubeProxyConfiguration::default();
    let f = file.unwrap_or(&empty);
    let ctx = Ctx {
        path: config_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    };
    let ipt = f.iptables.as_ref();
    let ipvs = f.ipvs.as_ref();
    let ct = f.conntrack.as_ref();
    let log = f.logging.as_ref();

    // Mode and backend.
    let mode = raw(&cli.mode, "mode", f.mode.as_deref(), "mode")
        .map(|(v, o)| parse_mode(v).map_err(|r| ctx.err(o, v, r)))
        .transpose()?
        .unwrap_or(ProxyMode::Iptables);
    let iptables_backend = parse_flag(&cli.iptables_backend, "iptables-backend", parse_backend)?
        .unwrap_or(IptablesBackend::Auto);

    // API server access.
    let kubeconfig = raw(
        &cli.kubeconfig,
        "kubeconfig",
        f.client_connection
            .as_ref()
            .and_then(|c| c.kubeconfig.as_deref()),
        "clientConnection.kubeconfig",
    )
    .map(|(v, _)| v.trim())
    .filter(|v| !v.is_empty())
    .map(PathBuf::from);
    let master = cli
        .master
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_string);

    let node_name = node_name(cli, f, env)?;

    // Addresses. The bind address family picks the server defaults.
    let bind_address = parse_raw_ip(
        &ctx,
        raw(
            &cli.bind_address,
            "bind-address",
            f.bind_address.as_deref(),
            "bindAddress",
        ),
    )?
    .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let (healthz_default, metrics_default) = if bind_address.is_ipv4() {
        (
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        )
    } else {
        (
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        )
    };
    let healthz_bind_address = server_address(
        &ctx,
        raw(
            &cli.healthz_bind_address,
            "healthz-bind-address",
            f.healthz_bind_address.as_deref(),
            "healthzBindAddress",
        ),
        SocketAddr::new(healthz_default, HEALTHZ_PORT),
    )?;
    let metrics_bind_address = server_address(
        &ctx,
        raw(
            &cli.metrics_bind_address,
            "metrics-bind-address",
            f.metrics_bind_address.as_deref(),
            "metricsBindAddress",
        ),
        SocketAddr::new(metrics_default, METRICS_PORT),
    )?;

    // Local traffic detection.
    let cluster_cidrs = parse_raw(
        &ctx,
        raw(
            &cli.cluster_cidr,
            "cluster-cidr",
            f.cluster_cidr.as_deref(),
            "clusterCIDR",
        ),
        parse_cluster_cidrs,
    )?
    .unwrap_or_default();
    let mode_raw = raw(
        &cli.detect_local_mode,
        "detect-local-mode",
        f.detect_local_mode.as_deref(),
        "detectLocalMode",
    );
    let detect_local_mode =
        parse_raw(&ctx, mode_raw, parse_detect_local_mode)?.unwrap_or(DetectLocalMode::ClusterCidr);
    let dl = f.detect_local.as_ref();
    let bridge = raw(
        &cli.pod_bridge_interface,
        "pod-bridge-interface",
        dl.and_then(|d| d.bridge_interface.as_deref()),
        "detectLocal.bridgeInterface",
    )
    .map(|(v, _)| v.trim().to_string())
    .filter(|v| !v.is_empty());
    let prefix = raw(
        &cli.pod_interface_name_prefix,
        "pod-interface-name-prefix",
        dl.and_then(|d| d.interface_name_prefix.as_deref()),
        "detectLocal.interfaceNamePrefix",
    )
    .map(|(v, _)| v.trim().to_string())
    .filter(|v| !v.is_empty());
    let mut warnings = Vec::new();
    let requires = |what: &str| {
        let (v, o) = mode_raw.unwrap_or(("", Origin::Default));
        ctx.err(o, v, format!("requires {what}"))
    };
    let detect_local = match detect_local_mode {
        DetectLocalMode::ClusterCidr if cluster_cidrs.is_empty() => {
            warnings.push(
                "detect-local-mode is ClusterCIDR but no cluster CIDR is set (--cluster-cidr / clusterCIDR): no traffic is treated as pod-local"
                    .to_string(),
            );
            LocalDetection::None
        }
        DetectLocalMode::ClusterCidr => LocalDetection::ClusterCidr(cluster_cidrs.clone()),
        DetectLocalMode::NodeCidr => LocalDetection::NodeCidr,
        DetectLocalMode::BridgeInterface => LocalDetection::BridgeInterface(
            bridge
                .ok_or_else(|| requires("--pod-bridge-interface (detectLocal.bridgeInterface)"))?,
        ),
        DetectLocalMode::InterfaceNamePrefix => {
            LocalDetection::InterfaceNamePrefix(prefix.ok_or_else(|| {
                requires("--pod-interface-name-prefix (detectLocal.interfaceNamePrefix)")
            })?)
        }
    };

    // NodePort addresses: flag slice, else file list, else all addresses.
    let nodeport_addresses = if !cli.nodeport_addresses.is_empty() {
        let joined = cli.nodeport_addresses.join(",");
        parse_nodeport_addresses(cli.nodeport_addresses.iter().map(String::as_str))
            .map_err(|r| ctx.err(Origin::Flag("nodeport-addresses"), &joined, r))?
    } else if let Some(list) = &f.node_port_addresses {
        parse_nodeport_addresses(list.iter().map(String::as_str))
            .map_err(|r| ctx.err(Origin::File("nodePortAddresses"), &list.join(","), r))?
    } else {
        Vec::new()
    };

    // iptables.
    let sync = pick_duration(
        &cli.iptables_sync_period,
        "iptables-sync-period",
        file_dur(ipt.and_then(|i| i.sync_period)),
        "iptables.syncPeriod",
        true,
        DEFAULT_SYNC_PERIOD,
    )?;
    let min = pick_duration(
        &cli.iptables_min_sync_period,
        "iptables-min-sync-period",
        file_dur(ipt.and_then(|i| i.min_sync_period)),
        "iptables.minSyncPeriod",
        true,
        DEFAULT_IPTABLES_MIN_SYNC_PERIOD,
    )?;
    // Validated against the 1 s default as before; unset means adaptive,
    // whose ceiling that default is.
    let (sync_period, min_value) = sync_pair(&ctx, sync, min)?;
    let min_sync_period = match min.1 {
        Origin::Default => MinSyncInterval::Adaptive,
        Origin::Flag(_) | Origin::File(_) => MinSyncInterval::Fixed(min_value),
    };
    let masquerade_bit = match parse_flag(
        &cli.iptables_masquerade_bit,
        "iptables-masquerade-bit",
        parse_masquerade_bit,
    )? {
        Some(b) => b,
        None => match ipt.and_then(|i| i.masquerade_bit) {
            Some(b) => parse_masquerade_bit(&b.to_string())
                .map_err(|r| ctx.err(Origin::File("iptables.masqueradeBit"), &b.to_string(), r))?,
            None => DEFAULT_MASQUERADE_BIT,
        },
    };
    let iptables = IptablesSettings {
        sync_period,
        min_sync_period,
        masquerade_bit,
        masquerade_all: flag_bool(&cli.masquerade_all, "masquerade-all")?
            .or(ipt.and_then(|i| i.masquerade_all))
            .unwrap_or(false),
        localhost_nodeports: flag_bool(
            &cli.iptables_localhost_nodeports,
            "iptables-localhost-nodeports",
        )?
        .or(ipt.and_then(|i| i.localhost_node_ports))
        .unwrap_or(true),
    };

    // IPVS. Upstream has no minSyncPeriod default for IPVS: 0 = sync on every change.
    let sync = pick_duration(
        &cli.ipvs_sync_period,
        "ipvs-sync-period",
        file_dur(ipvs.and_then(|i| i.sync_period)),
        "ipvs.syncPeriod",
        true,
        DEFAULT_SYNC_PERIOD,
    )?;
    let min = pick_duration(
        &cli.ipvs_min_sync_period,
        "ipvs-min-sync-period",
        file_dur(ipvs.and_then(|i| i.min_sync_period)),
        "ipvs.minSyncPeriod",
        false,
        Duration::ZERO,
    )?;
    let (ipvs_sync, ipvs_min) = sync_pair(&ctx, sync, min)?;
    let scheduler = parse_raw(
        &ctx,
        raw(
            &cli.ipvs_scheduler,
            "ipvs-scheduler",
            ipvs.and_then(|i| i.scheduler.as_deref()),
            "ipvs.scheduler",
        ),
        parse_scheduler,
    )?
    .unwrap_or(IpvsScheduler::Rr);
    let exclude_cidrs = if !cli.ipvs_exclude_cidrs.is_empty() {
        parse_cidr_list(cli.ipvs_exclude_cidrs.iter().map(String::as_str)).map_err(|r| {
            ctx.err(
                Origin::Flag("ipvs-exclude-cidrs"),
                &cli.ipvs_exclude_cidrs.join(","),
                r,
            )
        })?
    } else if let Some(list) = ipvs.and_then(|i| i.exclude_cidrs.as_ref()) {
        parse_cidr_list(list.iter().map(String::as_str))
            .map_err(|r| ctx.err(Origin::File("ipvs.excludeCIDRs"), &list.join(","), r))?
    } else {
        Vec::new()
    };
    let ipvs_settings = IpvsSettings {
        scheduler,
        sync_period: ipvs_sync,
        min_sync_period: ipvs_min,
        strict_arp: flag_bool(&cli.ipvs_strict_arp, "ipvs-strict-arp")?
            .or(ipvs.and_then(|i| i.strict_arp))
            .unwrap_or(false),
        exclude_cidrs,
        tcp_timeout: pick_timeout(
            &cli.ipvs_tcp_timeout,
            "ipvs-tcp-timeout",
            ipvs.map(|i| file_dur(i.tcp_timeout)),
            None,
        )?,
        tcp_fin_timeout: pick_timeout(
            &cli.ipvs_tcpfin_timeout,
            "ipvs-tcpfin-timeout",
            ipvs.map(|i| file_dur(i.tcp_fin_timeout)),
            None,
        )?,
        udp_timeout: pick_timeout(
            &cli.ipvs_udp_timeout,
            "ipvs-udp-timeout",
            ipvs.map(|i| file_dur(i.udp_timeout)),
            None,
        )?,
    };

    // conntrack. null/absent means the upstream default; an explicit 0 means
    // "leave the kernel value as is".
    let count = |flag: &Option<String>,
                 name: &'static str,
                 file: Option<i32>,
                 field: &'static str,
                 default: u32|
     -> Result<u32, ConfigError> {
        if let Some(v) = parse_flag(flag, name, parse_count)? {
            return Ok(v);
        }
        match file {
            Some(v) => parse_count(&v.to_string())
                .map_err(|r| ctx.err(Origin::File(field), &v.to_string(), r)),
            None => Ok(default),
        }
    };
    let conntrack = ConntrackSettings {
        max_per_core: count(
            &cli.conntrack_max_per_core,
            "conntrack-max-per-core",
            ct.and_then(|c| c.max_per_core),
            "conntrack.maxPerCore",
            DEFAULT_CONNTRACK_MAX_PER_CORE,
        )?,
        min: count(
            &cli.conntrack_min,
            "conntrack-min",
            ct.and_then(|c| c.min),
            "conntrack.min",
            DEFAULT_CONNTRACK_MIN,
        )?,
        tcp_established_timeout: pick_timeout(
            &cli.conntrack_tcp_timeout_established,
            "conntrack-tcp-timeout-established",
            ct.map(|c| file_dur(c.tcp_established_timeout)),
            Some(DEFAULT_TCP_ESTABLISHED_TIMEOUT),
        )?,
        tcp_close_wait_timeout: pick_timeout(
            &cli.conntrack_tcp_timeout_close_wait,
            "conntrack-tcp-timeout-close-wait",
            ct.map(|c| file_dur(c.tcp_close_wait_timeout)),
            Some(DEFAULT_TCP_CLOSE_WAIT_TIMEOUT),
        )?,
        udp_timeout: pick_timeout(
            &cli.conntrack_udp_timeout,
            "conntrack-udp-timeout",
            ct.map(|c| file_dur(c.udp_timeout)),
            None,
        )?,
        udp_stream_timeout: pick_timeout(
            &cli.conntrack_udp_timeout_stream,
            "conntrack-udp-timeout-stream",
            ct.map(|c| file_dur(c.udp_stream_timeout)),
            None,
        )?,
        tcp_be_liberal: flag_bool(&cli.conntrack_tcp_be_liberal, "conntrack-tcp-be-liberal")?
            .or(ct.and_then(|c| c.tcp_be_liberal))
            .unwrap_or(false),
    };

    // Logging.
    let log_format = parse_raw(
        &ctx,
        raw(
            &cli.log_format,
            "log-format",
            log.and_then(|l| l.format.as_deref()),
            "logging.format",
        ),
        parse_log_format,
    )?
    .unwrap_or(LogFormat::Text);
    let verbosity = match parse_flag(&cli.verbosity, "v", parse_verbosity)? {
        Some(v) => v,
        None => match log.and_then(|l| l.verbosity) {
            Some(v) => parse_verbosity(&v.to_string())
                .map_err(|r| ctx.err(Origin::File("logging.verbosity"), &v.to_string(), r))?,
            None => 0,
        },
    };

    // Ignored, but upstream validates the range; a bad value is a typo worth reporting.
    if let Some(adj) = f.oom_score_adj {
        if !(-1000..=1000).contains(&adj) {
            return Err(ctx.err(
                Origin::File("oomScoreAdj"),
                &adj.to_string(),
                "must be within -1000..=1000",
            ));
        }
    }

    let mut ignored_fields = f.ignored_fields();
    ignored_fields.extend(cli.ignored_flags());

    Ok(Settings {
        mode,
        iptables_backend,
        config_file,
        kubeconfig,
        master,
        node_name,
        bind_address,
        metrics_bind_address,
        healthz_bind_address,
        cluster_cidrs,
        detect_local_mode,
        detect_local,
        nodeport_addresses,
        iptables,
        ipvs: ipvs_settings,
        conntrack,
        log_format,
        verbosity,
        dry_run: flag_bool(&cli.dry_run, "dry-run")?.unwrap_or(false),
        ignored_fields,
        warnings,
    })
}

fn parse_raw<T>(
    ctx: &Ctx,
    r: Option<(&str, Origin)>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, ConfigError> {
    r.map(|(v, o)| parse(v).map_err(|reason| ctx.err(o, v, reason)))
        .transpose()
}

fn parse_raw_ip(ctx: &Ctx, r: Option<(&str, Origin)>) -> Result<Option<IpAddr>, ConfigError> {
    match r {
        // An explicit empty flag means "unset", like kube-proxy's IPVar.
        Some((v, _)) if v.trim().is_empty() => Ok(None),
        Some((v, o)) => parse_ip(v).map(Some).map_err(|r| ctx.err(o, v, r)),
        None => Ok(None),
    }
}

/// A server address: an explicit empty flag disables the server; an empty
/// file value means the default (kubeadm writes `""`).
fn server_address(
    ctx: &Ctx,
    r: Option<(&str, Origin)>,
    default: SocketAddr,
) -> Result<Option<SocketAddr>, ConfigError> {
    match r {
        None => Ok(Some(default)),
        Some((v, _)) if v.trim().is_empty() => Ok(None),
        Some((v, o)) => parse_bind_address(v, default.port())
            .map(Some)
            .map_err(|r| ctx.err(o, v, r)),
    }
}

/// `--hostname-override`, else `hostnameOverride`, else `$NODE_NAME`, else the
/// machine hostname; trimmed and lowercased like upstream's GetHostname.
fn node_name(cli: &Cli, f: &KubeProxyConfiguration, env: &dyn Env) -> Result<String, ConfigError> {
    if let Some(v) = &cli.hostname_override {
        let name = v.trim();
        if name.is_empty() {
            return Err(ConfigError::Flag {
                flag: "hostname-override",
                value: v.clone(),
                reason: "must not be empty".into(),
            });
        }
        return Ok(name.to_lowercase());
    }
    let from_file = f
        .hostname_override
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty());
    if let Some(name) = from_file {
        return Ok(name.to_lowercase());
    }
    if let Some(name) = env
        .var("NODE_NAME")
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
    {
        return Ok(name.to_lowercase());
    }
    let host = env.hostname().map_err(ConfigError::NodeName)?;
    let host = host.trim();
    if host.is_empty() {
        return Err(ConfigError::NodeName(
            "the machine hostname is empty; set --hostname-override or NODE_NAME".into(),
        ));
    }
    Ok(host.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing() {
        assert_eq!(
            parse_cidr("10.244.1.7/16"),
            Ok("10.244.0.0/16".parse().unwrap_or_else(|_| unreachable!()))
        );
        assert!(parse_cidr("10.0.0.0/33").is_err_and(|e| e.contains("out of range 0..=32")));
        assert!(parse_cidr("fd00::/129").is_err_and(|e| e.contains("0..=128")));
        assert!(parse_cidr("10.0.0.0").is_err_and(|e| e.contains("not a CIDR")));
        assert!(parse_cidr("10.0.0.300/8").is_err_and(|e| e.contains("not an IP address")));
        assert!(parse_cidr("10.0.0.0/x").is_err());
    }

    #[test]
    fn cluster_cidrs_one_per_family() {
        assert_eq!(
            parse_cluster_cidrs("10.244.0.0/16, fd00:10:244::/56").map(|v| v.len()),
            Ok(2)
        );
        assert_eq!(parse_cluster_cidrs("").map(|v| v.len()), Ok(0));
        assert!(parse_cluster_cidrs("10.0.0.0/8,192.168.0.0/16")
            .is_err_and(|e| e.contains("one CIDR per IP family")));
        assert!(parse_cluster_cidrs("fd00::/8,fd01::/16").is_err());
    }

    #[test]
    fn bind_addresses() {
        let p = |s| parse_bind_address(s, 10249);
        assert_eq!(
            p("0.0.0.0:10249"),
            Ok("0.0.0.0:10249".parse().unwrap_or_else(|_| unreachable!()))
        );
        assert_eq!(
            p("0.0.0.0"),
            Ok("0.0.0.0:10249".parse().unwrap_or_else(|_| unreachable!()))
        );
        assert_eq!(
            p("::"),
            Ok("[::]:10249".parse().unwrap_or_else(|_| unreachable!()))
        );
        assert_eq!(
            p("[::1]"),
            Ok("[::1]:10249".parse().unwrap_or_else(|_| unreachable!()))
        );
        assert_eq!(
            p("[::1]:9000"),
            Ok("[::1]:9000".parse().unwrap_or_else(|_| unreachable!()))
        );
        assert!(p("localhost:10249").is_err());
        assert!(p("1.2.3.4:99999").is_err());
    }

    #[test]
    fn go_bools() {
        for t in ["1", "t", "T", "true", "TRUE", "True"] {
            assert_eq!(parse_bool(t), Ok(true));
        }
        for f in ["0", "f", "F", "false", "FALSE", "False"] {
            assert_eq!(parse_bool(f), Ok(false));
        }
        assert!(parse_bool("yes").is_err());
    }

    #[test]
    fn nodeport_address_lists() {
        assert_eq!(
            parse_nodeport_addresses(["primary"].into_iter()),
            Ok(vec![NodePortAddress::Primary])
        );
        assert!(parse_nodeport_addresses(["primary", "10.0.0.0/8"].into_iter()).is_err());
        assert_eq!(
            parse_nodeport_addresses(["10.0.0.0/8,fd00::/8"].into_iter()).map(|v| v.len()),
            Ok(2)
        );
        assert_eq!(parse_nodeport_addresses([""].into_iter()), Ok(vec![]));
    }
}
