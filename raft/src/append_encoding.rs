//! An `AppendEntriesRequest` on the wire, built from and taken apart into its entries' own
//! encodings.
//!
//! The bytes are exactly postcard's encoding of the request (its fields in declaration order:
//! vote, previous log id, the entries as a length-prefixed sequence, leader commit), so either
//! side may also use plain `encode`/`decode`. What differs is where the entries' bytes come
//! from: a leader copies each entry's encoding from its log's recent entries rather than
//! encoding it again for every follower, and a follower keeps each entry's bytes as they came
//! so that its log writes them rather than encoding the entries once more.

use std::collections::VecDeque;

use bytes::Bytes;
use openraft::raft::AppendEntriesRequest;
use openraft::{Entry, LogId, Vote};

use crate::store::RecentEntries;
use crate::{NodeId, TypeConfig};

/// The request's encoding, with each entry's bytes copied from `recent` where it holds them.
pub(crate) fn encode_append(request: &AppendEntriesRequest<TypeConfig>, recent: &RecentEntries) -> Vec<u8> {
    let failed = "serialising to memory cannot fail";
    let mut out = Vec::new();
    out = postcard::to_extend(&request.vote, out).expect(failed);
    out = postcard::to_extend(&request.prev_log_id, out).expect(failed);
    // A sequence's length is a varint of a usize, as a usize is.
    out = postcard::to_extend(&request.entries.len(), out).expect(failed);
    for entry in &request.entries {
        match recent.encoded(&entry.log_id) {
            Some(encoded) => out.extend_from_slice(&encoded),
            None => out = postcard::to_extend(entry, out).expect(failed),
        }
    }
    postcard::to_extend(&request.leader_commit, out).expect(failed)
}

/// A decoded request with each of its entries' encodings, slices of the payload it came in.
pub(crate) struct DecodedAppend {
    pub(crate) request: AppendEntriesRequest<TypeConfig>,
    pub(crate) encodings: VecDeque<(LogId<NodeId>, Bytes)>,
}

