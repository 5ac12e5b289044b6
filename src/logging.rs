//! Log set-up: kube-proxy style `-v` verbosity, text or JSON lines.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// `-v` levels map as klog's do in kube-proxy: 0–1 info, 2–3 debug, 4+ trace.
/// `RUST_LOG` overrides, for developers.
pub fn init(format: LogFormat, verbosity: u8) {
    let level = match verbosity {
        0 | 1 => "info",
        2 | 3 => "debug",
        _ => "trace",
    };
    let default = format!("warn,kproxy={level},kproxy_model={level},kproxy_watch={level},kproxy_iptables={level},kproxy_ipvs={level},kproxy_metrics={level}");
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
