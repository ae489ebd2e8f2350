//! One run of an agent: the turn loop that the `AgentActor` starts once its machine is up.
//!
//! Each turn: wait while a user holds the terminal, take in pending follow-ups, call the model
//! (streaming its text to watchers), run the tool calls in the machine, commit what changed
//! inside the machine, push the branch through the repository mirror, and write the turn to
//! Raft with a checkpoint of the conversation. The checkpoint is written last, so a node that
//! dies mid-turn costs at most that turn, which the next owner redoes from the checkpoint.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_proto::v1;
use flotilla_raft::command::MAX_CHECKPOINT_BYTES;
use flotilla_raft::{
    AgentId, AgentRecord, AgentStatus, ApplyError, Command, Epoch, EventKind, PullRequestRef, Replica, WriteError,
};
use flotilla_sandbox::{BwrapDriver, ExecRequest, MachineDriver};
use prost::Message as _;
use ractor::ActorRef;

use crate::machine::RunningMachine;
use crate::mesh::Mesh;
use crate::model::{ModelProvider, StreamEvent, ToolSpec, TurnRequest};
use crate::repo::{GitSettings, RepoMsg, Workspace};
use crate::tools::{self, ToolLimits};
use crate::turn::{system_prompt, Budgets, Conversation, Ending, Next, PromptContext, MAX_GUIDANCE_BYTES};
use crate::vcs::{PluginTools, PullRequestSpec, VcsProviders};

/// Most bytes of a tool's output kept in its durable event (the model gets the whole capped output).
pub const MAX_EVENT_OUTPUT_BYTES: usize = 4 * 1024;
/// Most bytes of an assistant message or summary kept in a durable event.
pub const MAX_EVENT_TEXT_BYTES: usize = 16 * 1024;
/// Live events waiting to be published while the model streams.
const STREAM_BUFFER: usize = 256;
/// How long a stopped agent's final commit and push may take.
pub const STOP_PUSH_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a paused run looks whether the user has handed the terminal back.
const TAKEOVER_POLL: Duration = Duration::from_millis(100);

/// What every agent run on a node shares: the models by name, git settings and limits.
pub struct AgentRuntime {
    pub models: HashMap<String, Arc<dyn ModelProvider>>,
    pub git: GitSettings,
    pub budgets: Budgets,
    pub tool_limits: ToolLimits,
    pub max_output_tokens: u32,
    /// The repository providers (clone, push, pull requests); `None` uses plain git.
    pub providers: Option<Arc<dyn VcsProviders>>,
    /// Tools added as plugins; `None` offers the built-in tools only.
    pub plugin_tools: Option<Arc<dyn PluginTools>>,
}

impl Default for AgentRuntime {
    fn default() -> Self {
        AgentRuntime {
            models: HashMap::new(),
            git: GitSettings {
                author_name: "Flotilla Agent".to_string(),
                author_email: "agent@flotilla.invalid".to_string(),
                credentials: Vec::new(),
            },
            budgets: Budgets::default(),
            tool_limits: ToolLimits::default(),
            max_output_tokens: 8192,
            providers: None,
            plugin_tools: None,
        }
    }
}

/// Where the time of one turn went; the orchestration overhead is `total - model - tools`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnTiming {
    pub turn: u32,
    pub total: Duration,
    pub model: Duration,
    pub tools: Duration,
    /// Committing in the machine and pushing (part of the overhead).
    pub git: Duration,
    /// Writing the turn and its checkpoint through Raft (part of the overhead).
    pub record: Duration,
}

impl TurnTiming {
    pub fn overhead(&self) -> Duration {
        self.total.saturating_sub(self.model + self.tools)
    }
}

/// Called after every recorded turn (benchmarks and metrics).
pub type TurnObserver = Arc<dyn Fn(TurnTiming) + Send + Sync>;

/// Tools that can change the workspace: a turn that ran none of them needs no commit.
const WRITING_TOOLS: [&str; 3] = [tools::RUN_COMMAND, tools::WRITE_FILE, tools::EDIT_FILE];

