//! Tests of the RocksDB storage: what is applied or installed is what a reopened store loads.

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftLogReader, RaftSnapshotBuilder};
use rocksdb::WriteBatch;

use super::log_store::log_key;
use super::{encode, open, Encoder, StateMachineStore, CF_LOG, CF_STATE};
use crate::command::{AssignOne, Command, Request, Response, COMMAND_VERSION};
use crate::types::{AgentId, AgentSpec, AgentStatus, Checkpoint, Epoch, EventKind, NodeInfo, PluginKey, UploadId};
use crate::TypeConfig;

fn entry(index: u64, command: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(std::sync::Arc::new(Request {
            version: COMMAND_VERSION,
            at_ms: 1_000 + index,
            command,
        })),
    }
}

fn membership_entry(index: u64) -> Entry<TypeConfig> {
    let mut nodes = std::collections::BTreeMap::new();
    nodes.insert(1, crate::NodeAddr::default());
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Membership(Membership::new(vec![[1].into_iter().collect()], nodes)),
    }
}

/// A create whose record (about 2 KB of prompt) goes to a blob file.
fn long_create(id: AgentId) -> Command {
    Command::CreateAgent {
        id,
        spec: std::sync::Arc::new(AgentSpec {
            name: "long".into(),
            prompt: "a prompt of a realistic size, repeated. ".repeat(50),
            repository: "https://example.com/r.git".into(),
            ..Default::default()
        }),
    }
}

