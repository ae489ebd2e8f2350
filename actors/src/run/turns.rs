//! The turn loop. A run opens its conversation (from the checkpoint, or a new one), then each
//! turn takes in follow-ups, asks the model, runs the tool calls in the machine, commits and
//! pushes, and records the turn with its checkpoint, last. Each step answers
//! `ControlFlow::Break(outcome)` when the run ends there.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_proto::v1;
use flotilla_raft::command::MAX_CHECKPOINT_BYTES;
use flotilla_raft::{AgentRecord, AgentStatus, Command, EventKind};

use crate::model::{ModelProvider, StreamEvent, ToolSpec, TurnRequest, TurnResponse};
use crate::turn::{system_prompt, Conversation, Ending, Next, PromptContext};

use super::branch::{push_fenced, settle, take_fence, BranchOwner, BranchTrouble};
use super::finish::{finish, last_push_failure};
use super::git::commit_in_machine;
use super::{
    agent_guidance, available_tools, capped, fail, record, run_any_tool, wait_for_terminal, write_outcome, Live,
    RunContext, RunOutcome, TurnTiming, MAX_EVENT_OUTPUT_BYTES, MAX_EVENT_TEXT_BYTES, STREAM_BUFFER, WRITING_TOOLS,
};

/// A step of the run: go on with a value, or end the run with an outcome.
type Step<T> = ControlFlow<RunOutcome, T>;

/// What a run carries from turn to turn.
struct RunProgress {
    /// The agent as it was when the run started.
    start: AgentRecord,
    provider: Arc<dyn ModelProvider>,
    live: Live,
    /// The tools offered at the start (later turns ask the plugins again).
    tool_specs: Vec<ToolSpec>,
    conversation: Conversation,
    turn: u32,
    delivered: u32,
    pushed: Option<String>,
    push_error: Option<String>,
    /// A tool that can write ran since the last commit.
    dirty: bool,
    started: Instant,
}

/// Where the time of a turn went, before it is recorded.
struct TurnTimes {
    started: Instant,
    model: Duration,
    tools: Duration,
    git: Duration,
}

/// Runs the agent until it finishes, fails, or is superseded.
pub async fn run(context: RunContext) -> RunOutcome {
    let mut progress = match RunProgress::open(&context).await {
        ControlFlow::Continue(progress) => progress,
        ControlFlow::Break(outcome) => return outcome,
    };
    loop {
        wait_for_terminal(&context, &progress.live).await;
        if let ControlFlow::Break(outcome) = progress.next_turn(&context).await {
            return outcome;
        }
    }
}

impl RunProgress {
    async fn open(context: &RunContext) -> Step<RunProgress> {
        let Some(start) = record(&context.replica, context.agent) else {
            return ControlFlow::Break(RunOutcome::Superseded);
        };
        let provider = model_for(context, &start).await?;
        let live = Live {
            agent: context.agent,
            redactor: context.redactor.clone(),
            replica: context.replica.clone(),
            mesh: context.mesh.clone(),
            scripted: provider.scripted(),
        };
        let tool_specs = available_tools(context, &live).await;
        let conversation = open_conversation(context, &start, &live, &tool_specs).await?;
        // A later owner moves the fence to its epoch first: no older owner's push moves the
        // branch after it. The first owner has none to fence out; its first push takes the
        // fence with the branch (a push of the origin per agent start saved).
        let owner = BranchOwner::of(context);
        if owner.fence().succeeds_an_owner() {
            match take_fence(&owner).await {
                Ok(()) => {}
                Err(BranchTrouble::Ended(outcome)) => return ControlFlow::Break(outcome),
                // Every push takes the fence too; the first one tries again.
                Err(BranchTrouble::Origin(error)) => {
                    live.log(format!("could not take the fence at the origin: {error}"))
                }
            }
        }
        // The origin is made to agree with the record before any turn: a commit a fenced owner
        // pushed is reported and kept now, not found at the first push.
        let pushed = match settle(context, &live).await {
            Ok(recorded) => recorded,
            Err(BranchTrouble::Ended(outcome)) => return ControlFlow::Break(outcome),
            Err(BranchTrouble::Origin(error)) => {
                // The leased pushes still keep the branch; the finish checks it again.
                live.log(format!("could not check the work branch at the origin: {error}"));
                start.pushed_commit.clone()
            }
        };
        ControlFlow::Continue(RunProgress {
            turn: start.turns,
            delivered: start.follow_ups_delivered,
            pushed,
            push_error: None,
            // Every run starts from a fresh clone of the pushed branch: nothing to commit yet.
            dirty: false,
            started: Instant::now(),
            start,
            provider,
            live,
            tool_specs,
            conversation,
        })
    }

