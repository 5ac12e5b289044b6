//! Time to build the ProxyState from scratch, and of one update_service,
//! at 1k / 10k / 50k ClusterIP services × 10 endpoints.
//!
//! Run with `cargo bench -p kproxy-model`.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_model::compat::ListField;
use kproxy_model::fixtures::{simple_service, Ep, SliceBuilder};
use kproxy_model::{ServiceKey, StateBuilder};

const ENDPOINTS: usize = 10;

fn objects(n: usize) -> Vec<(ServiceKey, Service, EndpointSlice)> {
    (0..n)
        .map(|i| {
            let name = format!("svc-{i}");
            let ip = format!("10.{}.{}.{}", 96 + (i >> 16), (i >> 8) & 0xff, i & 0xff);
            let svc = simple_service("bench", &name, &ip, 80);
            let mut slice = SliceBuilder::new("bench", &format!("{name}-abcde"), &name, "IPv4")
                .port("", 8080, "TCP");
            for e in 0..ENDPOINTS {
                // Unique within a service; one endpoint on our node.
                let ep_ip = format!("10.{}.{}.{}", 128 + e, (i >> 8) & 0xff, i & 0xff);
                let node = if e == 0 { "node-a" } else { "node-b" };
                slice = slice.endpoint(Ep::new(&ep_ip).node(node));
            }
            (ServiceKey::new("bench", &name), svc, slice.build())
        })
        .collect()
}

fn fmt(d: Duration) -> String {
    if d.as_secs_f64() >= 1.0 {
        format!("{:.2} s", d.as_secs_f64())
    } else if d.as_micros() >= 1000 {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    }
}

fn main() {
    println!(
        "| services | endpoints | full build | per service | one update_service (median of 101) |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for n in [1_000, 10_000, 50_000] {
        let objs = objects(n);
        let mut b = StateBuilder::new("node-a");
        let start = Instant::now();
        for (key, svc, slice) in &objs {
            b.update_service(key, Some(svc), &[slice]);
        }
        let full = start.elapsed();
        assert_eq!(b.state().service_port_count(), n);
        assert_eq!(b.state().endpoint_count(), n * ENDPOINTS);

        // One service changes: its slice loses an endpoint, then gets it back.
        let (key, svc, slice) = &objs[n / 2];
        let mut smaller = slice.clone();
        smaller.endpoints.items_mut().pop();
        let mut times = Vec::with_capacity(101);
        for i in 0..101 {
            let s = if i % 2 == 0 { &smaller } else { slice };
            let t = Instant::now();
            let up = b.update_service(key, Some(svc), &[s]);
            times.push(t.elapsed());
            assert_eq!(up.changed_ports.len(), 1);
        }
        times.sort();
        println!(
            "| {n} | {} | {} | {} | {} |",
            n * ENDPOINTS,
            fmt(full),
            fmt(full / n as u32),
            fmt(times[50])
        );
    }
}