fn create(id: AgentId) -> Command {
    Command::CreateAgent {
        id,
        spec: std::sync::Arc::new(AgentSpec {
            name: "n".into(),
            prompt: "p".into(),
            repository: "https://example.com/r.git".into(),
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_state_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ids = [AgentId::new(), AgentId::new()];
    let expected = {
        let (_, mut machine) = open(dir.path()).unwrap();
        let results = machine
            .apply(vec![
                membership_entry(1),
                entry(
                    2,
                    Command::RegisterNode {
                        node: 1,
                        info: NodeInfo {
                            slots: 2,
                            ..Default::default()
                        },
                    },
                ),
                entry(3, create(ids[0])),
                entry(4, create(ids[1])),
                entry(
                    5,
                    Command::StopAgent {
                        agent: ids[0],
                        reason: "r".into(),
                    },
                ),
                entry(
                    6,
                    Command::StopAgent {
                        agent: ids[0],
                        reason: "again".into(),
                    },
                ),
            ])
            .await
            .unwrap();
        assert_eq!(results.len(), 6);
        assert!(matches!(results[2], Ok(Response::Agent(_))));
        assert!(results[5].is_err(), "stopping twice is refused");
        assert_eq!(machine.reader().last_applied_index(), 6);
        machine.reader().read(|state| state.clone())
    };
    let (_, mut reopened) = open(dir.path()).unwrap();
    let (applied, membership) = reopened.applied_state().await.unwrap();
    assert_eq!(applied.map(|log_id| log_id.index), Some(6));
    assert!(membership.membership().voter_ids().any(|id| id == 1));
    let state = reopened.reader().read(|state| state.clone());
    assert_eq!(state, expected);
    assert_eq!(state.events_after(ids[0], 0).len(), 2);
    assert!(state.pending.contains(&ids[1]), "indexes are rebuilt on load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_installs_the_same_state_elsewhere() {
    let source_dir = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    let (_, mut source) = open(source_dir.path()).unwrap();
    source
        .apply(vec![membership_entry(1), entry(2, create(AgentId::new()))])
        .await
        .unwrap();
    let snapshot = source.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snapshot.meta.last_log_id.map(|log_id| log_id.index), Some(2));

    let (_, mut target) = open(target_dir.path()).unwrap();
    target.apply(vec![entry(1, create(AgentId::new()))]).await.unwrap();
    target
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    let expected = source.reader().read(|state| state.clone());
    assert_eq!(target.reader().read(|state| state.clone()), expected);
    let held = target
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("a snapshot is held");
    assert_eq!(held.meta.last_log_id.map(|log_id| log_id.index), Some(2));
    drop(target);
    let (_, reopened) = open(target_dir.path()).unwrap();
    assert_eq!(
        reopened.reader().read(|state| state.clone()),
        expected,
        "the installed state is what is on disk"
    );
}

/// A snapshot is built from the stored records, not under the in-memory state's lock: it
/// completes while another thread holds that lock for writing (as a long apply would), and it
/// carries exactly the state and applied position the machine has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_built_without_the_state_lock_and_matches_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut machine) = open(dir.path()).unwrap();
    let ids: Vec<AgentId> = (0..50).map(|_| AgentId::new()).collect();
    let mut entries = vec![membership_entry(1)];
    entries.extend(
        ids.iter()
            .enumerate()
            .map(|(offset, id)| entry(offset as u64 + 2, create(*id))),
    );
    machine.apply(entries).await.unwrap();
    let expected = machine.reader().read(|state| state.clone());

    let mut builder = machine.get_snapshot_builder().await;
    let built = while_another_thread_holds_the_state_lock(&machine, builder.build_snapshot()).await;
    let snapshot = built.expect("the snapshot waited for the state lock").unwrap();
    assert_eq!(snapshot.meta.last_log_id.map(|log_id| log_id.index), Some(51));
    // The snapshot the machine now holds (stored borrowed) reads back as the one built.
    let held = machine
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("a snapshot is held");
    assert_eq!(held.meta, snapshot.meta);
    assert_eq!(held.snapshot.get_ref(), snapshot.snapshot.get_ref());

    let target_dir = tempfile::tempdir().unwrap();
    let (_, mut target) = open(target_dir.path()).unwrap();
    target
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    assert_eq!(target.reader().read(|state| state.clone()), expected);
    assert_eq!(target.reader().last_applied_index(), 51);
}

/// Writes `entries` into `log`'s segments and syncs them, as an append and its flush do.
fn write_log(log: &super::LogStore, entries: &[Entry<TypeConfig>]) {
    let mut frames = Vec::new();
    for entry in entries {
        super::segments::push_frame(&mut frames, entry.log_id.index, |buffer| {
            buffer.extend_from_slice(&encode(entry))
        });
    }
    let (first, last) = (entries[0].log_id.index, entries[entries.len() - 1].log_id.index);
    log.segments.append(first, last, &frames).unwrap();
    log.segments.sync().unwrap();
}

#[test]
fn the_kept_buffer_encodes_each_value_as_a_fresh_one_would() {
    let mut encoder = Encoder::new();
    let large = entry(1, long_create(AgentId::new()));
    let small = entry(2, create(AgentId::new()));
    let larger_than_the_first_room = "x".repeat(Encoder::INITIAL_BYTES * 3);
    // Large after small, small after large (what the buffer held before must not show), and a
    // value that outgrows the room the buffer starts with.
    assert_eq!(encoder.encode(&small), encode(&small).as_slice());
    assert_eq!(encoder.encode(&large), encode(&large).as_slice());
    assert_eq!(encoder.encode(&small), encode(&small).as_slice());
    assert_eq!(
        encoder.encode(&larger_than_the_first_room),
        encode(&larger_than_the_first_room).as_slice()
    );
    assert_eq!(encoder.encode(&7_u64), encode(&7_u64).as_slice());
    let read: Entry<TypeConfig> = postcard::from_bytes(encoder.encode(&large)).unwrap();
    assert_eq!(read, large);
}

#[test]
fn a_received_entrys_bytes_are_written_as_they_came_and_the_rest_encoded() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path()).unwrap();
    let entries: Vec<Entry<TypeConfig>> = (1..=3).map(|index| entry(index, create(AgentId::new()))).collect();
    // Bytes for entry 2's log id that encode another entry: only a frame written from them
    // reads back as that one. (Raft never sends two entries under one log id; this shows whose
    // bytes the frame holds.)
    let other = entry(2, create(AgentId::new()));
    let recent = log.recent_entries();
    recent.received(
        [(entries[1].log_id, bytes::Bytes::from(encode(&other)))]
            .into_iter()
            .collect(),
    );
    let (frames, placed) = log.frames_of(entries.clone());
    let read: Vec<Entry<TypeConfig>> = placed
        .iter()
        .map(|(_, span)| postcard::from_bytes(&frames[span.clone()]).unwrap())
        .collect();
    assert_eq!(read, vec![entries[0].clone(), other, entries[2].clone()]);
    assert_eq!(
        placed.iter().map(|(entry, _)| entry.log_id).collect::<Vec<_>>(),
        entries.iter().map(|entry| entry.log_id).collect::<Vec<_>>()
    );
    // Taken once: the next frames of entry 2 are its own encoding.
    let (frames, placed) = log.frames_of(vec![entries[1].clone()]);
    assert_eq!(&frames[placed[0].1.clone()], encode(&entries[1]).as_slice());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_entries_round_trip_and_purge() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path()).unwrap();
    let entries: Vec<Entry<TypeConfig>> = (1..=5).map(|index| entry(index, create(AgentId::new()))).collect();
    write_log(&log, &entries);
    assert_eq!(log.try_get_log_entries(2..4).await.unwrap(), entries[1..3].to_vec());
    assert_eq!(log.try_get_log_entries(2..=4).await.unwrap(), entries[1..4].to_vec());
    log.purge(entries[2].log_id).await.unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(entries[2].log_id));
    assert_eq!(state.last_log_id, Some(entries[4].log_id));
    assert_eq!(log.try_get_log_entries(0..10).await.unwrap(), entries[3..].to_vec());
    log.truncate(entries[4].log_id).await.unwrap();
    assert_eq!(log.try_get_log_entries(0..10).await.unwrap(), entries[3..4].to_vec());
    assert_eq!(
        log.get_log_state().await.unwrap().last_purged_log_id,
        Some(entries[2].log_id),
        "a truncate keeps the purge mark"
    );
    drop(log);
    let (mut log, _) = open(dir.path()).unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(entries[2].log_id));
    assert_eq!(state.last_log_id, Some(entries[3].log_id));
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries[3..4].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_mark_past_a_log_that_lost_its_tail_is_cut_back_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let entries: Vec<Entry<TypeConfig>> = (1..=5).map(|index| entry(index, create(AgentId::new()))).collect();
    {
        let (mut log, _) = open(dir.path()).unwrap();
        write_log(&log, &entries);
        log.save_committed(Some(entries[4].log_id)).await.unwrap();
        assert_eq!(log.read_committed().await.unwrap(), Some(entries[4].log_id));
        // What a power loss leaves when the mark reached the disk and the last two entries'
        // write did not.
        log.segments.truncate(4).unwrap();
        log.save_vote(&openraft::Vote::new(1, 1)).await.unwrap();
    }
    let (mut log, _) = open(dir.path()).unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(entries[2].log_id));
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries[..3].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_kept_in_rocksdb_by_an_earlier_release_moves_into_segments_whole() {
    let dir = tempfile::tempdir().unwrap();
    let entries: Vec<Entry<TypeConfig>> = (1..=40).map(|index| entry(index, create(AgentId::new()))).collect();
    {
        let (log, _) = open(dir.path()).unwrap();
        // As an earlier release stored them: in the `log` family under their big-endian index.
        let mut batch = WriteBatch::default();
        for entry in &entries {
            batch.put_cf(log.cf(CF_LOG), log_key(entry.log_id.index), encode(entry));
        }
        log.db.write(batch).unwrap();
        // A move cut short by a crash left a segment behind: it is made again from the family.
        write_log(&log, &entries[..3]);
    }
    let (mut log, _) = open(dir.path()).unwrap();
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries);
    assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(entries[39].log_id));
    let left = log.db.iterator_cf(log.cf(CF_LOG), rocksdb::IteratorMode::Start).count();
    assert_eq!(left, 0, "the family is emptied once the segments hold the log");
    // The next open finds nothing to move and the same log.
    drop(log);
    let (mut log, _) = open(dir.path()).unwrap();
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries);
}

