//! iptables backend: a pure rule planner and a thin `iptables-restore` applier.

pub mod cleanup;
pub mod conntrack;
pub mod netutil;
pub mod normalize;
pub mod planner;
pub mod proxier;
pub mod runner;
