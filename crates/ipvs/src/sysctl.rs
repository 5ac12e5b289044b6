//! The sysctls upstream kube-proxy's IPVS mode sets, as a pure list, and an
//! applier that writes them under /proc/sys and reports what it changed.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Write the value, or only check it and report (upstream only warns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SysctlAction {
    Ensure,
    CheckOnly,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sysctl {
    /// Relative to /proc/sys, e.g. `net/ipv4/vs/conntrack`.
    pub path: &'static str,
    pub value: &'static str,
    pub action: SysctlAction,
    /// Why IPVS mode needs it, for logs.
    pub why: &'static str,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SysctlOptions {
    /// `ipvs.strictARP`: keep the node from answering ARP for kube-ipvs0 addresses.
    pub strict_arp: bool,
    /// (major, minor) of the running kernel; decides `conn_reuse_mode`.
    pub kernel_version: Option<(u32, u32)>,
}

/// The list, in the order upstream applies it.
pub fn ipvs_sysctls(opts: SysctlOptions) -> Vec<Sysctl> {
    let mut v = vec![Sysctl {
        path: "net/ipv4/vs/conntrack",
        value: "1",
        action: SysctlAction::Ensure,
        why: "keep conntrack entries for IPVS connections so iptables SNAT/masquerade rules apply",
    }];
    // Between 4.1 and 5.9, conn_reuse_mode=1 drops reused connections to
    // gone real servers with a 1 s stall; 5.9 fixed it and upstream leaves it alone.
    if let Some(ver) = opts.kernel_version {
        if ((4, 1)..(5, 9)).contains(&ver) {
            v.push(Sysctl {
                path: "net/ipv4/vs/conn_reuse_mode",
                value: "0",
                action: SysctlAction::Ensure,
                why: "avoid 1 s delays when ports are reused (kernels before 5.9)",
            });
        }
    }
    v.extend([
        Sysctl {
            path: "net/ipv4/vs/expire_nodest_conn",
            value: "1",
            action: SysctlAction::Ensure,
            why: "drop connections to deleted real servers at once",
        },
        Sysctl {
            path: "net/ipv4/vs/expire_quiescent_template",
            value: "1",
            action: SysctlAction::Ensure,
            why: "end session affinity to real servers with weight 0",
        },
        Sysctl {
            path: "net/ipv4/ip_forward",
            value: "1",
            action: SysctlAction::Ensure,
            why: "forward service traffic to real servers on other hosts",
        },
    ]);
    if opts.strict_arp {
        v.extend([
            Sysctl {
                path: "net/ipv4/conf/all/arp_ignore",
                value: "1",
                action: SysctlAction::Ensure,
                why: "strict ARP: answer ARP only for addresses on the receiving interface",
            },
            Sysctl {
                path: "net/ipv4/conf/all/arp_announce",
                value: "2",
                action: SysctlAction::Ensure,
                why: "strict ARP: never announce kube-ipvs0 addresses",
            },
        ]);
    }
    v.push(Sysctl {
        path: "net/bridge/bridge-nf-call-iptables",
        value: "1",
        action: SysctlAction::CheckOnly,
        why: "bridged pod traffic must pass iptables (br_netfilter); upstream only warns",
    });
    v
}

/// What happened to one sysctl.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SysctlOutcome {
    /// Already had the value.
    Unchanged,
    /// Written; it was `from` before.
    Changed { from: String },
    /// Check-only and the value differs.
    Mismatch { found: String },
    /// The file does not exist (module not loaded, or not in this kernel).
    Missing,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysctlReport {
    pub sysctl: Sysctl,
    pub outcome: SysctlOutcome,
}

