//! The listing indexes (status index, pending queue, per-node and per-team sets, search
//! signatures) checked against what a scan of the records gives, after every step of the
//! property test in `properties.rs`.

use std::collections::BTreeMap;

use flotilla_state::search::SearchSignature;
use flotilla_state::{AgentId, AgentStatus, ClusterState};
use proptest::prelude::*;

/// The status index lists exactly what a scan of every record lists, newest first, from any
/// starting point; and a state read back from its serialised records (a snapshot install, a
/// restart) rebuilds the same indexes as the live state keeps.
pub(crate) fn check_listing_indexes(state: &ClusterState) -> Result<(), TestCaseError> {
    let statuses = [
        AgentStatus::Pending,
        AgentStatus::Provisioning,
        AgentStatus::Running,
        AgentStatus::Finished,
        AgentStatus::Failed,
        AgentStatus::Stopped,
    ];
    let filters: Vec<Vec<AgentStatus>> = statuses
        .iter()
        .map(|status| vec![*status])
        .chain([
            statuses[..3].to_vec(),
            statuses[3..].to_vec(),
            vec![statuses[5], statuses[0]],
        ])
        .collect();
    let starts: Vec<Option<AgentId>> = std::iter::once(None)
        .chain(state.agents.keys().map(|id| Some(*id)))
        .collect();
    for filter in &filters {
        for before in &starts {
            let indexed: Vec<AgentId> = state.ids_with_status_before(filter, *before).collect();
            let scanned: Vec<AgentId> = state
                .agents
                .values()
                .rev()
                .filter(|record| before.is_none_or(|before| record.id < before))
                .filter(|record| filter.contains(&record.status))
                .map(|record| record.id)
                .collect();
            prop_assert_eq!(indexed, scanned, "statuses {:?} before {:?}", filter, before);
        }
    }
    let bytes = postcard::to_allocvec(state).expect("a state serialises");
    let mut reloaded: ClusterState = postcard::from_bytes(&bytes).expect("a state reads back");
    reloaded.rebuild_indexes();
    prop_assert_eq!(non_empty(&reloaded.by_status), non_empty(&state.by_status));
    prop_assert_eq!(&reloaded.pending, &state.pending);
    prop_assert_eq!(non_empty(&reloaded.active_by_node), non_empty(&state.active_by_node));
    prop_assert_eq!(non_empty(&reloaded.live_by_team), non_empty(&state.live_by_team));
    let signatures = |state: &ClusterState| -> Vec<(AgentId, SearchSignature)> {
        state
            .search_signatures
            .iter()
            .map(|(id, signature)| (*id, signature.of(&state.agents[id])))
            .collect()
    };
    prop_assert_eq!(signatures(&reloaded), signatures(state));
    prop_assert!(state
        .agents
        .values()
        .all(|record| state.search_signatures[&record.id].of(record) == SearchSignature::of_record(record)));
    Ok(())
}

/// An index without the empty sets it keeps for keys whose last member left.
fn non_empty<K: Ord + Clone, V: Ord + Clone>(
    index: &BTreeMap<K, std::collections::BTreeSet<V>>,
) -> BTreeMap<K, std::collections::BTreeSet<V>> {
    index
        .iter()
        .filter(|(_, set)| !set.is_empty())
        .map(|(key, set)| (key.clone(), set.clone()))
        .collect()
}
