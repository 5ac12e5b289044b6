//! Command-line syntax (clap derive).
//!
//! Flags are kube-proxy's names. Values are kept as raw strings here and are
//! parsed in `config::resolve`, so flag and config-file values go through the
//! same parsers and every error names the flag and the value in one line.
//! Unlike kube-proxy, which ignores most flags once `--config` is given, an
//! explicit flag always wins over the config file.

use std::ffi::OsString;

use clap::error::ErrorKind;
use clap::Parser;

use crate::config::ConfigError;

// Boolean flags behave like Go's pflag: `--flag` means true and
// `--flag=false` turns it off (a separate `false` argument is not consumed),
// hence `num_args = 0..=1, require_equals, default_missing_value = "true"`.
#[derive(Debug, Default, Parser)]
#[command(
    name = "kproxy",
    version,
    about = "kproxy: a drop-in replacement for kube-proxy",
    args_override_self = true
)]
pub struct Cli {
    /// Proxy mode: iptables (default) or ipvs.
    #[arg(global = true, long, visible_alias = "proxy-mode", value_name = "MODE")]
    pub mode: Option<String>,

    /// Path to a KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) file.
    #[arg(global = true, long, value_name = "FILE")]
    pub config: Option<String>,

    /// Path to a kubeconfig file with authorization information.
    #[arg(global = true, long, value_name = "FILE")]
    pub kubeconfig: Option<String>,

    /// Address of the Kubernetes API server (overrides the kubeconfig's server).
    #[arg(global = true, long, value_name = "URL")]
    pub master: Option<String>,

    /// Node name to use instead of $NODE_NAME or the machine hostname.
    #[arg(global = true, long, value_name = "NAME")]
    pub hostname_override: Option<String>,

    /// Pod CIDR(s), comma-separated, at most one per IP family.
    #[arg(global = true, long, value_name = "CIDRS")]
    pub cluster_cidr: Option<String>,

    /// Local traffic detection: ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix.
    #[arg(global = true, long, value_name = "MODE")]
    pub detect_local_mode: Option<String>,

    /// Bridge interface for --detect-local-mode=BridgeInterface.
    #[arg(global = true, long, value_name = "NAME")]
    pub pod_bridge_interface: Option<String>,

    /// Interface name prefix for --detect-local-mode=InterfaceNamePrefix.
    #[arg(global = true, long, value_name = "PREFIX")]
    pub pod_interface_name_prefix: Option<String>,

    /// Metrics server address, IP[:port] (default 127.0.0.1:10249); empty disables.
    #[arg(global = true, long, value_name = "IP:PORT")]
    pub metrics_bind_address: Option<String>,

    /// Health check server address, IP[:port] (default 0.0.0.0:10256); empty disables.
    #[arg(global = true, long, value_name = "IP:PORT")]
    pub healthz_bind_address: Option<String>,

    /// The node's primary IP override (no socket is bound to it).
    #[arg(global = true, long, value_name = "IP")]
    pub bind_address: Option<String>,

    /// Maximum interval between full iptables resyncs (default 30s).
    #[arg(global = true, long, value_name = "DURATION")]
    pub iptables_sync_period: Option<String>,

    /// Minimum interval between iptables resyncs (default: adaptive 250ms–1s, twice the last sync's duration; 0 = sync on every change).
    #[arg(global = true, long, value_name = "DURATION")]
    pub iptables_min_sync_period: Option<String>,

    /// fwmark bit used to mark packets for SNAT, 0..=31 (default 14).
    #[arg(global = true, long, value_name = "BIT")]
    pub iptables_masquerade_bit: Option<String>,

    /// SNAT all traffic sent to Service cluster IPs.
    #[arg(global = true, long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub masquerade_all: Option<String>,

    /// Allow NodePorts on 127.0.0.1 (IPv4 iptables mode; default true).
    #[arg(global = true, long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub iptables_localhost_nodeports: Option<String>,

    /// NodePort addresses: comma-separated CIDRs, or "primary" (default: all local IPs).
    #[arg(global = true, long, value_name = "CIDRS", action = clap::ArgAction::Append)]
    pub nodeport_addresses: Vec<String>,

    /// IPVS scheduler: rr wrr lc wlc lblc lblcr sh dh sed nq mh (default rr).
    #[arg(global = true, long, value_name = "NAME")]
    pub ipvs_scheduler: Option<String>,

