//! Network namespaces, veth pairs and bridges for tests that send real traffic.
//!
//! Everything happens inside namespaces created here; nothing touches the
//! root namespace's interfaces, routes, sysctls or rules. Veth pairs are
//! created from inside a namespace (`ip netns exec NODE ip link add ... peer
//! ... netns POD`), so even their transient names never appear in the root
//! namespace.
//!
//! * [`Netns`]: one namespace, unique per process and test, deleted on drop.
//!   [`Netns::run_in`] runs a closure on a thread inside it: sockets created
//!   there stay in the namespace and can then be used from any thread.
//! * [`Topology`]: a small cluster — a node with a pod bridge, pods, an
//!   external client, optionally a remote node with its own pods.
//! * Traffic helpers: echo servers that answer with their namespace's name,
//!   and TCP / UDP / HTTP clients.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

const NETNS_DIR: &str = "/run/netns";
/// Every namespace made here is named `kpt<pid>-<n>-<label>`: the pid lets a
/// later run find and delete namespaces of crashed runs.
const PREFIX: &str = "kpt";

static COUNTER: AtomicUsize = AtomicUsize::new(0);
static STALE_CLEANUP: Once = Once::new();

/// Whether the process can create namespaces. Tests call this and return
/// early with a printed reason when it is false.
pub fn is_root() -> bool {
    // From /proc rather than libc::geteuid: no unsafe needed.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

/// `if skip_unless_root("why") { return; }` at the top of a test that needs root.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        false
    } else {
        eprintln!("SKIPPED {test}: needs root to create network namespaces");
        true
    }
}

/// Deletes namespaces left by test processes that no longer exist.
fn cleanup_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(netns = %name, "deleting stale test namespace");
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

/// A network namespace, deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
    label: String,
}

impl Netns {
    /// Creates a namespace named after `label` (unique per process and
    /// call) with `lo` up.
    pub fn create(label: &str) -> Result<Netns> {
        STALE_CLEANUP.call_once(cleanup_stale);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{label}", std::process::id());
        run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns {
            name,
            label: label.to_string(),
        };
        ns.exec_ok(["ip", "link", "set", "lo", "up"])?;
        // No duplicate address detection on interfaces created later (link-
        // local addresses included): a tentative address silently eats the
        // first IPv6 packets, and UDP does not retransmit.
        for key in [
            "net/ipv6/conf/all/accept_dad",
            "net/ipv6/conf/default/accept_dad",
        ] {
            ns.set_sysctl(key, "0")?;
        }
        Ok(ns)
    }

    /// The namespace's full (unique) name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The label it was created with.
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Runs `argv` inside the namespace (`ip netns exec`).
    pub fn exec<I, S>(&self, argv: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        cmd.output()
            .with_context(|| format!("running ip netns exec {}", self.name))
    }

    /// Like [`Netns::exec`], failing on a non-zero exit; returns stdout.
    pub fn exec_ok<I, S>(&self, argv: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        run_checked(&mut cmd)
    }

    /// Runs `argv` (a shell-free command line split on whitespace) inside the namespace.
    pub fn sh(&self, line: &str) -> Result<String> {
        self.exec_ok(line.split_whitespace())
    }

    /// Runs `f` on a fresh thread that has entered this namespace and
    /// returns its result. Sockets `f` creates belong to the namespace for
    /// their whole life, wherever they are used afterwards; processes it
    /// starts run in the namespace; netlink sockets and /proc/sys see it.
    /// (/proc/net is /proc/self/net, the main thread's view: use
    /// /proc/thread-self/net inside `f`.)
    pub fn run_in<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        std::thread::scope(|scope| {
            let handle = scope.spawn(move || -> Result<T> {
                enter(&file)?;
                Ok(f())
            });
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Like [`Netns::run_in`] but does not wait: `f` runs on a background
    /// thread inside the namespace (for servers that must keep running).
    /// The thread's result is an error if it could not enter the namespace.
    pub fn spawn_in<T, F>(&self, f: F) -> Result<JoinHandle<Result<T>>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        Ok(std::thread::spawn(move || -> Result<T> {
            enter(&file)?;
            Ok(f())
        }))
    }

    /// Reads a sysctl of this namespace, e.g. `net/ipv4/ip_forward`.
    pub fn sysctl(&self, key: &str) -> Result<String> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run_in(move || std::fs::read_to_string(&path))?
            .map(|s| s.trim().to_string())
            .with_context(|| format!("reading sysctl {key}"))
    }

