//! A network of namespaces for tests that cut and slow the links between nodes.
//!
//! Each node runs in a network namespace of its own, joined to a bridge in the host's namespace
//! by a veth pair, on a private /24 that no other lab and no host interface uses. The test
//! process reaches every node through the bridge's address, so clients keep reaching both sides
//! of a partition, as clients spread over regions would.
//!
//! - **Partitions** are the kernel's: an nftables chain on each namespace's output hook, ahead of
//!   connection tracking and NAT, drops what a node may no longer send. Cutting `a -> b` drops
//!   every packet `a` sends to `b`; a symmetric partition cuts both directions.
//! - **Delay and loss** between regions are made in user space (the kernel here may have no
//!   `netem`): every connection from a node to a node of another region is redirected by a DNAT
//!   rule to a relay listening on the bridge, which forwards the bytes after the link's delay.
//!   A lost segment shows up to a TCP user as a retransmission stall, so the relay models a loss
//!   as a chunk held back for a retransmission timeout, with everything behind it (head-of-line
//!   blocking). The relay reaches the target from an address of its own per source node, so a
//!   partition that cuts `b -> a` also cuts `b`'s answers to `a`'s relayed connections.
//!
//! The lab is torn down when dropped (namespaces, bridge, relays); labs of dead test processes
//! are swept when the next one starts.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Every node of a lab listens for gRPC on this port of its own address, and for the mesh on
/// the next one.
pub const NODE_GRPC_PORT: u16 = 7420;
/// The ports a node serves other nodes on, relayed between regions.
const NODE_PORTS: [u16; 2] = [NODE_GRPC_PORT, NODE_GRPC_PORT + 1];
/// The bridge's own address in the lab's /24.
const BRIDGE_HOST: u8 = 254;
/// The relay reaches node targets from `.RELAY_FACE_BASE + source node`.
const RELAY_FACE_BASE: u8 = 100;
/// At most this many nodes: the relay faces must stay below the bridge's address.
pub const MAX_NODES: usize = 90;
/// How long a lost chunk is held back, as a first TCP retransmission timeout would.
const RETRANSMISSION_TIMEOUT: Duration = Duration::from_millis(200);
/// Chunks in flight per direction of one relayed connection; a full queue pushes back on the
/// sender like a full TCP window.
const RELAY_QUEUE_CHUNKS: usize = 256;
const RELAY_CHUNK_BYTES: usize = 16 * 1024;
const NAMESPACE_PREFIX: &str = "flotilla-lab-";
const NFT_TABLE: &str = "flotilla_lab";

/// Delay and loss of the links between two regions (both directions).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkFaults {
    /// Added to every chunk in each direction.
    pub delay: Duration,
    /// Share of chunks held back for a retransmission timeout, in parts per thousand.
    pub loss_per_mille: u32,
    /// Each chunk's delay varies uniformly within `delay ± jitter` (never below zero); chunks
    /// stay in order, as on one TCP connection.
    pub jitter: Duration,
}

/// The faults of one region pair, shared with the relays of its connections.
#[derive(Debug, Default)]
struct LinkState {
    delay_us: AtomicU32,
    loss_per_mille: AtomicU32,
    jitter_us: AtomicU32,
}

impl LinkState {
    fn set(&self, faults: LinkFaults) {
        let micros = u32::try_from(faults.delay.as_micros()).unwrap_or(u32::MAX);
        self.delay_us.store(micros, Ordering::SeqCst);
        self.loss_per_mille
            .store(faults.loss_per_mille.min(1000), Ordering::SeqCst);
        let jitter = u32::try_from(faults.jitter.as_micros()).unwrap_or(u32::MAX);
        self.jitter_us.store(jitter, Ordering::SeqCst);
    }

    /// When a chunk read now may be written on.
    fn hold(&self) -> Duration {
        let delay = i64::from(self.delay_us.load(Ordering::SeqCst));
        let jitter = i64::from(self.jitter_us.load(Ordering::SeqCst));
        let varied = if jitter > 0 {
            delay + rand::thread_rng().gen_range(-jitter..=jitter)
        } else {
            delay
        };
        let mut hold = Duration::from_micros(varied.max(0).unsigned_abs());
        let loss = self.loss_per_mille.load(Ordering::SeqCst);
        if loss > 0 && rand::thread_rng().gen_range(0..1000) < loss {
            hold += RETRANSMISSION_TIMEOUT;
        }
        hold
    }
}

/// A node's place in the lab.
#[derive(Clone, Debug)]
pub struct LabNode {
    pub id: u64,
    pub region: String,
    pub address: Ipv4Addr,
    pub namespace: String,
}

impl LabNode {
    /// The path `nsenter --net=` takes.
    pub fn namespace_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.namespace)
    }

    pub fn endpoint(&self) -> String {
        format!("https://{}:{NODE_GRPC_PORT}", self.address)
    }
}