    /// Maximum interval between full IPVS resyncs (default 30s).
    #[arg(global = true, long, value_name = "DURATION")]
    pub ipvs_sync_period: Option<String>,

    /// Minimum interval between IPVS resyncs (default 0s = sync on every change).
    #[arg(global = true, long, value_name = "DURATION")]
    pub ipvs_min_sync_period: Option<String>,

    /// Set arp_ignore=1 and arp_announce=2 for kube-ipvs0.
    #[arg(global = true, long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ipvs_strict_arp: Option<String>,

    /// CIDRs whose IPVS services kproxy must not touch during cleanup (comma-separated).
    #[arg(global = true, long, value_name = "CIDRS", action = clap::ArgAction::Append)]
    pub ipvs_exclude_cidrs: Vec<String>,

    /// IPVS idle TCP session timeout (0 = leave as is).
    #[arg(global = true, long, value_name = "DURATION")]
    pub ipvs_tcp_timeout: Option<String>,

    /// IPVS TCP timeout after FIN (0 = leave as is).
    #[arg(global = true, long, value_name = "DURATION")]
    pub ipvs_tcpfin_timeout: Option<String>,

    /// IPVS UDP timeout (0 = leave as is).
    #[arg(global = true, long, value_name = "DURATION")]
    pub ipvs_udp_timeout: Option<String>,

    /// Conntrack entries per CPU core (default 32768; 0 = leave the limit as is).
    #[arg(global = true, long, value_name = "N")]
    pub conntrack_max_per_core: Option<String>,

    /// Minimum conntrack table size (default 131072).
    #[arg(global = true, long, value_name = "N")]
    pub conntrack_min: Option<String>,

    /// Idle timeout for established TCP connections (default 24h; 0 = leave as is).
    #[arg(global = true, long, value_name = "DURATION")]
    pub conntrack_tcp_timeout_established: Option<String>,

    /// Timeout for TCP connections in CLOSE_WAIT (default 1h; 0 = leave as is).
    #[arg(global = true, long, value_name = "DURATION")]
    pub conntrack_tcp_timeout_close_wait: Option<String>,

    /// Set nf_conntrack_tcp_be_liberal=1.
    #[arg(global = true, long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub conntrack_tcp_be_liberal: Option<String>,

    /// Idle timeout for UNREPLIED UDP flows (0 = leave as is).
    #[arg(global = true, long, value_name = "DURATION")]
    pub conntrack_udp_timeout: Option<String>,

    /// Idle timeout for ASSURED UDP flows (0 = leave as is).
    #[arg(global = true, long, value_name = "DURATION")]
    pub conntrack_udp_timeout_stream: Option<String>,

    /// Log format: text (default) or json.
    #[arg(
        global = true,
        long,
        visible_alias = "logging-format",
        value_name = "FORMAT"
    )]
    pub log_format: Option<String>,

    /// Log verbosity, 0..=10 (kube-proxy style: -v=2, --v=4).
    #[arg(global = true, short = 'v', long = "v", value_name = "N")]
    pub verbosity: Option<String>,

    /// Compute and log the rules, but apply nothing.
    #[arg(global = true, long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub dry_run: Option<String>,

    /// Remove kproxy/kube-proxy rules and exit.
    #[arg(global = true, long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub cleanup: Option<String>,

    /// iptables binaries: auto (detect), legacy or nft.
    #[arg(global = true, long, value_name = "BACKEND")]
    pub iptables_backend: Option<String>,

    // kube-proxy flags accepted so existing manifests keep working; kproxy
    // does not act on them and reports them in `Settings::ignored_fields`.
    #[arg(global = true, long, hide = true)]
    pub oom_score_adj: Option<String>,
    #[arg(global = true, long, hide = true)]
    pub feature_gates: Option<String>,
    #[arg(global = true, long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub profiling: Option<String>,
    #[arg(global = true, long, hide = true)]
    pub config_sync_period: Option<String>,
    #[arg(global = true, long, hide = true)]
    pub kube_api_qps: Option<String>,
    #[arg(global = true, long, hide = true)]
    pub kube_api_burst: Option<String>,
    #[arg(global = true, long, hide = true)]
    pub kube_api_content_type: Option<String>,
    #[arg(global = true, long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub bind_address_hard_fail: Option<String>,
    #[arg(global = true, long, hide = true)]
    pub show_hidden_metrics_for_version: Option<String>,
    // kube-proxy's logging flags (component-base) other than -v and
    // --logging-format, and klog's --logtostderr/--alsologtostderr from
    // older manifests: kproxy always logs to stderr.
    #[arg(global = true, long, hide = true)]
    pub vmodule: Option<String>,
    #[arg(global = true, long, hide = true)]
    pub log_flush_frequency: Option<String>,
    #[arg(global = true, long, hide = true)]
    pub log_json_info_buffer_size: Option<String>,
    #[arg(global = true, long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub log_json_split_stream: Option<String>,
    #[arg(global = true, long, hide = true)]
    pub log_text_info_buffer_size: Option<String>,
    #[arg(global = true, long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub log_text_split_stream: Option<String>,
    #[arg(global = true, long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub logtostderr: Option<String>,
    #[arg(global = true, long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub alsologtostderr: Option<String>,

    /// A debugging tool instead of running the proxy (none: run).
    #[command(subcommand)]
    pub tool: Option<ToolCommand>,
}

