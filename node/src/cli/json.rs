//! JSON renderings of the API messages for `--output json`.
//!
//! prost types do not derive serde, so the mapping is written out here. It follows the proto3
//! JSON mapping with the original snake_case field names: enums as their proto value names
//! (`AGENT_STATUS_RUNNING`), timestamps as RFC 3339 strings, absent messages as `null`, a oneof
//! as a key named after its set field. Unlike canonical proto JSON, 64-bit integers are plain
//! numbers: ids, epochs and sequence numbers stay far below 2^53, and `jq` compares them as
//! numbers.

use flotilla_proto::v1::{
    agent_event, watch_agent_response, Agent, AgentEvent, AgentStatus, Assignment, Cluster, Member, Plugin, PluginKind,
    PullRequest, RaftRole, SendFollowUpResponse, WatchAgentResponse,
};
use prost_types::Timestamp;
use serde_json::{json, Value};

pub(crate) fn timestamp(timestamp: Option<&Timestamp>) -> Value {
    match timestamp {
        Some(timestamp) => Value::String(timestamp.to_string()),
        None => Value::Null,
    }
}

/// The proto value name, or the bare number for a value this client does not know.
pub(crate) fn agent_status(value: i32) -> Value {
    match AgentStatus::try_from(value) {
        Ok(status) => Value::String(status.as_str_name().to_string()),
        Err(_) => Value::from(value),
    }
}

pub(crate) fn raft_role(value: i32) -> Value {
    match RaftRole::try_from(value) {
        Ok(role) => Value::String(role.as_str_name().to_string()),
        Err(_) => Value::from(value),
    }
}

fn assignment(assignment: Option<&Assignment>) -> Value {
    match assignment {
        Some(assignment) => json!({
            "node_id": assignment.node_id,
            "epoch": assignment.epoch,
        }),
        None => Value::Null,
    }
}

fn pull_request(pull_request: Option<&PullRequest>) -> Value {
    match pull_request {
        Some(pull_request) => json!({
            "url": pull_request.url,
            "number": pull_request.number,
        }),
        None => Value::Null,
    }
}

pub(crate) fn agent(agent: &Agent) -> Value {
    json!({
        "id": agent.id,
        "name": agent.name,
        "prompt": agent.prompt,
        "repository": agent.repository,
        "base_branch": agent.base_branch,
        "work_branch": agent.work_branch,
        "model": agent.model,
        "region": agent.region,
        "status": agent_status(agent.status),
        "assignment": assignment(agent.assignment.as_ref()),
        "created_at": timestamp(agent.created_at.as_ref()),
        "updated_at": timestamp(agent.updated_at.as_ref()),
        "summary": agent.summary,
        "error": agent.error,
        "team": agent.team,
        "pending_follow_ups": agent.pending_follow_ups,
        "pull_request": pull_request(agent.pull_request.as_ref()),
        "head_commit": agent.head_commit,
        "pushed_commit": agent.pushed_commit,
        "open_pull_request": agent.open_pull_request,
        "egress_allow": agent.egress_allow,
        "last_sequence": agent.last_sequence,
        "turns": agent.turns,
        "scripted": agent.scripted,
    })
}

pub(crate) fn follow_up_response(response: &SendFollowUpResponse) -> Value {
    json!({
        "agent": response.agent.as_ref().map(agent),
        "index": response.index,
    })
}

pub(crate) fn member(member: &Member) -> Value {
    // Sorted so that the output is stable from one call to the next.
    let labels: serde_json::Map<String, Value> = member
        .labels
        .iter()
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .map(|(key, value)| (key.clone(), Value::String(value.clone())))
        .collect();
    json!({
        "id": member.id,
        "grpc_address": member.grpc_address,
        "mesh_address": member.mesh_address,
        "region": member.region,
        "role": raft_role(member.role),
        "up": member.up,
        "draining": member.draining,
        "stopping": member.stopping,
        "slots": member.slots,
        "slots_in_use": member.slots_in_use,
        "voter": member.voter,
        "last_seen": timestamp(member.last_seen.as_ref()),
        "labels": labels,
    })
}

pub(crate) fn cluster(cluster: &Cluster) -> Value {
    json!({
        "members": cluster.members.iter().map(member).collect::<Vec<_>>(),
        "leader_id": cluster.leader_id,
        "term": cluster.term,
        "node_id": cluster.node_id,
        "last_applied_index": cluster.last_applied_index,
        "last_log_index": cluster.last_log_index,
        "snapshot_index": cluster.snapshot_index,
        "purged_index": cluster.purged_index,
    })
}

pub(crate) fn plugin_kind(value: i32) -> Value {
    match PluginKind::try_from(value) {
        Ok(kind) => Value::String(kind.as_str_name().to_string()),
        Err(_) => Value::from(value),
    }
}

pub(crate) fn plugin(plugin: &Plugin) -> Value {
    json!({
        "name": plugin.name,
        "version": plugin.version,
        "sha256": plugin.sha256,
        "size_bytes": plugin.size_bytes,
        "kind": plugin_kind(plugin.kind),
        "enabled": plugin.enabled,
        "granted_hosts": plugin.granted_hosts,
        "uploaded_at": timestamp(plugin.uploaded_at.as_ref()),
        "loaded_here": plugin.loaded_here,
        "load_error": plugin.load_error,
        "settings": plugin.settings.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "builtin": plugin.builtin,
    })
}

