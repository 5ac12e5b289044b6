//! kproxy-ipvs: the IPVS backend's kernel side.
//!
//! - [`codec`]: IPVS generic-netlink messages (pure, golden-tested).
//! - [`client`]: a synchronous IPVS client ([`IpvsClient`]).
//! - [`link`]: the `kube-ipvs0` dummy interface and its addresses ([`LinkClient`]).
//! - [`sysctl`]: the sysctls IPVS mode needs, and an applier.
//! - [`planner`], [`diff`], [`rules`]: the pure core of IPVS mode (state →
//!   virtual servers, kernel table → ordered operations, iptables part).
//!
//! Kernel-facing code is tested inside a VM with IPVS: `scripts/test-ipvs-vm.sh`.

pub mod client;
pub mod codec;
pub mod diff;
mod errno;
pub mod link;
mod nl;
pub mod planner;
pub mod proxier;
pub mod rules;
pub mod sysctl;

pub use client::{IpvsClient, IpvsError, Operation};
pub use codec::{
    Destination, ForwardMethod, Info, IpvsProtocol, Service, ServiceFlags, ServiceKey, Stats,
    Timeouts,
};
pub use diff::{diff, CurrentService, DrainPolicy, DrainState, Op};
pub use errno::errno_text;
pub use link::{AddressSync, LinkClient, LinkError, DEFAULT_DUMMY_NAME};
pub use planner::{plan, DesiredService, IpvsConfig, Plan, VsKind};
pub use proxier::{cleanup, CleanupError, CleanupReport, IpvsProxier, IpvsProxierError};
pub use sysctl::{apply_sysctls, ipvs_sysctls, Sysctl, SysctlOptions, SysctlOutcome, SysctlReport};