/// `kproxy dump|diff|trace`: the operator's debugging tools. Every flag of
/// the proxy is accepted after the subcommand too (they are global), so the
/// tools resolve exactly the settings `kproxy [flags]` would run with.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ToolCommand {
    /// Print the rules kproxy would program for the current cluster state.
    Dump(ToolInput),
    /// Compare the rules kproxy would program with the kernel's (exit 1 when they differ).
    Diff(ToolInput),
    /// Follow a connection's first packet through the planned rules.
    Trace(TraceArgs),
}

/// Where the cluster state comes from and how to print the result.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ToolInput {
    /// Read Services, EndpointSlices and optionally the Node from this
    /// multi-document YAML file instead of listing them from the API server.
    #[arg(long, value_name = "FILE")]
    pub from_file: Option<String>,

    /// Only this IP family: ipv4 or ipv6 (default: both; trace: the destination's).
    #[arg(long, value_name = "FAMILY")]
    pub family: Option<String>,

    /// Output format: text (default) or json.
    #[arg(long, short = 'o', value_name = "FORMAT")]
    pub output: Option<String>,

    /// The node's local addresses, comma-separated (default: read from the
    /// current network namespace). Used for --nodeport-addresses and by trace.
    #[arg(long, value_name = "IPS")]
    pub local_addresses: Option<String>,
}

/// `kproxy trace`: the packet and where it enters.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub input: ToolInput,

    /// The client's address.
    #[arg(long, value_name = "IP")]
    pub src: String,

    /// The destination, e.g. 10.96.0.10:80/TCP or [fd00::10]:53/UDP (protocol defaults to TCP).
    #[arg(long, value_name = "IP:PORT/PROTO")]
    pub dst: String,

    /// The interface the packet arrives on (omit for traffic from the node itself).
    #[arg(long, value_name = "NAME")]
    pub in_interface: Option<String>,
}

impl Cli {
    /// The accepted-but-ignored kube-proxy flags that were given.
    pub fn ignored_flags(&self) -> Vec<String> {
        [
            ("oom-score-adj", &self.oom_score_adj),
            ("feature-gates", &self.feature_gates),
            ("profiling", &self.profiling),
            ("config-sync-period", &self.config_sync_period),
            ("kube-api-qps", &self.kube_api_qps),
            ("kube-api-burst", &self.kube_api_burst),
            ("kube-api-content-type", &self.kube_api_content_type),
            ("bind-address-hard-fail", &self.bind_address_hard_fail),
            (
                "show-hidden-metrics-for-version",
                &self.show_hidden_metrics_for_version,
            ),
            ("vmodule", &self.vmodule),
            ("log-flush-frequency", &self.log_flush_frequency),
            ("log-json-info-buffer-size", &self.log_json_info_buffer_size),
            ("log-json-split-stream", &self.log_json_split_stream),
            ("log-text-info-buffer-size", &self.log_text_info_buffer_size),
            ("log-text-split-stream", &self.log_text_split_stream),
            ("logtostderr", &self.logtostderr),
            ("alsologtostderr", &self.alsologtostderr),
        ]
        .into_iter()
        .filter(|(_, v)| v.is_some())
        .map(|(name, _)| format!("--{name}"))
        .collect()
    }
}

