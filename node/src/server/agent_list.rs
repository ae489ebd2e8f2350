//! One page of `ListAgents`, read from the replicated state under its read lock: newest agent
//! first, resuming before the id a page token names. A list filtered by status walks the
//! state's status index (`ClusterState::ids_with_status_before`) instead of every agent, so
//! a status with few agents among many answers at once; other filters look at records one by
//! one, at most [`MAX_LIST_SCANNED`] per page. A search first tests each agent's fixed-size
//! trigram signature (`flotilla_state::search`) and reads only the records that may match,
//! so results are those of a full scan at a small part of its cost.

use std::collections::HashMap;

use flotilla_proto::v1;
use flotilla_raft::{AgentId, AgentRecord, AgentStatus, ClusterState};
use flotilla_state::search::{LazySignature, SearchSignature};
use prost::Message as _;

use super::authz::Principal;
use super::convert;

/// Most bytes of agents in one `ListAgents` page (a prompt alone may be 256 KiB): a page that
/// reaches it is short and has a next token.
pub const MAX_LIST_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Most agent records one `ListAgents` page looks at under the state's lock, matching or not;
/// a search that finds little answers a short page with a next token rather than scan on.
pub const MAX_LIST_SCANNED: usize = 50_000;

/// What a page is filtered by (already validated).
pub struct ListFilter<'a> {
    pub statuses: &'a [AgentStatus],
    pub repository: &'a str,
    pub region: &'a str,
    /// `None` for no search.
    pub needle: Option<&'a Needle>,
}

/// The page of agents `caller` sees after `after` (newest first), and the id to resume after
/// when the page ended before the last agent.
pub fn list_page(
    state: &ClusterState,
    caller: &Principal,
    filter: &ListFilter<'_>,
    after: Option<AgentId>,
    page_size: usize,
) -> (Vec<v1::Agent>, Option<AgentId>) {
    // Whether the caller sees a team's summaries, once per team of the page (keyed by the
    // record's own team text, borrowed from the state, so a lookup allocates nothing).
    let mut hidden_by_team: HashMap<&str, bool> = HashMap::new();
    let candidates = candidates(state, filter, after);
    // The page ends at `page_size` agents, at `MAX_LIST_PAGE_BYTES` of them, or after
    // `MAX_LIST_SCANNED` records looked at, whichever comes first; the token then resumes
    // after the last record looked at.
    let mut page: Vec<v1::Agent> = Vec::with_capacity(page_size);
    let mut page_bytes = 0;
    let mut last_examined = None;
    for (scanned, (id, record)) in candidates.enumerate() {
        if scanned == MAX_LIST_SCANNED || page.len() == page_size {
            return (page, last_examined);
        }
        if let Some(record) = record.filter(|record| caller.sees_team(&record.spec.team)) {
            let team = record.spec.team.as_str();
            let hide = *hidden_by_team
                .entry(team)
                .or_insert_with(|| caller.summary_hidden(team, &state.settings_of(team)));
            if wanted(record, filter, hide) {
                let mut agent = convert::agent(record);
                if hide {
                    super::visibility::hide_agent(&mut agent);
                }
                let bytes = agent.encoded_len();
                if !page.is_empty() && page_bytes + bytes > MAX_LIST_PAGE_BYTES {
                    return (page, last_examined);
                }
                page_bytes += bytes;
                page.push(agent);
            }
        }
        last_examined = Some(id);
    }
    (page, None)
}