pub struct RunContext {
    pub agent: AgentId,
    pub epoch: Epoch,
    pub replica: Replica,
    pub mesh: Mesh,
    pub driver: Arc<BwrapDriver>,
    pub machine: Arc<RunningMachine>,
    pub repo: ActorRef<RepoMsg>,
    pub workspace: Workspace,
    pub runtime: Arc<AgentRuntime>,
    pub observer: Option<TurnObserver>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The run ended and its status is written (finished or failed).
    Ended(AgentStatus),
    /// Another owner, or a stop, took the agent: nothing more to write.
    Superseded,
    /// A write could not be made (no leader for too long); the actor fails and is restarted,
    /// and the new run resumes from the last checkpoint.
    Unavailable(String),
}

/// Encodes a live (not durable) event for watchers.
pub fn live_event(agent: AgentId, node: u64, sequence: u64, scripted: bool, kind: v1::agent_event::Kind) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    v1::AgentEvent {
        agent_id: agent.to_string(),
        sequence,
        live: true,
        at: Some(prost_types::Timestamp {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos() as i32,
        }),
        node_id: node,
        scripted,
        kind: Some(kind),
    }
    .encode_to_vec()
}

/// Publishes live events of one agent.
#[derive(Clone)]
struct Live {
    agent: AgentId,
    replica: Replica,
    mesh: Mesh,
    scripted: bool,
}

impl Live {
    fn publish(&self, kind: v1::agent_event::Kind) {
        let sequence = self
            .replica
            .reader()
            .read(|state| state.agents.get(&self.agent).map(|agent| agent.last_sequence))
            .unwrap_or(0);
        self.mesh.publish(
            &self.agent.to_string(),
            live_event(self.agent, self.replica.node_id(), sequence, self.scripted, kind),
        );
    }

    fn log(&self, text: impl Into<String>) {
        self.publish(v1::agent_event::Kind::Log(v1::LogLine { text: text.into() }));
    }
}

fn capped(text: &str, limit: usize) -> String {
    let (text, cut) = tools::cap_text(text, limit);
    if cut {
        format!("{text}\n[cut]")
    } else {
        text
    }
}

fn record(replica: &Replica, agent: AgentId) -> Option<AgentRecord> {
    replica.reader().read(|state| state.agents.get(&agent).cloned())
}

/// How a refused or failed write ends the run.
fn write_outcome(error: WriteError) -> RunOutcome {
    match error {
        WriteError::Refused(ApplyError::Fenced { .. } | ApplyError::InvalidState { .. }) => RunOutcome::Superseded,
        other => RunOutcome::Unavailable(other.to_string()),
    }
}

async fn set_status(
    context: &RunContext,
    status: AgentStatus,
    reason: String,
    summary: Option<String>,
    error: Option<String>,
) -> Result<(), WriteError> {
    context
        .replica
        .write(Command::SetAgentStatus {
            agent: context.agent,
            node: context.replica.node_id(),
            epoch: context.epoch,
            status,
            reason,
            summary,
            error,
        })
        .await
        .map(|_| ())
}

async fn fail(context: &RunContext, reason: &str, error: String) -> RunOutcome {
    tracing::warn!(agent = %context.agent, %error, "{reason}");
    match set_status(context, AgentStatus::Failed, reason.to_string(), None, Some(error)).await {
        Ok(()) => RunOutcome::Ended(AgentStatus::Failed),
        Err(error) => write_outcome(error),
    }
}

/// The repository's own guidance for agents, read inside the machine (so a symlink cannot
/// reach outside the workspace).
async fn agent_guidance(context: &RunContext) -> Option<String> {
    let request = ExecRequest::new(format!(
        "test -f AGENTS.md && head -c {} AGENTS.md",
        MAX_GUIDANCE_BYTES + 1
    ))
    .with_timeout_ms(10_000);
    let output = context.driver.exec(&context.machine.machine, request).await.ok()?;
    let text = output.stdout_text();
    (output.success() && !text.trim().is_empty()).then_some(text)
}

