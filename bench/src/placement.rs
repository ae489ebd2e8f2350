//! `flotilla-bench placement`: the scheduler's pure decision (`placement_input` then `place`,
//! what the leader's scheduler runs under the state's read lock) over a simulated cluster of
//! many nodes in several regions, some draining, down or stopping, each repository's install
//! layer on a few of them. One thread, no I/O: it prints placements per second and the time of
//! one decision, and asserts nothing.
//!
//! Two shapes of load: a backlog (many agents pending at once, placed in rounds of up to
//! `MAX_ASSIGNMENTS_PER_ENTRY` as the scheduler does) and single creates (one agent pending
//! at a time, the usual case: one round per create). Each round's decisions are applied to the
//! simulated state with the real `apply`, untimed, so the next round sees them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use anyhow::bail;
use flotilla_state::placement::{place, placement_input, MAX_ASSIGNMENTS_PER_ENTRY};
use flotilla_state::{
    apply, AgentId, AgentRecord, AgentSpec, AgentStatus, AssignOne, Assignment, Changes, ClusterState, Command, Epoch,
    NodeId, NodeInfo, NodeRecord, Request,
};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MAX_NODES: usize = 100_000;
const MAX_AGENTS: usize = 1_000_000;
const MAX_REGIONS: usize = 100;
/// Pending agents one scheduler run reads, as in `actors/src/scheduler.rs`.
const PENDING_READ_PER_RUN: usize = MAX_ASSIGNMENTS_PER_ENTRY * 4;
/// Decision times are recorded in nanoseconds up to ten seconds.
const MAX_RECORDED_NS: u64 = 10_000_000_000;

#[derive(clap::Args, Debug)]
pub struct BenchPlacementArgs {
    /// simulated nodes
    #[arg(long, default_value_t = 1_000)]
    pub nodes: usize,
    /// regions the nodes are spread over
    #[arg(long, default_value_t = 5)]
    pub regions: usize,
    /// repositories the agents come from (each with an install layer on a few nodes)
    #[arg(long, default_value_t = 200)]
    pub repositories: usize,
    /// agents pending at once in the backlog run
    #[arg(long, default_value_t = 20_000)]
    pub backlog: usize,
    /// single creates, each placed on its own
    #[arg(long, default_value_t = 2_000)]
    pub singles: usize,
    /// seed of the simulated cluster (the same seed gives the same cluster and agents)
    #[arg(long, default_value_t = 18)]
    pub seed: u64,
}

fn validate(args: &BenchPlacementArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > MAX_NODES {
        bail!("--nodes must be between 1 and {MAX_NODES}, found {}", args.nodes);
    }
    if args.regions == 0 || args.regions > MAX_REGIONS {
        bail!("--regions must be between 1 and {MAX_REGIONS}, found {}", args.regions);
    }
    if args.repositories == 0 {
        bail!("--repositories must be at least 1");
    }
    if args.backlog > MAX_AGENTS || args.singles > MAX_AGENTS {
        bail!("--backlog and --singles must be at most {MAX_AGENTS}");
    }
    Ok(())
}

pub fn run_placement(args: BenchPlacementArgs) -> anyhow::Result<()> {
    validate(&args)?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut world = World::new(&args, &mut rng);
    println!(
        "simulated cluster: {} nodes in {} regions ({} take agents), {} slots ({} in use), {} repositories; {} build",
        args.nodes,
        args.regions,
        world.state.nodes.values().filter(|node| node.takes_agents()).count(),
        world
            .state
            .nodes
            .values()
            .map(|node| u64::from(node.info.slots))
            .sum::<u64>(),
        world.state.active_by_node.values().map(BTreeSet::len).sum::<usize>(),
        args.repositories,
        crate::build_profile(),
    );
    if args.backlog > 0 {
        for _ in 0..args.backlog {
            let spec = world.random_spec(&mut rng);
            world.create(spec)?;
        }
        let figures = world.drain(true);
        figures.print(&format!("backlog of {}", args.backlog));
    }
    if args.singles > 0 {
        // The backlog left the cluster fuller; free it again so single creates find slots.
        world.finish_all_placed();
        let mut figures = Figures::new();
        for _ in 0..args.singles {
            let spec = world.random_spec(&mut rng);
            world.create(spec)?;
            figures.add(world.drain(false));
        }
        figures.print("single creates");
    }
    Ok(())
}

