//! End-to-end tests of `load_settings`: flags + file + defaults.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use super::resolve::Env;
use super::*;

struct FakeEnv {
    node_name: Option<&'static str>,
    hostname: Result<&'static str, &'static str>,
}

impl Env for FakeEnv {
    fn var(&self, name: &str) -> Option<String> {
        (name == "NODE_NAME")
            .then_some(self.node_name)
            .flatten()
            .map(str::to_string)
    }
    fn hostname(&self) -> Result<String, String> {
        self.hostname.map(str::to_string).map_err(str::to_string)
    }
}

const ENV: FakeEnv = FakeEnv {
    node_name: None,
    hostname: Ok("Worker-1"),
};

fn fixture(name: &str) -> String {
    format!(
        "{}/tests/fixtures/config/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn command(args: &[&str], env: &FakeEnv) -> Result<Command, ConfigError> {
    let mut argv = vec!["kproxy"];
    argv.extend_from_slice(args);
    load_settings_with(argv, env)
}

fn settings(args: &[&str]) -> Settings {
    match command(args, &ENV) {
        Ok(Command::Run(s)) => *s,
        Ok(other) => panic!("expected Run, got {other:?}"),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// The error message, asserted to be a single line.
fn error(args: &[&str]) -> String {
    match command(args, &ENV) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "multi-line error: {msg}");
            msg
        }
    }
}

/// A config file with the standard header plus `body`.
fn config_file(body: &str) -> tempfile::NamedTempFile {
    let mut f = match tempfile::NamedTempFile::new() {
        Ok(f) => f,
        Err(e) => panic!("tempfile: {e}"),
    };
    let text = format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{body}"
    );
    if let Err(e) = f.write_all(text.as_bytes()) {
        panic!("write tempfile: {e}");
    }
    f
}