/// Commits everything the workspace holds inside the machine (the agent's own git config and
/// hooks act only there) and answers the head commit.
pub async fn commit_in_machine(
    driver: &BwrapDriver,
    machine: &RunningMachine,
    git: &GitSettings,
    message: &str,
) -> Result<String, String> {
    let script = "set -e\n\
        g() { git -c safe.directory='*' -c core.hooksPath=/dev/null \"$@\"; }\n\
        g add -A\n\
        if ! g diff --cached --quiet; then\n\
          printf '%s\\n' \"$FLOTILLA_COMMIT_MESSAGE\" | g -c user.name=\"$FLOTILLA_GIT_NAME\" -c user.email=\"$FLOTILLA_GIT_EMAIL\" commit --quiet --no-verify -F -\n\
        fi\n\
        g rev-parse HEAD\n";
    let mut request = ExecRequest::new(script).with_timeout_ms(120_000);
    request.env = vec![
        ("FLOTILLA_COMMIT_MESSAGE".to_string(), message.to_string()),
        ("FLOTILLA_GIT_NAME".to_string(), git.author_name.clone()),
        ("FLOTILLA_GIT_EMAIL".to_string(), git.author_email.clone()),
    ];
    let output = driver
        .exec(&machine.machine, request)
        .await
        .map_err(|error| format!("cannot run git in the machine: {error}"))?;
    if !output.success() {
        return Err(format!("git commit failed in the machine: {}", output.last_lines(8)));
    }
    let head = output.stdout_text().trim().lines().last().unwrap_or("").to_string();
    if head.len() < 40 || !head.chars().all(|character| character.is_ascii_hexdigit()) {
        return Err(format!("git did not answer a commit: {head:?}"));
    }
    Ok(head)
}

/// Pushes the work branch through the repository actor, from the machine's view of its
/// workspace (an overlay over the clone: the clone itself never sees the agent's changes).
pub async fn push(repo: &ActorRef<RepoMsg>, machine: &RunningMachine, branch: &str) -> Result<String, String> {
    ractor::call!(repo, |reply| RepoMsg::Push {
        path: machine.machine.workspace_path().to_path_buf(),
        branch: branch.to_string(),
        reply,
    })
    .map_err(|error| format!("the repository actor did not answer: {error}"))?
    .map_err(|error| error.to_string())
}

/// Commits and pushes what the workspace holds when the agent is stopped, and records it.
pub async fn push_on_stop(context: &StopContext) {
    let work = async {
        let message = format!(
            "{}: work so far (stopped)\n\nFlotilla-Agent: {}",
            context.name, context.agent
        );
        let head = commit_in_machine(&context.driver, &context.machine, &context.git, &message).await?;
        let pushed_before = record(&context.replica, context.agent).and_then(|record| record.pushed_commit);
        if pushed_before.as_deref() == Some(head.as_str())
            || (!context.workspace.resumed && head == context.workspace.head_commit)
        {
            return Ok(None);
        }
        let result = push(&context.repo, &context.machine, &context.workspace.branch).await;
        Ok::<_, String>(Some((head, result)))
    };
    let outcome = match tokio::time::timeout(STOP_PUSH_TIMEOUT, work).await {
        Ok(Ok(Some((head, result)))) => Some((head, result.err())),
        Ok(Ok(None)) => None,
        Ok(Err(error)) => {
            tracing::warn!(agent = %context.agent, %error, "could not commit a stopped agent's work");
            None
        }
        Err(_) => {
            tracing::warn!(agent = %context.agent, "committing a stopped agent's work timed out");
            None
        }
    };
    if let Some((commit, error)) = outcome {
        let result = context
            .replica
            .write(Command::RecordPush {
                agent: context.agent,
                node: context.replica.node_id(),
                epoch: context.epoch,
                branch: context.workspace.branch.clone(),
                commit,
                error,
            })
            .await;
        if let Err(error) = result {
            tracing::warn!(agent = %context.agent, %error, "could not record a stopped agent's push");
        }
    }
}

/// What the final push of a stopped agent needs.
pub struct StopContext {
    pub agent: AgentId,
    pub epoch: Epoch,
    pub name: String,
    pub replica: Replica,
    pub driver: Arc<BwrapDriver>,
    pub machine: Arc<RunningMachine>,
    pub repo: ActorRef<RepoMsg>,
    pub workspace: Workspace,
    pub git: GitSettings,
}

/// Waits while a user has taken over the machine's terminal.
async fn wait_for_terminal(context: &RunContext, live: &Live) {
    if !context.machine.taken_over.load(Ordering::Acquire) {
        return;
    }
    live.log("paused: a user has taken over the terminal");
    while context.machine.taken_over.load(Ordering::Acquire) {
        tokio::time::sleep(TAKEOVER_POLL).await;
    }
    live.log("resumed: the terminal was handed back");
}

