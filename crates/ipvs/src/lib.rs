//! kproxy-ipvs
