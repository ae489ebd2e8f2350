//! Small helpers shared by the numbered test modules.

use std::time::Duration;

use flotilla_proto::v1;
use flotilla_tests::AgentClient;

pub const DEADLINE: Duration = Duration::from_secs(60);

pub fn create_request(name: &str, prompt: &str) -> v1::CreateAgentRequest {
    v1::CreateAgentRequest {
        prompt: prompt.to_string(),
        repository: "https://git.example.test/team/service.git".to_string(),
        name: name.to_string(),
        ..Default::default()
    }
}

pub async fn create(client: &mut AgentClient, name: &str, prompt: &str) -> v1::Agent {
    client
        .create_agent(create_request(name, prompt))
        .await
        .unwrap_or_else(|status| panic!("creating {name} failed: {status}"))
        .into_inner()
        .agent
        .expect("create answers with the agent")
}

pub async fn get(client: &mut AgentClient, id: &str) -> Option<v1::Agent> {
    client
        .get_agent(v1::GetAgentRequest { id: id.to_string() })
        .await
        .ok()
        .map(|reply| reply.into_inner())
}

pub fn status_of(agent: &v1::Agent) -> v1::AgentStatus {
    v1::AgentStatus::try_from(agent.status).unwrap_or(v1::AgentStatus::Unspecified)
}

/// The fields a client gave and the server fixed at creation; they must never change.
pub fn identity(agent: &v1::Agent) -> (String, String, String, String, String, String, String, String) {
    (
        agent.id.clone(),
        agent.name.clone(),
        agent.prompt.clone(),
        agent.repository.clone(),
        agent.base_branch.clone(),
        agent.work_branch.clone(),
        agent.model.clone(),
        format!("{:?}", agent.created_at),
    )
}