/// Runs the agent until it finishes, fails, or is superseded.
pub async fn run(context: RunContext) -> RunOutcome {
    let Some(start) = record(&context.replica, context.agent) else {
        return RunOutcome::Superseded;
    };
    let node = context.replica.node_id();
    let Some(provider) = context.runtime.models.get(&start.spec.model).cloned() else {
        let mut declared: Vec<&String> = context.runtime.models.keys().collect();
        declared.sort();
        return fail(
            &context,
            "model not available",
            format!(
                "model {:?} is not declared on node {node} (declared: {:?})",
                start.spec.model, declared
            ),
        )
        .await;
    };
    let live = Live {
        agent: context.agent,
        replica: context.replica.clone(),
        mesh: context.mesh.clone(),
        scripted: provider.scripted(),
    };
    let tool_specs = available_tools(&context, &live).await;
    let checkpoint = context
        .replica
        .reader()
        .read(|state| state.checkpoints.get(&context.agent).cloned());
    let budgets = context.runtime.budgets;
    let mut conversation = match checkpoint {
        Some(checkpoint) => match crate::checkpoint::decode(&checkpoint.data) {
            Ok(transcript) => {
                tracing::info!(agent = %context.agent, epoch = %context.epoch, turn = checkpoint.turn, "run resumes from its checkpoint");
                live.log(format!(
                    "resuming on node {node} from the checkpoint of turn {}",
                    checkpoint.turn
                ));
                Conversation::resume(transcript.messages, budgets)
            }
            Err(error) => return fail(&context, "checkpoint unreadable", error.to_string()).await,
        },
        None => {
            let prompt_context = PromptContext {
                repository: start.spec.repository.clone(),
                base_branch: start.spec.base_branch.clone(),
                work_branch: context.workspace.branch.clone(),
                tool_names: tool_specs.iter().map(|spec| spec.name.clone()).collect(),
                agent_guidance: agent_guidance(&context).await,
                terminals: context
                    .machine
                    .terminals
                    .iter()
                    .map(|name| (name.clone(), String::new()))
                    .collect(),
            };
            Conversation::new(system_prompt(&prompt_context), start.spec.prompt.clone(), budgets)
        }
    };
    let mut turn = start.turns;
    let mut delivered = start.follow_ups_delivered;
    let mut pushed = start.pushed_commit.clone();
    let mut push_error: Option<String> = None;
    // Every run starts from a fresh clone of the pushed branch: nothing to commit yet.
    let mut dirty = false;
    let started = Instant::now();
    loop {
        wait_for_terminal(&context, &live).await;
        let turn_started = Instant::now();
        let Some(current) = record(&context.replica, context.agent) else {
            return RunOutcome::Superseded;
        };
        if current.status != AgentStatus::Running {
            return RunOutcome::Superseded;
        }
        let new_follow_ups: Vec<String> = current.follow_ups[delivered as usize..]
            .iter()
            .map(|follow_up| follow_up.text.clone())
            .collect();
        if !new_follow_ups.is_empty() {
            live.log(format!(
                "taking {} follow-up(s) into turn {}",
                new_follow_ups.len(),
                turn + 1
            ));
            conversation.add_follow_ups(new_follow_ups);
            delivered = current.follow_ups.len() as u32;
        } else if turn == start.turns {
            // The previous owner recorded the model's final answer and stopped before it could
            // finish: finish now instead of asking the model again.
            if let Some(summary) = conversation.final_answer() {
                live.log(format!("the final answer of turn {turn} is recorded; finishing"));
                push_error = last_push_failure(&context);
                if let Some(outcome) = finish(&context, &live, &start, turn, &summary, &pushed, &push_error).await {
                    return outcome;
                }
                continue;
            }
        }

        // Tool plugins come and go while the cluster runs; a turn offers those enabled now.
        let tool_specs = if turn > start.turns {
            available_tools(&context, &live).await
        } else {
            tool_specs.clone()
        };
        let request = TurnRequest {
            messages: conversation.messages.clone(),
            tools: tool_specs,
            max_output_tokens: context.runtime.max_output_tokens,
        };
        let (sender, mut receiver) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        let forwarder = {
            let live = live.clone();
            tokio::spawn(async move {
                while let Some(event) = receiver.recv().await {
                    if let StreamEvent::TextDelta(text) = event {
                        live.publish(v1::agent_event::Kind::AssistantDelta(v1::AssistantDelta { text }));
                    }
                }
            })
        };
        let model_started = Instant::now();
        tracing::debug!(agent = %context.agent, turn = turn + 1, "asking the model");
        let answer = provider.turn(&request, sender).await;
        let model_time = model_started.elapsed();
        tracing::debug!(agent = %context.agent, turn = turn + 1, elapsed_ms = model_time.as_millis() as u64, ok = answer.is_ok(), "the model answered");
        let _ = forwarder.await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(error) => {
                return fail(
                    &context,
                    "the model call failed",
                    format!("model {}: {error}", provider.name()),
                )
                .await
            }
        };
        turn += 1;
        let next = conversation.after_answer(&answer, started.elapsed());
        let mut events = Vec::new();
        if !answer.text.trim().is_empty() {
            events.push(EventKind::AssistantMessage {
                turn,
                text: capped(&answer.text, MAX_EVENT_TEXT_BYTES),
            });
        }
        let mut tool_calls = 0u32;
        let tools_started = Instant::now();
        match &next {
            Next::RunTools(calls) => {
                for call in calls {
                    dirty |= WRITING_TOOLS.contains(&call.name.as_str());
                    live.publish(v1::agent_event::Kind::ToolCallStarted(v1::ToolCallStarted {
                        call_id: call.id.clone(),
                        tool: call.name.clone(),
                        arguments: capped(&call.arguments_json, MAX_EVENT_OUTPUT_BYTES),
                    }));
                    let began = Instant::now();
                    let output = run_any_tool(&context, &call.name, &call.arguments_json).await;
                    let duration_ms = began.elapsed().as_millis() as u64;
                    let event_output = capped(&output.content, MAX_EVENT_OUTPUT_BYTES);
                    live.publish(v1::agent_event::Kind::ToolCallFinished(v1::ToolCallFinished {
                        call_id: call.id.clone(),
                        tool: call.name.clone(),
                        output: event_output.clone(),
                        truncated: output.truncated || event_output.len() < output.content.len(),
                        failed: output.failed,
                        duration_ms,
                    }));
                    events.push(EventKind::ToolCallFinished {
                        call_id: call.id.clone(),
                        tool: call.name.clone(),
                        arguments: capped(&call.arguments_json, MAX_EVENT_OUTPUT_BYTES),
                        output: event_output.clone(),
                        truncated: output.truncated || event_output.len() < output.content.len(),
                        failed: output.failed,
                        duration_ms,
                    });
                    conversation.add_tool_result(&call.id, output.content);
                    tool_calls += 1;
                }
            }
            Next::End(_) => {
                // Calls the budget left unrun still get an answer, so the conversation stays
                // valid for a later run.
                for call in &answer.tool_calls {
                    conversation.add_tool_result(&call.id, "not run: the agent's budget ran out".to_string());
                }
            }
        }

        let tools_time = tools_started.elapsed();
        let git_started = Instant::now();
        let message = format!(
            "{}: turn {turn}\n\n{}\n\nFlotilla-Agent: {}",
            start.spec.name,
            capped(answer.text.trim(), 2000),
            context.agent
        );
        let head = if dirty {
            match commit_in_machine(&context.driver, &context.machine, &context.runtime.git, &message).await {
                Ok(head) => {
                    dirty = false;
                    Some(head)
                }
                Err(error) => {
                    events.push(EventKind::Log {
                        text: capped(&error, MAX_EVENT_OUTPUT_BYTES),
                    });
                    None
                }
            }
        } else {
            None
        };
        if let Some(head) = &head {
            let unchanged = !context.workspace.resumed && *head == context.workspace.head_commit;
            if pushed.as_deref() != Some(head.as_str()) && !unchanged {
                match push(&context.repo, &context.machine, &context.workspace.branch).await {
                    Ok(commit) => {
                        events.push(EventKind::CommitPushed {
                            branch: context.workspace.branch.clone(),
                            commit: commit.clone(),
                        });
                        pushed = Some(commit);
                        push_error = None;
                    }
                    Err(error) => {
                        events.push(EventKind::PushFailed {
                            branch: context.workspace.branch.clone(),
                            commit: head.clone(),
                            error: capped(&error, MAX_EVENT_OUTPUT_BYTES),
                        });
                        push_error = Some(error);
                    }
                }
            }
        }
        let git_time = git_started.elapsed();
        events.push(EventKind::TurnFinished {
            turn,
            input_tokens: answer.usage.input_tokens,
            output_tokens: answer.usage.output_tokens,
            tool_calls,
            model_ms: model_time.as_millis() as u64,
            tools_ms: tools_time.as_millis() as u64,
        });
        let checkpoint = match crate::checkpoint::encode(&conversation.messages, MAX_CHECKPOINT_BYTES) {
            Ok((data, _)) => data,
            Err(error) => return fail(&context, "checkpoint too large", error.to_string()).await,
        };
        let record_started = Instant::now();
        let recorded = context
            .replica
            .write(Command::RecordTurn {
                agent: context.agent,
                node,
                epoch: context.epoch,
                turn,
                follow_ups_delivered: delivered,
                head_commit: head,
                scripted: provider.scripted(),
                checkpoint,
                events,
            })
            .await;
        if let Err(error) = recorded {
            return write_outcome(error);
        }
        if let Some(observer) = &context.observer {
            observer(TurnTiming {
                turn,
                total: turn_started.elapsed(),
                model: model_time,
                tools: tools_time,
                git: git_time,
                record: record_started.elapsed(),
            });
        }

        match next {
            Next::RunTools(_) => {}
            Next::End(Ending::Finished { summary }) => {
                if let Some(outcome) = finish(&context, &live, &start, turn, &summary, &pushed, &push_error).await {
                    return outcome;
                }
            }
            Next::End(ending) => {
                let error = match ending {
                    Ending::TurnBudget { turns } => format!("the run reached its budget of {turns} turns"),
                    Ending::TokenBudget { tokens } => format!("the run used {tokens} tokens, its budget"),
                    Ending::TimeBudget { elapsed } => {
                        format!("the run reached its wall-clock budget after {} s", elapsed.as_secs())
                    }
                    Ending::Finished { .. } => unreachable!("handled above"),
                };
                return fail(&context, "budget exhausted", error).await;
            }
        }
    }
}