    /// Writes a sysctl of this namespace.
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run_in(move || std::fs::write(&path, value))?
            .with_context(|| format!("writing sysctl {key}={value}"))
    }
}

/// Moves the calling thread into the network namespace `file` refers to.
fn enter(file: &File) -> Result<()> {
    // SAFETY: `setns` only reads its two integer arguments; `file` is an open
    // fd of /run/netns/NAME that outlives the call. Changing the network
    // namespace is sound for Rust code because it affects only the calling
    // thread, and every caller is a dedicated thread spawned for this purpose
    // that exits when its closure returns, so no other code (a thread pool,
    // the test harness) ever runs on it in the wrong namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn run_checked(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A pod: a namespace on a node's bridge.
#[derive(Debug)]
pub struct Pod {
    pub ns: Netns,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Pod {
    /// The pod's IPv4 address.
    pub fn ip(&self) -> IpAddr {
        IpAddr::V4(self.ipv4)
    }

    pub fn ip6(&self) -> IpAddr {
        IpAddr::V6(self.ipv6)
    }
}

/// A small cluster for traffic tests.
///
/// ```text
///  client ns                node ns                               pod ns (i)
///  eth0 192.168.50.2 ─veth─ eth-client 192.168.50.1
///       fd00:0:0:50::2           fd00:0:0:50::1
///                           br0 10.244.1.1/24 ──── veth-p<i> ─── eth0 10.244.1.(10+i)
///                               fd00:10:244:1::1/64                 fd00:10:244:1::(10+i)
///                           eth-remote 172.18.0.2 ─veth─ remote node ns 172.18.0.3 (fd00:0:0:18::2/3)
///                                                         br0 10.244.2.1/24 ─ remote pods 10.244.2.(10+i)
/// ```
/// The node forwards (ip_forward=1, IPv6 forwarding on); the client, pods
/// and remote node route everything through it. The remote node network
/// exists only when remote pods were asked for.
#[derive(Debug)]
pub struct Topology {
    pub node: Netns,
    pub client: Netns,
    pub pods: Vec<Pod>,
    /// The simulated second node (holds `remote_pods`' bridge).
    pub remote_node: Option<Netns>,
    pub remote_pods: Vec<Pod>,
}

/// Builds a [`Topology`].
#[derive(Clone, Debug)]
pub struct TopologyBuilder {
    pods: usize,
    remote_pods: usize,
}

pub const POD_CIDR_V4: &str = "10.244.1.0/24";
pub const POD_CIDR_V6: &str = "fd00:10:244:1::/64";
pub const CLUSTER_CIDR_V4: &str = "10.244.0.0/16";
pub const CLUSTER_CIDR_V6: &str = "fd00:10:244::/56";
/// The node's address on the client link (what external clients use).
pub const NODE_IP_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
pub const NODE_IP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0x50, 0, 0, 0, 1);
pub const CLIENT_IP_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
pub const CLIENT_IP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0x50, 0, 0, 0, 2);
/// The node's gateway address on the pod bridge.
pub const NODE_BRIDGE_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
pub const NODE_BRIDGE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 1);
/// The node's address towards the remote node.
pub const NODE_INTERNAL_V4: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
pub const NODE_INTERNAL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0x18, 0, 0, 0, 2);
pub const REMOTE_NODE_V4: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);
pub const REMOTE_NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0x18, 0, 0, 0, 3);

impl Topology {
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder {
            pods: 2,
            remote_pods: 0,
        }
    }

    /// Pod `i` on this node.
    ///
    /// # Panics
    /// When there is no such pod (a bug in the test).
    pub fn pod(&self, i: usize) -> &Pod {
        &self.pods[i]
    }

    /// Pod `i` on the remote node.
    ///
    /// # Panics
    /// When there is no such pod.
    pub fn remote_pod(&self, i: usize) -> &Pod {
        &self.remote_pods[i]
    }
}