    async fn next_turn(&mut self, context: &RunContext) -> Step<()> {
        let started = Instant::now();
        if !self.take_follow_ups(context).await? {
            return ControlFlow::Continue(());
        }
        let model_started = Instant::now();
        let mut answer = self.ask_model(context).await?;
        // The model never saw a value (tool output is redacted), but its text is shown and kept.
        context.redactor.redact_in_place(&mut answer.text);
        let model = model_started.elapsed();
        self.turn += 1;
        let next = self.conversation.after_answer(&answer, self.started.elapsed());
        let mut events = Vec::new();
        if !answer.text.trim().is_empty() {
            events.push(EventKind::AssistantMessage {
                turn: self.turn,
                text: capped(&answer.text, MAX_EVENT_TEXT_BYTES),
            });
        }
        let tools_started = Instant::now();
        let tool_calls = self.run_tools(context, &next, &answer, &mut events).await;
        let tools = tools_started.elapsed();
        let git_started = Instant::now();
        let head = self.commit_and_push(context, &answer, &mut events).await?;
        let times = TurnTimes {
            started,
            model,
            tools,
            git: git_started.elapsed(),
        };
        events.extend(context.notes.take().into_iter().map(|text| EventKind::Log { text }));
        events.push(EventKind::TurnFinished {
            turn: self.turn,
            input_tokens: answer.usage.input_tokens,
            output_tokens: answer.usage.output_tokens,
            tool_calls,
            model_ms: times.model.as_millis() as u64,
            tools_ms: times.tools.as_millis() as u64,
        });
        self.record_turn(context, head, events, times).await?;
        self.after_turn(context, next).await
    }

    /// Takes in the follow-ups not yet delivered. `false` when there was nothing to ask the
    /// model: a previous owner recorded the final answer and this run finished from it (and a
    /// follow-up arrived meanwhile, so the loop goes round again).
    async fn take_follow_ups(&mut self, context: &RunContext) -> Step<bool> {
        let Some(current) = record(&context.replica, context.agent) else {
            return ControlFlow::Break(RunOutcome::Superseded);
        };
        if current.status != AgentStatus::Running {
            return ControlFlow::Break(RunOutcome::Superseded);
        }
        let new_follow_ups: Vec<String> = current.follow_ups[self.delivered as usize..]
            .iter()
            .map(|follow_up| follow_up.text.clone())
            .collect();
        if !new_follow_ups.is_empty() {
            self.live.log(format!(
                "taking {} follow-up(s) into turn {}",
                new_follow_ups.len(),
                self.turn + 1
            ));
            self.conversation.add_follow_ups(new_follow_ups);
            self.delivered = current.follow_ups.len() as u32;
        } else if self.turn == self.start.turns {
            // The previous owner recorded the model's final answer and stopped before it could
            // finish: finish now instead of asking the model again.
            if let Some(summary) = self.conversation.final_answer() {
                self.live
                    .log(format!("the final answer of turn {} is recorded; finishing", self.turn));
                self.push_error = last_push_failure(context);
                self.finish(context, &summary).await?;
                return ControlFlow::Continue(false);
            }
        }
        ControlFlow::Continue(true)
    }

    /// Asks the model for the next turn, streaming its text to watchers.
    async fn ask_model(&self, context: &RunContext) -> Step<TurnResponse> {
        // Tool plugins come and go while the cluster runs; a turn offers those enabled now.
        let tool_specs = if self.turn > self.start.turns {
            available_tools(context, &self.live).await
        } else {
            self.tool_specs.clone()
        };
        let request = TurnRequest {
            messages: self.conversation.messages.clone(),
            tools: tool_specs,
            max_output_tokens: context.runtime.max_output_tokens,
        };
        let (sender, mut receiver) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        let forwarder = {
            let live = self.live.clone();
            // One stream redactor for the whole answer: a value the model spells over two
            // deltas is held back (at most the longest value's length) until it is whole.
            let mut stream = context.redactor.stream();
            tokio::spawn(async move {
                while let Some(event) = receiver.recv().await {
                    if let StreamEvent::TextDelta(text) = event {
                        let text = stream.push_str(&text);
                        if !text.is_empty() {
                            live.publish(v1::agent_event::Kind::AssistantDelta(v1::AssistantDelta { text }));
                        }
                    }
                }
                let rest = stream.finish_str();
                if !rest.is_empty() {
                    live.publish(v1::agent_event::Kind::AssistantDelta(v1::AssistantDelta { text: rest }));
                }
            })
        };
        let asked = Instant::now();
        tracing::debug!(agent = %context.agent, turn = self.turn + 1, "asking the model");
        let answer = self.provider.turn(&request, sender).await;
        tracing::debug!(agent = %context.agent, turn = self.turn + 1, elapsed_ms = asked.elapsed().as_millis() as u64, ok = answer.is_ok(), "the model answered");
        let _ = forwarder.await;
        match answer {
            Ok(answer) => ControlFlow::Continue(answer),
            Err(error) => {
                let error = format!("model {}: {error}", self.provider.name());
                ControlFlow::Break(fail(context, "the model call failed", error).await)
            }
        }
    }