/// Result of parsing the command line.
#[derive(Debug)]
pub enum Parsed {
    Flags(Box<Cli>),
    /// `--help` / `--version` output for stdout; the process exits 0.
    Print(String),
}

/// Parse argv (the first item is the program name, as from `std::env::args_os()`).
pub fn parse<I, T>(args: I) -> Result<Parsed, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    match Cli::try_parse_from(args) {
        Ok(cli) => Ok(Parsed::Flags(Box::new(cli))),
        Err(err) => match err.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                Ok(Parsed::Print(err.render().to_string()))
            }
            _ => Err(ConfigError::Usage(clap_one_line(&err))),
        },
    }
}

/// clap renders errors as several lines (message, tip, usage); keep the first,
/// without its "error: " prefix, so the binary prints one line.
fn clap_one_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let first = rendered
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid arguments");
    let msg = first.trim().strip_prefix("error: ").unwrap_or(first.trim());
    format!("{msg} (see --help)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut argv = vec!["kproxy"];
        argv.extend_from_slice(args);
        match parse(argv) {
            Ok(Parsed::Flags(c)) => *c,
            other => panic!("unexpected parse result: {other:?}"),
        }
    }

    fn usage_err(args: &[&str]) -> String {
        let mut argv = vec!["kproxy"];
        argv.extend_from_slice(args);
        match parse(argv) {
            Err(e) => e.to_string(),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn help_and_version_are_printed() {
        for flag in ["--help", "-h"] {
            match parse(["kproxy", flag]) {
                Ok(Parsed::Print(text)) => {
                    assert!(text.contains("--iptables-sync-period"), "{text}");
                    assert!(text.contains("--proxy-mode"), "alias shown: {text}");
                }
                other => panic!("unexpected: {other:?}"),
            }
        }
        match parse(["kproxy", "--version"]) {
            Ok(Parsed::Print(text)) => assert!(text.contains(env!("CARGO_PKG_VERSION"))),
            other => panic!("unexpected: {other:?}"),
        }
    }

    #[test]
    fn go_style_bools() {
        assert_eq!(
            cli(&["--masquerade-all"]).masquerade_all.as_deref(),
            Some("true")
        );
        assert_eq!(
            cli(&["--masquerade-all=false"]).masquerade_all.as_deref(),
            Some("false")
        );
        assert_eq!(cli(&[]).masquerade_all, None);
        // A following word is not swallowed as the bool's value.
        assert!(usage_err(&["--masquerade-all", "false"]).contains("false"));
    }

    #[test]
    fn verbosity_spellings() {
        for args in [
            &["-v", "3"][..],
            &["-v=3"],
            &["-v3"],
            &["--v=3"],
            &["--v", "3"],
        ] {
            assert_eq!(cli(args).verbosity.as_deref(), Some("3"), "{args:?}");
        }
    }

    #[test]
    fn aliases_and_repeats() {
        assert_eq!(cli(&["--proxy-mode=ipvs"]).mode.as_deref(), Some("ipvs"));
        assert_eq!(
            cli(&["--logging-format=json"]).log_format.as_deref(),
            Some("json")
        );
        // Scalars: last one wins, like pflag.
        assert_eq!(
            cli(&["--mode=ipvs", "--mode", "iptables"]).mode.as_deref(),
            Some("iptables")
        );
        // Slices accumulate, like pflag's StringSlice.
        let c = cli(&[
            "--nodeport-addresses=10.0.0.0/8",
            "--nodeport-addresses=fd00::/8",
        ]);
        assert_eq!(c.nodeport_addresses, ["10.0.0.0/8", "fd00::/8"]);
    }

    #[test]
    fn compat_flags_are_accepted_and_reported() {
        let c = cli(&[
            "--oom-score-adj=-999",
            "--profiling",
            "--feature-gates=A=true",
        ]);
        assert_eq!(
            c.ignored_flags(),
            ["--oom-score-adj", "--feature-gates", "--profiling"]
        );
    }

    #[test]
    fn usage_errors_are_one_line() {
        let msg = usage_err(&["--no-such-flag"]);
        assert!(msg.contains("--no-such-flag"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        let msg = usage_err(&["--kubeconfig"]);
        assert!(msg.contains("--kubeconfig"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
}