/// The built-in tools and, after them, the enabled tool plugins whose names are free.
async fn available_tools(context: &RunContext, live: &Live) -> Vec<ToolSpec> {
    let mut specs: Vec<ToolSpec> = tools::tool_specs()
        .into_iter()
        .map(|(name, description, parameters)| ToolSpec {
            name,
            description,
            parameters,
        })
        .collect();
    if let Some(plugin_tools) = &context.runtime.plugin_tools {
        for spec in plugin_tools.specs().await {
            if specs.iter().any(|known| known.name == spec.name) {
                live.log(format!(
                    "the tool plugin {:?} is not offered: a tool of that name exists",
                    spec.name
                ));
                continue;
            }
            specs.push(spec);
        }
    }
    specs
}

/// Runs a built-in tool in the machine, or a tool plugin in the node's plugin host.
async fn run_any_tool(context: &RunContext, name: &str, arguments_json: &str) -> tools::ToolOutput {
    let limits = &context.runtime.tool_limits;
    if !tools::is_builtin(name) {
        if let Some(plugin_tools) = &context.runtime.plugin_tools {
            if let Some(result) = plugin_tools.invoke(name, arguments_json).await {
                let output = match result {
                    Ok(text) => tools::ToolOutput::success(text),
                    Err(error) => tools::ToolOutput::failure(error),
                };
                return output.capped(limits.max_output_bytes);
            }
        }
    }
    tools::run_tool(
        context.driver.as_ref(),
        &context.machine.machine,
        name,
        arguments_json,
        limits,
    )
    .await
}

