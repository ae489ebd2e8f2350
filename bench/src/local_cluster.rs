//! Loopback clusters for `flotilla-bench create`: `flotilla node` processes in a temporary
//! directory, joined, with up to five voters, stopped again whatever way the bench ends.

use std::collections::HashSet;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flotilla_proto::v1::{AddNodeRequest, Cluster};

use crate::client::{cluster_client, connect, error_chain, get_cluster, unary, BearerToken};

/// Bench nodes run no agents: the figure is the create path (validation, Raft commit,
/// apply), not machine provisioning, which has its own benchmark (`flotilla-bench machines`).
const SLOTS_PER_BENCH_NODE: u32 = 0;
/// Nodes beyond this stay learners: a Raft group wants few voters.
const MAX_BENCH_VOTERS: u64 = 5;
/// Time for a loopback cluster to bootstrap, join and elect; RocksDB opens dominate.
const CLUSTER_READY_TIMEOUT_MS: u64 = 120_000;
const READINESS_POLL_INTERVAL_MS: u64 = 100;
/// After SIGTERM a node gets this long to exit before its process group is killed.
const NODE_SHUTDOWN_GRACE_MS: u64 = 5_000;
const NODE_LOG_TAIL_LINES: usize = 15;

/// What every node of a loopback cluster is given beyond its address.
#[derive(Debug, Clone)]
pub struct NodeSetup {
    pub slots: u32,
    /// The node's config file (TOML); `None`: a scripted model no agent ever runs.
    pub config: Option<String>,
}

impl Default for NodeSetup {
    fn default() -> Self {
        NodeSetup {
            slots: SLOTS_PER_BENCH_NODE,
            config: None,
        }
    }
}

/// A `flotilla node` process started by the bench.
struct LocalNode {
    id: u64,
    endpoint: String,
    log_path: PathBuf,
    child: Child,
}

/// Loopback nodes in a temporary directory. Dropping it stops every node and removes the
/// directory, so no path out of the bench (error, panic, Ctrl-C) leaves processes behind.
pub struct LocalCluster {
    nodes: Vec<LocalNode>,
    admin_token: String,
    executable: PathBuf,
    setup: NodeSetup,
    // Declared last so that it is removed after the nodes are stopped.
    directory: tempfile::TempDir,
}

impl LocalCluster {
    /// Starts `node_count` nodes of `flotilla_binary` and waits until every node sees every
    /// member up, a leader, and the first few nodes as voters.
    pub async fn start(flotilla_binary: &Path, node_count: usize) -> anyhow::Result<Self> {
        LocalCluster::start_with(flotilla_binary, node_count, NodeSetup::default()).await
    }

    /// [`LocalCluster::start`] with nodes set up as `setup` says.
    pub async fn start_with(flotilla_binary: &Path, node_count: usize, setup: NodeSetup) -> anyhow::Result<Self> {
        let directory = tempfile::Builder::new()
            .prefix("flotilla-bench-")
            .tempdir()
            .context("creating a temporary directory for the bench cluster")?;
        let mut cluster = LocalCluster {
            nodes: Vec::with_capacity(node_count),
            admin_token: String::new(),
            executable: flotilla_binary.to_path_buf(),
            setup,
            directory,
        };
        let deadline = Instant::now() + Duration::from_millis(CLUSTER_READY_TIMEOUT_MS);
        let grpc_ports = free_port_pairs(node_count)?;

        cluster.spawn_node(1, grpc_ports[0], None)?;
        cluster.admin_token = cluster.wait_for_admin_token(deadline).await?;
        let ca_path = cluster.directory().join("node1").join("ca.pem");
        crate::client::trust_ca(
            std::fs::read_to_string(&ca_path).with_context(|| format!("reading {}", ca_path.display()))?,
        );
        let token = BearerToken::new(Some(&cluster.admin_token))?;
        cluster
            .wait_for_cluster(0, &token, deadline, "node 1 to elect itself leader", |state| {
                state.leader_id != 0
            })
            .await?;

        let seed = cluster.nodes[0].endpoint.clone();
        for (index, &port) in grpc_ports.iter().enumerate().skip(1) {
            let join_token = mint_join_token(&seed, &token).await?;
            cluster.spawn_node(index as u64 + 1, port, Some((&seed, &join_token)))?;
        }
        let expected_ids: Vec<u64> = (1..=node_count as u64).collect();
        let all_members_up = |state: &Cluster| {
            state.leader_id != 0
                && expected_ids
                    .iter()
                    .all(|id| state.members.iter().any(|member| member.id == *id && member.up))
        };
        let joined = cluster
            .wait_for_cluster(0, &token, deadline, "every node to join and be up", &all_members_up)
            .await?;

        let promoted = cluster.promote_to_voters(&token, &joined).await;
        for index in 0..cluster.nodes.len() {
            let what = format!("node {} to see every member and a leader", index + 1);
            cluster
                .wait_for_cluster(index, &token, deadline, &what, |state| {
                    all_members_up(state)
                        && (!promoted
                            || state
                                .members
                                .iter()
                                .all(|member| member.voter || member.id > MAX_BENCH_VOTERS))
                })
                .await?;
        }
        Ok(cluster)
    }