fn event_kind(kind: &agent_event::Kind) -> (&'static str, Value) {
    use agent_event::Kind;
    match kind {
        Kind::StatusChanged(changed) => (
            "status_changed",
            json!({
                "from": agent_status(changed.from),
                "to": agent_status(changed.to),
                "assignment": assignment(changed.assignment.as_ref()),
                "reason": changed.reason,
            }),
        ),
        Kind::FollowUpAccepted(accepted) => (
            "follow_up_accepted",
            json!({ "text": accepted.text, "index": accepted.index }),
        ),
        Kind::Log(line) => ("log", json!({ "text": line.text })),
        Kind::AssistantDelta(delta) => ("assistant_delta", json!({ "text": delta.text })),
        Kind::ToolCallStarted(started) => (
            "tool_call_started",
            json!({
                "call_id": started.call_id,
                "tool": started.tool,
                "arguments": started.arguments,
            }),
        ),
        Kind::ToolCallFinished(finished) => (
            "tool_call_finished",
            json!({
                "call_id": finished.call_id,
                "tool": finished.tool,
                "output": finished.output,
                "truncated": finished.truncated,
                "failed": finished.failed,
                "duration_ms": finished.duration_ms,
            }),
        ),
        Kind::AssistantMessage(message) => (
            "assistant_message",
            json!({ "turn": message.turn, "text": message.text }),
        ),
        Kind::TurnFinished(turn) => (
            "turn_finished",
            json!({
                "turn": turn.turn,
                "input_tokens": turn.input_tokens,
                "output_tokens": turn.output_tokens,
                "tool_calls": turn.tool_calls,
                "model_ms": turn.model_ms,
                "tools_ms": turn.tools_ms,
            }),
        ),
        Kind::PushFailed(failed) => (
            "push_failed",
            json!({ "branch": failed.branch, "commit": failed.commit, "error": failed.error }),
        ),
        Kind::CommitPushed(pushed) => (
            "commit_pushed",
            json!({ "branch": pushed.branch, "commit": pushed.commit }),
        ),
        Kind::Summary(summary) => ("summary", json!({ "text": summary.text })),
        Kind::PullRequestOpened(opened) => (
            "pull_request_opened",
            json!({ "url": opened.url, "number": opened.number, "provider": opened.provider }),
        ),
        Kind::PullRequestFailed(failed) => (
            "pull_request_failed",
            json!({ "provider": failed.provider, "error": failed.error }),
        ),
    }
}

pub(crate) fn agent_event(event: &AgentEvent) -> Value {
    let mut value = json!({
        "agent_id": event.agent_id,
        "sequence": event.sequence,
        "live": event.live,
        "at": timestamp(event.at.as_ref()),
        "node_id": event.node_id,
        "scripted": event.scripted,
    });
    if let (Some(kind), Value::Object(fields)) = (&event.kind, &mut value) {
        let (name, body) = event_kind(kind);
        fields.insert(name.to_string(), body);
    }
    value
}

pub(crate) fn watch_response(response: &WatchAgentResponse) -> Value {
    match &response.kind {
        Some(watch_agent_response::Kind::Snapshot(snapshot)) => {
            json!({ "snapshot": agent(snapshot) })
        }
        Some(watch_agent_response::Kind::Event(event)) => json!({ "event": agent_event(event) }),
        None => json!({}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_uses_proto_names_enum_names_and_rfc3339() {
        let value = agent(&Agent {
            id: "01HZX".into(),
            status: AgentStatus::Running as i32,
            assignment: Some(Assignment { node_id: 2, epoch: 3 }),
            created_at: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..Default::default()
        });
        assert_eq!(value["status"], "AGENT_STATUS_RUNNING");
        assert_eq!(value["assignment"]["epoch"], 3);
        assert_eq!(value["created_at"], "2023-11-14T22:13:20Z");
        assert_eq!(value["updated_at"], Value::Null);
        assert_eq!(value["pull_request"], Value::Null);
    }

    #[test]
    fn agent_carries_turns_scripted_and_the_pushed_commit() {
        let value = agent(&Agent {
            turns: 4,
            scripted: true,
            pushed_commit: "83908dbbacf0".into(),
            ..Default::default()
        });
        assert_eq!(value["turns"], 4);
        assert_eq!(value["scripted"], true);
        assert_eq!(value["pushed_commit"], "83908dbbacf0");
    }

    #[test]
    fn every_event_says_whether_it_is_scripted() {
        let value = agent_event(&AgentEvent {
            scripted: true,
            live: true,
            kind: Some(agent_event::Kind::AssistantDelta(flotilla_proto::v1::AssistantDelta {
                text: "hi".into(),
            })),
            ..Default::default()
        });
        assert_eq!(value["scripted"], true);
        assert_eq!(value["live"], true);
        assert_eq!(value["assistant_delta"]["text"], "hi");
    }

    #[test]
    fn plugin_uses_proto_names_and_the_kind_name() {
        let value = plugin(&Plugin {
            name: "github".into(),
            version: "1.0.0".into(),
            kind: PluginKind::VcsProvider as i32,
            enabled: true,
            granted_hosts: vec!["api.github.com".into()],
            size_bytes: 42,
            ..Default::default()
        });
        assert_eq!(value["kind"], "PLUGIN_KIND_VCS_PROVIDER");
        assert_eq!(value["granted_hosts"][0], "api.github.com");
        assert_eq!(value["size_bytes"], 42);
        assert_eq!(value["uploaded_at"], Value::Null);
    }

    #[test]
    fn event_oneof_is_a_key_named_after_the_field() {
        let value = agent_event(&AgentEvent {
            agent_id: "a".into(),
            sequence: 7,
            kind: Some(agent_event::Kind::Summary(flotilla_proto::v1::Summary {
                text: "done".into(),
            })),
            ..Default::default()
        });
        assert_eq!(value["summary"]["text"], "done");
        assert_eq!(value["sequence"], 7);
    }
}
