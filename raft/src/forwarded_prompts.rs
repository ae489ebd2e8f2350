//! A forwarded write's answer without the prompts of the agents it created: the leader leaves
//! them out of the records it sends back to a follower that says it restores them
//! (`restores_prompts` on the forward), and the follower puts back the prompts of its own
//! request. A create stores its spec as it came, so the record is then the leader's again; the
//! prompt was the largest part of the answer.

use flotilla_state::command::{ApplyResult, Command, Response};
use flotilla_state::types::AgentRecord;

/// The commands of `command`: a batch's, or the command itself.
fn commands_of(command: &Command) -> Vec<&Command> {
    match command {
        Command::Batch { commands } => commands.iter().collect(),
        command => vec![command],
    }
}

/// Which commands of `command` (a batch's, or the command itself) create an agent.
pub(crate) fn creates(command: &Command) -> Vec<bool> {
    commands_of(command)
        .iter()
        .map(|command| matches!(command, Command::CreateAgent { .. }))
        .collect()
}

/// Calls `each` with every agent record `result` answers for a create (`creates`, by the
/// position of the command), with that position.
fn for_each_created_record(creates: &[bool], result: &mut ApplyResult, mut each: impl FnMut(&mut AgentRecord, usize)) {
    let mut one = |position: usize, result: &mut ApplyResult| {
        if let (Some(true), Ok(Response::Agent(record))) = (creates.get(position), result) {
            each(record, position);
        }
    };
    match result {
        Ok(Response::Batch(results)) if creates.len() == results.len() => {
            for (position, result) in results.iter_mut().enumerate() {
                one(position, result);
            }
        }
        Ok(Response::Batch(_)) => {}
        result => {
            if creates.len() == 1 {
                one(0, result);
            }
        }
    }
}

/// On the leader: leaves the prompts out of the records `result` answers for the creates among
/// `creates` (from [`creates`] of the request).
pub(crate) fn leave_out(creates: &[bool], result: &mut ApplyResult) {
    for_each_created_record(creates, result, |record, _| {
        record.spec = std::sync::Arc::new(record.spec.without_prompt())
    });
}

/// On the follower: puts the prompts a leader left out back into the records of the agents
/// `command` created. An empty prompt from an older leader, which sent the record whole, was
/// empty in the command too.
pub(crate) fn restore(command: &Command, result: &mut ApplyResult) {
    let commands = commands_of(command);
    for_each_created_record(&creates(command), result, |record, position| {
        if let Command::CreateAgent { spec, .. } = commands[position] {
            if record.spec.prompt.is_empty() {
                // The record was just decoded, so its spec is its own: nothing else is copied.
                std::sync::Arc::make_mut(&mut record.spec).prompt = spec.prompt.clone();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use flotilla_state::command::{ApplyError, Request, COMMAND_VERSION};
    use flotilla_state::types::{AgentId, AgentSpec};

    use super::*;

    /// A create and what applying it answers.
    fn create(prompt: &str) -> (Command, ApplyResult) {
        let spec = AgentSpec {
            name: "n".into(),
            prompt: prompt.into(),
            repository: "https://example.com/r.git".into(),
            ..Default::default()
        };
        let command = Command::CreateAgent {
            id: AgentId::new(),
            spec: spec.into(),
        };
        let request = Request {
            version: COMMAND_VERSION,
            at_ms: 1_000,
            command: command.clone(),
        };
        let result = flotilla_state::apply_in_term(
            &mut flotilla_state::ClusterState::default(),
            &mut flotilla_state::Changes::default(),
            crate::types::Term(1),
            &request,
        );
        assert!(matches!(&result, Ok(Response::Agent(record)) if record.spec.prompt == prompt));
        (command, result)
    }

    fn prompts(result: &ApplyResult) -> Vec<Option<String>> {
        let one = |result: &ApplyResult| match result {
            Ok(Response::Agent(record)) => Some(record.spec.prompt.clone()),
            _ => None,
        };
        match result {
            Ok(Response::Batch(results)) => results.iter().map(one).collect(),
            result => vec![one(result)],
        }
    }

    /// What the leader sends back for a follower that restores prompts, and what the follower
    /// makes of it.
    fn leader_then_follower(command: &Command, mut result: ApplyResult) -> ApplyResult {
        leave_out(&creates(command), &mut result);
        restore(command, &mut result);
        result
    }

    #[test]
    fn a_batch_comes_back_with_every_created_prompt_and_nothing_else_touched() {
        let (first, first_result) = create("Fix the build");
        let (empty, empty_result) = create("");
        let (refused, _) = create("Refused one");
        // A follow-up answers with the agent's record too; only creates lose and regain prompts.
        let (_, follow_up_record) = create("Kept as it is");
        let follow_up = Command::FollowUp {
            agent: AgentId::new(),
            text: "more".into(),
        };
        let command = Command::Batch {
            commands: vec![first, empty, refused, follow_up],
        };
        let result = Ok(Response::Batch(vec![
            first_result,
            empty_result,
            Err(ApplyError::TeamNotFound("t".into())),
            follow_up_record,
        ]));
        let expected = prompts(&result);
        let sent = {
            let mut sent = result.clone();
            leave_out(&creates(&command), &mut sent);
            sent
        };
        assert_eq!(
            prompts(&sent),
            vec![
                Some(String::new()),
                Some(String::new()),
                None,
                Some("Kept as it is".into())
            ],
            "the leader leaves out the created agents' prompts only"
        );
        assert_eq!(prompts(&leader_then_follower(&command, result)), expected);
    }

    #[test]
    fn a_single_create_and_an_answer_from_an_older_leader_come_back_whole() {
        let (command, result) = create("Write the docs");
        assert_eq!(
            prompts(&leader_then_follower(&command, result.clone())),
            vec![Some("Write the docs".into())]
        );
        // An older leader sends the record whole: the follower leaves it as it is.
        let mut whole = result.clone();
        restore(&command, &mut whole);
        assert_eq!(prompts(&whole), prompts(&result));
    }
}
