//! kube-proxy's own config file: `KubeProxyConfiguration`,
//! `kubeproxy.config.k8s.io/v1alpha1` (k8s.io/kube-proxy/config/v1alpha1).
//!
//! Every upstream field is declared, with its Go JSON name spelled out
//! (`clusterCIDR`, `strictARP`, …: `rename_all = "camelCase"` would get the
//! acronyms wrong and silently drop them). Unknown fields are errors naming
//! their path. All fields are optional because kubeadm writes `null`, `""`
//! and `0s` for "use the default"; `resolve` applies the defaults.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::duration::parse_go_duration;
use super::error::{one_line, ConfigError};

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// A Go `metav1.Duration` ("30s", "1m30s"). A bare YAML number is accepted
/// only as far as the Go grammar allows (i.e. `0`); `30` gets "missing unit".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoDuration(pub Duration);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            U(u64),
            I(i64),
        }
        let text = match Raw::deserialize(d)? {
            Raw::S(s) => s,
            Raw::U(n) => n.to_string(),
            Raw::I(n) => n.to_string(),
        };
        parse_go_duration(&text)
            .map(GoDuration)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
// Parsed so a real file validates; not every field is read.
#[allow(dead_code)]
pub struct KubeProxyConfiguration {
    #[serde(rename = "apiVersion")]
    pub api_version: Option<String>,
    pub kind: Option<String>,
    #[serde(rename = "featureGates")]
    pub feature_gates: Option<BTreeMap<String, bool>>,
    #[serde(rename = "clientConnection")]
    pub client_connection: Option<ClientConnection>,
    pub logging: Option<Logging>,
    #[serde(rename = "hostnameOverride")]
    pub hostname_override: Option<String>,
    #[serde(rename = "bindAddress")]
    pub bind_address: Option<String>,
    #[serde(rename = "healthzBindAddress")]
    pub healthz_bind_address: Option<String>,
    #[serde(rename = "metricsBindAddress")]
    pub metrics_bind_address: Option<String>,
    #[serde(rename = "bindAddressHardFail")]
    pub bind_address_hard_fail: Option<bool>,
    #[serde(rename = "enableProfiling")]
    pub enable_profiling: Option<bool>,
    #[serde(rename = "showHiddenMetricsForVersion")]
    pub show_hidden_metrics_for_version: Option<String>,
    pub mode: Option<String>,
    pub iptables: Option<Iptables>,
    pub ipvs: Option<Ipvs>,
    pub nftables: Option<Nftables>,
    pub winkernel: Option<Winkernel>,
    #[serde(rename = "detectLocalMode")]
    pub detect_local_mode: Option<String>,
    #[serde(rename = "detectLocal")]
    pub detect_local: Option<DetectLocal>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    #[serde(rename = "nodePortAddresses")]
    pub node_port_addresses: Option<Vec<String>>,
    #[serde(rename = "oomScoreAdj")]
    pub oom_score_adj: Option<i32>,
    pub conntrack: Option<Conntrack>,
    #[serde(rename = "configSyncPeriod")]
    pub config_sync_period: Option<GoDuration>,
    #[serde(rename = "portRange")]
    pub port_range: Option<String>,
    #[serde(rename = "windowsRunAsService")]
    pub windows_run_as_service: Option<bool>,
    /// Removed upstream in 1.26 (userspace proxy); still present in files
    /// written by older releases, so accepted and ignored.
    #[serde(rename = "udpIdleTimeout")]
    pub udp_idle_timeout: Option<GoDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConnection {
    pub kubeconfig: Option<String>,
    #[serde(rename = "acceptContentTypes")]
    pub accept_content_types: Option<String>,
    #[serde(rename = "contentType")]
    pub content_type: Option<String>,
    pub qps: Option<f64>,
    pub burst: Option<i32>,
}

/// component-base `LoggingConfiguration`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logging {
    pub format: Option<String>,
    /// A duration string or an integer of nanoseconds (`TimeOrMetaDuration`).
    #[serde(rename = "flushFrequency")]
    pub flush_frequency: Option<serde_json::Value>,
    pub verbosity: Option<u32>,
    pub vmodule: Option<Vec<VModuleItem>>,
    pub options: Option<LoggingOptions>,
    /// Removed upstream; accepted from older files.
    pub sanitization: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
// Parsed so a real file validates; not every field is read.
#[allow(dead_code)]
pub struct VModuleItem {
    #[serde(rename = "filePattern")]
    pub file_pattern: Option<String>,
    pub verbosity: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingOptions {
    pub text: Option<OutputRouting>,
    pub json: Option<OutputRouting>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputRouting {
    #[serde(rename = "splitStream")]
    pub split_stream: Option<bool>,
    /// A Kubernetes quantity, written as a string ("0") or a number.
    #[serde(rename = "infoBufferSize")]
    pub info_buffer_size: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Iptables {
    #[serde(rename = "masqueradeBit")]
    pub masquerade_bit: Option<i32>,
    #[serde(rename = "masqueradeAll")]
    pub masquerade_all: Option<bool>,
    #[serde(rename = "localhostNodePorts")]
    pub localhost_node_ports: Option<bool>,
    #[serde(rename = "snatNodeInternalIP")]
    pub snat_node_internal_ip: Option<bool>,
    #[serde(rename = "syncPeriod")]
    pub sync_period: Option<GoDuration>,
    #[serde(rename = "minSyncPeriod")]
    pub min_sync_period: Option<GoDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ipvs {
    #[serde(rename = "syncPeriod")]
    pub sync_period: Option<GoDuration>,
    #[serde(rename = "minSyncPeriod")]
    pub min_sync_period: Option<GoDuration>,
    pub scheduler: Option<String>,
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    pub strict_arp: Option<bool>,
    #[serde(rename = "tcpTimeout")]
    pub tcp_timeout: Option<GoDuration>,
    #[serde(rename = "tcpFinTimeout")]
    pub tcp_fin_timeout: Option<GoDuration>,
    #[serde(rename = "udpTimeout")]
    pub udp_timeout: Option<GoDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nftables {
    #[serde(rename = "masqueradeBit")]
    pub masquerade_bit: Option<i32>,
    #[serde(rename = "masqueradeAll")]
    pub masquerade_all: Option<bool>,
    #[serde(rename = "syncPeriod")]
    pub sync_period: Option<GoDuration>,
    #[serde(rename = "minSyncPeriod")]
    pub min_sync_period: Option<GoDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Winkernel {
    #[serde(rename = "networkName")]
    pub network_name: Option<String>,
    #[serde(rename = "sourceVip")]
    pub source_vip: Option<String>,
    #[serde(rename = "enableDSR")]
    pub enable_dsr: Option<bool>,
    #[serde(rename = "rootHnsEndpointName")]
    pub root_hns_endpoint_name: Option<String>,
    #[serde(rename = "forwardHealthCheckVip")]
    pub forward_health_check_vip: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectLocal {
    #[serde(rename = "bridgeInterface")]
    pub bridge_interface: Option<String>,
    #[serde(rename = "interfaceNamePrefix")]
    pub interface_name_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conntrack {
    #[serde(rename = "maxPerCore")]
    pub max_per_core: Option<i32>,
    pub min: Option<i32>,
    #[serde(rename = "tcpEstablishedTimeout")]
    pub tcp_established_timeout: Option<GoDuration>,
    #[serde(rename = "tcpCloseWaitTimeout")]
    pub tcp_close_wait_timeout: Option<GoDuration>,
    #[serde(rename = "tcpBeLiberal")]
    pub tcp_be_liberal: Option<bool>,
    #[serde(rename = "udpTimeout")]
    pub udp_timeout: Option<GoDuration>,
    #[serde(rename = "udpStreamTimeout")]
    pub udp_stream_timeout: Option<GoDuration>,
    /// Removed upstream long ago; accepted from older files.
    pub max: Option<i32>,
}

/// Read and decode a config file. Errors name the file and, for field
/// problems, the field path (`iptables.syncPeriod`).
pub fn load(path: &Path) -> Result<KubeProxyConfiguration, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: shown.clone(),
        reason: format!("cannot read: {}", one_line(&e.to_string())),
    })?;
    parse(&shown, &text)
}

/// Decode config text; `path` is only used in messages.
pub fn parse(path: &str, text: &str) -> Result<KubeProxyConfiguration, ConfigError> {
    let file_err = |reason: String| ConfigError::File {
        path: path.to_string(),
        reason,
    };
    // YAML → generic tree first: syntax errors come from the YAML parser with a
    // location, then field errors come with a path from serde_path_to_error.
    let tree: serde_json::Value = serde_saphyr::from_str(text).map_err(|e| {
        file_err(format!(
            "invalid YAML: {}",
            one_line(&e.without_snippet().to_string())
        ))
    })?;
    let map = match &tree {
        serde_json::Value::Object(map) => map,
        serde_json::Value::Null => return Err(file_err("the file is empty".to_string())),
        _ => {
            return Err(file_err(format!(
                "expected a {KIND} mapping at the top level"
            )))
        }
    };
    // Checked before anything else: with the wrong kind, every other field
    // error would be noise.
    let field_err = |field: &str, reason: String| ConfigError::Field {
        path: path.to_string(),
        field: field.to_string(),
        reason,
    };
    match map.get("apiVersion") {
        Some(serde_json::Value::String(v)) if v == API_VERSION => {}
        Some(other) => {
            return Err(field_err(
                "apiVersion",
                format!(
                    "unsupported value {}, expected {API_VERSION:?}",
                    show_json(other)
                ),
            ))
        }
        None => {
            return Err(field_err(
                "apiVersion",
                format!("missing, expected {API_VERSION:?}"),
            ))
        }
    }
    match map.get("kind") {
        Some(serde_json::Value::String(v)) if v == KIND => {}
        Some(other) => {
            return Err(field_err(
                "kind",
                format!("unsupported value {}, expected {KIND:?}", show_json(other)),
            ))
        }
        None => return Err(field_err("kind", format!("missing, expected {KIND:?}"))),
    }
    serde_path_to_error::deserialize(&tree).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde's message lists every expected field; the path says enough.
        let reason = if inner.starts_with("unknown field") {
            "unknown field (not part of KubeProxyConfiguration v1alpha1)".to_string()
        } else {
            one_line(&inner)
        };
        field_err(&field, reason)
    })
}

fn show_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

impl KubeProxyConfiguration {
    /// Fields that are set to something other than "default" but that kproxy
    /// does not act on, as field paths for a startup log line.
    pub fn ignored_fields(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut note = |set: bool, name: &str| {
            if set {
                out.push(name.to_string());
            }
        };
        let s = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());
        let b = |v: &Option<bool>| v.unwrap_or(false);
        let d = |v: &Option<GoDuration>| v.is_some_and(|d| !d.0.is_zero());
        let json = |v: &Option<serde_json::Value>| {
            v.as_ref().is_some_and(|v| match v {
                serde_json::Value::Null => false,
                serde_json::Value::String(s) => !(s.is_empty() || s == "0" || s == "0s"),
                serde_json::Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            })
        };

        note(
            self.feature_gates.as_ref().is_some_and(|m| !m.is_empty()),
            "featureGates",
        );
        if let Some(c) = &self.client_connection {
            note(
                s(&c.accept_content_types),
                "clientConnection.acceptContentTypes",
            );
            note(s(&c.content_type), "clientConnection.contentType");
            note(c.qps.is_some_and(|q| q != 0.0), "clientConnection.qps");
            note(c.burst.is_some_and(|q| q != 0), "clientConnection.burst");
        }
        if let Some(l) = &self.logging {
            note(json(&l.flush_frequency), "logging.flushFrequency");
            note(
                l.vmodule.as_ref().is_some_and(|v| !v.is_empty()),
                "logging.vmodule",
            );
            if let Some(o) = &l.options {
                for (name, r) in [("text", &o.text), ("json", &o.json)] {
                    if let Some(r) = r {
                        note(
                            b(&r.split_stream),
                            &format!("logging.options.{name}.splitStream"),
                        );
                        note(
                            json(&r.info_buffer_size),
                            &format!("logging.options.{name}.infoBufferSize"),
                        );
                    }
                }
            }
            note(b(&l.sanitization), "logging.sanitization");
        }
        note(b(&self.bind_address_hard_fail), "bindAddressHardFail");
        note(b(&self.enable_profiling), "enableProfiling");
        note(
            s(&self.show_hidden_metrics_for_version),
            "showHiddenMetricsForVersion",
        );
        if let Some(i) = &self.iptables {
            note(b(&i.snat_node_internal_ip), "iptables.snatNodeInternalIP");
        }
        if let Some(n) = &self.nftables {
            note(n.masquerade_bit.is_some(), "nftables.masqueradeBit");
            note(b(&n.masquerade_all), "nftables.masqueradeAll");
            note(d(&n.sync_period), "nftables.syncPeriod");
            note(d(&n.min_sync_period), "nftables.minSyncPeriod");
        }
        if let Some(w) = &self.winkernel {
            note(s(&w.network_name), "winkernel.networkName");
            note(s(&w.source_vip), "winkernel.sourceVip");
            note(b(&w.enable_dsr), "winkernel.enableDSR");
            note(
                s(&w.root_hns_endpoint_name),
                "winkernel.rootHnsEndpointName",
            );
            note(
                b(&w.forward_health_check_vip),
                "winkernel.forwardHealthCheckVip",
            );
        }
        note(self.oom_score_adj.is_some(), "oomScoreAdj");
        if let Some(c) = &self.conntrack {
            note(c.max.is_some_and(|m| m != 0), "conntrack.max");
        }
        note(d(&self.config_sync_period), "configSyncPeriod");
        note(s(&self.port_range), "portRange");
        note(b(&self.windows_run_as_service), "windowsRunAsService");
        note(self.udp_idle_timeout.is_some(), "udpIdleTimeout");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str =
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

    fn parse_ok(body: &str) -> KubeProxyConfiguration {
        match parse("/x/y.yaml", &format!("{HEADER}{body}")) {
            Ok(c) => c,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    fn parse_err(text: &str) -> String {
        match parse("/x/y.yaml", text) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.contains('\n'), "multi-line message: {msg}");
                msg
            }
        }
    }

    #[test]
    fn acronym_fields_use_go_names() {
        let c = parse_ok(
            "clusterCIDR: 10.244.0.0/16\nipvs:\n  strictARP: true\n  excludeCIDRs: [10.0.0.0/8]\n",
        );
        assert_eq!(c.cluster_cidr.as_deref(), Some("10.244.0.0/16"));
        let ipvs = c.ipvs.unwrap_or_default();
        assert_eq!(ipvs.strict_arp, Some(true));
        assert_eq!(ipvs.exclude_cidrs, Some(vec!["10.0.0.0/8".to_string()]));
    }

    #[test]
    fn camel_case_acronyms_are_unknown() {
        let msg = parse_err(&format!("{HEADER}clusterCidr: 10.244.0.0/16\n"));
        assert_eq!(
            msg,
            "config file /x/y.yaml: clusterCidr: unknown field (not part of KubeProxyConfiguration v1alpha1)"
        );
    }

    #[test]
    fn unknown_nested_field_names_its_path() {
        let msg = parse_err(&format!(
            "{HEADER}iptables:\n  syncPeriod: 1s\n  bogus: 1\n"
        ));
        assert!(
            msg.starts_with("config file /x/y.yaml: iptables.bogus: unknown field"),
            "{msg}"
        );
        let msg = parse_err(&format!(
            "{HEADER}logging:\n  options:\n    json:\n      color: true\n"
        ));
        assert!(
            msg.contains("logging.options.json.color: unknown field"),
            "{msg}"
        );
    }

    #[test]
    fn bad_duration_names_field_and_value() {
        let msg = parse_err(&format!("{HEADER}iptables:\n  syncPeriod: 3x\n"));
        assert_eq!(
            msg,
            "config file /x/y.yaml: iptables.syncPeriod: invalid duration \"3x\": unknown unit \"x\""
        );
        let msg = parse_err(&format!("{HEADER}conntrack:\n  udpTimeout: 30\n"));
        assert!(
            msg.contains("conntrack.udpTimeout: invalid duration \"30\": missing unit"),
            "{msg}"
        );
    }

    #[test]
    fn wrong_type_names_field() {
        let msg = parse_err(&format!("{HEADER}iptables:\n  masqueradeBit: fourteen\n"));
        assert!(
            msg.starts_with("config file /x/y.yaml: iptables.masqueradeBit: invalid type"),
            "{msg}"
        );
        assert!(msg.contains("fourteen"), "{msg}");
    }

    #[test]
    fn wrong_kind_or_version() {
        let msg =
            parse_err("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n");
        assert_eq!(
            msg,
            "config file /x/y.yaml: kind: unsupported value \"KubeletConfiguration\", expected \"KubeProxyConfiguration\""
        );
        let msg = parse_err(
            "apiVersion: kubeproxy.config.k8s.io/v1beta1\nkind: KubeProxyConfiguration\n",
        );
        assert!(
            msg.contains("apiVersion: unsupported value \"kubeproxy.config.k8s.io/v1beta1\""),
            "{msg}"
        );
        let msg = parse_err("kind: KubeProxyConfiguration\n");
        assert!(msg.contains("apiVersion: missing"), "{msg}");
    }

    #[test]
    fn invalid_yaml_and_empty_file() {
        let msg = parse_err("apiVersion: [unclosed\n");
        assert!(
            msg.starts_with("config file /x/y.yaml: invalid YAML:"),
            "{msg}"
        );
        let msg = parse_err("");
        assert!(msg.starts_with("config file /x/y.yaml:"), "{msg}");
        let msg = parse_err("- a\n- b\n");
        assert!(
            msg.contains("expected a KubeProxyConfiguration mapping"),
            "{msg}"
        );
    }

    #[test]
    fn unreadable_file() {
        let err = load(Path::new("/nonexistent/kproxy/config.yaml"));
        let msg = err
            .map(|_| ())
            .map_err(|e| e.to_string())
            .err()
            .unwrap_or_default();
        assert!(
            msg.starts_with("config file /nonexistent/kproxy/config.yaml: cannot read:"),
            "{msg}"
        );
    }

    #[test]
    fn nulls_and_empty_strings_are_accepted() {
        let c = parse_ok(
            "mode: \"\"\nclusterCIDR: null\niptables:\n  masqueradeBit: null\n  syncPeriod: 0s\nconntrack:\n  maxPerCore: null\n",
        );
        assert_eq!(c.mode.as_deref(), Some(""));
        assert_eq!(c.cluster_cidr, None);
        let ipt = c.iptables.unwrap_or_default();
        assert_eq!(ipt.masquerade_bit, None);
        assert_eq!(ipt.sync_period, Some(GoDuration(Duration::ZERO)));
    }

    #[test]
    fn ignored_fields_lists_only_meaningful_values() {
        let c = parse_ok(
            "enableProfiling: true\noomScoreAdj: -999\nportRange: \"\"\nwinkernel:\n  networkName: \"\"\n  enableDSR: false\nfeatureGates:\n  SomeGate: true\nnftables:\n  syncPeriod: 0s\n",
        );
        assert_eq!(
            c.ignored_fields(),
            ["featureGates", "enableProfiling", "oomScoreAdj"]
        );
    }
}