impl TopologyBuilder {
    /// Pods on the node (default 2).
    pub fn pods(mut self, n: usize) -> Self {
        self.pods = n;
        self
    }

    /// Pods on a simulated remote node (default 0: no remote node).
    pub fn remote_pods(mut self, n: usize) -> Self {
        self.remote_pods = n;
        self
    }

    pub fn build(self) -> Result<Topology> {
        if self.pods > 200 || self.remote_pods > 200 {
            bail!("at most 200 pods per node");
        }
        let node = Netns::create("node")?;
        setup_node_bridge(&node, 1)?;
        for key in [
            "net/ipv4/ip_forward",
            "net/ipv6/conf/all/forwarding",
            "net/ipv6/conf/default/forwarding",
        ] {
            node.set_sysctl(key, "1")?;
        }

        let client = Netns::create("client")?;
        link(
            &node,
            "eth-client",
            &client,
            (NODE_IP_V4, NODE_IP_V6),
            (CLIENT_IP_V4, CLIENT_IP_V6),
            24,
        )?;
        client.sh(&format!("ip route add default via {NODE_IP_V4}"))?;
        client.sh(&format!("ip -6 route add default via {NODE_IP_V6}"))?;

        let mut pods = Vec::new();
        for i in 0..self.pods {
            pods.push(add_pod(&node, 1, i, "pod")?);
        }

        let mut remote_node = None;
        let mut remote_pods = Vec::new();
        if self.remote_pods > 0 {
            let remote = Netns::create("remote")?;
            link(
                &node,
                "eth-remote",
                &remote,
                (NODE_INTERNAL_V4, NODE_INTERNAL_V6),
                (REMOTE_NODE_V4, REMOTE_NODE_V6),
                24,
            )?;
            setup_node_bridge(&remote, 2)?;
            for key in ["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"] {
                remote.set_sysctl(key, "1")?;
            }
            // Each node routes the other's pod CIDR to it; everything else
            // from the remote node goes through our node.
            node.sh(&format!("ip route add 10.244.2.0/24 via {REMOTE_NODE_V4}"))?;
            node.sh(&format!(
                "ip -6 route add fd00:10:244:2::/64 via {REMOTE_NODE_V6}"
            ))?;
            remote.sh(&format!("ip route add default via {NODE_INTERNAL_V4}"))?;
            remote.sh(&format!("ip -6 route add default via {NODE_INTERNAL_V6}"))?;
            for i in 0..self.remote_pods {
                remote_pods.push(add_pod(&remote, 2, i, "rpod")?);
            }
            remote_node = Some(remote);
        }
        Ok(Topology {
            node,
            client,
            pods,
            remote_node,
            remote_pods,
        })
    }
}

/// br0 with 10.244.<subnet>.1/24 and fd00:10:244:<subnet>::1/64.
fn setup_node_bridge(node: &Netns, subnet: u8) -> Result<()> {
    node.sh("ip link add br0 type bridge")?;
    node.sh(&format!("ip addr add 10.244.{subnet}.1/24 dev br0"))?;
    node.sh(&format!(
        "ip addr add fd00:10:244:{subnet}::1/64 dev br0 nodad"
    ))?;
    node.sh("ip link set br0 up")?;
    Ok(())
}

/// A veth pair between `a` (named `a_if`) and `b` (named eth0), both up.
fn link(
    a: &Netns,
    a_if: &str,
    b: &Netns,
    a_ips: (Ipv4Addr, Ipv6Addr),
    b_ips: (Ipv4Addr, Ipv6Addr),
    prefix_v4: u8,
) -> Result<()> {
    a.sh(&format!(
        "ip link add {a_if} type veth peer name eth0 netns {}",
        b.name()
    ))?;
    a.sh(&format!("ip addr add {}/{prefix_v4} dev {a_if}", a_ips.0))?;
    a.sh(&format!("ip addr add {}/64 dev {a_if} nodad", a_ips.1))?;
    a.sh(&format!("ip link set {a_if} up"))?;
    b.sh(&format!("ip addr add {}/{prefix_v4} dev eth0", b_ips.0))?;
    b.sh(&format!("ip addr add {}/64 dev eth0 nodad", b_ips.1))?;
    b.sh("ip link set eth0 up")?;
    Ok(())
}

