//! kproxy-metrics
