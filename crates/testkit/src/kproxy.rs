//! Runs the real `kproxy` binary for end-to-end tests and the demo: in the
//! current namespace or inside a [`Netns`], with its metrics and health
//! servers on free loopback ports, and its log captured to a file.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::{parse_http_response, Netns};

/// A running kproxy. Killed (SIGKILL) on drop if still running.
pub struct KproxyProcess<'ns> {
    child: Child,
    netns: Option<&'ns Netns>,
    log_path: PathBuf,
    _log_dir: tempfile::TempDir,
    pub metrics_addr: SocketAddr,
    pub healthz_addr: SocketAddr,
}

impl<'ns> KproxyProcess<'ns> {
    /// Starts `binary` with `args`, plus `--metrics-bind-address` and
    /// `--healthz-bind-address` on free 127.0.0.1 ports of `netns` (or of
    /// the current namespace).
    pub fn spawn(
        binary: &Path,
        netns: Option<&'ns Netns>,
        args: &[String],
    ) -> Result<KproxyProcess<'ns>> {
        let (metrics_port, healthz_port) = match netns {
            Some(ns) => {
                ns.run_in(|| -> Result<(u16, u16)> { Ok((free_port()?, free_port()?)) })??
            }
            None => (free_port()?, free_port()?),
        };
        let metrics_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, metrics_port));
        let healthz_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, healthz_port));
        let log_dir = tempfile::tempdir()?;
        let log_path = log_dir.path().join("kproxy.log");
        let log = File::create(&log_path)?;
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.name()]).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        command
            .args(args)
            .arg(format!("--metrics-bind-address={metrics_addr}"))
            .arg(format!("--healthz-bind-address={healthz_addr}"))
            .env(
                "RUST_LOG",
                std::env::var("KPROXY_TEST_LOG").unwrap_or_else(|_| {
                    "info,kproxy=debug,kproxy_iptables=debug,kproxy_ipvs=debug".into()
                }),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(KproxyProcess {
            child,
            netns,
            log_path,
            _log_dir: log_dir,
            metrics_addr,
            healthz_addr,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A GET on the metrics server (`/metrics`, `/debug/state`).
    pub fn get_metrics(&self, path: &str) -> Result<(u16, String)> {
        self.get(self.metrics_addr, path)
    }

    /// A GET on the health server (`/healthz`, `/livez`).
    pub fn get_healthz(&self, path: &str) -> Result<(u16, String)> {
        self.get(self.healthz_addr, path)
    }

    fn get(&self, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
        let connect = move || TcpStream::connect_timeout(&addr, Duration::from_secs(2));
        let stream = match self.netns {
            Some(ns) => ns.run_in(connect)??,
            None => connect()?,
        };
        http_get_on(stream, addr, path)
    }

    /// The value of one sample of `/metrics`, e.g.
    /// `kubeproxy_sync_proxy_rules_service_changes_total` or
    /// `kubeproxy_sync_proxy_rules_iptables_total{table="nat"}`.
    pub fn metric(&self, sample: &str) -> Result<Option<f64>> {
        let (_, body) = self.get_metrics("/metrics")?;
        Ok(find_sample(&body, sample))
    }

    /// `/debug/state` as JSON.
    pub fn debug_state(&self) -> Result<serde_json::Value> {
        let (status, body) = self.get_metrics("/debug/state")?;
        if status != 200 {
            bail!("/debug/state answered {status}: {body}");
        }
        serde_json::from_str(&body).context("/debug/state is not JSON")
    }

    /// Waits until `/healthz` answers 200 (the first sync is done).
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        self.wait_until(timeout, "healthy", |k| {
            Ok(matches!(k.get_healthz("/healthz"), Ok((200, _))))
        })
    }

    /// Polls `check` every 20 ms until it returns true; fails with the log
    /// if kproxy exits or the time runs out.
    pub fn wait_until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(&KproxyProcess) -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "kproxy exited ({status}) while waiting for {what}; log:\n{}",
                    self.log()
                );
            }
            if check(self)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then waits up to `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal("TERM")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "kproxy did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (a crash), and reaps the process.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill().ok();
        self.child.wait()?;
        Ok(())
    }

    fn signal(&self, name: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{name} {} failed", self.child.id());
        }
        Ok(())
    }

    /// The namespace kproxy runs in, if any.
    pub fn netns(&self) -> Option<&'ns Netns> {
        self.netns
    }
}

impl Drop for KproxyProcess<'_> {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

/// Finds one sample's value in Prometheus text output.
pub fn find_sample(body: &str, sample: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        let rest = line.strip_prefix(sample)?;
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn http_get_on(mut stream: TcpStream, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| anyhow!("reading the answer of {addr}{path}: {e}"))?;
    parse_http_response(&raw)
}
