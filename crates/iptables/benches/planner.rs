//! Planner benchmark: full-plan time and size for N ClusterIP services × 10
//! remote endpoints, next to upstream's layout (2 + 3E nat rules and E + 1
//! chains per service), and a one-endpoint partial plan.
//!
//! `cargo bench -p kproxy-iptables --bench planner` (plain main, no harness).

use std::collections::BTreeSet;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kproxy_iptables::planner::{ExistingChains, LocalDetector, Planner, PlannerConfig};
use kproxy_model::{IpFamily, ServicePortName};

mod support;
use support::{service, state, v4, ENDPOINTS};

fn best<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut out = None;
    for _ in 0..runs {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed());
        out = Some(v);
    }
    match out {
        Some(v) => (best, v),
        None => (best, f()),
    }
}

/// (nat rules, nat chains) of a restore text, counting only `KUBE-` chains.
fn nat_counts(text: &str) -> (usize, usize) {
    let nat = text.split("*nat\n").nth(1).unwrap_or("");
    let rules = nat.lines().filter(|l| l.starts_with("-A ")).count();
    let chains = nat.lines().filter(|l| l.starts_with(':')).count();
    (rules, chains)
}

fn main() {
    let mut cfg = PlannerConfig::new(IpFamily::V4);
    cfg.local_detector = LocalDetector::Cidrs(vec!["10.64.0.0/10".parse().expect("cidr")]);
    let planner = Planner::new(cfg).expect("config");

    println!("full plan, N ClusterIP services x {ENDPOINTS} remote endpoints (large-cluster mode: no per-endpoint comments)");
    println!(
        "{:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10}",
        "N",
        "plan ms",
        "nat rules",
        "upstream",
        "nat chains",
        "upstream",
        "filter rules",
        "text MiB",
        "rules/svc"
    );
    for n in [1_000usize, 10_000, 50_000] {
        let st = state(n);
        let runs = if n >= 50_000 { 2 } else { 3 };
        let (t, plan) = best(runs, || {
            planner.plan_full(black_box(&st), &ExistingChains::default())
        });
        let (nat_rules, nat_chains) = nat_counts(&plan.text);
        assert_eq!(nat_rules, plan.counts.nat_rules);
        let fixed_nat = 5; // POSTROUTING 3, MARK-MASQ 1, NodePort jump 1
        println!(
            "{:>7} {:>10.1} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12.1} {:>10.1}",
            n,
            t.as_secs_f64() * 1e3,
            nat_rules,
            n * (2 + 3 * ENDPOINTS) + fixed_nat,
            nat_chains,
            n * (ENDPOINTS + 1) + 5,
            plan.counts.filter_rules,
            plan.text.len() as f64 / (1024.0 * 1024.0),
            (nat_rules - fixed_nat) as f64 / n as f64,
        );
    }

    println!();
    println!("streamed full plan (planned, then written to a sink through a 64 KiB buffer)");
    println!("{:>7} {:>10}", "N", "ms");
    for n in [10_000usize, 50_000] {
        let st = state(n);
        let (t, written) = best(3, || {
            let plan = planner.plan_full_streamed(black_box(&st), &ExistingChains::default());
            let mut w = std::io::BufWriter::with_capacity(64 * 1024, std::io::sink());
            plan.write_to(&mut w).map(|_| plan.text_len())
        });
        assert!(written.is_ok());
        println!("{:>7} {:>10.1}", n, t.as_secs_f64() * 1e3);
    }

    println!();
    println!("partial plan: one endpoint of one service changes");
    println!(
        "{:>7} {:>12} {:>12} {:>14} {:>12} {:>12}",
        "N", "plan µs", "commit µs", "rules written", "text bytes", "touches SVCS"
    );
    for n in [10_000usize, 50_000] {
        let st = state(n);
        let mut slot = None;
        planner
            .plan_full(&st, &ExistingChains::default())
            .update
            .apply_to(&mut slot);
        let Some(applied) = slot else {
            panic!("full plan yields a record");
        };
        let mut next = st.clone();
        let changed_port = service(n / 2, 0);
        let mut changed_sp = changed_port.clone();
        changed_sp.endpoints.cluster[3].ip = v4(0x0a7f_0001);
        changed_sp.endpoints.all[3].ip = v4(0x0a7f_0001);
        next.insert(changed_sp.name.clone(), Arc::new(changed_sp));
        let changed: BTreeSet<ServicePortName> = [changed_port.name.clone()].into();
        let (t, plan) = best(20, || {
            planner.plan_partial(black_box(&applied), &next, &changed)
        });
        let text_len = plan.text.len();
        let rules_written = plan.counts.rules_written;
        let touches = plan.text.contains("KUBE-SERVICES");
        let mut slot = Some(applied);
        let t_commit = Instant::now();
        plan.update.apply_to(&mut slot);
        let commit = t_commit.elapsed();
        println!(
            "{:>7} {:>12.1} {:>12.1} {:>14} {:>12} {:>12}",
            n,
            t.as_secs_f64() * 1e6,
            commit.as_secs_f64() * 1e6,
            rules_written,
            text_len,
            touches
        );
    }
}