/// A lab: its namespaces, bridge, relays and the faults in force.
pub struct NetLab {
    tag: String,
    bridge: String,
    subnet: [u8; 3],
    nodes: Vec<LabNode>,
    links: BTreeMap<(String, String), Arc<LinkState>>,
    /// For each node, the relay ports its DNAT rules send other regions' traffic to.
    nat_rules: BTreeMap<u64, Vec<String>>,
    /// Directed cuts in force: (from, to).
    cuts: Mutex<Vec<(u64, u64)>>,
    relays: Vec<JoinHandle<()>>,
}

/// Why the lab could not be built: names the command that failed and what it said.
#[derive(Debug)]
pub struct LabError(pub String);

impl std::fmt::Display for LabError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl std::error::Error for LabError {}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), LabError> {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|error| LabError(format!("could not run {program} {}: {error}", args.join(" "))))?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input
            .write_all(text.as_bytes())
            .map_err(|error| LabError(format!("could not feed {program}: {error}")))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|error| LabError(format!("could not wait for {program}: {error}")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(LabError(format!(
        "{program} {} failed ({}): {}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim(),
        stdin.map(|text| format!("\ninput:\n{text}")).unwrap_or_default()
    )))
}

fn nft_in(namespace: &str, script: &str) -> Result<(), LabError> {
    let net = format!("--net=/run/netns/{namespace}");
    run("nsenter", &[&net, "nft", "-f", "-"], Some(script))
}

/// Whether a process with this id runs (a zombie, dead but not reaped, does not).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Removes the namespaces and bridges of labs whose owning process is gone, and kills the
/// processes still running in those namespaces (nodes a killed owner left behind). Returns the
/// namespaces removed.
pub fn sweep_dead_labs() -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return removed;
    };
    let mut dead_tags = std::collections::BTreeSet::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(NAMESPACE_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|pid| pid.parse::<u32>().ok()) else {
            continue;
        };
        if !process_alive(pid) {
            kill_processes_in(&name);
            let _ = run("ip", &["netns", "del", &name], None);
            removed.push(name.clone());
            if let Some(tag) = rest.rsplit_once('-').map(|(tag, _)| tag.to_string()) {
                dead_tags.insert(tag);
            }
        }
    }
    for tag in dead_tags {
        let _ = run("ip", &["link", "del", &bridge_name(&tag)], None);
    }
    removed
}

/// Kills (SIGKILL) every process whose network namespace is `namespace`.
pub fn kill_processes_in(namespace: &str) {
    let Ok(output) = Command::new("ip").args(["netns", "pids", namespace]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse::<libc::pid_t>().ok())
    {
        // A process gone since the kernel listed it is ignored.
        crate::kill_quietly(pid);
    }
}

/// `flb` and a short hash of the lab's tag: interface names have 15 bytes.
fn bridge_name(tag: &str) -> String {
    format!("flb{:08x}", short_hash(tag))
}

