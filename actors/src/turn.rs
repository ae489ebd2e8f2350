//! The pure core of an agent's turn loop: the system prompt, the conversation, budgets, and the
//! decision after each model answer. The `AgentActor` wraps it with the model call, the tool
//! runs in the machine, checkpoints and pushes; everything here is plain data and is tested
//! without a cluster.

use std::time::Duration;

use crate::model::{Message, Role, ToolCall, TurnResponse};

/// Limits of one agent run; each ends the run with a clear reason when reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    pub max_turns: u32,
    pub max_total_tokens: u64,
    pub max_wall_clock: Duration,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            max_turns: 100,
            max_total_tokens: 2_000_000,
            max_wall_clock: Duration::from_secs(2 * 60 * 60),
        }
    }
}

/// What the repository and its machine tell the model at the start.
#[derive(Debug, Clone, Default)]
pub struct PromptContext {
    pub repository: String,
    pub base_branch: String,
    pub work_branch: String,
    pub tool_names: Vec<String>,
    /// The repository's own guidance for agents (AGENTS.md), if it has any.
    pub agent_guidance: Option<String>,
    /// Terminals of the machine: (name, description).
    pub terminals: Vec<(String, String)>,
}

/// Guidance longer than this is cut, so one file cannot crowd out the task.
pub const MAX_GUIDANCE_BYTES: usize = 32 * 1024;

pub fn system_prompt(context: &PromptContext) -> String {
    let mut prompt = format!(
        "You are a coding agent working in a checkout of {} at /workspace, on branch {} (from {}). \
         Use the tools to read, change and test the code. Your changes are committed and pushed \
         for you after each turn that changes files. When the task is done, answer without \
         calling a tool, with a short summary of what you changed and how you checked it.\n\n\
         Tools: {}.\n",
        context.repository,
        context.work_branch,
        context.base_branch,
        context.tool_names.join(", ")
    );
    if !context.terminals.is_empty() {
        prompt.push_str("\nTerminals running in the machine (read them with read_terminal):\n");
        for (name, description) in &context.terminals {
            if description.is_empty() {
                prompt.push_str(&format!("- {name}\n"));
            } else {
                prompt.push_str(&format!("- {name}: {description}\n"));
            }
        }
    }
    if let Some(guidance) = &context.agent_guidance {
        let (guidance, cut) = crate::tools::cap_text(guidance, MAX_GUIDANCE_BYTES);
        prompt.push_str("\nThe repository's guidance for agents (AGENTS.md):\n");
        prompt.push_str(&guidance);
        if cut {
            prompt.push_str("\n[guidance cut]");
        }
        prompt.push('\n');
    }
    prompt
}

/// Why a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The model answered without tool calls; its text is the summary.
    Finished {
        summary: String,
    },
    TurnBudget {
        turns: u32,
    },
    TokenBudget {
        tokens: u64,
    },
    TimeBudget {
        elapsed: Duration,
    },
}

/// What the loop does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    RunTools(Vec<ToolCall>),
    End(Ending),
}

/// The conversation of one run and the budgets it has used.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub messages: Vec<Message>,
    pub turns: u32,
    pub tokens: u64,
    budgets: Budgets,
}

impl Conversation {
    pub fn new(system: String, prompt: String, budgets: Budgets) -> Conversation {
        Conversation {
            messages: vec![Message::system(system), Message::user(prompt)],
            turns: 0,
            tokens: 0,
            budgets,
        }
    }

    /// Continues a conversation from a checkpoint, with fresh budgets for this run.
    pub fn resume(messages: Vec<Message>, budgets: Budgets) -> Conversation {
        Conversation {
            messages,
            turns: 0,
            tokens: 0,
            budgets,
        }
    }

    /// The model's final answer, when the conversation ends with it (an assistant message that
    /// calls no tool): a run resumed there has nothing left to ask the model.
    pub fn final_answer(&self) -> Option<String> {
        let last = self.messages.last()?;
        (last.role == Role::Assistant && last.tool_calls.is_empty()).then(|| last.content.trim().to_string())
    }

    /// Follow-ups are delivered at the start of the next turn, in order.
    pub fn add_follow_ups(&mut self, follow_ups: impl IntoIterator<Item = String>) {
        for text in follow_ups {
            self.messages.push(Message::user(text));
        }
    }

    /// Records the model's answer and decides what comes next.
    pub fn after_answer(&mut self, answer: &TurnResponse, elapsed: Duration) -> Next {
        self.turns += 1;
        self.tokens += answer.usage.input_tokens + answer.usage.output_tokens;
        self.messages
            .push(Message::assistant(answer.text.clone(), answer.tool_calls.clone()));
        if answer.tool_calls.is_empty() {
            return Next::End(Ending::Finished {
                summary: answer.text.trim().to_string(),
            });
        }
        if let Some(ending) = self.exhausted(elapsed) {
            return Next::End(ending);
        }
        Next::RunTools(answer.tool_calls.clone())
    }

    /// Records one tool result (failures included: the model sees them and carries on).
    pub fn add_tool_result(&mut self, call_id: &str, content: String) {
        self.messages.push(Message::tool_result(call_id.to_string(), content));
    }