fn add_pod(node: &Netns, subnet: u8, i: usize, label: &str) -> Result<Pod> {
    let host = u8::try_from(10 + i).context("too many pods")?;
    let ns = Netns::create(&format!("{label}{i}"))?;
    let ipv4 = Ipv4Addr::new(10, 244, subnet, host);
    // Written like the IPv4 address: pod 1 of node 1 is 10.244.1.11 and
    // fd00:10:244:1::11 (hex 0x11), not ::b.
    let ipv6: Ipv6Addr = format!("fd00:10:244:{subnet}::{host}")
        .parse()
        .context("pod IPv6 address")?;
    let host_if = format!("veth-p{i}");
    node.sh(&format!(
        "ip link add {host_if} type veth peer name eth0 netns {}",
        ns.name()
    ))?;
    node.sh(&format!("ip link set {host_if} master br0"))?;
    node.sh(&format!("ip link set {host_if} up"))?;
    ns.sh(&format!("ip addr add {ipv4}/24 dev eth0"))?;
    ns.sh(&format!("ip addr add {ipv6}/64 dev eth0 nodad"))?;
    ns.sh("ip link set eth0 up")?;
    ns.sh(&format!("ip route add default via 10.244.{subnet}.1"))?;
    ns.sh(&format!(
        "ip -6 route add default via fd00:10:244:{subnet}::1"
    ))?;
    Ok(Pod { ns, ipv4, ipv6 })
}

/// A running echo server; stops when dropped.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The bound address (with the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const POLL: Duration = Duration::from_millis(20);

/// A TCP server bound to `addr` inside `ns` that answers every connection
/// with `ns.name()` and closes it: tells a test which backend answered.
pub fn tcp_echo_server(ns: &Netns, addr: SocketAddr) -> Result<ServerHandle> {
    tcp_reply_server(ns, addr, ns.name().to_string())
}

/// Like [`tcp_echo_server`] with a chosen reply.
pub fn tcp_reply_server(ns: &Netns, addr: SocketAddr, reply: String) -> Result<ServerHandle> {
    let listener = ns.run_in(move || TcpListener::bind(addr))??;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.write_all(reply.as_bytes());
                    let _ = conn.shutdown(std::net::Shutdown::Write);
                    // Drain what the client sent so closing does not reset.
                    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
                    let mut sink = [0u8; 512];
                    while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
                Err(_) => std::thread::sleep(POLL),
            }
        }
    });
    Ok(ServerHandle {
        addr,
        stop,
        thread: Some(thread),
    })
}

/// A UDP server bound to `addr` inside `ns` that answers every datagram
/// with `ns.name()`.
pub fn udp_echo_server(ns: &Netns, addr: SocketAddr) -> Result<ServerHandle> {
    udp_reply_server(ns, addr, ns.name().to_string())
}

/// Like [`udp_echo_server`] with a chosen reply.
pub fn udp_reply_server(ns: &Netns, addr: SocketAddr, reply: String) -> Result<ServerHandle> {
    let socket = ns.run_in(move || UdpSocket::bind(addr))??;
    socket.set_read_timeout(Some(POLL))?;
    let addr = socket.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop2.load(Ordering::Relaxed) {
            if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(reply.as_bytes(), peer);
            }
        }
    });
    Ok(ServerHandle {
        addr,
        stop,
        thread: Some(thread),
    })
}

/// A TCP server bound to `addr` inside `ns` that answers every connection
/// with `"<ns name> <peer address>"` and closes it: tells a test which
/// backend answered and which source address it saw (masquerading or not).
/// Parse the reply with [`parse_peer_reply`].
pub fn tcp_peer_server(ns: &Netns, addr: SocketAddr) -> Result<ServerHandle> {
    let listener = ns.run_in(move || TcpListener::bind(addr))??;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let name = ns.name().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut conn, peer)) => {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.write_all(format!("{name} {peer}").as_bytes());
                    let _ = conn.shutdown(std::net::Shutdown::Write);
                    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
                    let mut sink = [0u8; 512];
                    while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
                }
                Err(_) => std::thread::sleep(POLL),
            }
        }
    });
    Ok(ServerHandle {
        addr,
        stop,
        thread: Some(thread),
    })
}

