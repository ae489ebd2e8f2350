//! Tests of assignments and the indexes they keep.

use super::*;

#[test]
fn assignment_needs_the_next_epoch_and_a_live_node() {
    let mut state = with_nodes(2);
    let id = create(&mut state, "a");
    assert!(assign(&mut state, id, 1, 2).is_empty(), "epoch must be current + 1");
    assert!(assign(&mut state, id, 9, 1).is_empty(), "unknown node");
    assert_eq!(assign(&mut state, id, 1, 1), vec![id]);
    assert!(assign(&mut state, id, 2, 2).is_empty(), "already assigned");
    assert!(!state.pending.contains(&id));
    assert_eq!(state.slots_in_use(1), 1);
    run(
        &mut state,
        Command::SetDraining {
            node: 2,
            draining: true,
        },
    )
    .unwrap();
    let other = create(&mut state, "b");
    assert!(
        assign(&mut state, other, 2, 1).is_empty(),
        "draining node takes nothing"
    );
}

#[test]
fn indexes_rebuild_to_the_same_sets() {
    let mut state = with_nodes(2);
    let a = create(&mut state, "a");
    let b = create(&mut state, "b");
    assign(&mut state, a, 2, 1);
    let (pending, active) = (state.pending.clone(), state.active_by_node.clone());
    state.rebuild_indexes();
    assert_eq!(state.pending, pending);
    assert_eq!(state.active_by_node.get(&2), active.get(&2));
    assert!(state.pending.contains(&b));
}