fn path_arg(f: &tempfile::NamedTempFile) -> String {
    format!("--config={}", f.path().display())
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn defaults() -> Settings {
    Settings {
        mode: ProxyMode::Iptables,
        iptables_backend: IptablesBackend::Auto,
        config_file: None,
        kubeconfig: None,
        master: None,
        node_name: "worker-1".into(),
        bind_address: "0.0.0.0".parse().unwrap_or_else(|_| unreachable!()),
        metrics_bind_address: Some(addr("127.0.0.1:10249")),
        healthz_bind_address: Some(addr("0.0.0.0:10256")),
        cluster_cidrs: vec![],
        detect_local_mode: DetectLocalMode::ClusterCidr,
        detect_local: LocalDetection::None,
        nodeport_addresses: vec![],
        iptables: IptablesSettings {
            sync_period: secs(30),
            min_sync_period: MinSyncInterval::Adaptive,
            masquerade_bit: 14,
            masquerade_all: false,
            localhost_nodeports: true,
        },
        ipvs: IpvsSettings {
            scheduler: IpvsScheduler::Rr,
            sync_period: secs(30),
            min_sync_period: Duration::ZERO,
            strict_arp: false,
            exclude_cidrs: vec![],
            tcp_timeout: None,
            tcp_fin_timeout: None,
            udp_timeout: None,
        },
        conntrack: ConntrackSettings {
            max_per_core: 32768,
            min: 131072,
            tcp_established_timeout: Some(secs(86400)),
            tcp_close_wait_timeout: Some(secs(3600)),
            udp_timeout: None,
            udp_stream_timeout: None,
            tcp_be_liberal: false,
        },
        log_format: LogFormat::Text,
        verbosity: 0,
        dry_run: false,
        ignored_fields: vec![],
        warnings: vec![
            "detect-local-mode is ClusterCIDR but no cluster CIDR is set (--cluster-cidr / clusterCIDR): no traffic is treated as pod-local".into(),
        ],
    }
}

#[test]
fn no_flags_gives_kube_proxy_defaults() {
    assert_eq!(settings(&[]), defaults());
}

#[test]
fn every_flag() {
    let s = settings(&[
        "--proxy-mode=ipvs",
        "--kubeconfig=/k/config",
        "--master=https://10.0.0.1:6443",
        "--hostname-override=Node-7",
        "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56",
        "--detect-local-mode=BridgeInterface",
        "--pod-bridge-interface=cbr0",
        "--pod-interface-name-prefix=veth",
        "--metrics-bind-address=0.0.0.0:10249",
        "--healthz-bind-address=127.0.0.1",
        "--bind-address=10.0.0.9",
        "--iptables-sync-period=1m",
        "--iptables-min-sync-period=0",
        "--iptables-masquerade-bit=15",
        "--masquerade-all",
        "--iptables-localhost-nodeports=false",
        "--nodeport-addresses=10.0.0.0/8,fd00::/8",
        "--ipvs-scheduler=mh",
        "--ipvs-sync-period=20s",
        "--ipvs-min-sync-period=2s",
        "--ipvs-strict-arp",
        "--ipvs-exclude-cidrs=10.96.0.0/12",
        "--ipvs-tcp-timeout=900s",
        "--ipvs-tcpfin-timeout=2m",
        "--ipvs-udp-timeout=300ms",
        "--conntrack-max-per-core=0",
        "--conntrack-min=1000",
        "--conntrack-tcp-timeout-established=2h",
        "--conntrack-tcp-timeout-close-wait=0s",
        "--conntrack-tcp-be-liberal",
        "--conntrack-udp-timeout=30s",
        "--conntrack-udp-timeout-stream=2m",
        "--log-format=json",
        "--v=5",
        "--dry-run",
        "--iptables-backend=nft",
    ]);
    let want = Settings {
        mode: ProxyMode::Ipvs,
        iptables_backend: IptablesBackend::Nft,
        kubeconfig: Some(PathBuf::from("/k/config")),
        master: Some("https://10.0.0.1:6443".into()),
        node_name: "node-7".into(),
        bind_address: "10.0.0.9".parse().unwrap_or_else(|_| unreachable!()),
        metrics_bind_address: Some(addr("0.0.0.0:10249")),
        healthz_bind_address: Some(addr("127.0.0.1:10256")),
        cluster_cidrs: vec![net("10.244.0.0/16"), net("fd00:10:244::/56")],
        detect_local_mode: DetectLocalMode::BridgeInterface,
        detect_local: LocalDetection::BridgeInterface("cbr0".into()),
        nodeport_addresses: vec![
            NodePortAddress::Cidr(net("10.0.0.0/8")),
            NodePortAddress::Cidr(net("fd00::/8")),
        ],
        iptables: IptablesSettings {
            sync_period: secs(60),
            min_sync_period: MinSyncInterval::Fixed(Duration::ZERO),
            masquerade_bit: 15,
            masquerade_all: true,
            localhost_nodeports: false,
        },
        ipvs: IpvsSettings {
            scheduler: IpvsScheduler::Mh,
            sync_period: secs(20),
            min_sync_period: secs(2),
            strict_arp: true,
            exclude_cidrs: vec![net("10.96.0.0/12")],
            tcp_timeout: Some(secs(900)),
            tcp_fin_timeout: Some(secs(120)),
            udp_timeout: Some(Duration::from_millis(300)),
        },
        conntrack: ConntrackSettings {
            max_per_core: 0,
            min: 1000,
            tcp_established_timeout: Some(secs(7200)),
            tcp_close_wait_timeout: None,
            udp_timeout: Some(secs(30)),
            udp_stream_timeout: Some(secs(120)),
            tcp_be_liberal: true,
        },
        log_format: LogFormat::Json,
        verbosity: 5,
        dry_run: true,
        warnings: vec![],
        ..defaults()
    };
    assert_eq!(s, want);
}

#[test]
fn mode_alias_and_short_verbosity() {
    assert_eq!(settings(&["--mode", "ipvs"]).mode, ProxyMode::Ipvs);
    assert_eq!(settings(&["-v=3"]).verbosity, 3);
    assert_eq!(settings(&["-v", "10"]).verbosity, 10);
    assert_eq!(
        settings(&["--logging-format=json"]).log_format,
        LogFormat::Json
    );
}

#[test]
fn detect_local_modes() {
    let s = settings(&["--cluster-cidr=10.244.0.0/16"]);
    assert_eq!(
        s.detect_local,
        LocalDetection::ClusterCidr(vec![net("10.244.0.0/16")])
    );
    assert!(s.warnings.is_empty());
    assert_eq!(
        settings(&["--detect-local-mode=NodeCIDR"]).detect_local,
        LocalDetection::NodeCidr
    );
    assert_eq!(
        settings(&[
            "--detect-local-mode=InterfaceNamePrefix",
            "--pod-interface-name-prefix=veth"
        ])
        .detect_local,
        LocalDetection::InterfaceNamePrefix("veth".into())
    );
    assert_eq!(
        error(&["--detect-local-mode=BridgeInterface"]),
        "invalid value \"BridgeInterface\" for --detect-local-mode: requires --pod-bridge-interface (detectLocal.bridgeInterface)"
    );
    let f = config_file("detectLocalMode: InterfaceNamePrefix\n");
    let msg = error(&[&path_arg(&f)]);
    assert!(
        msg.ends_with(": detectLocalMode: invalid value \"InterfaceNamePrefix\": requires --pod-interface-name-prefix (detectLocal.interfaceNamePrefix)"),
        "{msg}"
    );
}

#[test]
fn server_addresses() {
    let s = settings(&["--healthz-bind-address=", "--metrics-bind-address="]);
    assert_eq!(
        (s.healthz_bind_address, s.metrics_bind_address),
        (None, None)
    );
    let s = settings(&["--metrics-bind-address=[::]:9999"]);
    assert_eq!(s.metrics_bind_address, Some(addr("[::]:9999")));
    // An IPv6 node IP moves both defaults to IPv6, like upstream.
    let s = settings(&["--bind-address=fd00::5"]);
    assert_eq!(s.metrics_bind_address, Some(addr("[::1]:10249")));
    assert_eq!(s.healthz_bind_address, Some(addr("[::]:10256")));
    // In the file, "" means default (kubeadm writes that), not "disabled".
    let f = config_file("healthzBindAddress: \"\"\nmetricsBindAddress: 0.0.0.0\n");
    let s = settings(&[&path_arg(&f)]);
    assert_eq!(s.healthz_bind_address, Some(addr("0.0.0.0:10256")));
    assert_eq!(s.metrics_bind_address, Some(addr("0.0.0.0:10249")));
}

#[test]
fn node_name_resolution_order() {
    let env = FakeEnv {
        node_name: Some(" Node-From-Env "),
        hostname: Ok("host"),
    };
    let run = |args: &[&str], env: &FakeEnv| match command(args, env) {
        Ok(Command::Run(s)) => s.node_name,
        other => panic!("{other:?}"),
    };
    assert_eq!(run(&[], &env), "node-from-env");
    assert_eq!(run(&["--hostname-override=Flag-Name"], &env), "flag-name");
    let f = config_file("hostnameOverride: File-Name\n");
    assert_eq!(run(&[&path_arg(&f)], &env), "file-name");
    assert_eq!(
        run(&[&path_arg(&f), "--hostname-override=flag"], &env),
        "flag"
    );
    assert_eq!(run(&[], &ENV), "worker-1");
    let broken = FakeEnv {
        node_name: None,
        hostname: Err("no hostname"),
    };
    match command(&[], &broken) {
        Err(e) => assert_eq!(e.to_string(), "cannot determine the node name: no hostname"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        error(&["--hostname-override=  "]),
        "invalid value \"  \" for --hostname-override: must not be empty"
    );
}

#[test]
fn cleanup_help_and_version() {
    assert!(matches!(
        command(&["--cleanup"], &ENV),
        Ok(Command::Cleanup(_))
    ));
    assert!(matches!(
        command(&["--cleanup=false"], &ENV),
        Ok(Command::Run(_))
    ));
    assert!(matches!(command(&["--help"], &ENV), Ok(Command::Print(t)) if t.contains("Usage")));
    assert!(matches!(command(&["--version"], &ENV), Ok(Command::Print(t)) if t.contains("kproxy")));
}

#[test]
fn kubeadm_config_parses_to_defaults() {
    let path = fixture("kubeadm.yaml");
    let s = settings(&["--config", &path, "--hostname-override=node-1"]);
    let want = Settings {
        config_file: Some(PathBuf::from(&path)),
        kubeconfig: Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf")),
        node_name: "node-1".into(),
        cluster_cidrs: vec![net("10.244.0.0/16")],
        detect_local: LocalDetection::ClusterCidr(vec![net("10.244.0.0/16")]),
        warnings: vec![],
        ..defaults()
    };
    assert_eq!(s, want);
}

#[test]
fn legacy_kubeadm_config_parses() {
    let path = fixture("legacy.yaml");
    let s = settings(&["--config", &path]);
    assert_eq!(s.mode, ProxyMode::Ipvs);
    assert_eq!(s.ipvs.exclude_cidrs, vec![net("10.103.97.2/32")]);
    assert_eq!(s.metrics_bind_address, Some(addr("0.0.0.0:10249")));
    assert_eq!(s.iptables.sync_period, secs(30));
    assert_eq!(
        s.ignored_fields,
        [
            "clientConnection.contentType",
            "clientConnection.qps",
            "clientConnection.burst",
            "oomScoreAdj",
            "configSyncPeriod",
            "udpIdleTimeout"
        ]
    );
}

#[test]
fn full_config_file() {
    let path = fixture("full.yaml");
    let s = settings(&["--config", &path]);
    let want = Settings {
        mode: ProxyMode::Ipvs,
        config_file: Some(PathBuf::from(&path)),
        kubeconfig: Some(PathBuf::from("/etc/kproxy/kubeconfig")),
        node_name: "node-a.example".into(),
        bind_address: "10.0.0.5".parse().unwrap_or_else(|_| unreachable!()),
        metrics_bind_address: Some(addr("0.0.0.0:10249")),
        healthz_bind_address: Some(addr("10.0.0.5:12345")),
        cluster_cidrs: vec![net("10.244.0.0/16"), net("fd00:10:244::/56")],
        detect_local_mode: DetectLocalMode::InterfaceNamePrefix,
        detect_local: LocalDetection::InterfaceNamePrefix("veth".into()),
        nodeport_addresses: vec![
            NodePortAddress::Cidr(net("192.168.0.0/16")),
            NodePortAddress::Cidr(net("fd00::/8")),
        ],
        iptables: IptablesSettings {
            sync_period: secs(90),
            min_sync_period: MinSyncInterval::Fixed(Duration::from_millis(500)),
            masquerade_bit: 13,
            masquerade_all: true,
            localhost_nodeports: false,
        },
        ipvs: IpvsSettings {
            scheduler: IpvsScheduler::Wlc,
            sync_period: secs(45),
            min_sync_period: secs(2),
            strict_arp: true,
            exclude_cidrs: vec![net("10.96.0.0/12")],
            tcp_timeout: Some(secs(900)),
            tcp_fin_timeout: Some(secs(30)),
            udp_timeout: Some(secs(90)),
        },
        conntrack: ConntrackSettings {
            max_per_core: 0,
            min: 65536,
            tcp_established_timeout: Some(secs(12 * 3600)),
            tcp_close_wait_timeout: None,
            udp_timeout: Some(secs(30)),
            udp_stream_timeout: Some(secs(300)),
            tcp_be_liberal: true,
        },
        log_format: LogFormat::Json,
        verbosity: 4,
        warnings: vec![],
        ..defaults()
    };
    assert_eq!(s, want);
}

#[test]
fn flag_beats_file_beats_default() {
    let f = config_file(
        "mode: ipvs\nclusterCIDR: 10.1.0.0/16\niptables:\n  syncPeriod: 10s\n  masqueradeBit: 12\nconntrack:\n  min: 5\nlogging:\n  verbosity: 2\n",
    );
    let cfg = path_arg(&f);
    let s = settings(&[&cfg]);
    assert_eq!(
        (
            s.mode,
            s.iptables.sync_period,
            s.iptables.masquerade_bit,
            s.conntrack.min,
            s.verbosity
        ),
        (ProxyMode::Ipvs, secs(10), 12, 5, 2)
    );
    assert_eq!(s.cluster_cidrs, vec![net("10.1.0.0/16")]);
    // Untouched by file and flags: defaults.
    assert_eq!(s.iptables.min_sync_period, MinSyncInterval::Adaptive);
    assert_eq!(s.conntrack.max_per_core, 32768);

    let s = settings(&[
        &cfg,
        "--proxy-mode=iptables",
        "--cluster-cidr=10.2.0.0/16",
        "--iptables-sync-period=20s",
        "--iptables-masquerade-bit=11",
        "--conntrack-min=7",
        "-v=6",
    ]);
    assert_eq!(
        (
            s.mode,
            s.iptables.sync_period,
            s.iptables.masquerade_bit,
            s.conntrack.min,
            s.verbosity
        ),
        (ProxyMode::Iptables, secs(20), 11, 7, 6)
    );
    assert_eq!(s.cluster_cidrs, vec![net("10.2.0.0/16")]);
}

#[test]
fn file_zero_durations_mean_default_but_flag_zero_is_literal() {
    let f = config_file("iptables:\n  syncPeriod: 0s\n  minSyncPeriod: 0s\n");
    let s = settings(&[&path_arg(&f)]);
    assert_eq!(
        (s.iptables.sync_period, s.iptables.min_sync_period),
        // A zero in the file is upstream's "unset": the default, adaptive.
        (secs(30), MinSyncInterval::Adaptive)
    );
    let s = settings(&["--iptables-min-sync-period=0s"]);
    assert_eq!(
        s.iptables.min_sync_period,
        MinSyncInterval::Fixed(Duration::ZERO)
    );
    assert_eq!(
        error(&["--iptables-sync-period=0"]),
        "invalid value \"0s\" for --iptables-sync-period: must be greater than 0"
    );
}

#[test]
fn min_sync_period_unset_is_adaptive_set_is_fixed() {
    // Unset anywhere: adaptive, in iptables mode.
    let s = settings(&[]);
    assert_eq!(s.iptables.min_sync_period, MinSyncInterval::Adaptive);
    assert_eq!(s.sync_periods(), (secs(30), MinSyncInterval::Adaptive));
    // Set to the old default, by flag or file: fixed, as upstream.
    let s = settings(&["--iptables-min-sync-period=1s"]);
    assert_eq!(s.iptables.min_sync_period, MinSyncInterval::Fixed(secs(1)));
    assert_eq!(
        s.sync_periods(),
        (secs(30), MinSyncInterval::Fixed(secs(1)))
    );
    let f = config_file("iptables:\n  minSyncPeriod: 1s\n");
    let s = settings(&[&path_arg(&f)]);
    assert_eq!(s.iptables.min_sync_period, MinSyncInterval::Fixed(secs(1)));
    // The flag beats the file's value.
    let f = config_file("iptables:\n  minSyncPeriod: 2s\n");
    let s = settings(&[&path_arg(&f), "--iptables-min-sync-period=300ms"]);
    assert_eq!(
        s.iptables.min_sync_period,
        MinSyncInterval::Fixed(Duration::from_millis(300))
    );
    // IPVS: unset keeps upstream's 0 (every change), set is fixed.
    let s = settings(&["--proxy-mode=ipvs"]);
    assert_eq!(
        s.sync_periods(),
        (secs(30), MinSyncInterval::Fixed(Duration::ZERO))
    );
    let s = settings(&["--proxy-mode=ipvs", "--ipvs-min-sync-period=1s"]);
    assert_eq!(
        s.sync_periods(),
        (secs(30), MinSyncInterval::Fixed(secs(1)))
    );
}

#[test]
fn min_sync_period_must_not_exceed_sync_period() {
    assert_eq!(
        error(&["--iptables-min-sync-period=1m"]),
        "invalid value \"1m0s\" for --iptables-min-sync-period: must not exceed the sync period 30s (default)"
    );
    assert_eq!(
        error(&["--ipvs-sync-period=1s", "--ipvs-min-sync-period=5s"]),
        "invalid value \"5s\" for --ipvs-min-sync-period: must not exceed the sync period 1s (--ipvs-sync-period)"
    );
    // Only the sync period was set: it is the one to blame.
    assert_eq!(
        error(&["--iptables-sync-period=500ms"]),
        "invalid value \"500ms\" for --iptables-sync-period: must not be less than the minimum sync period 1s (default)"
    );
    let f = config_file("iptables:\n  syncPeriod: 10s\n  minSyncPeriod: 20s\n");
    let msg = error(&[&path_arg(&f)]);
    assert!(
        msg.ends_with(": iptables.minSyncPeriod: invalid value \"20s\": must not exceed the sync period 10s (iptables.syncPeriod)"),
        "{msg}"
    );
}

#[test]
fn flag_errors_name_flag_and_value() {
    let cases: &[(&[&str], &str)] = &[
        (&["--mode=userspace"], "invalid value \"userspace\" for --mode: the userspace proxy mode was removed from kube-proxy; use iptables or ipvs"),
        (&["--mode=bogus"], "invalid value \"bogus\" for --mode: expected iptables or ipvs"),
        (&["--proxy-mode=nftables"], "invalid value \"nftables\" for --mode: the nftables proxy mode is not supported by kproxy; use iptables or ipvs"),
        (&["--cluster-cidr=10.0.0.0/33"], "invalid value \"10.0.0.0/33\" for --cluster-cidr: prefix length \"33\" is out of range 0..=32"),
        (&["--cluster-cidr=10.0.0.0/8,10.1.0.0/16"], "invalid value \"10.0.0.0/8,10.1.0.0/16\" for --cluster-cidr: at most one CIDR per IP family is allowed (e.g. 10.244.0.0/16,fd00:10:244::/56)"),
        (&["--iptables-sync-period=3x"], "invalid value \"3x\" for --iptables-sync-period: invalid duration: unknown unit \"x\""),
        (&["--ipvs-udp-timeout=30"], "invalid value \"30\" for --ipvs-udp-timeout: invalid duration: missing unit (use ns, us, ms, s, m or h, e.g. \"30s\")"),
        (&["--iptables-masquerade-bit=32"], "invalid value \"32\" for --iptables-masquerade-bit: must be an integer from 0 to 31"),
        (&["--masquerade-all=yes"], "invalid value \"yes\" for --masquerade-all: expected true or false"),
        (&["--ipvs-scheduler=fifo"], "invalid value \"fifo\" for --ipvs-scheduler: unknown IPVS scheduler, expected one of rr, wrr, lc, wlc, lblc, lblcr, sh, dh, sed, nq, mh"),
        (&["--detect-local-mode=clustercidr"], "invalid value \"clustercidr\" for --detect-local-mode: expected ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix"),
        (&["--metrics-bind-address=localhost:10249"], "invalid value \"localhost:10249\" for --metrics-bind-address: expected IP:port or IP (e.g. 0.0.0.0:10249)"),
        (&["--bind-address=node1"], "invalid value \"node1\" for --bind-address: not an IP address"),
        (&["--nodeport-addresses=primary,10.0.0.0/8"], "invalid value \"primary,10.0.0.0/8\" for --nodeport-addresses: \"primary\" cannot be combined with other entries"),
        (&["--ipvs-exclude-cidrs=10.0.0.1"], "invalid value \"10.0.0.1\" for --ipvs-exclude-cidrs: \"10.0.0.1\" is not a CIDR (expected e.g. 10.244.0.0/16)"),
        (&["--conntrack-min=-1"], "invalid value \"-1\" for --conntrack-min: must not be negative"),
        (&["--log-format=xml"], "invalid value \"xml\" for --log-format: expected text or json"),
        (&["--v=11"], "invalid value \"11\" for --v: expected an integer from 0 to 10"),
        (&["--iptables-backend=nftables"], "invalid value \"nftables\" for --iptables-backend: expected auto, legacy or nft"),
        (&["--dry-run=maybe"], "invalid value \"maybe\" for --dry-run: expected true or false"),
    ];
    for (args, want) in cases {
        assert_eq!(error(args), *want, "args {args:?}");
    }
}

#[test]
fn file_errors_name_file_field_and_value() {
    let cases: &[(&str, &str)] = &[
        ("mode: nftables\n", "mode: invalid value \"nftables\": the nftables proxy mode is not supported by kproxy; use iptables or ipvs"),
        ("clusterCIDR: 10.0.0.0/33\n", "clusterCIDR: invalid value \"10.0.0.0/33\": prefix length \"33\" is out of range 0..=32"),
        ("iptables:\n  syncPeriod: 3x\n", "iptables.syncPeriod: invalid duration \"3x\": unknown unit \"x\""),
        ("iptables:\n  masqueradeBit: 40\n", "iptables.masqueradeBit: invalid value \"40\": must be an integer from 0 to 31"),
        ("ipvs:\n  scheduler: fifo\n", "ipvs.scheduler: invalid value \"fifo\": unknown IPVS scheduler, expected one of rr, wrr, lc, wlc, lblc, lblcr, sh, dh, sed, nq, mh"),
        ("ipvs:\n  excludeCIDRs: [nope]\n", "ipvs.excludeCIDRs: invalid value \"nope\": \"nope\" is not a CIDR (expected e.g. 10.244.0.0/16)"),
        ("nodePortAddresses: [primary, 10.0.0.0/8]\n", "nodePortAddresses: invalid value \"primary,10.0.0.0/8\": \"primary\" cannot be combined with other entries"),
        ("metricsBindAddress: nowhere\n", "metricsBindAddress: invalid value \"nowhere\": expected IP:port or IP (e.g. 0.0.0.0:10249)"),
        ("conntrack:\n  maxPerCore: -5\n", "conntrack.maxPerCore: invalid value \"-5\": must not be negative"),
        ("logging:\n  verbosity: 12\n", "logging.verbosity: invalid value \"12\": expected an integer from 0 to 10"),
        ("logging:\n  format: xml\n", "logging.format: invalid value \"xml\": expected text or json"),
        ("oomScoreAdj: -2000\n", "oomScoreAdj: invalid value \"-2000\": must be within -1000..=1000"),
        ("ipvs:\n  strictArp: true\n", "ipvs.strictArp: unknown field (not part of KubeProxyConfiguration v1alpha1)"),
        ("iptables:\n  syncPeriod: 10s\n  minSyncPeriod: 1m\n", "iptables.minSyncPeriod: invalid value \"1m0s\": must not exceed the sync period 10s (iptables.syncPeriod)"),
    ];
    for (body, want) in cases {
        let f = config_file(body);
        let msg = error(&[&path_arg(&f)]);
        assert_eq!(
            msg,
            format!("config file {}: {want}", f.path().display()),
            "body {body:?}"
        );
    }
}

#[test]
fn whole_file_errors() {
    let msg = error(&["--config=/nonexistent/kproxy.yaml"]);
    assert!(
        msg.starts_with("config file /nonexistent/kproxy.yaml: cannot read: "),
        "{msg}"
    );
    assert!(msg.contains("No such file"), "{msg}");

    let mut f = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
    f.write_all(b"apiVersion: v1\nkind: ConfigMap\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let msg = error(&[&path_arg(&f)]);
    assert_eq!(
        msg,
        format!(
            "config file {}: apiVersion: unsupported value \"v1\", expected \"kubeproxy.config.k8s.io/v1alpha1\"",
            f.path().display()
        )
    );

    let f = config_file("iptables: [\n");
    let msg = error(&[&path_arg(&f)]);
    assert!(
        msg.starts_with(&format!(
            "config file {}: invalid YAML: ",
            f.path().display()
        )),
        "{msg}"
    );
}

#[test]
fn ignored_fields_and_flags_are_reported() {
    let f = config_file("enableProfiling: true\nwinkernel:\n  networkName: l2bridge\n");
    let s = settings(&[&path_arg(&f), "--oom-score-adj=-999"]);
    assert_eq!(
        s.ignored_fields,
        [
            "enableProfiling",
            "winkernel.networkName",
            "--oom-score-adj"
        ]
    );
}

#[test]
fn empty_config_flag_means_no_file() {
    assert_eq!(settings(&["--config="]), defaults());
}