/// Decodes `payload` as [`decode`](crate::network::decode) would, keeping each entry's bytes
/// (slices of `payload`: nothing is copied).
pub(crate) fn decode_append(payload: Bytes) -> Result<DecodedAppend, postcard::Error> {
    let (vote, rest) = postcard::take_from_bytes::<Vote<NodeId>>(&payload)?;
    let (prev_log_id, rest) = postcard::take_from_bytes::<Option<LogId<NodeId>>>(rest)?;
    let (count, mut rest) = postcard::take_from_bytes::<usize>(rest)?;
    // Each entry takes a byte at least: a count beyond what is left cannot be honest, and
    // reserving for it would let a message size an allocation.
    let room = count.min(rest.len());
    let mut entries = Vec::with_capacity(room);
    let mut spans = Vec::with_capacity(room);
    for _ in 0..count {
        let start = payload.len() - rest.len();
        let (entry, after) = postcard::take_from_bytes::<Entry<TypeConfig>>(rest)?;
        rest = after;
        spans.push((entry.log_id, start..payload.len() - rest.len()));
        entries.push(entry);
    }
    let (leader_commit, _) = postcard::take_from_bytes::<Option<LogId<NodeId>>>(rest)?;
    Ok(DecodedAppend {
        request: AppendEntriesRequest {
            vote,
            prev_log_id,
            entries,
            leader_commit,
        },
        encodings: spans
            .into_iter()
            .map(|(log_id, span)| (log_id, payload.slice(span)))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::network::{decode, encode};
    use crate::{Command, Request};

    /// An entry at `index`: every third one blank, the others a batch of `commands` commands.
    fn entry(index: u64, commands: usize) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(7, 2), index),
            payload: if index.is_multiple_of(3) {
                EntryPayload::Blank
            } else {
                let commands = (0..commands as u64)
                    .map(|node| Command::SetDraining { node, draining: true })
                    .collect();
                EntryPayload::Normal(Arc::new(Request::at(
                    1_700_000_000_000 + index,
                    Command::Batch { commands },
                )))
            },
        }
    }

    fn request(entries: Vec<Entry<TypeConfig>>) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(7, 2),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(7, 2), 41)),
            entries,
            leader_commit: Some(LogId::new(CommittedLeaderId::new(7, 2), 40)),
        }
    }

    #[test]
    fn encodes_as_postcard_does_whether_or_not_the_entries_are_held() {
        // 200 entries: the sequence's length takes two bytes.
        for count in [0, 1, 5, 200] {
            let entries: Vec<_> = (1..=count).map(|index| entry(index, 40)).collect();
            let request = request(entries.clone());
            let expected = encode(&request);
            let nothing_held = RecentEntries::new(1 << 20);
            assert_eq!(
                encode_append(&request, &nothing_held),
                expected,
                "{count} entries, none held"
            );
            // The first half held with their encodings: those are copied, the rest encoded.
            let some_held = RecentEntries::new(1 << 20);
            some_held.appended(
                entries
                    .into_iter()
                    .map(|entry| {
                        let encoded = Bytes::from(encode(&entry));
                        (entry, encoded)
                    })
                    .collect(),
            );
            some_held.truncate(count / 2 + 1);
            assert_eq!(
                encode_append(&request, &some_held),
                expected,
                "{count} entries, some held"
            );
        }
    }

    #[test]
    fn copies_the_held_bytes_of_an_entry_rather_than_encoding_it() {
        let held = entry(1, 3);
        let recent = RecentEntries::new(1 << 20);
        // Bytes that are not the entry's encoding show which way the request was built.
        recent.appended(vec![(held.clone(), Bytes::from_static(b"HELD"))]);
        let built = encode_append(&request(vec![held]), &recent);
        assert!(built.windows(4).any(|window| window == b"HELD"));
    }

    #[test]
    fn a_decoded_request_and_its_entries_bytes_match_the_senders() {
        let request = request((1..=200).map(|index| entry(index, 5)).collect());
        let bytes = encode(&request);
        let decoded = decode_append(Bytes::from(bytes.clone())).expect("decodes");
        let plain: AppendEntriesRequest<TypeConfig> = decode(&bytes).expect("decodes");
        assert_eq!(format!("{:?}", decoded.request), format!("{plain:?}"));
        assert_eq!(decoded.encodings.len(), 200);
        for ((log_id, encoded), entry) in decoded.encodings.iter().zip(&request.entries) {
            assert_eq!(*log_id, entry.log_id);
            assert_eq!(encoded.as_ref(), encode(entry).as_slice());
        }
        // A heartbeat has no entries and keeps nothing.
        let heartbeat = decode_append(Bytes::from(encode(&self::request(Vec::new())))).expect("decodes");
        assert!(heartbeat.encodings.is_empty() && heartbeat.request.entries.is_empty());
        assert_eq!(heartbeat.request.leader_commit, request.leader_commit);
    }

    #[test]
    fn refuses_what_plain_decoding_refuses() {
        let bytes = encode(&request((1..=4).map(|index| entry(index, 2)).collect()));
        for cut in [0, 3, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                decode_append(Bytes::copy_from_slice(&bytes[..cut])).is_err(),
                "cut at {cut}"
            );
            assert!(decode::<AppendEntriesRequest<TypeConfig>>(&bytes[..cut]).is_err());
        }
        // A count far beyond the bytes that follow fails, without reserving room for it.
        let mut lying = postcard::to_allocvec(&Vote::<NodeId>::new_committed(1, 1)).expect("encodes");
        lying = postcard::to_extend(&None::<LogId<NodeId>>, lying).expect("encodes");
        lying = postcard::to_extend(&usize::MAX, lying).expect("encodes");
        assert!(decode_append(Bytes::from(lying)).is_err());
    }
}