    /// Runs the turn's tool calls one after another; answers how many ran.
    async fn run_tools(
        &mut self,
        context: &RunContext,
        next: &Next,
        answer: &TurnResponse,
        events: &mut Vec<EventKind>,
    ) -> u32 {
        let calls = match next {
            Next::RunTools(calls) => calls,
            Next::End(_) => {
                // Calls the budget left unrun still get an answer, so the conversation stays
                // valid for a later run.
                for call in &answer.tool_calls {
                    self.conversation
                        .add_tool_result(&call.id, "not run: the agent's budget ran out".to_string());
                }
                return 0;
            }
        };
        for call in calls {
            self.dirty |= WRITING_TOOLS.contains(&call.name.as_str());
            let arguments = capped(&call.arguments_json, MAX_EVENT_OUTPUT_BYTES);
            self.live
                .publish(v1::agent_event::Kind::ToolCallStarted(v1::ToolCallStarted {
                    call_id: call.id.clone(),
                    tool: call.name.clone(),
                    arguments: arguments.clone(),
                }));
            let began = Instant::now();
            let output = run_any_tool(context, &call.name, &call.arguments_json).await;
            let duration_ms = began.elapsed().as_millis() as u64;
            let event_output = capped(&output.content, MAX_EVENT_OUTPUT_BYTES);
            let truncated = output.truncated || event_output.len() < output.content.len();
            self.live
                .publish(v1::agent_event::Kind::ToolCallFinished(v1::ToolCallFinished {
                    call_id: call.id.clone(),
                    tool: call.name.clone(),
                    output: event_output.clone(),
                    truncated,
                    failed: output.failed,
                    duration_ms,
                }));
            events.push(EventKind::ToolCallFinished {
                call_id: call.id.clone(),
                tool: call.name.clone(),
                arguments,
                output: event_output,
                truncated,
                failed: output.failed,
                duration_ms,
            });
            self.conversation.add_tool_result(&call.id, output.content);
        }
        calls.len() as u32
    }

    /// Commits in the machine when a writing tool ran, and pushes when the head moved; answers
    /// the head commit. The run ends here when the push finds that another owner has the agent.
    async fn commit_and_push(
        &mut self,
        context: &RunContext,
        answer: &TurnResponse,
        events: &mut Vec<EventKind>,
    ) -> Step<Option<String>> {
        if !self.dirty {
            return ControlFlow::Continue(None);
        }
        let message = format!(
            "{}: turn {}\n\n{}\n\nFlotilla-Agent: {}",
            self.start.spec.name,
            self.turn,
            capped(answer.text.trim(), 2000),
            context.agent
        );
        let head = match commit_in_machine(&context.machine, &context.runtime.git, &message).await {
            Ok(head) => head,
            Err(error) => {
                events.push(EventKind::Log {
                    text: capped(&error.to_string(), MAX_EVENT_OUTPUT_BYTES),
                });
                return ControlFlow::Continue(None);
            }
        };
        self.dirty = false;
        let unchanged = !context.workspace.resumed && head == context.workspace.head_commit;
        if self.pushed.as_deref() == Some(head.as_str()) || unchanged {
            return ControlFlow::Continue(Some(head));
        }
        let branch = context.workspace.branch.clone();
        match push_fenced(context, &self.live).await {
            Ok(commit) => {
                events.push(EventKind::CommitPushed {
                    branch,
                    commit: commit.clone(),
                });
                self.pushed = Some(commit);
                self.push_error = None;
            }
            Err(BranchTrouble::Ended(outcome)) => return ControlFlow::Break(outcome),
            Err(BranchTrouble::Origin(error)) => {
                events.push(EventKind::PushFailed {
                    branch,
                    commit: head.clone(),
                    error: capped(&error, MAX_EVENT_OUTPUT_BYTES),
                });
                self.push_error = Some(error);
            }
        }
        ControlFlow::Continue(Some(head))
    }