/// Ends a run whose model gave its final answer (`summary`, at `turn`; `pushed` and `push_error`
/// are the run's last pushed commit and push failure): `FAILED` if the last push failed or the
/// pull request could not be opened, else `FINISHED`. `None` when a follow-up arrived during the
/// last turn: the run goes on to answer it.
async fn finish(
    context: &RunContext,
    live: &Live,
    start: &AgentRecord,
    turn: u32,
    summary: &str,
    pushed: &Option<String>,
    push_error: &Option<String>,
) -> Option<RunOutcome> {
    let summary = capped(summary, MAX_EVENT_TEXT_BYTES);
    let failed = |reason: &'static str, error: String| {
        let summary = summary.clone();
        async move {
            match set_status(
                context,
                AgentStatus::Failed,
                reason.to_string(),
                Some(summary),
                Some(error),
            )
            .await
            {
                Ok(()) => RunOutcome::Ended(AgentStatus::Failed),
                Err(error) => write_outcome(error),
            }
        }
    };
    if let Some(error) = push_error {
        // The work is done but not on the origin: that is not a finished agent.
        let error = capped(error, MAX_EVENT_OUTPUT_BYTES);
        return Some(failed("the work branch could not be pushed", error).await);
    }
    if start.spec.open_pull_request {
        if let Err(failure) = open_pull_request(context, live, pushed.is_some(), &summary).await {
            let error = capped(&failure, MAX_EVENT_OUTPUT_BYTES);
            return Some(failed("the pull request could not be opened", error).await);
        }
    }
    match set_status(
        context,
        AgentStatus::Finished,
        format!("finished after turn {turn}"),
        Some(summary.clone()),
        None,
    )
    .await
    {
        Ok(()) => Some(RunOutcome::Ended(AgentStatus::Finished)),
        Err(WriteError::Refused(ApplyError::UndeliveredFollowUps { .. })) => None,
        Err(error) => Some(write_outcome(error)),
    }
}

