//! IPVS programming at scale, against a real kernel (run inside the IPVS VM
//! by `crates/ipvs/benches/ipvs-vm.sh`): 10k services × 10 real servers from
//! empty, one endpoint change at that size, and `ipvsadm -R` loading the
//! same table, each in a fresh network namespace. Prints a table.
//!
//! Args: `[services] [endpoints]` (default 10000 10).

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kproxy_ipvs::{plan, IpvsConfig, IpvsProxier};
use kproxy_model::{
    Changes, Endpoint, IpFamily, Protocol, Proxier, ProxyState, ServiceEndpoints,
    ServiceKey as SvcName, ServicePort, ServicePortName,
};

fn enter_netns() {
    // SAFETY: unshare(2) takes no pointers; CLONE_NEWNET only switches this
    // thread's network namespace (the bench is single-threaded until here).
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
    sh("ip link set lo up");
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ep(i: u32, j: u32) -> Endpoint {
    let n = i * 16 + j;
    Endpoint {
        ip: IpAddr::V4(Ipv4Addr::new(
            10,
            128 + (n >> 16) as u8,
            (n >> 8) as u8,
            n as u8,
        )),
        port: 8080,
        is_local: false,
        ready: true,
        serving: true,
        terminating: false,
    }
}

fn service(i: u32, eps: u32) -> ServicePort {
    let e: Vec<Endpoint> = (0..eps).map(|j| ep(i, j)).collect();
    ServicePort {
        name: ServicePortName {
            service: SvcName::new("bench", format!("svc-{i}")),
            port: String::new(),
            protocol: Protocol::Tcp,
        },
        family: IpFamily::V4,
        cluster_ip: IpAddr::V4(Ipv4Addr::new(10, 96, (i >> 8) as u8, i as u8)),
        port: 80,
        target_port: "8080".into(),
        node_port: None,
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        session_affinity_seconds: None,
        external_policy_local: false,
        internal_policy_local: false,
        health_check_node_port: None,
        endpoints: ServiceEndpoints {
            all: e.clone(),
            cluster: e,
            local: vec![],
            has_any: eps > 0,
        },
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: u32 = args.first().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let eps: u32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    if !std::path::Path::new("/sys/module/ip_vs").exists() {
        eprintln!("ipvs_scale: no IPVS in this kernel; run crates/ipvs/benches/ipvs-vm.sh");
        return;
    }
    let mut state = ProxyState::default();
    for i in 0..n {
        let sp = service(i, eps);
        state.ipv4.insert(sp.name.clone(), Arc::new(sp));
    }
    let cfg = IpvsConfig {
        node_ips: vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))],
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        ..IpvsConfig::default()
    };
    let mut rows: Vec<(String, String, String)> = Vec::new();

    let t = Instant::now();
    let p = plan(&state, &cfg, &cfg.node_ips);
    rows.push((
        "plan (pure)".into(),
        ms(t.elapsed()),
        format!("{} VS, {} RS", p.services.len(), p.dest_count()),
    ));

    enter_netns();
    let mut proxier = IpvsProxier::new(cfg.clone()).expect("IpvsProxier::new");
    let all: BTreeSet<_> = state
        .ipv4
        .keys()
        .map(|k| (IpFamily::V4, k.clone()))
        .collect();
    let r = proxier.sync(
        &state,
        &Changes {
            ports: all,
            force_full: true,
        },
    );
    assert!(r.succeeded(), "{:?}", r.failure);
    rows.push((
        "kproxy full sync from empty".into(),
        ms(r.duration),
        format!(
            "{} objects written (IPVS + kube-ipvs0 + iptables)",
            r.objects_written
        ),
    ));
    let vs = sh("ipvsadm -Ln | grep -c '^TCP'").trim().to_string();
    let rs = sh("ipvsadm -Ln | grep -c -- '->'").trim().to_string();

    // One endpoint replaced in one service.
    let mut changed = service(n / 2, eps);
    changed.endpoints.cluster[0].ip = IpAddr::V4(Ipv4Addr::new(10, 250, 0, 1));
    changed.endpoints.all = changed.endpoints.cluster.clone();
    let name = changed.name.clone();
    state.ipv4.insert(name.clone(), Arc::new(changed));
    let ch = Changes {
        ports: [(IpFamily::V4, name)].into(),
        force_full: false,
    };
    let r = proxier.sync(&state, &ch);
    assert!(r.succeeded(), "{:?}", r.failure);
    rows.push((
        "kproxy one endpoint change (partial)".into(),
        ms(r.duration),
        format!("{} objects written", r.objects_written),
    ));
    let r = proxier.sync(
        &state,
        &Changes {
            ports: BTreeSet::new(),
            force_full: true,
        },
    );
    assert!(r.succeeded(), "{:?}", r.failure);
    rows.push((
        "kproxy full resync, nothing to do".into(),
        ms(r.duration),
        format!("{} objects written", r.objects_written),
    ));
    drop(proxier);

    // The same table through ipvsadm -R in a fresh namespace.
    enter_netns();
    let mut input = String::with_capacity(p.services.len() * (eps as usize + 1) * 48);
    for d in p.services.values() {
        let a = format!("{}:{}", d.service.addr, d.service.port);
        input.push_str(&format!("-A -t {a} -s rr\n"));
        for dst in d.dests.values() {
            input.push_str(&format!("-a -t {a} -r {}:{} -m -w 1\n", dst.addr, dst.port));
        }
    }
    let t = Instant::now();
    let mut child = Command::new("ipvsadm")
        .arg("-R")
        .stdin(Stdio::piped())
        .spawn()
        .expect("ipvsadm");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    assert!(child.wait().expect("wait").success(), "ipvsadm -R failed");
    rows.push((
        "ipvsadm -R same table (IPVS only)".into(),
        ms(t.elapsed()),
        format!("{} lines", input.lines().count()),
    ));

    println!("\nIPVS scale: {n} services x {eps} real servers (kernel {}); kproxy table: {vs} VS, {rs} RS", sh("uname -r").trim());
    println!("{:<40} {:>12}  notes", "what", "ms");
    for (w, t, note) in rows {
        println!("{w:<40} {t:>12}  {note}");
    }
}