    /// Writes the turn and its checkpoint through Raft, last, and reports its timing.
    async fn record_turn(
        &self,
        context: &RunContext,
        head: Option<String>,
        events: Vec<EventKind>,
        times: TurnTimes,
    ) -> Step<()> {
        let checkpoint = match crate::checkpoint::encode(&self.conversation.messages, MAX_CHECKPOINT_BYTES) {
            Ok((data, _)) => data,
            Err(error) => return ControlFlow::Break(fail(context, "checkpoint too large", error.to_string()).await),
        };
        let record_started = Instant::now();
        let recorded = context
            .replica
            .write(Command::RecordTurn {
                agent: context.agent,
                node: context.replica.node_id(),
                epoch: context.epoch,
                turn: self.turn,
                follow_ups_delivered: self.delivered,
                head_commit: head,
                scripted: self.provider.scripted(),
                checkpoint,
                events: events
                    .into_iter()
                    .map(|mut event| {
                        super::redaction::redact_event(&context.redactor, &mut event);
                        event
                    })
                    .collect(),
            })
            .await;
        if let Err(error) = recorded {
            return ControlFlow::Break(write_outcome(error));
        }
        if let Some(observer) = &context.observer {
            observer(TurnTiming {
                turn: self.turn,
                total: times.started.elapsed(),
                model: times.model,
                tools: times.tools,
                git: times.git,
                record: record_started.elapsed(),
            });
        }
        ControlFlow::Continue(())
    }

    /// Ends the run when the model finished or a budget ran out; goes on otherwise.
    async fn after_turn(&mut self, context: &RunContext, next: Next) -> Step<()> {
        let error = match next {
            Next::RunTools(_) => return ControlFlow::Continue(()),
            Next::End(Ending::Finished { summary }) => return self.finish(context, &summary).await,
            Next::End(Ending::TurnBudget { turns }) => format!("the run reached its budget of {turns} turns"),
            Next::End(Ending::TokenBudget { tokens }) => format!("the run used {tokens} tokens, its budget"),
            Next::End(Ending::TimeBudget { elapsed }) => {
                format!("the run reached its wall-clock budget after {} s", elapsed.as_secs())
            }
        };
        ControlFlow::Break(fail(context, "budget exhausted", error).await)
    }

    /// Finishes from the model's final answer; goes on when a follow-up arrived meanwhile.
    async fn finish(&self, context: &RunContext, summary: &str) -> Step<()> {
        let ending = finish(
            context,
            &self.live,
            &self.start,
            self.turn,
            summary,
            &self.pushed,
            &self.push_error,
        )
        .await;
        match ending {
            Some(outcome) => ControlFlow::Break(outcome),
            None => ControlFlow::Continue(()),
        }
    }
}

/// The model the agent names, or the run fails: the node does not declare it.
async fn model_for(context: &RunContext, start: &AgentRecord) -> Step<Arc<dyn ModelProvider>> {
    if let Some(provider) = context.runtime.models.get(&start.spec.model) {
        return ControlFlow::Continue(provider.clone());
    }
    let mut declared: Vec<&String> = context.runtime.models.keys().collect();
    declared.sort();
    let error = format!(
        "model {:?} is not declared on node {} (declared: {:?})",
        start.spec.model,
        context.replica.node_id(),
        declared
    );
    ControlFlow::Break(fail(context, "model not available", error).await)
}

/// The conversation from the agent's checkpoint, or a new one: system prompt, then the task.
async fn open_conversation(
    context: &RunContext,
    start: &AgentRecord,
    live: &Live,
    tool_specs: &[ToolSpec],
) -> Step<Conversation> {
    let budgets = context.runtime.budgets;
    let checkpoint = context
        .replica
        .reader()
        .read(|state| state.checkpoints.get(&context.agent).cloned());
    let Some(checkpoint) = checkpoint else {
        let prompt_context = PromptContext {
            repository: start.spec.repository.clone(),
            base_branch: start.spec.base_branch.clone(),
            work_branch: context.workspace.branch.clone(),
            tool_names: tool_specs.iter().map(|spec| spec.name.clone()).collect(),
            agent_guidance: agent_guidance(context).await,
            terminals: context
                .machine
                .terminals
                .iter()
                .map(|name| (name.clone(), String::new()))
                .collect(),
        };
        let system = system_prompt(&prompt_context);
        return ControlFlow::Continue(Conversation::new(system, start.spec.prompt.clone(), budgets));
    };
    match crate::checkpoint::decode(&checkpoint.data) {
        Ok(transcript) => {
            tracing::info!(agent = %context.agent, epoch = %context.epoch, turn = checkpoint.turn, "run resumes from its checkpoint");
            live.log(format!(
                "resuming on node {} from the checkpoint of turn {}",
                context.replica.node_id(),
                checkpoint.turn
            ));
            ControlFlow::Continue(Conversation::resume(transcript.messages, budgets))
        }
        Err(error) => ControlFlow::Break(fail(context, "checkpoint unreadable", error.to_string()).await),
    }
}
