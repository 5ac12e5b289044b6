//! A standalone fake Kubernetes API server for demos and manual testing.
//!
//! Prints its URL on the first line of stdout and serves until killed;
//! mutate it through the HTTP API (curl, kubectl).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kproxy_testkit::apiserver::{FakeApiServer, Options, DEFAULT_EVENT_WINDOW};

#[derive(Debug, Parser)]
#[command(name = "fake-apiserver", about = "A fake Kubernetes API server")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Multi-document YAML of Services, EndpointSlices and Nodes to preload.
    #[arg(long)]
    objects: Option<PathBuf>,
    /// Write a kubeconfig pointing at this server here.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Change events retained for watches.
    #[arg(long, default_value_t = DEFAULT_EVENT_WINDOW)]
    event_window: usize,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 60)]
    bookmark_interval_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("binding {}", args.listen))?;
    let server = FakeApiServer::serve_on_with(
        listener,
        Options {
            event_window: args.event_window,
            bookmark_interval: Duration::from_secs(args.bookmark_interval_secs),
        },
    )?;
    if let Some(path) = &args.objects {
        let yaml =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let loaded = server
            .load_yaml(&yaml)
            .with_context(|| format!("loading {}", path.display()))?;
        tracing::info!(objects = loaded.len(), "preloaded objects");
    }
    if let Some(path) = &args.kubeconfig_out {
        server
            .write_kubeconfig(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}", server.url());
    tracing::info!(url = %server.url(), "serving");
    tokio::signal::ctrl_c().await?;
    server.stop().await;
    Ok(())
}