/// A UDP server bound to `addr` inside `ns` that answers every datagram
/// with `"<ns name> <peer address>"` (see [`tcp_peer_server`]).
pub fn udp_peer_server(ns: &Netns, addr: SocketAddr) -> Result<ServerHandle> {
    let socket = ns.run_in(move || UdpSocket::bind(addr))??;
    socket.set_read_timeout(Some(POLL))?;
    let addr = socket.local_addr()?;
    let name = ns.name().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop2.load(Ordering::Relaxed) {
            if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(format!("{name} {peer}").as_bytes(), peer);
            }
        }
    });
    Ok(ServerHandle {
        addr,
        stop,
        thread: Some(thread),
    })
}

/// Splits a [`tcp_peer_server`] / [`udp_peer_server`] reply into the
/// answering namespace's name and the peer address it saw.
pub fn parse_peer_reply(reply: &str) -> Result<(String, SocketAddr)> {
    let (name, peer) = reply
        .trim()
        .split_once(' ')
        .ok_or_else(|| anyhow!("not a peer-server reply: {reply:?}"))?;
    let peer = peer
        .parse()
        .with_context(|| format!("bad peer address in {reply:?}"))?;
    Ok((name.to_string(), peer))
}

/// Default timeout of the request helpers.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects from `ns` to `dst` and returns what the server sent before closing.
pub fn tcp_request(ns: &Netns, dst: SocketAddr) -> Result<String> {
    tcp_request_timeout(ns, dst, REQUEST_TIMEOUT)
}

pub fn tcp_request_timeout(ns: &Netns, dst: SocketAddr, timeout: Duration) -> Result<String> {
    let mut stream = ns
        .run_in(move || TcpStream::connect_timeout(&dst, timeout))?
        .with_context(|| format!("connecting from {} to {dst}", ns.name()))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .with_context(|| format!("reading from {dst}"))?;
    Ok(reply)
}

/// Sends one datagram from `ns` to `dst` (from an ephemeral port) and
/// returns the reply.
pub fn udp_request(ns: &Netns, dst: SocketAddr) -> Result<String> {
    let src = match dst {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    udp_request_from(ns, src, dst, REQUEST_TIMEOUT)
}

/// Sends one datagram from `src` in `ns` to `dst` and returns the reply
/// (a fixed source port makes a test's conntrack flow predictable).
pub fn udp_request_from(
    ns: &Netns,
    src: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<String> {
    let socket = ns
        .run_in(move || UdpSocket::bind(src))?
        .with_context(|| format!("binding {src} in {}", ns.name()))?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(b"ping", dst)?;
    let mut buf = [0u8; 2048];
    let (n, _) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("no UDP reply from {dst} to {}", ns.name()))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A plain HTTP/1.1 GET from inside `ns`; returns the status and the body.
/// `url` is `http://HOST:PORT/PATH` with HOST an IP (IPv6 in brackets).
pub fn http_get(ns: &Netns, url: &str) -> Result<(u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("only http:// URLs: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = authority
        .parse()
        .with_context(|| format!("{authority} is not IP:PORT"))?;
    let mut stream = ns
        .run_in(move || TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT))?
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_http_response(&raw)
}

/// Splits a raw HTTP/1.1 response into status and body (de-chunked if needed).
pub fn parse_http_response(raw: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("incomplete HTTP response"))?;
    let status: u16 = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_string()));
    }
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size_line, after) = rest
            .split_once("\r\n")
            .ok_or_else(|| anyhow!("bad chunk"))?;
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_line:?}"))?;
        if size == 0 {
            break;
        }
        let chunk = after.get(..size).ok_or_else(|| anyhow!("short chunk"))?;
        out.push_str(chunk);
        rest = after.get(size + 2..).unwrap_or("");
    }
    Ok((status, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(parse_http_response(plain).unwrap(), (200, "ok".to_string()));
        let chunked = b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(
            parse_http_response(chunked).unwrap(),
            (503, "abcde".to_string())
        );
        assert!(parse_http_response(b"garbage").is_err());
    }
}
