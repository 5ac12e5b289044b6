//! API objects → validated [`ProxyState`]. Pure: no I/O, no panics on any input.

pub mod builder;
pub mod proxier;
pub mod types;

pub use builder::{ServiceUpdate, StateBuilder};
pub use proxier::{Proxier, SyncFailure, SyncKind, SyncReport};
pub use types::*;