    pub fn directory(&self) -> &Path {
        self.directory.path()
    }

    /// The token node 1 wrote at bootstrap.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|node| node.endpoint.clone()).collect()
    }

    /// Every node's process id, in node order.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|node| node.child.id()).collect()
    }

    /// The process id of node `index` (0-based), for reading its figures under /proc.
    pub fn node_pid(&self, index: usize) -> Option<u32> {
        self.nodes.get(index).map(|node| node.child.id())
    }

    /// Starts node `id`; `join` is the member to join through and a join token.
    fn spawn_node(&mut self, id: u64, grpc_port: u16, join: Option<(&str, &str)>) -> anyhow::Result<()> {
        let data_dir = self.directory().join(format!("node{id}"));
        let log_path = self.directory().join(format!("node{id}.log"));
        let log = File::create(&log_path).with_context(|| format!("creating the log file {}", log_path.display()))?;
        let log_for_stderr = log.try_clone().context("duplicating the node log handle")?;
        // Creates need a declared model; bench nodes run no agent (no slots), so a script
        // that is never read is enough.
        let config_path = self.directory().join(format!("node{id}.toml"));
        std::fs::write(self.directory().join("bench.json"), r#"{"turns": [{"text": "done"}]}"#)
            .context("writing the bench model script")?;
        let config = self
            .setup
            .config
            .clone()
            .unwrap_or_else(|| "[models.bench]\nprovider = \"scripted\"\nscript = \"bench.json\"\n".to_string());
        std::fs::write(&config_path, config).with_context(|| format!("writing {}", config_path.display()))?;
        let mut command = Command::new(&self.executable);
        command
            .arg("node")
            .args(["--id", &id.to_string()])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", &format!("127.0.0.1:{grpc_port}")])
            .args(["--region", "local"])
            .args(["--slots", &self.setup.slots.to_string()])
            .arg("--config")
            .arg(&config_path);
        if let Some((seed, join_token)) = join {
            command.args(["--join", seed]).env("FLOTILLA_JOIN_TOKEN", join_token);
        }
        command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            // Its own process group, so that stopping the node also reaches anything it started.
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("starting {} node --id {id}", self.executable.display()))?;
        self.nodes.push(LocalNode {
            id,
            endpoint: format!("https://127.0.0.1:{grpc_port}"),
            log_path,
            child,
        });
        Ok(())
    }

    /// Stops the node at `index` cleanly (SIGTERM, as an operator's stop) and waits until its
    /// process has exited; returns how long that took. Past `deadline` the node is killed and
    /// the stop reported as failed.
    pub async fn stop_node(&mut self, index: usize, deadline: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let node = &mut self.nodes[index];
        signal_process_group(&node.child, libc::SIGTERM);
        loop {
            if let Some(status) = node.child.try_wait().context("waiting for a stopping node")? {
                if !status.success() {
                    bail!("node {} exited with {status} on a clean stop", node.id);
                }
                return Ok(started.elapsed());
            }
            if started.elapsed() >= deadline {
                signal_process_group(&node.child, libc::SIGKILL);
                let _ = node.child.wait();
                bail!(
                    "node {} did not stop within {} ms of SIGTERM",
                    node.id,
                    deadline.as_millis()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The log file of the node at `index` (its current life: a restart starts a new one).
    pub fn log_path(&self, index: usize) -> &Path {
        &self.nodes[index].log_path
    }

    /// Kills the node at `index` with SIGKILL (a crash: nothing of its own stop runs) and reaps
    /// it.
    pub fn kill_node(&mut self, index: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[index];
        signal_process_group(&node.child, libc::SIGKILL);
        node.child.wait().context("reaping a killed node")?;
        Ok(())
    }

    /// Starts the node at `index` again on its own data dir and ports (after [`Self::stop_node`]
    /// or [`Self::kill_node`]);
    /// it rejoins from what its data dir holds. Returns at once, when the process is spawned.
    pub fn start_node_again(&mut self, index: usize) -> anyhow::Result<()> {
        let node = self.nodes.remove(index);
        let port: u16 = node
            .endpoint
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .context("reading the node's port from its endpoint")?;
        self.spawn_node(node.id, port, None)?;
        let restarted = self.nodes.pop().expect("spawn_node pushed the node");
        self.nodes.insert(index, restarted);
        Ok(())
    }

    /// Fails with the node's log tail if any node has exited.
    fn ensure_all_running(&mut self) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            if let Some(status) = node.child.try_wait().context("checking a bench node")? {
                bail!(
                    "bench node {} exited early ({status}); last lines of {}:\n{}",
                    node.id,
                    node.log_path.display(),
                    log_tail(&node.log_path)
                );
            }
        }
        Ok(())
    }

    async fn wait_for_admin_token(&mut self, deadline: Instant) -> anyhow::Result<String> {
        let token_path = self.directory().join("node1").join("admin.token");
        loop {
            self.ensure_all_running()?;
            if let Ok(contents) = std::fs::read_to_string(&token_path) {
                let token = contents.trim();
                if !token.is_empty() {
                    return Ok(token.to_string());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "node 1 wrote no {} within {CLUSTER_READY_TIMEOUT_MS} ms; last lines of its log:\n{}",
                    token_path.display(),
                    log_tail(&self.nodes[0].log_path)
                );
            }
            tokio::time::sleep(Duration::from_millis(READINESS_POLL_INTERVAL_MS)).await;
        }
    }

    /// Polls GetCluster on one node until `ready` holds, a node exits, or the deadline passes.
    async fn wait_for_cluster(
        &mut self,
        node_index: usize,
        token: &BearerToken,
        deadline: Instant,
        what: &str,
        ready: impl Fn(&Cluster) -> bool,
    ) -> anyhow::Result<Cluster> {
        let endpoint = self.nodes[node_index].endpoint.clone();
        loop {
            self.ensure_all_running()?;
            let last_observation = match get_cluster(&endpoint, token).await {
                Ok(state) if ready(&state) => return Ok(state),
                Ok(state) => describe_cluster(&state),
                Err(error) => error.to_string(),
            };
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|node| format!("--- {}:\n{}", node.log_path.display(), log_tail(&node.log_path)))
                    .collect();
                bail!(
                    "timed out after {CLUSTER_READY_TIMEOUT_MS} ms waiting for {what}; {endpoint} last said: {last_observation}\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(READINESS_POLL_INTERVAL_MS)).await;
        }
    }

    /// Makes the first few nodes voters so that commits wait for a real quorum. Returns false
    /// (after a warning) when the cluster refuses; the bench then measures it as it is.
    async fn promote_to_voters(&self, token: &BearerToken, state: &Cluster) -> bool {
        let seed = &self.nodes[0].endpoint;
        let mut learners: Vec<u64> = state
            .members
            .iter()
            .filter(|member| !member.voter && member.id <= MAX_BENCH_VOTERS)
            .map(|member| member.id)
            .collect();
        learners.sort_unstable();
        for node_id in learners {
            let promoted = async {
                let mut client = cluster_client(connect(seed).await?, token.clone());
                unary(seed, client.add_node(AddNodeRequest { node_id, voter: true })).await
            }
            .await;
            if let Err(error) = promoted {
                eprintln!("warning: could not make node {node_id} a voter ({error}); measuring the cluster as it is");
                return false;
            }
        }
        true
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // This may block a runtime thread for up to the grace period; it happens once, at the
        // end of a run or on the way out of an error.
        for node in &self.nodes {
            signal_process_group(&node.child, libc::SIGTERM);
        }
        let grace_deadline = Instant::now() + Duration::from_millis(NODE_SHUTDOWN_GRACE_MS);
        for node in &mut self.nodes {
            loop {
                match node.child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < grace_deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => {
                        // Still running, so its process group id cannot have been reused.
                        signal_process_group(&node.child, libc::SIGKILL);
                        let _ = node.child.wait();
                        break;
                    }
                }
            }
        }
    }
}

