//! kproxy-watch