/// What a set of scheduler runs measured.
struct Figures {
    placed: u64,
    runs: u64,
    total_ns: u64,
    run_ns: Histogram<u64>,
}

impl Figures {
    fn new() -> Figures {
        Figures {
            placed: 0,
            runs: 0,
            total_ns: 0,
            run_ns: Histogram::new_with_bounds(1, MAX_RECORDED_NS, 3)
                .expect("the histogram bounds are valid constants"),
        }
    }

    fn add(&mut self, other: Figures) {
        self.placed += other.placed;
        self.runs += other.runs;
        self.total_ns += other.total_ns;
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.run_ns.add(&other.run_ns);
    }

    fn print(&self, what: &str) {
        let seconds = self.total_ns as f64 / 1e9;
        let per_second = self.placed as f64 / seconds.max(f64::EPSILON);
        let us = |quantile: f64| self.run_ns.value_at_quantile(quantile) as f64 / 1000.0;
        println!(
            "{what}: placed {} in {} decisions, {:.3} s deciding: {per_second:.0} placements/s; one decision p50 {:.1} us p99 {:.1} us max {:.1} us ({:.1} us per placement)",
            self.placed,
            self.runs,
            seconds,
            us(0.50),
            us(0.99),
            self.run_ns.max() as f64 / 1000.0,
            self.total_ns as f64 / 1000.0 / (self.placed.max(1) as f64),
        );
    }
}

/// The simulated cluster: the replicated state and the clock of its log.
struct World {
    state: ClusterState,
    at_ms: u64,
    regions: Vec<String>,
    repositories: Vec<String>,
}

impl World {
    fn new(args: &BenchPlacementArgs, rng: &mut StdRng) -> World {
        let regions: Vec<String> = (0..args.regions).map(|index| format!("region-{index}")).collect();
        let repositories: Vec<String> = (0..args.repositories)
            .map(|index| format!("https://git.example.com/team-{}/repo-{index}.git", index % 17))
            .collect();
        let mut state = ClusterState::default();
        for id in 1..=args.nodes as NodeId {
            state.nodes.insert(id, random_node(id, &regions, rng));
        }
        state.highest_node_id = args.nodes as NodeId;
        let node_ids: Vec<NodeId> = state.nodes.keys().copied().collect();
        // Each repository's install layer is on a few nodes, popular ones on more.
        for (index, repository) in repositories.iter().enumerate() {
            let holders = 1 + rng.gen_range(0..(2 + 40 / (index + 1)));
            let nodes: BTreeSet<NodeId> = (0..holders)
                .map(|_| node_ids[rng.gen_range(0..node_ids.len())])
                .collect();
            state.install_layers.insert(repository.clone(), nodes);
        }
        // A third of the slots already run agents.
        let running: Vec<(NodeId, u32)> = state
            .nodes
            .values()
            .map(|node| (node.id, node.info.slots / 3))
            .collect();
        for (node, count) in running {
            for _ in 0..count {
                let record = running_agent(node, &repositories[rng.gen_range(0..repositories.len())]);
                state.agents.insert(record.id, record);
            }
        }
        state.rebuild_indexes();
        World {
            state,
            at_ms: 1_000,
            regions,
            repositories,
        }
    }

    fn random_spec(&self, rng: &mut StdRng) -> AgentSpec {
        // Skewed towards the first repositories, as real traffic is.
        let repository_index = (rng.gen_range(0.0f64..1.0).powi(3) * self.repositories.len() as f64) as usize;
        AgentSpec {
            name: String::new(),
            prompt: "bench".to_string(),
            repository: self.repositories[repository_index.min(self.repositories.len() - 1)].clone(),
            base_branch: "main".to_string(),
            model: "bench".to_string(),
            // Three in ten may run anywhere.
            region: (rng.gen_range(0..10) >= 3).then(|| self.regions[rng.gen_range(0..self.regions.len())].clone()),
            ..AgentSpec::default()
        }
    }

