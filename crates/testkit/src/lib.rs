//! kproxy-testkit