/// Entries from `first_index` on that register node 1, run agent `id` there under epoch 1
/// and record its first turn with `checkpoint`.
fn first_turn_entries(first_index: u64, id: AgentId, checkpoint: &[u8]) -> Vec<Entry<TypeConfig>> {
    let commands = vec![
        Command::RegisterNode {
            node: 1,
            info: NodeInfo {
                slots: 2,
                ..Default::default()
            },
        },
        create(id),
        Command::AssignAgents {
            assignments: vec![AssignOne {
                agent: id,
                node: 1,
                epoch: Epoch(1),
            }],
        },
        Command::SetAgentStatus {
            agent: id,
            node: 1,
            epoch: Epoch(1),
            status: AgentStatus::Running,
            reason: "started".into(),
            summary: None,
            error: None,
        },
        Command::RecordTurn {
            agent: id,
            node: 1,
            epoch: Epoch(1),
            turn: 1,
            follow_ups_delivered: 0,
            head_commit: Some("abc123".into()),
            scripted: true,
            checkpoint: checkpoint.to_vec(),
            events: vec![EventKind::TurnFinished {
                turn: 1,
                input_tokens: 1,
                output_tokens: 1,
                tool_calls: 0,
                model_ms: 1,
                tools_ms: 0,
            }],
        },
    ];
    commands
        .into_iter()
        .zip(first_index..)
        .map(|(command, index)| entry(index, command))
        .collect()
}

