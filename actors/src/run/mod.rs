//! One run of an agent: the turn loop that the `AgentActor` starts once its machine is up.
//!
//! Each turn: wait while a user holds the terminal, take in pending follow-ups, call the model
//! (streaming its text to watchers), run the tool calls in the machine, commit what changed
//! inside the machine, push the branch through the repository mirror, and write the turn to
//! Raft with a checkpoint of the conversation. The checkpoint is written last, so a node that
//! dies mid-turn costs at most that turn, which the next owner redoes from the checkpoint.
//!
//! The loop lives in [`turns`]; the git around it (commits in the machine, pushes through the
//! mirror, the final push of a stopped agent) in [`git`]; the fence on the work branch at the
//! origin (leased pushes, displaced commits, the check before a finish) in [`branch`]; the end
//! of a finished run (pull request, `FINISHED`) in [`finish`].

mod branch;
mod finish;
mod git;
mod redaction;
mod turns;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::v1;
use flotilla_raft::{AgentId, AgentRecord, AgentStatus, ApplyError, Command, Epoch, Replica, WriteError};
use flotilla_sandbox::ExecRequest;
use prost::Message as _;
use ractor::ActorRef;

use crate::machine::RunningMachine;
use crate::mesh::Mesh;
use crate::model::{ModelProvider, ToolSpec};
use crate::repo::{GitSettings, RepoMsg, Workspace};
use crate::tools::{self, ToolLimits};
use crate::turn::{Budgets, MAX_GUIDANCE_BYTES};
use crate::vcs::{PluginTools, VcsProviders};

pub use finish::PullRequestError;
pub use git::{commit_in_machine, push, push_on_stop, CommitError, PushError, StopContext};
pub use turns::run;

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
    /// The replicated secrets machines get; `None` gives none.
    pub secrets: Option<Arc<dyn crate::secrets::MachineSecrets>>,
}

impl Default for AgentRuntime {
    fn default() -> Self {
        AgentRuntime {
            models: HashMap::new(),
            git: GitSettings {
                author_name: "Flotilla Agent".to_string(),
                author_email: "agent@flotilla.invalid".to_string(),
                credentials: Vec::new(),
                repositories: crate::repo_url::RepositoryPolicy::default(),
            },
            budgets: Budgets::default(),
            tool_limits: ToolLimits::default(),
            max_output_tokens: 8192,
            providers: None,
            plugin_tools: None,
            secrets: None,
        }
    }
}