    fn apply(&mut self, command: Command) -> flotilla_state::ApplyResult {
        self.at_ms += 1;
        apply(
            &mut self.state,
            &mut Changes::default(),
            &Request::at(self.at_ms, command),
        )
    }

    fn create(&mut self, spec: AgentSpec) -> anyhow::Result<()> {
        if let Err(error) = self.apply(Command::CreateAgent {
            id: AgentId::new(),
            spec: spec.into(),
        }) {
            bail!("the simulated state refused a create: {error}");
        }
        Ok(())
    }

    /// Runs the scheduler's decision until it places nothing more (or once, unless `until_empty`),
    /// timing each decision and applying its assignments untimed.
    fn drain(&mut self, until_empty: bool) -> Figures {
        let mut figures = Figures::new();
        loop {
            let started = Instant::now();
            let (candidates, pending) = placement_input(&self.state, PENDING_READ_PER_RUN);
            let decisions: Vec<AssignOne> = place(&candidates, &pending, MAX_ASSIGNMENTS_PER_ENTRY);
            let elapsed_ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            figures.runs += 1;
            figures.total_ns += elapsed_ns;
            figures.run_ns.saturating_record(elapsed_ns.max(1));
            if decisions.is_empty() {
                return figures;
            }
            figures.placed += decisions.len() as u64;
            let _ = self.apply(Command::AssignAgents { assignments: decisions });
            if !until_empty {
                return figures;
            }
        }
    }

    /// Ends every agent placed since the start, so that their slots are free again.
    fn finish_all_placed(&mut self) {
        let placed: Vec<AgentId> = self
            .state
            .agents
            .values()
            .filter(|agent| agent.status == AgentStatus::Pending)
            .map(|agent| agent.id)
            .collect();
        for id in placed {
            if let Some(record) = self.state.agents.get_mut(&id) {
                record.status = AgentStatus::Stopped;
            }
        }
        self.state.rebuild_indexes();
    }
}

fn random_node(id: NodeId, regions: &[String], rng: &mut StdRng) -> NodeRecord {
    let roll = rng.gen_range(0..100);
    let mut labels = BTreeMap::new();
    labels.insert(
        "disk".to_string(),
        if id.is_multiple_of(4) { "hdd" } else { "ssd" }.to_string(),
    );
    labels.insert("zone".to_string(), format!("zone-{}", id % 3));
    NodeRecord {
        id,
        info: NodeInfo {
            grpc_address: format!("https://10.0.{}.{}:7443", id / 250, id % 250),
            mesh_address: format!("10.0.{}.{}:7444", id / 250, id % 250),
            region: regions[rng.gen_range(0..regions.len())].clone(),
            labels,
            slots: rng.gen_range(8..=64),
        },
        // 3 % down, 5 % draining, 1 % stopping.
        up: roll >= 3,
        draining: (3..8).contains(&roll),
        changed_at_ms: 0,
        stopping: roll == 8,
    }
}

fn running_agent(node: NodeId, repository: &str) -> AgentRecord {
    AgentRecord {
        id: AgentId::new(),
        spec: std::sync::Arc::new(AgentSpec {
            prompt: "bench".to_string(),
            repository: repository.to_string(),
            base_branch: "main".to_string(),
            model: "bench".to_string(),
            ..AgentSpec::default()
        }),
        status: AgentStatus::Running,
        assignment: Some(Assignment { node, epoch: Epoch(1) }),
        epoch: Epoch(1),
        created_at_ms: 0,
        updated_at_ms: 0,
        summary: None,
        error: None,
        follow_ups: Vec::new(),
        follow_ups_delivered: 0,
        head_commit: None,
        pull_request: None,
        last_sequence: 0,
        turns: 0,
        scripted: false,
        pushed_commit: None,
    }
}