/// The error of the agent's last push, if its last push event is a failure (what an owner that
/// stopped after recording its final turn would have finished with).
fn last_push_failure(context: &RunContext) -> Option<String> {
    context
        .replica
        .reader()
        .agent_events_after(context.agent, 0)
        .iter()
        .rev()
        .find_map(|event| match &event.kind {
            EventKind::CommitPushed { .. } => Some(None),
            EventKind::PushFailed { error, .. } => Some(Some(error.clone())),
            _ => None,
        })
        .flatten()
}

/// Opens the pull request a finished agent's request asked for, once: a pull request already
/// recorded (a follow-up run) is updated by the push itself. Answers why it could not.
async fn open_pull_request(context: &RunContext, live: &Live, pushed: bool, summary: &str) -> Result<(), String> {
    let Some(current) = record(&context.replica, context.agent) else {
        return Ok(());
    };
    if current.pull_request.is_some() {
        return Ok(());
    }
    if !pushed {
        live.log("no pull request: the agent pushed no commit");
        return Ok(());
    }
    let Some(providers) = &context.runtime.providers else {
        return Err("this node has no VCS providers to open pull requests with".to_string());
    };
    let spec = &current.spec;
    let title = pull_request_title(&spec.name, &spec.prompt);
    let body = format!(
        "{}\n\n---\nOpened by Flotilla agent {} ({}) from the prompt:\n\n{}",
        summary.trim(),
        spec.name,
        context.agent,
        capped(spec.prompt.trim(), 4000)
    );
    let outcome = providers
        .open_pull_request(PullRequestSpec {
            repository: spec.repository.clone(),
            head_branch: context.workspace.branch.clone(),
            base_branch: spec.base_branch.clone(),
            title,
            body,
            draft: false,
        })
        .await;
    let (provider, pull_request, error) = match &outcome {
        Ok(opened) => (
            opened.provider.clone(),
            Some(PullRequestRef {
                url: opened.url.clone(),
                number: opened.number,
            }),
            None,
        ),
        Err(error) => (
            error.provider.clone(),
            None,
            Some(capped(&error.message, MAX_EVENT_OUTPUT_BYTES)),
        ),
    };
    context
        .replica
        .write(Command::RecordPullRequest {
            agent: context.agent,
            node: context.replica.node_id(),
            epoch: context.epoch,
            provider,
            pull_request,
            error,
        })
        .await
        .map_err(|error| format!("could not record the pull request: {error}"))?;
    outcome.map(|_| ()).map_err(|error| error.to_string())
}

/// A pull request title: the prompt's first non-blank line (the agent's name for a blank
/// prompt), cut to fit forges' limits.
fn pull_request_title(name: &str, prompt: &str) -> String {
    const MAX_TITLE_CHARS: usize = 120;
    let title = prompt
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or(name);
    let mut cut: String = title.chars().take(MAX_TITLE_CHARS).collect();
    if cut.len() < title.len() {
        cut.push('…');
    }
    cut
}
