//! Node commands: node ids, registration, liveness (up, down, draining), removal, and the
//! install layers a node holds. A node that goes down, is removed or stops cleanly loses its
//! live agents back to pending (see `assignments::requeue_agents_of`).

use super::assignments::requeue_agents_of;
use super::not_in_family;
use crate::cluster_state::{Changes, ClusterState};
use crate::command::{ApplyError, ApplyResult, Command, Response};
use crate::types::{NodeId, NodeInfo, NodeRecord, Term};

/// Routes a node command to its rule.
pub(super) fn apply_node_command(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    command: &Command,
) -> ApplyResult {
    match command {
        Command::ReserveNodeId => reserve_node_id(state, changes),
        Command::RegisterNode { node, info } => register_node(state, changes, at_ms, *node, info),
        Command::RemoveNode { node } => remove_node(state, changes, at_ms, *node),
        Command::SetDraining { node, draining } => set_draining(state, changes, *node, *draining),
        Command::NodeDown { node } => node_down(state, changes, at_ms, *node),
        Command::NodeUp { node } => node_up(state, changes, at_ms, *node),
        Command::NodeStopping { node } => node_stopping(state, changes, at_ms, *node),
        Command::RecordInstallLayer { node, repository } => record_install_layer(state, changes, *node, repository),
        other => not_in_family("node", other),
    }
}

/// Routes a leader's judgement of a node to its rule, if the entry carrying it (appended in
/// `entry_term`) is of the term the judgement names.
pub(super) fn apply_judged_node_command(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    entry_term: Term,
    command: &Command,
) -> ApplyResult {
    let (node, judged) = match command {
        Command::NodeDownInTerm { node, term } | Command::NodeUpInTerm { node, term } => (*node, *term),
        other => not_in_family("judged node", other),
    };
    if judged != entry_term {
        return Err(ApplyError::StaleTerm {
            command: command.name().to_string(),
            node,
            judged,
            entry: entry_term,
        });
    }
    match command {
        Command::NodeDownInTerm { .. } => node_down(state, changes, at_ms, node),
        _ => node_up(state, changes, at_ms, node),
    }
}

/// Hands out an id above every id handed out or registered: ids are never reused.
fn reserve_node_id(state: &mut ClusterState, changes: &mut Changes) -> ApplyResult {
    let highest = state
        .nodes
        .keys()
        .max()
        .copied()
        .unwrap_or(0)
        .max(state.highest_node_id);
    state.highest_node_id = highest + 1;
    changes.meta = true;
    Ok(Response::NodeId(state.highest_node_id))
}

/// Adds a node (up, not draining) or updates what a known node declares. A node registers on
/// every start after a clean stop, which makes it take agents again.
fn register_node(
    state: &mut ClusterState,
    changes: &mut Changes,
    at_ms: u64,
    node: NodeId,
    info: &NodeInfo,
) -> ApplyResult {
    if state.removed_nodes.contains(&node) {
        return Err(ApplyError::NodeRemoved(node));
    }
    if node > state.highest_node_id {
        state.highest_node_id = node;
        changes.meta = true;
    }
    let record = state.nodes.entry(node).or_insert_with(|| NodeRecord {
        id: node,
        info: info.clone(),
        up: true,
        draining: false,
        changed_at_ms: at_ms,
        stopping: false,
    });
    record.info = info.clone();
    record.stopping = false;
    let record = record.clone();
    changes.nodes.insert(node);
    Ok(Response::Node(record))
}

fn remove_node(state: &mut ClusterState, changes: &mut Changes, at_ms: u64, node: NodeId) -> ApplyResult {
    if state.nodes.remove(&node).is_none() {
        return Err(ApplyError::NodeNotFound(node));
    }
    for nodes in state.install_layers.values_mut() {
        nodes.remove(&node);
    }
    state.install_layers.retain(|_, nodes| !nodes.is_empty());
    // Its certificates are refused from now on, and its id is never registered again.
    state.removed_nodes.insert(node);
    changes.meta = true;
    changes.nodes.insert(node);
    let requeued = requeue_agents_of(state, changes, node, at_ms, &format!("node {node} removed"));
    Ok(Response::Requeued(requeued))
}

fn set_draining(state: &mut ClusterState, changes: &mut Changes, node: NodeId, draining: bool) -> ApplyResult {
    let record = state.nodes.get_mut(&node).ok_or(ApplyError::NodeNotFound(node))?;
    record.draining = draining;
    let record = record.clone();
    changes.nodes.insert(node);
    Ok(Response::Node(record))
}

/// A node's lease expired. Re-queues the node's live agents even if
/// it was down already, so that a repeated node-down leaves nothing assigned to it.
fn node_down(state: &mut ClusterState, changes: &mut Changes, at_ms: u64, node: NodeId) -> ApplyResult {
    let record = state.nodes.get_mut(&node).ok_or(ApplyError::NodeNotFound(node))?;
    if record.up {
        record.up = false;
        record.changed_at_ms = at_ms;
        changes.nodes.insert(node);
    }
    let requeued = requeue_agents_of(state, changes, node, at_ms, &format!("node {node} down"));
    Ok(Response::Requeued(requeued))
}

/// A node stops cleanly: it takes no agents until it registers again, and its live agents go
/// back to pending now rather than when its lease runs out. Only a registration clears the
/// mark, not `NodeUp`: a stopping node still reports while it winds down.
fn node_stopping(state: &mut ClusterState, changes: &mut Changes, at_ms: u64, node: NodeId) -> ApplyResult {
    let record = state.nodes.get_mut(&node).ok_or(ApplyError::NodeNotFound(node))?;
    if !record.stopping {
        record.stopping = true;
        changes.nodes.insert(node);
    }
    let requeued = requeue_agents_of(state, changes, node, at_ms, &format!("node {node} stopping"));
    Ok(Response::Requeued(requeued))
}

fn node_up(state: &mut ClusterState, changes: &mut Changes, at_ms: u64, node: NodeId) -> ApplyResult {
    let record = state.nodes.get_mut(&node).ok_or(ApplyError::NodeNotFound(node))?;
    if !record.up {
        record.up = true;
        record.changed_at_ms = at_ms;
        changes.nodes.insert(node);
    }
    Ok(Response::Node(record.clone()))
}

/// A node holds an install layer of `repository`; placement prefers such nodes.
fn record_install_layer(
    state: &mut ClusterState,
    changes: &mut Changes,
    node: NodeId,
    repository: &str,
) -> ApplyResult {
    if !state.nodes.contains_key(&node) {
        return Err(ApplyError::NodeNotFound(node));
    }
    state
        .install_layers
        .entry(repository.to_string())
        .or_default()
        .insert(node);
    changes.meta = true;
    Ok(Response::Done)
}