impl fmt::Display for SysctlReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.sysctl.path.replace('/', ".");
        match &self.outcome {
            SysctlOutcome::Unchanged => write!(f, "{name} = {} (unchanged)", self.sysctl.value),
            SysctlOutcome::Changed { from } => {
                write!(f, "{name} = {} (was {from})", self.sysctl.value)
            }
            SysctlOutcome::Mismatch { found } => write!(
                f,
                "{name} is {found}, expected {}: {}",
                self.sysctl.value, self.sysctl.why
            ),
            SysctlOutcome::Missing => write!(f, "{name} does not exist: {}", self.sysctl.why),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{verb} {}: {source}", .path.display())]
pub struct SysctlError {
    pub verb: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Applies `list` under `root` (normally `/proc/sys`; a directory in tests).
/// Stops at the first write that fails; a missing `Ensure` file is an error
/// (IPVS sysctls exist once ip_vs is loaded), a missing check-only one is reported.
pub fn apply_sysctls(root: &Path, list: &[Sysctl]) -> Result<Vec<SysctlReport>, SysctlError> {
    let mut out = Vec::with_capacity(list.len());
    for s in list {
        let path = root.join(s.path);
        let current = match std::fs::read_to_string(&path) {
            Ok(v) => v.trim().to_string(),
            Err(e)
                if e.kind() == io::ErrorKind::NotFound && s.action == SysctlAction::CheckOnly =>
            {
                out.push(SysctlReport {
                    sysctl: s.clone(),
                    outcome: SysctlOutcome::Missing,
                });
                continue;
            }
            Err(source) => {
                return Err(SysctlError {
                    verb: "reading",
                    path,
                    source,
                })
            }
        };
        let outcome = if current == s.value {
            SysctlOutcome::Unchanged
        } else if s.action == SysctlAction::CheckOnly {
            SysctlOutcome::Mismatch { found: current }
        } else {
            std::fs::write(&path, s.value).map_err(|source| SysctlError {
                verb: "writing",
                path: path.clone(),
                source,
            })?;
            SysctlOutcome::Changed { from: current }
        };
        let report = SysctlReport {
            sysctl: s.clone(),
            outcome,
        };
        match report.outcome {
            SysctlOutcome::Changed { .. } => tracing::info!("sysctl {report}"),
            SysctlOutcome::Mismatch { .. } | SysctlOutcome::Missing => {
                tracing::warn!("sysctl {report}")
            }
            SysctlOutcome::Unchanged => {}
        }
        out.push(report);
    }
    Ok(out)
}

/// (major, minor) from a kernel release string such as `6.1.0-56-amd64`.
pub fn parse_kernel_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(v: &[Sysctl]) -> Vec<&str> {
        v.iter().map(|s| s.path).collect()
    }

    #[test]
    fn list_follows_upstream() {
        let base = ipvs_sysctls(SysctlOptions {
            strict_arp: false,
            kernel_version: Some((6, 1)),
        });
        assert_eq!(
            paths(&base),
            [
                "net/ipv4/vs/conntrack",
                "net/ipv4/vs/expire_nodest_conn",
                "net/ipv4/vs/expire_quiescent_template",
                "net/ipv4/ip_forward",
                "net/bridge/bridge-nf-call-iptables",
            ]
        );
        let strict = ipvs_sysctls(SysctlOptions {
            strict_arp: true,
            kernel_version: Some((5, 4)),
        });
        let find = |p: &str| strict.iter().find(|s| s.path == p).map(|s| s.value);
        assert_eq!(find("net/ipv4/conf/all/arp_ignore"), Some("1"));
        assert_eq!(find("net/ipv4/conf/all/arp_announce"), Some("2"));
        assert_eq!(find("net/ipv4/vs/conn_reuse_mode"), Some("0"));
        let old = ipvs_sysctls(SysctlOptions {
            strict_arp: false,
            kernel_version: Some((4, 0)),
        });
        assert!(!paths(&old).contains(&"net/ipv4/vs/conn_reuse_mode"));
    }

    #[test]
    fn applier_reports_changes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let write = |p: &str, v: &str| {
            let f = root.join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, v).unwrap();
        };
        write("net/ipv4/vs/conntrack", "0\n");
        write("net/ipv4/vs/expire_nodest_conn", "1\n");
        write("net/ipv4/vs/expire_quiescent_template", "0\n");
        write("net/ipv4/ip_forward", "0\n");
        let list = ipvs_sysctls(SysctlOptions::default());
        let rep = apply_sysctls(root, &list).unwrap();
        let outcomes: Vec<_> = rep
            .iter()
            .map(|r| (r.sysctl.path, r.outcome.clone()))
            .collect();
        assert_eq!(
            outcomes,
            vec![
                (
                    "net/ipv4/vs/conntrack",
                    SysctlOutcome::Changed { from: "0".into() }
                ),
                ("net/ipv4/vs/expire_nodest_conn", SysctlOutcome::Unchanged),
                (
                    "net/ipv4/vs/expire_quiescent_template",
                    SysctlOutcome::Changed { from: "0".into() }
                ),
                (
                    "net/ipv4/ip_forward",
                    SysctlOutcome::Changed { from: "0".into() }
                ),
                ("net/bridge/bridge-nf-call-iptables", SysctlOutcome::Missing),
            ]
        );
        assert_eq!(
            std::fs::read_to_string(root.join("net/ipv4/vs/conntrack")).unwrap(),
            "1"
        );
        assert_eq!(rep[0].to_string(), "net.ipv4.vs.conntrack = 1 (was 0)");
        // second run: nothing to do
        let again = apply_sysctls(root, &list).unwrap();
        assert!(again[..4]
            .iter()
            .all(|r| r.outcome == SysctlOutcome::Unchanged));

        // a check-only mismatch is reported, not written
        write("net/bridge/bridge-nf-call-iptables", "0\n");
        let rep = apply_sysctls(root, &list).unwrap();
        assert_eq!(
            rep[4].outcome,
            SysctlOutcome::Mismatch { found: "0".into() }
        );
        assert_eq!(
            std::fs::read_to_string(root.join("net/bridge/bridge-nf-call-iptables")).unwrap(),
            "0\n"
        );

        // a missing IPVS sysctl (ip_vs not loaded) is an error naming the file
        let empty = tempfile::tempdir().unwrap();
        let err = apply_sysctls(empty.path(), &list).unwrap_err();
        assert!(err.to_string().contains("net/ipv4/vs/conntrack"), "{err}");
    }

    #[test]
    fn kernel_release() {
        assert_eq!(parse_kernel_release("6.1.0-56-amd64"), Some((6, 1)));
        assert_eq!(parse_kernel_release("5.4.0\n"), Some((5, 4)));
        assert_eq!(parse_kernel_release("garbage"), None);
    }
}
