//! `--cleanup`: remove everything kproxy (or kube-proxy's iptables mode)
//! installed, and nothing else.
//!
//! Owned chains are the fixed kube-proxy chains per table plus every
//! per-service chain (`KUBE-SVC-`, `KUBE-SVL-`, `KUBE-EXT-`, `KUBE-FW-`,
//! `KUBE-SEP-`), as upstream's `CleanupLeftovers`. kubelet's chains
//! (`KUBE-KUBELET-CANARY`, `KUBE-FIREWALL`, `KUBE-IPTABLES-HINT`) and any
//! other foreign chain or rule stay. Running it again finds nothing and
//! does nothing.

use tracing::info;

use kproxy_model::IpFamily;

use crate::runner::{parse_save_tables, Backend, Iptables, IptablesError, SavedTable};

/// The fixed chains kube-proxy's iptables mode creates, per table.
const OWNED: &[(&str, &[&str])] = &[
    (
        "nat",
        &[
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
            "KUBE-MARK-DROP",
            "KUBE-LOAD-BALANCER",
            "KUBE-PROXY-CANARY",
        ],
    ),
    (
        "filter",
        &[
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-FORWARD",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
            "KUBE-PROXY-CANARY",
        ],
    ),
    ("mangle", &["KUBE-PROXY-CANARY"]),
];

/// Per-service chains, in nat (upstream's `isServiceChainName`).
const SERVICE_CHAIN_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
];

const BUILTIN_CHAINS: &[&str] = &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// Whether kproxy owns `chain` in `table`.
pub fn is_owned_chain(table: &str, chain: &str) -> bool {
    let fixed = OWNED
        .iter()
        .any(|(t, chains)| *t == table && chains.contains(&chain));
    fixed || (table == "nat" && SERVICE_CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p)))
}

/// What a cleanup removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Rules in built-in chains that jumped to an owned chain, as
    /// (table, chain, rulespec).
    pub rules_removed: Vec<(String, String, String)>,
    /// Owned chains flushed and deleted, as (table, chain).
    pub chains_removed: Vec<(String, String)>,
}

impl CleanupReport {
    pub fn is_empty(&self) -> bool {
        self.rules_removed.is_empty() && self.chains_removed.is_empty()
    }
}

/// Cleans `family` on `backend` in the current network namespace.
pub fn cleanup(family: IpFamily, backend: Backend) -> Result<CleanupReport, IptablesError> {
    cleanup_with(&Iptables::new(family, backend))
}

/// [`cleanup`] through a given [`Iptables`].
pub fn cleanup_with(ipt: &Iptables) -> Result<CleanupReport, IptablesError> {
    let mut report = CleanupReport::default();
    let mut restore = String::new();
    for (table, _) in OWNED {
        let saved = ipt.save(table)?;
        let Some(state) = parse_save_tables(&saved).remove(*table) else {
            continue;
        };
        // Unlink first: a chain that is jumped to cannot be deleted.
        for (chain, rule) in jumps_to_owned(table, &state) {
            ipt.run_command(
                table,
                &["-D".to_string(), chain.clone(), rule.0.to_string()],
            )?;
            report
                .rules_removed
                .push((table.to_string(), chain, rule.1));
        }
        let owned: Vec<&String> = state
            .chains
            .keys()
            .filter(|c| is_owned_chain(table, c))
            .collect();
        if owned.is_empty() {
            continue;
        }
        // Declaring a chain in a --noflush restore flushes it; after all
        // are flushed, nothing references them and -X succeeds.
        restore.push_str(&format!("*{table}\n"));
        for chain in &owned {
            restore.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for chain in &owned {
            restore.push_str(&format!("-X {chain}\n"));
            report
                .chains_removed
                .push((table.to_string(), chain.to_string()));
        }
        restore.push_str("COMMIT\n");
    }
    if !restore.is_empty() {
        ipt.restore(&restore)?;
    }
    info!(
        family = %ipt.family(),
        backend = %ipt.backend(),
        rules = report.rules_removed.len(),
        chains = report.chains_removed.len(),
        "iptables cleanup done"
    );
    Ok(report)
}

/// Rules of built-in chains that jump (`-j`/`-g`) to an owned chain, as
/// (chain, (1-based rule number, rulespec)), highest number first per chain
/// so deleting by number in this order keeps the others' numbers valid.
fn jumps_to_owned(table: &str, state: &SavedTable) -> Vec<(String, (usize, String))> {
    let mut out = Vec::new();
    for chain in BUILTIN_CHAINS {
        let Some(rules) = state.chains.get(*chain) else {
            continue;
        };
        let mut hits: Vec<(usize, String)> = rules
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                let words: Vec<&str> = r.split_whitespace().collect();
                words
                    .windows(2)
                    .any(|w| (w[0] == "-j" || w[0] == "-g") && is_owned_chain(table, w[1]))
            })
            .map(|(i, r)| (i + 1, r.clone()))
            .collect();
        hits.reverse();
        out.extend(hits.into_iter().map(|h| (chain.to_string(), h)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::parse_save_tables;

    #[test]
    fn owned_chains() {
        assert!(is_owned_chain("nat", "KUBE-SVC-ABCDEF"));
        assert!(is_owned_chain("nat", "KUBE-SEP-ABCDEF"));
        assert!(is_owned_chain("filter", "KUBE-PROXY-FIREWALL"));
        assert!(is_owned_chain("mangle", "KUBE-PROXY-CANARY"));
        assert!(!is_owned_chain("filter", "KUBE-FIREWALL"));
        assert!(!is_owned_chain("mangle", "KUBE-KUBELET-CANARY"));
        assert!(!is_owned_chain("filter", "KUBE-SVC-ABCDEF"));
        assert!(!is_owned_chain("nat", "DOCKER"));
    }

    #[test]
    fn finds_jumps_highest_first() {
        let text = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j DOCKER\n-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A PREROUTING -p udp -j RETURN\n-A PREROUTING -g KUBE-SVC-X\nCOMMIT\n";
        let tables = parse_save_tables(text);
        let jumps = jumps_to_owned("nat", &tables["nat"]);
        let numbers: Vec<usize> = jumps.iter().map(|(_, (n, _))| *n).collect();
        assert_eq!(numbers, vec![4, 2]);
    }
}
