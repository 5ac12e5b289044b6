//! Jumps from the built-in chains, as the proxier adds them, on the real
//! kernel (legacy and nft, both families): missing ones go into the full
//! sync's restore, and later full syncs find them by listing and never add
//! them twice; a differently spelled jump to one of our chains is left to
//! `-C` instead of being duplicated.

use kproxy_iptables::planner::{Planner, PlannerConfig};
use kproxy_iptables::proxier::{jump_rule, FamilyConfig, FamilyProxier, IptablesProxier};
use kproxy_iptables::runner::{Backend, Iptables, JumpRule};
use kproxy_model::{Changes, IpFamily, Proxier, ProxyState};
use kproxy_testkit::netns::{skip_unless_root, Netns};

fn proxier(family: IpFamily, backend: Backend) -> IptablesProxier {
    let fp = FamilyProxier::new(
        FamilyConfig::new(PlannerConfig::new(family)),
        Box::new(Iptables::new(family, backend)),
    )
    .expect("default config");
    IptablesProxier::new(vec![fp], None)
}

/// The jumps from built-in chains the planner wants, as the runner adds them.
fn planner_jumps(family: IpFamily) -> Vec<JumpRule> {
    Planner::new(PlannerConfig::new(family))
        .expect("config")
        .jump_rules()
        .iter()
        .map(jump_rule)
        .collect()
}

/// `<iptables> -t table -S chain` in `ns`.
fn listing(ns: &Netns, family: IpFamily, backend: Backend, table: &str, chain: &str) -> String {
    let program = match family {
        IpFamily::V4 => format!("iptables-{}", backend.as_str()),
        IpFamily::V6 => format!("ip6tables-{}", backend.as_str()),
    };
    ns.exec_ok([program.as_str(), "-t", table, "-S", chain])
        .expect("list chain")
}

#[test]
fn full_syncs_add_each_jump_once() {
    if skip_unless_root("full_syncs_add_each_jump_once") {
        return;
    }
    let forced = Changes {
        force_full: true,
        ..Changes::default()
    };
    for backend in [Backend::Legacy, Backend::Nft] {
        for family in IpFamily::ALL {
            let ns = Netns::create(&format!("jumps-{}", backend.as_str())).expect("netns");
            let jumps = planner_jumps(family);
            let state = ProxyState::default();
            let reports = ns
                .run_in(|| {
                    let mut p = proxier(family, backend);
                    let first = p.sync(&state, &Changes::default());
                    let second = p.sync(&state, &forced);
                    (first, second)
                })
                .expect("run in netns");
            assert!(reports.0.succeeded(), "{backend} {family}: {:?}", reports.0);
            assert!(reports.1.succeeded(), "{backend} {family}: {:?}", reports.1);
            for j in &jumps {
                let target = j.rulespec.last().cloned().unwrap_or_default();
                let listed = listing(&ns, family, backend, &j.table, &j.chain);
                let n = listed
                    .lines()
                    .filter(|l| l.ends_with(&format!("-j {target}")))
                    .count();
                assert_eq!(
                    n, 1,
                    "{backend} {family}: {} {} -> {target}:\n{listed}",
                    j.table, j.chain
                );
            }
        }
    }
}

#[test]
fn a_differently_spelled_jump_is_not_duplicated() {
    if skip_unless_root("a_differently_spelled_jump_is_not_duplicated") {
        return;
    }
    let family = IpFamily::V4;
    for backend in [Backend::Legacy, Backend::Nft] {
        let ns = Netns::create(&format!("jumps-spelled-{}", backend.as_str())).expect("netns");
        let ipt = format!("iptables-{}", backend.as_str());
        // Someone else's jump to our chain, without our comment.
        ns.exec_ok([ipt.as_str(), "-t", "nat", "-N", "KUBE-SERVICES"])
            .expect("create chain");
        ns.exec_ok([
            ipt.as_str(),
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-j",
            "KUBE-SERVICES",
        ])
        .expect("add foreign jump");
        let jumps = planner_jumps(family);
        let (unsure, absent) = ns
            .run_in(|| {
                let missing = Iptables::new(family, backend)
                    .missing_jump_rules(&jumps)
                    .expect("list");
                let names = |v: &[&JumpRule]| -> Vec<String> {
                    v.iter()
                        .map(|j| format!("{} {}", j.table, j.chain))
                        .collect()
                };
                (names(&missing.unsure), names(&missing.absent))
            })
            .expect("run in netns");
        assert_eq!(unsure, ["nat PREROUTING"], "{backend}");
        assert_eq!(absent.len(), jumps.len() - 1, "{backend}: {absent:?}");
        let report = ns
            .run_in(|| proxier(family, backend).sync(&ProxyState::default(), &Changes::default()))
            .expect("run in netns");
        assert!(report.succeeded(), "{backend}: {report:?}");
        let listed = listing(&ns, family, backend, "nat", "PREROUTING");
        let ours = listed
            .lines()
            .filter(|l| l.contains("kubernetes service portals"))
            .count();
        // `-C` does not match the foreign spelling, so ours is added once,
        // by the ensure path; the foreign rule stays.
        assert_eq!(ours, 1, "{backend}:\n{listed}");
        assert_eq!(
            listed
                .lines()
                .filter(|l| l.ends_with("-j KUBE-SERVICES"))
                .count(),
            2,
            "{backend}:\n{listed}"
        );
    }
}