async fn apply_all(machine: &mut StateMachineStore, entries: Vec<Entry<TypeConfig>>) {
    let results = machine.apply(entries).await.unwrap();
    for result in results {
        let took_effect = match &result {
            Ok(Response::Assigned(ids)) => !ids.is_empty(),
            other => other.is_ok(),
        };
        assert!(took_effect, "every entry of the test takes effect: {result:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_checkpoint_survives_a_reopen_and_is_replaced_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let id = AgentId::new();
    {
        let (_, mut machine) = open(dir.path()).unwrap();
        let mut entries = vec![membership_entry(1)];
        entries.extend(first_turn_entries(2, id, b"conversation after turn 1"));
        apply_all(&mut machine, entries).await;
    }
    let (_, mut reopened) = open(dir.path()).unwrap();
    let checkpoint = reopened.reader().read(|state| state.checkpoints.get(&id).cloned());
    assert_eq!(
        checkpoint,
        Some(Checkpoint {
            turn: 1,
            at_ms: 1_006,
            head_commit: Some("abc123".into()),
            data: b"conversation after turn 1".to_vec(),
        })
    );
    let agent = reopened.reader().read(|state| state.agents[&id].clone());
    assert_eq!(agent.turns, 1);

    let second = Command::RecordTurn {
        agent: id,
        node: 1,
        epoch: Epoch(1),
        turn: 2,
        follow_ups_delivered: 0,
        head_commit: None,
        scripted: true,
        checkpoint: b"conversation after turn 2".to_vec(),
        events: Vec::new(),
    };
    apply_all(&mut reopened, vec![entry(7, second)]).await;
    let expected = reopened.reader().read(|state| state.clone());
    drop(reopened);
    let (_, again) = open(dir.path()).unwrap();
    let state = again.reader().read(|state| state.clone());
    assert_eq!(state.checkpoints.len(), 1, "one checkpoint per agent is kept");
    assert_eq!(state.checkpoints[&id].turn, 2);
    assert_eq!(state, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_travels_in_a_snapshot_and_replaces_the_receivers() {
    let source_dir = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    let id = AgentId::new();
    let (_, mut source) = open(source_dir.path()).unwrap();
    let mut entries = vec![membership_entry(1)];
    entries.extend(first_turn_entries(2, id, b"from the source"));
    apply_all(&mut source, entries).await;
    let snapshot = source.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let expected = source.reader().read(|state| state.clone());
    assert!(expected.checkpoints.contains_key(&id));

    // The receiver has a checkpoint of its own, for an agent the snapshot does not know.
    let stale = AgentId::new();
    let (_, mut target) = open(target_dir.path()).unwrap();
    apply_all(&mut target, first_turn_entries(1, stale, b"stale")).await;
    target
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    assert_eq!(target.reader().read(|state| state.clone()), expected);
    drop(target);
    let (_, reopened) = open(target_dir.path()).unwrap();
    let state = reopened.reader().read(|state| state.clone());
    assert_eq!(state.checkpoints[&id].data, b"from the source".to_vec());
    assert!(
        !state.checkpoints.contains_key(&stale),
        "the receiver's own checkpoint is gone from disk"
    );
    assert_eq!(state, expected, "the installed state is what is on disk");
}

/// Entries from `first_index` on that stage `bytes` under `upload` in chunks of `chunk_bytes`
/// and, when `commit` holds a name and version, commit them as that plugin.
fn plugin_entries(
    first_index: u64,
    upload: UploadId,
    bytes: &[u8],
    chunk_bytes: usize,
    commit: Option<(&str, &str, bool)>,
) -> Vec<Entry<TypeConfig>> {
    use sha2::Digest as _;
    let mut commands: Vec<Command> = bytes
        .chunks(chunk_bytes)
        .enumerate()
        .map(|(index, chunk)| Command::PutPluginChunk {
            upload,
            index: index as u32,
            bytes: chunk.to_vec(),
        })
        .collect();
    if let Some((name, version, enable)) = commit {
        commands.push(Command::CommitPlugin {
            upload,
            name: name.into(),
            version: version.into(),
            sha256: hex::encode(sha2::Sha256::digest(bytes)),
            kind: crate::types::PluginKind::Tool,
            size_bytes: bytes.len() as u64,
            chunk_count: commands.len() as u32,
            granted_hosts: vec!["example.com".into()],
            enable,
        });
    }
    commands
        .into_iter()
        .zip(first_index..)
        .map(|(command, index)| entry(index, command))
        .collect()
}

/// Keys under `prefix` in the state column family.
fn stored_keys(machine: &StateMachineStore, prefix: &[u8]) -> usize {
    machine
        .db
        .prefix_iterator_cf(machine.cf(CF_STATE), prefix)
        .map(|item| item.unwrap().0)
        .take_while(|key| key.starts_with(prefix))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_bytes_and_staged_uploads_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let kept: Vec<u8> = (0..10_000u32).map(|value| (value % 251) as u8).collect();
    let removed = b"a version that is removed again".to_vec();
    let staged = b"an upload still in progress".to_vec();
    let staged_upload = UploadId::new();
    let expected = {
        let (_, mut machine) = open(dir.path()).unwrap();
        let mut entries = vec![membership_entry(1)];
        entries.extend(plugin_entries(
            2,
            UploadId::new(),
            &kept,
            3_000,
            Some(("fmt", "1.0.0", true)),
        ));
        let next = 2 + entries.len() as u64 - 1;
        entries.extend(plugin_entries(
            next,
            UploadId::new(),
            &removed,
            8,
            Some(("fmt", "0.9.0", false)),
        ));
        let next = 2 + entries.len() as u64 - 1;
        entries.push(entry(
            next,
            Command::RemovePlugin {
                name: "fmt".into(),
                version: "0.9.0".into(),
            },
        ));
        entries.extend(plugin_entries(next + 1, staged_upload, &staged, 10, None));
        apply_all(&mut machine, entries).await;
        assert_eq!(
            stored_keys(&machine, b"q/"),
            4,
            "the removed version's chunks are deleted"
        );
        assert_eq!(stored_keys(&machine, b"p/"), 1);
        machine.reader().read(|state| state.clone())
    };
    let (_, reopened) = open(dir.path()).unwrap();
    let state = reopened.reader().read(|state| state.clone());
    assert_eq!(state, expected);
    assert_eq!(state.plugin_bytes(&PluginKey::new("fmt", "1.0.0")), Some(kept));
    assert_eq!(state.plugins[&PluginKey::new("fmt", "1.0.0")].chunk_count, 4);
    assert!(state.enabled_plugins().any(|record| record.version == "1.0.0"));
    assert!(!state.plugins.contains_key(&PluginKey::new("fmt", "0.9.0")));
    assert!(state.plugin_uploads.contains_key(&staged_upload));
    let staged_back: Vec<u8> = state.upload_chunks.values().flatten().copied().collect();
    assert_eq!(staged_back, staged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_bytes_travel_in_a_snapshot_and_replace_the_receivers() {
    let source_dir = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = (0..5_000u32).map(|value| (value % 13) as u8).collect();
    let (_, mut source) = open(source_dir.path()).unwrap();
    let mut entries = vec![membership_entry(1)];
    entries.extend(plugin_entries(
        2,
        UploadId::new(),
        &bytes,
        1_024,
        Some(("lint", "2.1.0", true)),
    ));
    let next = 2 + entries.len() as u64 - 1;
    entries.extend(plugin_entries(next, UploadId::new(), b"half an upload", 4, None));
    apply_all(&mut source, entries).await;
    let snapshot = source.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let expected = source.reader().read(|state| state.clone());
    assert_eq!(expected.plugin_chunks.len(), 5);
    assert_eq!(expected.upload_chunks.len(), 4);

    // The receiver holds a plugin and an upload of its own that the snapshot does not know.
    let (_, mut target) = open(target_dir.path()).unwrap();
    let mut own = plugin_entries(
        1,
        UploadId::new(),
        b"the receiver's own plugin",
        5,
        Some(("own", "0.1.0", true)),
    );
    let next = 1 + own.len() as u64;
    own.extend(plugin_entries(next, UploadId::new(), b"its own upload", 3, None));
    apply_all(&mut target, own).await;
    target
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    assert_eq!(target.reader().read(|state| state.clone()), expected);
    drop(target);
    let (_, reopened) = open(target_dir.path()).unwrap();
    let state = reopened.reader().read(|state| state.clone());
    assert_eq!(state, expected, "the installed state is what is on disk");
    assert_eq!(state.plugin_bytes(&PluginKey::new("lint", "2.1.0")), Some(bytes));
    assert!(!state.plugins.contains_key(&PluginKey::new("own", "0.1.0")));
    assert_eq!(
        stored_keys(&reopened, b"q/"),
        5,
        "the receiver's own chunks are gone from disk"
    );
    assert_eq!(stored_keys(&reopened, b"v/"), 4);
}

fn entry_in_term(term: u64, index: u64, command: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
        ..entry(index, command)
    }
}

/// The store applies each entry in its own term: a node-down judged in term 2 and appended by
/// the leader of term 3 is refused, one appended in its own term takes effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_applies_only_in_the_term_it_was_judged_in() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut machine) = open(dir.path()).unwrap();
    let register = |node| Command::RegisterNode {
        node,
        info: NodeInfo {
            slots: 2,
            ..Default::default()
        },
    };
    let judged = |node, term| Command::NodeDownInTerm {
        node,
        term: crate::types::Term(term),
    };
    let results = machine
        .apply(vec![
            membership_entry(1),
            entry_in_term(2, 2, register(1)),
            entry_in_term(2, 3, register(2)),
            entry_in_term(2, 4, judged(1, 2)),
            entry_in_term(3, 5, judged(2, 2)),
        ])
        .await
        .unwrap();
    assert!(matches!(results[3], Ok(Response::Requeued(_))), "{:?}", results[3]);
    assert!(
        matches!(results[4], Err(crate::ApplyError::StaleTerm { .. })),
        "{:?}",
        results[4]
    );
    let up = machine.reader().read(|state| (state.nodes[&1].up, state.nodes[&2].up));
    assert_eq!(up, (false, true));
}

fn audit_entry(target: &str) -> crate::AuditEntry {
    crate::AuditEntry {
        sequence: 0,
        at_ms: 1_000,
        node: 1,
        key_id: "key_1".to_string(),
        user: "ana".to_string(),
        team: "red".to_string(),
        target_team: String::new(),
        method: "AgentService/StopAgent".to_string(),
        target: target.to_string(),
        code: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_entries_and_limits_survive_a_reopen_and_travel_in_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    let (_, mut machine) = open(dir.path()).unwrap();
    let limits = crate::TeamLimits {
        max_running_agents: Some(3),
        creates_per_minute: None,
    };
    apply_all(
        &mut machine,
        vec![
            membership_entry(1),
            entry(
                2,
                Command::RecordAudit {
                    entries: vec![audit_entry("a"), audit_entry("b")],
                },
            ),
            entry(3, Command::SetTeamLimits { team: None, limits }),
            entry(
                4,
                Command::RecordAudit {
                    entries: vec![audit_entry("c")],
                },
            ),
        ],
    )
    .await;
    assert_eq!(stored_keys(&machine, b"l/"), 3);
    let expected = machine.reader().read(|state| state.clone());
    assert_eq!(expected.next_audit_sequence, 3);
    assert_eq!(expected.default_team_limits, limits);
    assert_reopens_and_installs_whole(machine, dir.path(), target_dir.path()).await;
}

/// Builds a snapshot of `machine` (whose store is in `dir`), then checks that the store reopens
/// to `machine`'s state and that the snapshot, installed in a store in `target_dir`, gives the
/// same state once that store is reopened too.
async fn assert_reopens_and_installs_whole(
    mut machine: StateMachineStore,
    dir: &std::path::Path,
    target_dir: &std::path::Path,
) {
    let expected = machine.reader().read(|state| state.clone());
    let snapshot = machine.get_snapshot_builder().await.build_snapshot().await.unwrap();
    drop(machine);
    let (_, reopened) = open(dir).unwrap();
    assert_eq!(
        reopened.reader().read(|state| state.clone()),
        expected,
        "the reopened store"
    );

    let (_, mut target) = open(target_dir).unwrap();
    target
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    drop(target);
    let (_, installed) = open(target_dir).unwrap();
    assert_eq!(
        installed.reader().read(|state| state.clone()),
        expected,
        "the installed snapshot, reopened"
    );
}

/// Runs `work` (for at most 30 s) while another thread holds the in-memory state's write lock,
/// as a long apply would: whatever needs that lock cannot finish.
async fn while_another_thread_holds_the_state_lock<T>(
    machine: &StateMachineStore,
    work: impl std::future::Future<Output = T>,
) -> Result<T, tokio::time::error::Elapsed> {
    let (locked, lock_taken) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let holder = {
        let lock = machine.machine.clone();
        std::thread::spawn(move || {
            let _guard = lock.write().expect("state lock");
            locked.send(()).expect("test waits");
            let _ = released.recv();
        })
    };
    lock_taken.recv().expect("the holder took the lock");
    let done = tokio::time::timeout(std::time::Duration::from_secs(30), work).await;
    release.send(()).expect("holder waits");
    holder.join().expect("holder thread");
    done
}

/// Entries of the state family's active memtable: records written but in no table yet.
fn state_records_in_memory(machine: &StateMachineStore) -> u64 {
    machine
        .db
        .property_int_value_cf(machine.cf(CF_STATE), "rocksdb.num-entries-active-mem-table")
        .unwrap()
        .expect("the property exists")
}

/// Applied records skip RocksDB's write-ahead log (the Raft log replays them after a crash), so
/// no log may be purged while records it could replay are only in memory: building the snapshot
/// that allows a purge, and the purge itself, put them in a table first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_is_purged_while_the_records_it_replays_are_only_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, mut machine) = open(dir.path()).unwrap();
    let mut entries = vec![membership_entry(1)];
    entries.extend((2..=20).map(|index| entry(index, create(AgentId::new()))));
    machine.apply(entries).await.unwrap();
    assert!(
        state_records_in_memory(&machine) > 0,
        "applied records start in the memtable"
    );
    machine.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(
        state_records_in_memory(&machine),
        0,
        "a built snapshot flushed the state"
    );

    machine
        .apply((21..=30).map(|index| entry(index, create(AgentId::new()))))
        .await
        .unwrap();
    assert!(state_records_in_memory(&machine) > 0);
    log.purge(LogId::new(CommittedLeaderId::new(1, 1), 25)).await.unwrap();
    assert_eq!(state_records_in_memory(&machine), 0, "a purge flushed the state");
}

/// A node reads the cluster CA and the removed nodes before its replica opens; those copies go
/// through RocksDB's write-ahead log (unlike the state's own records), and a store from before
/// the copies existed is read from the state's records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_removed_nodes_are_read_before_the_replica_opens() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_, mut machine) = open(dir.path()).unwrap();
        let register = |index, node| {
            entry(
                index,
                Command::RegisterNode {
                    node,
                    info: NodeInfo {
                        slots: 1,
                        ..Default::default()
                    },
                },
            )
        };
        machine
            .apply(vec![membership_entry(1), register(2, 2), register(3, 3)])
            .await
            .unwrap();
        machine
            .apply(vec![entry(4, Command::RemoveNode { node: 3 })])
            .await
            .unwrap();
        assert!(
            state_records_in_memory(&machine) > 0,
            "the removal's state records are in memory only"
        );
        let copy = machine
            .db
            .get_cf(machine.cf(super::CF_LOG_META), super::KEY_PKI_REMOVED_NODES)
            .unwrap()
            .expect("the removal wrote the copy");
        let removed: std::collections::BTreeSet<crate::NodeId> = postcard::from_bytes(&copy).unwrap();
        assert_eq!(removed, [3].into_iter().collect());
        // As a store written before the copies existed.
        machine
            .db
            .delete_cf(machine.cf(super::CF_LOG_META), super::KEY_PKI_CLUSTER_CA)
            .unwrap();
    }
    let (ca, removed) = super::read_stored_pki(dir.path()).unwrap();
    assert_eq!(ca, None);
    assert_eq!(removed, [3].into_iter().collect(), "read from the state's records");
}

/// A backup reads the state's records through a RocksDB snapshot, not the in-memory state under
/// its lock: it is taken while another thread holds that lock, and restores to the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_is_taken_without_the_state_lock_and_matches_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut machine) = open(dir.path()).unwrap();
    let mut entries = vec![membership_entry(1)];
    entries.extend((2..=41).map(|index| entry(index, create(AgentId::new()))));
    machine.apply(entries).await.unwrap();
    let expected = machine.reader().read(|state| state.clone());

    let reader = machine.reader();
    let backup = tokio::task::spawn_blocking(move || reader.take_backup("cluster-a", None, 7));
    let taken = while_another_thread_holds_the_state_lock(&machine, backup).await;
    let backup = taken.expect("the backup waited for the state lock").unwrap().unwrap();
    assert_eq!(backup.header.applied_index, 41);
    assert_eq!(backup.header.agents, 40);
    let verified = super::backup::verify_backup(&[backup.prefix, backup.body].concat()).expect("verifies");
    let mut restored = verified.state;
    restored.rebuild_indexes();
    assert_eq!(restored, expected);
}

/// Agents' records with their prompts go to the state family's blob files (kept out of
/// compactions); what a reopened store loads and what a snapshot carries are unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_records_are_kept_in_blob_files_and_read_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    let (_, mut machine) = open(dir.path()).unwrap();
    let mut entries = vec![membership_entry(1)];
    entries.extend((2..=11).map(|index| entry(index, long_create(AgentId::new()))));
    entries.extend((12..=16).map(|index| entry(index, create(AgentId::new()))));
    machine.apply(entries).await.unwrap();
    let blob_bytes = |machine: &StateMachineStore| {
        machine
            .db
            .property_int_value_cf(machine.cf(CF_STATE), "rocksdb.total-blob-file-size")
            .unwrap()
            .expect("the property exists")
    };
    assert_eq!(blob_bytes(&machine), 0, "nothing is in blob files before a flush");
    super::state_machine::flush_state(&machine.db).unwrap();
    assert!(
        blob_bytes(&machine) >= 10 * 2_000,
        "the ten long records are in blob files: {} bytes",
        blob_bytes(&machine)
    );
    assert_reopens_and_installs_whole(machine, dir.path(), target_dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_s_tables_and_blobs_are_written_around_the_page_cache_where_the_disk_allows() {
    let dir = tempfile::tempdir().unwrap();
    let direct = super::takes_direct_writes(dir.path());
    assert!(
        !dir.path().join("DIRECT_IO_PROBE").exists(),
        "the probe leaves no file behind"
    );
    let on_tmpfs = super::page_cache::on_tmpfs(dir.path());
    let (_, mut machine) = open(dir.path()).unwrap();
    let mut entries = vec![membership_entry(1)];
    entries.extend((2..=201).map(|index| entry(index, long_create(AgentId::new()))));
    machine.apply(entries).await.unwrap();
    super::state_machine::flush_state(&machine.db).unwrap();
    let written: Vec<std::path::PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| matches!(path.extension().and_then(|e| e.to_str()), Some("sst" | "blob")))
        .collect();
    let written_bytes: u64 = written.iter().map(|path| path.metadata().unwrap().len()).sum();
    assert!(written_bytes > 200 * 2_000, "{written_bytes} bytes of tables and blobs");
    let cached: u64 = written.iter().map(|path| super::page_cache::cached_bytes(path)).sum();
    if direct && !on_tmpfs {
        // Only what RocksDB reads back as it opens a new table (its footer and index) is cached.
        assert!(
            cached * 4 < written_bytes,
            "{cached} of {written_bytes} bytes of {written:?} were written through the page cache"
        );
    } else {
        // tmpfs (or a file system without direct writes) keeps what is written in memory.
        assert!(cached > 0, "{written:?} are not in memory");
    }
    // What was written around the cache reads back whole.
    assert_reopens_and_installs_whole(machine, dir.path(), tempfile::tempdir().unwrap().path()).await;
}