impl AgentRuntime {
    /// Every secret value the node knows (empty without a secret source).
    pub fn known_redactor(&self) -> crate::secrets::Redactor {
        self.secrets
            .as_ref()
            .map(|secrets| secrets.known_redactor())
            .unwrap_or_default()
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

/// Most notes waiting for the next turn; older ones are dropped first.
const MAX_RUN_NOTES: usize = 16;

/// Notes from outside the turn loop (a failed credential renewal), recorded as log events with
/// the next turn.
#[derive(Clone, Default)]
pub struct RunNotes(Arc<std::sync::Mutex<std::collections::VecDeque<String>>>);

impl RunNotes {
    pub fn push(&self, text: String) {
        let mut notes = self.0.lock().expect("run notes lock poisoned");
        notes.push_back(text);
        while notes.len() > MAX_RUN_NOTES {
            notes.pop_front();
        }
    }

    fn take(&self) -> Vec<String> {
        self.0.lock().expect("run notes lock poisoned").drain(..).collect()
    }
}

pub struct RunContext {
    /// Replaces the values of the secrets the machine got wherever the run's text leaves it
    /// (renewed credentials change them while the run goes on).
    pub redactor: crate::secrets::SharedRedactor,
    /// Recorded with the next turn.
    pub notes: RunNotes,
    pub agent: AgentId,
    pub epoch: Epoch,
    pub replica: Replica,
    pub mesh: Mesh,
    /// The agent's machine, owned by its `MachineActor`.
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
    redactor: crate::secrets::SharedRedactor,
    replica: Replica,
    mesh: Mesh,
    scripted: bool,
}

impl Live {
    pub(super) fn publish(&self, kind: v1::agent_event::Kind) {
        let sequence = self
            .replica
            .reader()
            .read(|state| state.agents.get(&self.agent).map(|agent| agent.last_sequence))
            .unwrap_or(0);
        self.mesh.publish(
            &self.agent.to_string(),
            live_event(
                self.agent,
                self.replica.node_id(),
                sequence,
                self.scripted,
                redaction::redact_live(&self.redactor, kind),
            ),
        );
    }

    pub(super) fn log(&self, text: impl Into<String>) {
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
            reason: context.redactor.redact(&reason).into_owned(),
            summary: redaction::redact_option(&context.redactor, summary),
            error: redaction::redact_option(&context.redactor, error),
        })
        .await
        .map(|_| ())
}

async fn fail(context: &RunContext, reason: &str, error: String) -> RunOutcome {
    // The error may quote a model's reply (a malformed response) or a tool's output, which
    // privacy mode keeps out of node logs: it is in the agent's record, not here.
    tracing::warn!(agent = %context.agent, error_bytes = error.len(), "{reason}; the error is in the agent's record");
    match set_status(context, AgentStatus::Failed, reason.to_string(), None, Some(error)).await {
        Ok(()) => RunOutcome::Ended(AgentStatus::Failed),
        Err(error) => write_outcome(error),
    }
}

/// The repository's own guidance for agents (`AGENTS.md` at the workspace's top), at most
/// [`MAX_GUIDANCE_BYTES`] and one byte more (the prompt marks the cut).
async fn agent_guidance(context: &RunContext) -> Option<String> {
    let workspace = context.machine.workspace_path().to_path_buf();
    let read = tokio::task::spawn_blocking(move || read_guidance_beneath(&workspace)).await;
    match read {
        Ok(Guidance::Text(text)) => Some(text),
        Ok(Guidance::None) => None,
        // A symlink resolves in the machine's own root, never the node's.
        Ok(Guidance::AskMachine) | Err(_) => guidance_read_in_machine(context).await,
    }
}

const GUIDANCE_FILE: &str = "AGENTS.md";

/// What the node found of the guidance in the workspace's directory.
#[derive(Debug, PartialEq, Eq)]
enum Guidance {
    Text(String),
    /// No such file, or nothing in it but blanks.
    None,
    /// A symlink, or something the node may not read: the machine reads it.
    AskMachine,
}

/// Reads the guidance from the node's side of the workspace, without a process in the machine:
/// beneath the directory, following no symlink, a regular file only, bounded
/// ([`flotilla_sandbox::copy_workspace_file`]). Blocking.
fn read_guidance_beneath(workspace: &std::path::Path) -> Guidance {
    let mut bytes = Vec::new();
    let limit = MAX_GUIDANCE_BYTES as u64;
    match flotilla_sandbox::copy_workspace_file(workspace, GUIDANCE_FILE, limit, &mut bytes) {
        Ok(None) => Guidance::None,
        // Longer than the limit: its first bytes, and the prompt says it was cut.
        Ok(Some(_)) | Err(flotilla_sandbox::WorkspaceFileError::TooLarge { .. }) => {
            bytes.truncate(MAX_GUIDANCE_BYTES + 1);
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if text.trim().is_empty() {
                Guidance::None
            } else {
                Guidance::Text(text)
            }
        }
        Err(_) => Guidance::AskMachine,
    }
}

/// The guidance as the machine sees it: a symlink in the workspace resolves inside the machine.
async fn guidance_read_in_machine(context: &RunContext) -> Option<String> {
    let request = ExecRequest::new(format!(
        "test -f {GUIDANCE_FILE} && head -c {} {GUIDANCE_FILE}",
        MAX_GUIDANCE_BYTES + 1
    ))
    .with_timeout_ms(10_000);
    let output = context.machine.exec(request).await.ok()?;
    let text = output.stdout_text();
    (output.success() && !text.trim().is_empty()).then_some(text)
}

/// Waits while a user has taken over the machine's terminal.
async fn wait_for_terminal(context: &RunContext, live: &Live) {
    if !context.machine.is_taken_over() {
        return;
    }
    live.log("paused: a user has taken over the terminal");
    while context.machine.is_taken_over() {
        tokio::time::sleep(TAKEOVER_POLL).await;
    }
    live.log("resumed: the terminal was handed back");
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
                let mut output = output.capped(limits.max_output_bytes);
                context.redactor.redact_in_place(&mut output.content);
                return output;
            }
        }
    }
    let mut output = tools::run_tool(
        context.machine.driver(),
        context.machine.handle(),
        name,
        arguments_json,
        limits,
    )
    .await;
    // What goes back to the model, and into every event, holds no secret value.
    context.redactor.redact_in_place(&mut output.content);
    output
}

#[cfg(test)]
mod guidance_tests {
    use super::{read_guidance_beneath, Guidance, GUIDANCE_FILE, MAX_GUIDANCE_BYTES};

    #[test]
    fn guidance_is_read_beneath_the_workspace_and_symlinks_go_to_the_machine() {
        let workspace = tempfile::tempdir().expect("workspace");
        let file = workspace.path().join(GUIDANCE_FILE);
        assert_eq!(read_guidance_beneath(workspace.path()), Guidance::None);

        std::fs::write(&file, "Run `make check` first.\n").expect("write");
        assert_eq!(
            read_guidance_beneath(workspace.path()),
            Guidance::Text("Run `make check` first.\n".to_string())
        );

        std::fs::write(&file, " \n\n").expect("write");
        assert_eq!(read_guidance_beneath(workspace.path()), Guidance::None);

        // Longer than the limit: one byte more than the limit, so that the prompt marks the cut.
        std::fs::write(&file, "x".repeat(MAX_GUIDANCE_BYTES * 3)).expect("write");
        assert_eq!(
            read_guidance_beneath(workspace.path()),
            Guidance::Text("x".repeat(MAX_GUIDANCE_BYTES + 1))
        );

        // A link (here to a node file) is never followed by the node.
        let outside = tempfile::tempdir().expect("outside");
        std::fs::write(outside.path().join("secret"), "node secret").expect("write");
        std::fs::remove_file(&file).expect("remove");
        std::os::unix::fs::symlink(outside.path().join("secret"), &file).expect("symlink");
        assert_eq!(read_guidance_beneath(workspace.path()), Guidance::AskMachine);

        // Nor is anything but a regular file opened for reading (a FIFO would block).
        std::fs::remove_file(&file).expect("remove");
        std::fs::create_dir(&file).expect("directory");
        assert_eq!(read_guidance_beneath(workspace.path()), Guidance::AskMachine);
    }
}