/// The agents a page looks at, newest first, before `after`: each with its record, or `None`
/// when its search signature rules it out (it still counts as looked at, and the page may
/// resume after it). A status filter walks the status index; a search without one walks the
/// signatures, reading only the records that may match.
fn candidates<'state>(
    state: &'state ClusterState,
    filter: &ListFilter<'_>,
    after: Option<AgentId>,
) -> Box<dyn Iterator<Item = (AgentId, Option<&'state AgentRecord>)> + 'state> {
    let signature = filter.needle.and_then(|needle| needle.signature);
    if !filter.statuses.is_empty() {
        return Box::new(state.ids_with_status_before(filter.statuses, after).map(move |id| {
            let record = match (signature, state.search_signatures.get(&id)) {
                (Some(needle), Some(candidate)) => unless_ruled_out(state, &id, candidate, &needle),
                _ => state.agents.get(&id),
            };
            (id, record)
        }));
    }
    if let Some(needle) = signature {
        let range = match after {
            Some(after) => state.search_signatures.range(..after),
            None => state.search_signatures.range(..),
        };
        return Box::new(
            range
                .rev()
                .map(move |(id, candidate)| (*id, unless_ruled_out(state, id, candidate, &needle))),
        );
    }
    let range = match after {
        Some(after) => state.agents.range(..after),
        None => state.agents.range(..),
    };
    Box::new(range.rev().map(|(id, record)| (*id, Some(record))))
}

/// The record of `id` unless its signature rules `needle` out. A signature a search took
/// before rules the record out without reading it; one not taken yet is taken from the record,
/// once.
fn unless_ruled_out<'state>(
    state: &'state ClusterState,
    id: &AgentId,
    candidate: &LazySignature,
    needle: &SearchSignature,
) -> Option<&'state AgentRecord> {
    match candidate.taken() {
        Some(taken) if !taken.may_contain(needle) => None,
        Some(_) => state.agents.get(id),
        None => state
            .agents
            .get(id)
            .filter(|record| candidate.of(record).may_contain(needle)),
    }
}

fn wanted(record: &AgentRecord, filter: &ListFilter<'_>, summary_hidden: bool) -> bool {
    (filter.statuses.is_empty() || filter.statuses.contains(&record.status))
        && (filter.repository.is_empty() || record.spec.repository == filter.repository)
        && (filter.region.is_empty() || record.spec.region.as_deref() == Some(filter.region))
        && filter
            .needle
            .is_none_or(|needle| matches_search(record, needle, summary_hidden))
}

/// Whether `record` matches a search; a summary hidden from the caller is not searched, so a
/// search cannot reveal it a word at a time.
pub fn matches_search(record: &AgentRecord, needle: &Needle, summary_hidden: bool) -> bool {
    needle.found_in(&record.spec.name)
        || needle.found_in(&record.spec.prompt)
        || (!summary_hidden
            && record
                .summary
                .as_deref()
                .is_some_and(|summary| needle.found_in(summary)))
}

/// A search's needle, lowercased once per page, with the trigram bits a record must have to
/// hold it (`None` when the needle is too short to have any).
pub struct Needle {
    lowercase: String,
    signature: Option<SearchSignature>,
}

impl Needle {
    /// `None` for an empty search. The needle is lowercased here.
    pub fn new(search: &str) -> Option<Needle> {
        (!search.is_empty()).then(|| Needle {
            lowercase: search.to_lowercase(),
            signature: Some(SearchSignature::of_needle(search))
                .filter(|signature| *signature != SearchSignature::default()),
        })
    }

    /// Whether the lowercase of `text` holds the needle. Matching ASCII text in place (with a
    /// byte loop, or a case-insensitive automaton) measured slower in a debug build than this
    /// copy, which runs in the standard library's optimised code; see docs/performance.md.
    pub fn found_in(&self, text: &str) -> bool {
        text.to_lowercase().contains(&self.lowercase)
    }
}

#[cfg(test)]
mod tests {
    use super::Needle;

    #[test]
    fn ascii_and_unicode_searches_match_what_lowercasing_matches() {
        let texts = ["Fix the Build", "ÉTÉ À PARIS", "Kelvin \u{212A} sign", "", "abc"];
        let needles = ["build", "fix the", "été", "k", "à p", "", "xyz", "abcd", "kelvin k"];
        for text in texts {
            for needle in needles {
                let found = Needle::new(needle).is_none_or(|matcher| matcher.found_in(text));
                assert_eq!(
                    found,
                    text.to_lowercase().contains(needle),
                    "{text:?} contains {needle:?}"
                );
            }
        }
    }
}
