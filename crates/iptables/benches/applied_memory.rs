//! Heap held by the planner at N ClusterIP services × 10 remote endpoints:
//! the peak while a full plan is built, the plan text, and the [`Applied`]
//! record kept between syncs (what partial syncs diff against).
//!
//! `cargo bench -p kproxy-iptables --bench applied_memory [-- N]` (plain
//! main, no harness; N defaults to 10000). Counts bytes requested from the
//! allocator (capacity, not RSS; allocator overhead not included).
//!
//! [`Applied`]: kproxy_iptables::planner::Applied

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kproxy_iptables::planner::{ExistingChains, LocalDetector, Planner, PlannerConfig};
use kproxy_model::{IpFamily, ServicePortName};

mod support;
use support::{service, state, v4, ENDPOINTS};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= layout.size() {
            grew(new_size - layout.size());
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Resets the peak to what is live now.
fn reset_peak() {
    PEAK.store(live(), Ordering::Relaxed);
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / 1e6
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let mut cfg = PlannerConfig::new(IpFamily::V4);
    cfg.local_detector = LocalDetector::Cidrs(vec!["10.64.0.0/10".parse().expect("cidr")]);
    let planner = Planner::new(cfg).expect("config");
    let st = state(n);

    let base = live();
    // Streamed, as a full sync without chains to adopt applies it: planned,
    // then written through the runner's 64 KiB pipe buffer (here to a sink).
    reset_peak();
    let streamed = planner.plan_full_streamed(&st, &ExistingChains::default());
    let mut pipe = std::io::BufWriter::with_capacity(64 * 1024, std::io::sink());
    streamed.write_to(&mut pipe).expect("sink");
    let streamed_peak = PEAK.load(Ordering::Relaxed) - base;
    drop((pipe, streamed));

    reset_peak();
    let plan = planner.plan_full(&st, &ExistingChains::default());
    let plan_peak = PEAK.load(Ordering::Relaxed) - base;
    let with_plan = live() - base;
    let text = plan.text.capacity();
    let (nat, filter) = (plan.counts.nat_rules, plan.counts.filter_rules);
    let mut slot = None;
    let update = plan.update;
    drop(plan.text);
    update.apply_to(&mut slot);
    let applied = live() - base;

    // One endpoint of one service changes: the partial plan and its commit.
    let Some(prev) = slot.take() else {
        panic!("a full plan yields a record");
    };
    let before_change = live();
    let mut next = st.clone();
    let mut changed_sp = service(n / 2, 0);
    changed_sp.endpoints.cluster[3].ip = v4(0x0a7f_0001);
    changed_sp.endpoints.all[3].ip = v4(0x0a7f_0001);
    let changed: BTreeSet<ServicePortName> = [changed_sp.name.clone()].into();
    next.insert(changed_sp.name.clone(), Arc::new(changed_sp));
    let before_partial = live();
    reset_peak();
    let partial = planner.plan_partial(&prev, &next, &changed);
    let partial_peak = PEAK.load(Ordering::Relaxed) - before_partial;
    let rewritten = partial.text.matches(":KUBE-SVC-").count();
    slot = Some(prev);
    partial.update.apply_to(&mut slot);
    drop((next, changed));
    let after_partial = applied + live() - before_change;

    println!("{n} ClusterIP services x {ENDPOINTS} endpoints: {nat} nat / {filter} filter rules");
    println!(
        "  full plan, peak while planning: {:>8.1} MB",
        mb(plan_peak)
    );
    println!(
        "  streamed full plan, peak while planning and writing: {:.1} MB",
        mb(streamed_peak)
    );
    println!(
        "  full plan, text + update:       {:>8.1} MB",
        mb(with_plan)
    );
    println!("    of which the text:            {:>8.1} MB", mb(text));
    println!("  applied record:                 {:>8.1} MB", mb(applied));
    println!(
        "  partial plan (1 endpoint), peak: {:>7.3} MB, chains rewritten: {rewritten}",
        mb(partial_peak)
    );
    println!(
        "  applied record after it:        {:>8.1} MB",
        mb(after_partial)
    );
    drop(slot);
}
