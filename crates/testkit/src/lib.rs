//! Test support: a fake Kubernetes API server and network-namespace topologies.

pub mod apiserver;
pub mod kproxy;
pub mod netns;