fn short_hash(text: &str) -> u32 {
    // FNV-1a: stable across processes, so a sweep finds a dead lab's bridge by its tag.
    text.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

/// A /24 under 10.0.0.0/8 that no interface of the host uses yet.
fn free_subnet(tag: &str) -> Result<[u8; 3], LabError> {
    let output = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .map_err(|error| LabError(format!("could not run ip addr: {error}")))?;
    let in_use = String::from_utf8_lossy(&output.stdout).to_string();
    let seed = short_hash(tag);
    for attempt in 0..200u32 {
        let mixed = seed.wrapping_add(attempt.wrapping_mul(0x9e37_79b9));
        let subnet = [10, 160 + (mixed % 60) as u8, ((mixed >> 8) % 256) as u8];
        if !in_use.contains(&format!(" {}.{}.{}.", subnet[0], subnet[1], subnet[2])) {
            return Ok(subnet);
        }
    }
    Err(LabError("found no free /24 under 10.160.0.0/10".to_string()))
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

impl NetLab {
    /// Builds a lab of `regions.len()` nodes (ids 1..=n, node i in `regions[i - 1]`), with
    /// relays between every two nodes of different regions. Needs root, `ip`, `nft` and
    /// `nsenter`; the error says which step failed.
    pub async fn create(regions: &[String]) -> Result<NetLab, LabError> {
        if regions.is_empty() || regions.len() > MAX_NODES {
            return Err(LabError(format!(
                "a lab has 1 to {MAX_NODES} nodes, not {}",
                regions.len()
            )));
        }
        let _ = sweep_dead_labs();
        let tag = format!("{}-{}", std::process::id(), LAB_COUNTER.fetch_add(1, Ordering::SeqCst));
        let subnet = free_subnet(&tag)?;
        let bridge = bridge_name(&tag);
        let nodes = regions
            .iter()
            .enumerate()
            .map(|(index, region)| LabNode {
                id: index as u64 + 1,
                region: region.clone(),
                address: Ipv4Addr::new(subnet[0], subnet[1], subnet[2], index as u8 + 1),
                namespace: format!("{NAMESPACE_PREFIX}{tag}-n{}", index + 1),
            })
            .collect();
        let mut lab = NetLab {
            tag,
            bridge,
            subnet,
            nodes,
            links: BTreeMap::new(),
            nat_rules: BTreeMap::new(),
            cuts: Mutex::new(Vec::new()),
            relays: Vec::new(),
        };
        lab.build_links()?;
        lab.start_relays().await?;
        lab.apply_rules()?;
        Ok(lab)
    }

    fn address(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], host)
    }

    fn relay_face(&self, node: u64) -> Ipv4Addr {
        self.address(RELAY_FACE_BASE + node as u8)
    }

    /// The bridge, the namespaces and their veths, and the relay faces.
    fn build_links(&self) -> Result<(), LabError> {
        let bridge = self.bridge.as_str();
        run("ip", &["link", "add", bridge, "type", "bridge"], None)?;
        let bridge_address = format!("{}/24", self.address(BRIDGE_HOST));
        run("ip", &["addr", "add", &bridge_address, "dev", bridge], None)?;
        for node in &self.nodes {
            let face = format!("{}/24", self.relay_face(node.id));
            run("ip", &["addr", "add", &face, "dev", bridge], None)?;
        }
        run("ip", &["link", "set", bridge, "up"], None)?;
        for node in &self.nodes {
            let namespace = node.namespace.as_str();
            let host_end = format!("flv{:07x}n{}", short_hash(&self.tag) & 0x0fff_ffff, node.id);
            run("ip", &["netns", "add", namespace], None)?;
            run(
                "ip",
                &[
                    "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", namespace,
                ],
                None,
            )?;
            run("ip", &["link", "set", &host_end, "master", bridge, "up"], None)?;
            let address = format!("{}/24", node.address);
            run("ip", &["-n", namespace, "addr", "add", &address, "dev", "eth0"], None)?;
            run("ip", &["-n", namespace, "link", "set", "eth0", "up"], None)?;
            run("ip", &["-n", namespace, "link", "set", "lo", "up"], None)?;
        }
        Ok(())
    }

    fn link_key(a: &str, b: &str) -> (String, String) {
        if a <= b {
            (a.to_string(), b.to_string())
        } else {
            (b.to_string(), a.to_string())
        }
    }

    /// One relay listener per (source node, target node of another region, port), and the DNAT
    /// rule that sends the source's connections to it.
    async fn start_relays(&mut self) -> Result<(), LabError> {
        let bridge_address = self.address(BRIDGE_HOST);
        for source in self.nodes.clone() {
            let mut rules = Vec::new();
            for target in self.nodes.iter().filter(|target| target.region != source.region) {
                let link = self
                    .links
                    .entry(Self::link_key(&source.region, &target.region))
                    .or_default()
                    .clone();
                for port in NODE_PORTS {
                    let listener = TcpListener::bind(SocketAddr::from((bridge_address, 0)))
                        .await
                        .map_err(|error| LabError(format!("could not bind a relay on {bridge_address}: {error}")))?;
                    let relay_port = listener
                        .local_addr()
                        .map_err(|error| LabError(format!("relay address: {error}")))?
                        .port();
                    rules.push(format!(
                        "ip daddr {} tcp dport {port} dnat to {bridge_address}:{relay_port}",
                        target.address
                    ));
                    let relay = Relay {
                        face: self.relay_face(source.id),
                        target: SocketAddr::from((target.address, port)),
                        link: link.clone(),
                    };
                    self.relays.push(tokio::spawn(relay.serve(listener)));
                }
            }
            self.nat_rules.insert(source.id, rules);
        }
        Ok(())
    }

    /// Writes every namespace's table: its cuts and its relay redirections.
    fn apply_rules(&self) -> Result<(), LabError> {
        let cuts = self.cuts.lock().unwrap_or_else(|poison| poison.into_inner()).clone();
        for node in &self.nodes {
            let mut dropped = Vec::new();
            for (_, to) in cuts.iter().filter(|(from, _)| *from == node.id) {
                dropped.push(self.node(*to).address.to_string());
                dropped.push(self.relay_face(*to).to_string());
            }
            let mut script = format!(
                "table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\ntable ip {NFT_TABLE} {{\n\
                 \tchain cut {{ type filter hook output priority -300; policy accept;\n"
            );
            if !dropped.is_empty() {
                script.push_str(&format!("\t\tip daddr {{ {} }} drop\n", dropped.join(", ")));
            }
            script.push_str("\t}\n\tchain relay { type nat hook output priority -100; policy accept;\n");
            for rule in self.nat_rules.get(&node.id).into_iter().flatten() {
                script.push_str(&format!("\t\t{rule}\n"));
            }
            script.push_str("\t}\n}\n");
            nft_in(&node.namespace, &script)?;
        }
        Ok(())
    }

    /// The bridge joining the lab's namespaces, in the host's namespace.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    pub fn nodes(&self) -> &[LabNode] {
        &self.nodes
    }

    pub fn node(&self, id: u64) -> &LabNode {
        self.nodes
            .iter()
            .find(|node| node.id == id)
            .unwrap_or_else(|| panic!("the lab has no node {id}"))
    }

    /// Drops everything `from` sends to `to` (one direction), on top of the cuts in force.
    pub fn cut(&self, from: u64, to: u64) -> Result<(), LabError> {
        self.cuts
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .push((from, to));
        self.apply_rules()
    }

    /// Splits the nodes into `side` and the rest, both directions cut.
    pub fn partition(&self, side: &[u64]) -> Result<(), LabError> {
        {
            let mut cuts = self.cuts.lock().unwrap_or_else(|poison| poison.into_inner());
            for node in &self.nodes {
                for other in self.nodes.iter().filter(|other| side.contains(&other.id)) {
                    if !side.contains(&node.id) {
                        cuts.push((node.id, other.id));
                        cuts.push((other.id, node.id));
                    }
                }
            }
        }
        self.apply_rules()
    }

    /// Lifts every cut.
    pub fn heal(&self) -> Result<(), LabError> {
        self.cuts.lock().unwrap_or_else(|poison| poison.into_inner()).clear();
        self.apply_rules()
    }

    /// Sets the delay and loss between regions `a` and `b` (both directions); new and open
    /// connections alike see it from their next chunk.
    pub fn set_link(&self, a: &str, b: &str, faults: LinkFaults) {
        match self.links.get(&Self::link_key(a, b)) {
            Some(link) => link.set(faults),
            None => panic!("no link between regions {a} and {b} in this lab"),
        }
    }

    /// Every region pair back to no delay and no loss.
    pub fn clear_links(&self) {
        for link in self.links.values() {
            link.set(LinkFaults::default());
        }
    }

    /// The region pairs that have relays.
    pub fn region_pairs(&self) -> Vec<(String, String)> {
        self.links.keys().cloned().collect()
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for relay in &self.relays {
            relay.abort();
        }
        for node in &self.nodes {
            if let Err(error) = run("ip", &["netns", "del", &node.namespace], None) {
                eprintln!("lab clean-up: {error}");
            }
        }
        if let Err(error) = run("ip", &["link", "del", &self.bridge], None) {
            eprintln!("lab clean-up: {error}");
        }
    }
}

