//! Small helpers shared by the numbered test modules.

use std::time::Duration;

use flotilla_proto::v1;
use flotilla_tests::AgentClient;

pub const DEADLINE: Duration = Duration::from_secs(60);

/// The sample repository of this test process: its directory and URL.
static SAMPLE_REPOSITORY: std::sync::OnceLock<(std::path::PathBuf, String)> = std::sync::OnceLock::new();

/// A small repository (a README, no environment.json) that agents of a test process clone:
/// agents now get real machines, so their repository must exist. It lives as long as the
/// process (a static is never dropped), and is removed when the process exits.
pub fn sample_repository() -> String {
    SAMPLE_REPOSITORY
        .get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("flotilla-it-repo-")
                .tempdir()
                .expect("temp dir")
                .keep();
            let url = bare_repository(&dir, "sample", &[("README.md", "a sample service\n")]);
            remove_at_exit();
            (dir, url)
        })
        .1
        .clone()
}

/// Registers the removal of the sample repository with the C library's exit handlers, which
/// the test harness's exit runs (pass or fail).
#[allow(unsafe_code)]
fn remove_at_exit() {
    extern "C" fn remove_sample_repository() {
        if let Some((dir, _)) = SAMPLE_REPOSITORY.get() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    // SAFETY: `atexit` only records the function pointer; the handler touches no state that
    // exit tears down before it (a static, and the file system).
    let registered = unsafe { libc::atexit(remove_sample_repository) };
    assert_eq!(registered, 0, "could not register the sample repository's removal");
}

/// Waits until the (restarted) node at `endpoint` answers and names a leader.
pub async fn wait_for_a_leader(what: &str, endpoint: &str, token: &str) {
    let (endpoint, token) = (endpoint.to_string(), token.to_string());
    flotilla_tests::wait_for(what, DEADLINE, move || {
        let (endpoint, token) = (endpoint.clone(), token.clone());
        async move {
            flotilla_tests::try_get_cluster(&endpoint, &token)
                .await
                .filter(|cluster| cluster.leader_id != 0)
        }
    })
    .await;
}

pub fn create_request(name: &str, prompt: &str) -> v1::CreateAgentRequest {
    v1::CreateAgentRequest {
        prompt: prompt.to_string(),
        repository: sample_repository(),
        name: name.to_string(),
        ..Default::default()
    }
}

pub async fn create(client: &mut AgentClient, name: &str, prompt: &str) -> v1::Agent {
    create_from(client, create_request(name, prompt)).await
}

/// Creates an agent from a whole request and returns it as acknowledged.
pub async fn create_from(client: &mut AgentClient, request: v1::CreateAgentRequest) -> v1::Agent {
    let name = request.name.clone();
    client
        .create_agent(request)
        .await
        .unwrap_or_else(|status| panic!("creating {name:?} failed: {status}"))
        .into_inner()
        .agent
        .expect("create answers with the agent")
}

/// Sends a follow-up and returns the acknowledgement (given once it is durable).
pub async fn follow_up(client: &mut AgentClient, id: &str, text: &str) -> v1::SendFollowUpResponse {
    client
        .send_follow_up(v1::SendFollowUpRequest {
            id: id.to_string(),
            text: text.to_string(),
        })
        .await
        .unwrap_or_else(|status| panic!("follow-up to {id} failed: {status}"))
        .into_inner()
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

/// Makes a bare repository at `dir/name.git` whose `main` holds `files`, and returns its
/// `file://` URL.
pub fn bare_repository(dir: &std::path::Path, name: &str, files: &[(&str, &str)]) -> String {
    let origin = flotilla_tests::fakes::create_bare_repository(dir, name, files);
    format!("file://{}", origin.display())
}

/// Runs the CLI with `key` against `endpoint` and returns its stdout, failing the test with its
/// output when it fails.
pub fn cli(endpoint: &str, key: &str, args: &[&str]) -> String {
    let output = flotilla_tests::run_cli(endpoint, key, args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "flotilla {args:?} failed: {stderr}{stdout}");
    stdout
}

/// `key create` through the CLI: the new key is the last line of stdout.
pub fn cli_key(endpoint: &str, key: &str, team: &str, user: &str, role: &str) -> String {
    let stdout = cli(
        endpoint,
        key,
        &["key", "create", "--team", team, "--user", user, "--role", role],
    );
    let secret = stdout.lines().last().expect("a last line").trim().to_string();
    assert!(secret.starts_with("flt_"), "the last line is the key: {stdout}");
    secret
}