// Unsafe: kill(2) on a node's process group; std only kills single children.
#[allow(unsafe_code)]
pub(crate) fn signal_process_group(child: &Child, signal: libc::c_int) {
    let Ok(process_group) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions. The group id is the pid of a child
    // this process has not reaped yet, so it still names that child's group.
    unsafe {
        libc::kill(-process_group, signal);
    }
}

fn describe_cluster(state: &Cluster) -> String {
    let members: Vec<String> = state
        .members
        .iter()
        .map(|member| {
            format!(
                "{}({}{})",
                member.id,
                if member.up { "up" } else { "down" },
                if member.voter { ", voter" } else { "" }
            )
        })
        .collect();
    format!("leader {}, members [{}]", state.leader_id, members.join(" "))
}

pub(crate) fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(contents) => {
            let lines: Vec<&str> = contents.lines().collect();
            lines[lines.len().saturating_sub(NODE_LOG_TAIL_LINES)..].join("\n")
        }
        Err(error) => format!("(cannot read the log: {})", error_chain(&error)),
    }
}

/// gRPC ports P such that P and P + 1 (the mesh port) are both free, all distinct. The ports
/// are released before the nodes bind them, a small race that a bench can live with.
fn free_port_pairs(count: usize) -> anyhow::Result<Vec<u16>> {
    const MAX_ATTEMPTS: usize = 200;
    let mut chosen: Vec<u16> = Vec::with_capacity(count);
    let mut taken: HashSet<u16> = HashSet::new();
    for _ in 0..MAX_ATTEMPTS {
        if chosen.len() == count {
            break;
        }
        let grpc = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).context("binding a loopback port")?;
        let port = grpc.local_addr()?.port();
        let Some(mesh_port) = port.checked_add(1) else {
            continue;
        };
        if taken.contains(&port) || taken.contains(&mesh_port) {
            continue;
        }
        if TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, mesh_port)).is_ok() {
            taken.insert(port);
            taken.insert(mesh_port);
            chosen.push(port);
        }
    }
    if chosen.len() < count {
        bail!(
            "found only {} free loopback port pairs of the {count} needed",
            chosen.len()
        );
    }
    Ok(chosen)
}

/// A single-use join token minted through the member at `seed`.
async fn mint_join_token(seed: &str, token: &BearerToken) -> anyhow::Result<String> {
    let mut client = crate::client::cluster_client(crate::client::connect(seed).await?, token.clone());
    let minted = client
        .create_join_token(flotilla_proto::v1::CreateJoinTokenRequest {
            expires_in_seconds: 600,
        })
        .await
        .with_context(|| format!("minting a join token through {seed}"))?;
    Ok(minted.into_inner().token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_pairs_are_distinct_and_adjacent_ports_are_free() {
        let ports = free_port_pairs(3).unwrap();
        assert_eq!(ports.len(), 3);
        let mut all: Vec<u16> = ports.iter().flat_map(|&port| [port, port + 1]).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 6);
    }
}
