//! kproxy: a drop-in replacement for kube-proxy.

fn main() {}
