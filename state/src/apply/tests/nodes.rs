//! Tests of the node commands.

use super::*;

#[test]
fn node_down_requeues_its_agents_and_the_next_epoch_is_higher() {
    let mut state = with_nodes(2);
    let id = create(&mut state, "a");
    assign(&mut state, id, 1, 1);
    let requeued = run(&mut state, Command::NodeDown { node: 1 }).unwrap();
    assert_eq!(requeued, Response::Requeued(vec![id]));
    assert_eq!(state.agents[&id].status, AgentStatus::Pending);
    assert!(state.pending.contains(&id));
    assert!(!state.nodes[&1].up);
    assert!(assign(&mut state, id, 1, 2).is_empty(), "a down node takes nothing");
    assert_eq!(assign(&mut state, id, 2, 2), vec![id]);
    // The old owner's writes under epoch 1 are refused.
    let stale = run(
        &mut state,
        Command::SetAgentStatus {
            agent: id,
            node: 1,
            epoch: Epoch(1),
            status: AgentStatus::Running,
            reason: "stale".into(),
            summary: None,
            error: None,
        },
    );
    assert!(matches!(stale, Err(ApplyError::Fenced { .. })));
}

#[test]
fn reserved_node_ids_are_unique() {
    let mut state = with_nodes(2);
    assert_eq!(run(&mut state, Command::ReserveNodeId), Ok(Response::NodeId(3)));
    assert_eq!(run(&mut state, Command::ReserveNodeId), Ok(Response::NodeId(4)));
    run(
        &mut state,
        Command::RegisterNode {
            node: 9,
            info: NodeInfo::default(),
        },
    )
    .unwrap();
    assert_eq!(run(&mut state, Command::ReserveNodeId), Ok(Response::NodeId(10)));
}