    /// A budget that has run out, if any.
    pub fn exhausted(&self, elapsed: Duration) -> Option<Ending> {
        if self.turns >= self.budgets.max_turns {
            Some(Ending::TurnBudget { turns: self.turns })
        } else if self.tokens >= self.budgets.max_total_tokens {
            Some(Ending::TokenBudget { tokens: self.tokens })
        } else if elapsed >= self.budgets.max_wall_clock {
            Some(Ending::TimeBudget { elapsed })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{StopReason, Usage};

    fn answer(text: &str, calls: &[&str], tokens: u64) -> TurnResponse {
        TurnResponse {
            text: text.to_string(),
            tool_calls: calls
                .iter()
                .enumerate()
                .map(|(index, name)| ToolCall {
                    id: format!("call_{index}"),
                    name: name.to_string(),
                    arguments_json: "{}".to_string(),
                })
                .collect(),
            usage: Usage {
                input_tokens: tokens,
                output_tokens: 0,
            },
            stop_reason: if calls.is_empty() {
                StopReason::EndTurn
            } else {
                StopReason::ToolUse
            },
        }
    }

    #[test]
    fn a_conversation_that_ends_with_an_answer_has_a_final_answer() {
        let mut conversation = Conversation::new("system".into(), "prompt".into(), Budgets::default());
        assert_eq!(conversation.final_answer(), None, "it ends with the prompt");
        conversation.after_answer(&answer("calling", &["list_dir"], 1), Duration::ZERO);
        assert_eq!(conversation.final_answer(), None, "it ends with a tool call");
        conversation.add_tool_result("call_0", "a.txt".into());
        assert_eq!(conversation.final_answer(), None, "it ends with a tool result");
        conversation.after_answer(&answer("  all done \n", &[], 1), Duration::ZERO);
        assert_eq!(conversation.final_answer().as_deref(), Some("all done"));
        let resumed = Conversation::resume(conversation.messages.clone(), Budgets::default());
        assert_eq!(resumed.final_answer().as_deref(), Some("all done"));
        let mut followed = resumed;
        followed.add_follow_ups(["and one more thing".to_string()]);
        assert_eq!(followed.final_answer(), None, "a follow-up is for the model to answer");
    }

    #[test]
    fn the_prompt_names_the_branches_tools_terminals_and_guidance() {
        let prompt = system_prompt(&PromptContext {
            repository: "file:///r.git".into(),
            base_branch: "main".into(),
            work_branch: "flotilla/abc-x".into(),
            tool_names: vec!["run_command".into(), "read_file".into()],
            agent_guidance: Some("Run `make check` before you finish.".into()),
            terminals: vec![("web".into(), "the dev server".into())],
        });
        for wanted in [
            "flotilla/abc-x",
            "from main",
            "run_command, read_file",
            "- web: the dev server",
            "make check",
        ] {
            assert!(prompt.contains(wanted), "{wanted:?} missing from {prompt}");
        }
        let long = system_prompt(&PromptContext {
            agent_guidance: Some("x".repeat(MAX_GUIDANCE_BYTES * 2)),
            ..Default::default()
        });
        assert!(long.contains("[guidance cut]"));
        assert!(long.len() < MAX_GUIDANCE_BYTES + 2048);
    }

    #[test]
    fn tool_calls_continue_and_a_plain_answer_finishes() {
        let mut conversation = Conversation::new("sys".into(), "do it".into(), Budgets::default());
        let next = conversation.after_answer(&answer("", &["run_command"], 10), Duration::ZERO);
        assert!(matches!(next, Next::RunTools(ref calls) if calls.len() == 1));
        conversation.add_tool_result("call_0", "exit 0".into());
        conversation.add_follow_ups(["also the docs".to_string()]);
        let next = conversation.after_answer(&answer("  Added it and its test.\n", &[], 10), Duration::ZERO);
        assert_eq!(
            next,
            Next::End(Ending::Finished {
                summary: "Added it and its test.".into()
            })
        );
        let roles: Vec<Role> = conversation.messages.iter().map(|message| message.role).collect();
        assert_eq!(
            roles,
            vec![
                Role::System,
                Role::User,
                Role::Assistant,
                Role::Tool,
                Role::User,
                Role::Assistant
            ]
        );
        assert_eq!(conversation.turns, 2);
        assert_eq!(conversation.tokens, 20);
    }

    #[test]
    fn each_budget_ends_the_run() {
        let budgets = Budgets {
            max_turns: 2,
            max_total_tokens: 100,
            max_wall_clock: Duration::from_secs(60),
        };
        let mut turns = Conversation::new("s".into(), "p".into(), budgets);
        turns.after_answer(&answer("", &["search"], 1), Duration::ZERO);
        assert_eq!(
            turns.after_answer(&answer("", &["search"], 1), Duration::ZERO),
            Next::End(Ending::TurnBudget { turns: 2 })
        );
        let mut tokens = Conversation::new("s".into(), "p".into(), budgets);
        assert_eq!(
            tokens.after_answer(&answer("", &["search"], 150), Duration::ZERO),
            Next::End(Ending::TokenBudget { tokens: 150 })
        );
        let mut time = Conversation::new("s".into(), "p".into(), budgets);
        assert_eq!(
            time.after_answer(&answer("", &["search"], 1), Duration::from_secs(61)),
            Next::End(Ending::TimeBudget {
                elapsed: Duration::from_secs(61)
            })
        );
    }
}
