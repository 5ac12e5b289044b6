//! The normaliser against the real kernel: every golden full plan, loaded
//! with `iptables-restore` into a fresh network namespace (legacy and nft),
//! reads back through `iptables-save` as rules that normalise equal to the
//! planner's, chain by chain — so the first sync after a restart finds every
//! unchanged chain unchanged and leaves it alone.

use std::collections::BTreeMap;
use std::path::PathBuf;

use kproxy_iptables::normalize::{held_chains, normalize, unchanged_chains};
use kproxy_iptables::planner::Table;
use kproxy_iptables::runner::{parse_save_tables, Backend, Iptables};
use kproxy_model::IpFamily;
use kproxy_testkit::netns::{skip_unless_root, Netns};

type Chains = BTreeMap<(Table, String), Vec<String>>;

fn chains(text: &str) -> Chains {
    let mut out = Chains::new();
    for (name, table) in parse_save_tables(text) {
        let t = match name.as_str() {
            "nat" => Table::Nat,
            "filter" => Table::Filter,
            _ => continue,
        };
        for (chain, rules) in table.chains {
            out.insert((t, chain), rules);
        }
    }
    out
}

fn goldens() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut v: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("golden dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .map(|p| {
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, std::fs::read_to_string(&p).expect("golden"))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn every_golden_plan_normalises_equal_after_a_kernel_round_trip() {
    if skip_unless_root("every_golden_plan_normalises_equal_after_a_kernel_round_trip") {
        return;
    }
    let goldens = goldens();
    assert!(goldens.len() >= 10, "golden files not found");
    for backend in [Backend::Legacy, Backend::Nft] {
        let mut rules_checked = 0usize;
        let mut respelled = 0usize;
        for (name, text) in &goldens {
            let family = if text.contains("::") || name.contains("ipv6") {
                IpFamily::V6
            } else {
                IpFamily::V4
            };
            let ns = Netns::create(&format!("norm-{}", backend.as_str())).expect("create netns");
            let ipt = Iptables::new(family, backend);
            let saved = ns
                .run_in(|| -> Result<String, String> {
                    ipt.restore(text).map_err(|e| e.to_string())?;
                    let mut out = String::new();
                    for table in ["filter", "nat"] {
                        out.push_str(&ipt.save(table).map_err(|e| e.to_string())?);
                    }
                    Ok(out)
                })
                .expect("run in netns")
                .unwrap_or_else(|e| panic!("{name} ({backend}): {e}"));
            let planned = chains(text);
            let kernel = chains(&saved);
            for (key, want) in &planned {
                let have = kernel
                    .get(key)
                    .unwrap_or_else(|| panic!("{name} ({backend}): {key:?} not in the kernel"));
                assert_eq!(
                    want.len(),
                    have.len(),
                    "{name} ({backend}): {key:?} rule count"
                );
                for (w, h) in want.iter().zip(have) {
                    assert_eq!(
                        normalize(w),
                        normalize(h),
                        "{name} ({backend}) {key:?}:\n  planner: {w}\n  kernel:  {h}"
                    );
                    rules_checked += 1;
                    respelled += usize::from(w != h);
                }
            }
            let unchanged = unchanged_chains(&planned, &held_chains(kernel.clone()));
            assert_eq!(
                unchanged.len(),
                planned.len(),
                "{name} ({backend}): every chain is unchanged"
            );
        }
        println!(
            "{backend}: {rules_checked} rules of {} golden plans round-tripped, {respelled} respelled by the kernel",
            goldens.len()
        );
        assert!(rules_checked > 200 && respelled > 100, "the test is blind");
    }
}

/// The jump rules from the built-in chains, once installed, are found in
/// `iptables -S CHAIN` by their normalised spelling: a full sync then
/// checks them with one cheap listing per chain instead of a `-C` per rule
/// (which loads the whole table with iptables-nft). A spelling that differs
/// from iptables' would still work, through `-C`, but slowly; this catches it.
#[test]
fn planner_jump_rules_are_found_by_listing_after_ensure() {
    use kproxy_iptables::planner::{Planner, PlannerConfig};
    use kproxy_iptables::proxier::jump_rule;

    if skip_unless_root("planner_jump_rules_are_found_by_listing_after_ensure") {
        return;
    }
    let goldens = goldens();
    for backend in [Backend::Legacy, Backend::Nft] {
        for family in IpFamily::ALL {
            let (name, text) = goldens
                .iter()
                .find(|(name, text)| {
                    (family == IpFamily::V6) == (text.contains("::") || name.contains("ipv6"))
                })
                .expect("a golden plan of each family");
            let planner = Planner::new(PlannerConfig::new(family)).expect("default config");
            let rules: Vec<_> = planner.jump_rules().iter().map(jump_rule).collect();
            assert!(rules.len() >= 10, "{rules:?}");
            let ns = Netns::create(&format!("jumps-{}", backend.as_str())).expect("create netns");
            let ipt = Iptables::new(family, backend);
            let (added, again, unlisted) = ns
                .run_in(|| -> Result<_, String> {
                    ipt.restore(text).map_err(|e| e.to_string())?;
                    let added = ipt.ensure_jump_rules(&rules).map_err(|e| e.to_string())?;
                    let again = ipt.ensure_jump_rules(&rules).map_err(|e| e.to_string())?;
                    let unlisted: Vec<String> = ipt
                        .jump_rules_not_listed(&rules)
                        .map_err(|e| e.to_string())?
                        .iter()
                        .map(|r| format!("{} {} {:?}", r.table, r.chain, r.rulespec))
                        .collect();
                    Ok((added, again, unlisted))
                })
                .expect("run in netns")
                .unwrap_or_else(|e| panic!("{name} ({backend} {family}): {e}"));
            assert_eq!(added, rules.len(), "{backend} {family}");
            assert_eq!(again, 0, "{backend} {family}");
            assert!(
                unlisted.is_empty(),
                "{backend} {family}: not found by listing: {unlisted:#?}"
            );
        }
    }
}
