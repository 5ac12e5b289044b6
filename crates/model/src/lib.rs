//! API objects → validated [`ProxyState`]. Pure: no I/O, no panics on any input.
//!
//! [`StateBuilder`] takes Services, EndpointSlices and the own Node and keeps
//! the [`ProxyState`] every backend programs: one [`ServicePort`] per
//! (family, port) with the endpoints chosen as upstream kube-proxy does.

pub mod builder;
pub mod compat;
mod conflicts;
pub mod convert;
pub mod endpoints;
pub mod objects;
pub mod proxier;
pub mod types;
pub mod validate;

#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;

pub use builder::{ServiceUpdate, StateBuilder};
pub use objects::{ServiceObject, SliceObject};
pub use proxier::{Proxier, SyncFailure, SyncKind, SyncReport};
pub use types::*;