/// Forwards connections from one source node to one target port, through a link's faults.
#[derive(Clone)]
struct Relay {
    face: Ipv4Addr,
    target: SocketAddr,
    link: Arc<LinkState>,
}

impl Relay {
    async fn serve(self, listener: TcpListener) {
        loop {
            let Ok((inbound, _)) = listener.accept().await else {
                continue;
            };
            let relay = self.clone();
            tokio::spawn(async move {
                if let Ok(outbound) = relay.connect().await {
                    relay.pipe(inbound, outbound).await;
                }
            });
        }
    }

    async fn connect(&self) -> std::io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((self.face, 0)))?;
        let stream = socket.connect(self.target).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    async fn pipe(&self, inbound: TcpStream, outbound: TcpStream) {
        let _ = inbound.set_nodelay(true);
        let (inbound_read, inbound_write) = inbound.into_split();
        let (outbound_read, outbound_write) = outbound.into_split();
        let there = tokio::spawn(carry(inbound_read, outbound_write, self.link.clone()));
        let back = tokio::spawn(carry(outbound_read, inbound_write, self.link.clone()));
        let _ = tokio::join!(there, back);
    }
}

/// One direction of a relayed connection: chunks are written in order, each no earlier than
/// its hold after it was read.
async fn carry(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<LinkState>,
) {
    let (sender, mut receiver) = mpsc::channel::<(Instant, Vec<u8>)>(RELAY_QUEUE_CHUNKS);
    let reader = tokio::spawn(async move {
        let mut buffer = vec![0u8; RELAY_CHUNK_BYTES];
        let mut last_release = Instant::now();
        loop {
            let read = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            // In order: a held-back chunk holds back everything behind it.
            let release = (Instant::now() + link.hold()).max(last_release);
            last_release = release;
            if sender.send((release, buffer[..read].to_vec())).await.is_err() {
                break;
            }
        }
    });
    while let Some((release, chunk)) = receiver.recv().await {
        tokio::time::sleep_until(release.into()).await;
        if to.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
    reader.abort();
}
