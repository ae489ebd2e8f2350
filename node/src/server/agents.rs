//! `flotilla.v1.AgentService`.

use std::pin::Pin;

use base64::Engine as _;
use flotilla_proto::v1::agent_service_server::AgentService;
use flotilla_proto::v1::{self, watch_agent_response};
use flotilla_raft::{
    AgentId, AgentRecord, AgentSpec, AgentStatus, ApplyError, Command, Epoch, Replica, Response, WriteError,
};
use std::sync::Arc;

use flotilla_actors::machine::{running_machine, RunningMachine};
use flotilla_sandbox::{PtySession, PtySize};
use futures::{Stream, StreamExt as _};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Status, Streaming};

use super::auth::principal;
use super::authz::{Principal, WatchQuota};
use super::status::read_status;
use super::{convert, validate, write_status};

/// Messages buffered towards one watcher before the server waits for it to read.
pub const WATCH_BUFFER_MESSAGES: usize = 256;
/// The base branch of a create when neither the request nor the team names one and the node
/// cannot read the origin's default branch with its own credentials.
const FALLBACK_BASE_BRANCH: &str = "main";
/// Durable events a watcher copies from the state in one step of its replay.
pub const WATCH_REPLAY_STEP_EVENTS: usize = 64;
pub struct AgentApi {
    pub replica: Replica,
    pub models: Arc<ModelCatalog>,
    /// The node's VCS providers, which must claim an agent's repository; `None` (unit tests
    /// without a plugin host) takes any repository.
    pub plugins: Option<Arc<super::vcs::NodePlugins>>,
    /// Which local repositories this node takes (`[repos] allow_local`).
    pub repositories: flotilla_actors::repo_url::RepositoryPolicy,
    /// Watches open per key on this node (each holds a task and a buffer).
    pub watches: WatchQuota,
    /// Applied events routed to the watch streams of their agent.
    pub watch_hub: super::watch_hub::WatchHub,
    /// One live subscription per watched agent, shared by its watch streams.
    pub live_hub: super::live_hub::LiveHub,
    /// How this node dials another node's public endpoint (TLS, checked against the CA).
    pub node_tls: tonic::transport::ClientTlsConfig,
    /// Credentials for reading an origin's default branch.
    pub git: flotilla_actors::repo::GitSettings,
    /// Origins' default branches, read recently.
    pub default_branches: super::default_branch::DefaultBranches,
}

/// The models this node declares, for checking `CreateAgent` (every node of a cluster is meant
/// to declare the same models; an agent placed on a node without its model fails clearly).
#[derive(Debug, Default)]
pub struct ModelCatalog {
    /// Model name to whether it is the scripted provider.
    pub scripted: std::collections::BTreeMap<String, bool>,
    pub default_model: Option<String>,
}

impl ModelCatalog {
    /// The model an agent gets, and whether it is scripted.
    pub fn choose(&self, asked: &str) -> Result<(String, bool), Status> {
        let name = if asked.is_empty() {
            self.default_model.clone().ok_or_else(|| {
                Status::failed_precondition(if self.scripted.is_empty() {
                    "no model is declared on this node: add a [models.NAME] table to its config".to_string()
                } else {
                    format!(
                        "no model given and no [agents] default_model set; declared models: {}",
                        self.names()
                    )
                })
            })?
        } else {
            asked.to_string()
        };
        match self.scripted.get(&name) {
            Some(scripted) => Ok((name, *scripted)),
            None => Err(Status::failed_precondition(format!(
                "model {name:?} is not declared; declared models: {}",
                self.names()
            ))),
        }
    }

    pub fn names(&self) -> String {
        if self.scripted.is_empty() {
            "none".to_string()
        } else {
            self.scripted.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    }
}

fn invalid(message: String) -> Status {
    Status::invalid_argument(message)
}

fn agent_not_found(id: AgentId) -> Status {
    Status::not_found(format!("agent {id} not found"))
}

/// How a watch of an agent that was deleted (or purged) ends.
fn agent_deleted(id: AgentId) -> Status {
    Status::not_found(format!("agent {id} was deleted; the watch ends"))
}

/// `record` if `caller` may see it, else the unknown-id answer.
fn visible(caller: &Principal, record: AgentRecord) -> Result<AgentRecord, Status> {
    if caller.sees_team(&record.spec.team) {
        Ok(record)
    } else {
        Err(agent_not_found(record.id))
    }
}

/// The opaque page token: where the last page ended, and a digest of the filter it was for.
#[derive(Serialize, Deserialize)]
struct PageToken {
    after: AgentId,
    filter: u64,
}

fn filter_digest(request: &v1::ListAgentsRequest) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    request.statuses.hash(&mut hasher);
    request.repository.hash(&mut hasher);
    request.region.hash(&mut hasher);
    request.search.hash(&mut hasher);
    hasher.finish()
}

fn encode_page_token(token: &PageToken) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(postcard::to_allocvec(token).expect("in-memory encoding"))
}

fn decode_page_token(text: &str) -> Result<PageToken, Status> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| invalid("page_token: not a token this service issued".to_string()))?;
    postcard::from_bytes(&bytes).map_err(|_| invalid("page_token: not a token this service issued".to_string()))
}

impl AgentApi {
    /// Whether `team`'s summaries and diffs are hidden from `caller` (its `display_summary`
    /// setting, as this node holds it now).
    fn hides_summary(&self, caller: &Principal, team: &str) -> bool {
        let settings = self.replica.reader().read(|state| state.settings_of(team));
        caller.summary_hidden(team, &settings)
    }

    /// The record on the wire as `caller` may see it.
    fn present(&self, caller: &Principal, record: &AgentRecord) -> v1::Agent {
        let mut agent = convert::agent(record);
        if self.hides_summary(caller, &record.spec.team) {
            super::visibility::hide_agent(&mut agent);
        }
        agent
    }

    /// The agent as this node's replica holds it, which may lag the cluster.
    fn find_here(&self, id: AgentId) -> Option<AgentRecord> {
        self.replica.reader().read(|state| state.agents.get(&id).cloned())
    }

    /// Brings this node's state up to every write the cluster acknowledged (a read barrier):
    /// reads after it answer the same through any node.
    /// Names the team of an agent the caller was found to see in the call's audit entry.
    fn note_team(&self, note: &super::audit::AuditNote, id: AgentId) {
        let team = self.replica.reader().read(|state| {
            state
                .agents
                .get(&id)
                .map(|record| crate::server::authz::owning_team(&record.spec.team).to_string())
        });
        if let Some(team) = team {
            note.set(id.to_string(), Some(&team));
        }
    }

    async fn settle(&self) -> Result<(), Status> {
        self.replica.read_barrier().await.map(|_| ()).map_err(read_status)
    }

    /// The agent as the cluster acknowledged it: a linearizable read. NOT_FOUND only for an
    /// id the cluster never acknowledged.
    async fn find(&self, id: AgentId) -> Result<AgentRecord, Status> {
        self.settle().await?;
        self.find_here(id).ok_or_else(|| agent_not_found(id))
    }

    /// The agent as the cluster acknowledged it, if `caller` may see it: another team's agent
    /// answers exactly as an unknown id does, so ids do not leak across teams.
    async fn find_visible(&self, caller: &Principal, id: AgentId) -> Result<AgentRecord, Status> {
        let record = self.find(id).await?;
        visible(caller, record)
    }

    /// Refuses, before a write, an id the cluster never acknowledged or `caller` may not see.
    /// Agents are never removed, so one this node holds exists; one it lacks may be one it has
    /// not applied yet, so the answer then waits for a read barrier. An agent's team never
    /// changes, so the team check holds on any view. The state machine checks again when the
    /// write applies (existence and state), so nothing here decides on a stale view.
    async fn require_acknowledged(&self, caller: &Principal, id: AgentId) -> Result<(), Status> {
        if let Some(record) = self.find_here(id) {
            return visible(caller, record).map(|_| ());
        }
        self.find_visible(caller, id).await.map(|_| ())
    }

    fn known_regions(&self) -> Vec<String> {
        let mut regions: Vec<String> = self
            .replica
            .reader()
            .read(|state| state.nodes.values().map(|node| node.info.region.clone()).collect());
        regions.sort();
        regions.dedup();
        regions
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchAgentResponse, Status>> + Send>>;
type AttachStream = Pin<Box<dyn Stream<Item = Result<v1::AttachResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn create_agent(
        &self,
        request: Request<v1::CreateAgentRequest>,
    ) -> Result<tonic::Response<v1::CreateAgentResponse>, Status> {
        let caller = principal(&request)?;
        let audit_note = super::audit::note_of(&request);
        let mut body = request.into_inner();
        validate::prompt("prompt", &body.prompt, validate::MAX_PROMPT_BYTES)?;
        // The team's settings as this node holds them: a change made through this node applies
        // to its next create at once, one made elsewhere once this node applied it (milliseconds).
        let settings = self.replica.reader().read(|state| state.settings_of(&caller.team));
        if body.repository.is_empty() {
            body.repository = settings.default_repository.clone();
        }
        validate::repository(&body.repository)?;
        self.repositories
            .check_blocking(&body.repository)
            .await
            .map_err(super::status::repository_status)?;
        let base_branch = if !body.base_branch.is_empty() {
            body.base_branch.clone()
        } else if !settings.default_base_branch.is_empty() {
            settings.default_base_branch.clone()
        } else {
            let auth = self.git.auth_env(&body.repository);
            match self.default_branches.get(&body.repository, auth).await {
                Ok(branch) => branch,
                // The node's own git credentials may not open the origin (a forge whose token its
                // provider plugin holds), or the origin may be gone: the run reports that when it
                // clones. The branch then is the conventional `main`, as before the lookup.
                Err(super::default_branch::DefaultBranchError::Git { url, message }) => {
                    tracing::info!(%url, error_bytes = message.len(), "cannot read the origin's default branch; using main");
                    FALLBACK_BASE_BRANCH.to_string()
                }
                Err(error) => return Err(error.into()),
            }
        };
        validate::branch("base_branch", &base_branch)?;
        validate::short_text("name", &body.name, validate::MAX_NAME_CHARS)?;
        validate::short_text("model", &body.model, validate::MAX_MODEL_CHARS)?;
        let region = if body.region.is_empty() {
            None
        } else {
            validate::region(&body.region)?;
            let mut known = self.known_regions();
            if !known.contains(&body.region) {
                // A node that just joined may not be applied here yet: ask the cluster.
                self.settle().await?;
                known = self.known_regions();
            }
            if !known.contains(&body.region) {
                return Err(Status::failed_precondition(format!(
                    "region {:?} has no node; regions in this cluster: {}",
                    body.region,
                    known.join(", ")
                )));
            }
            Some(body.region.clone())
        };
        validate::egress_allow(&body.egress_allow)?;
        if body.model.is_empty() {
            body.model = settings.default_model.clone();
        }
        let (model, scripted) = self.models.choose(&body.model)?;
        if !settings.allows_model(&model) {
            return Err(Status::permission_denied(format!(
                "model {model:?} is not allowed for team {}; its allowed_models: {}",
                super::authz::owning_team(&caller.team),
                settings.allowed_models.join(", ")
            )));
        }
        if let Some(plugins) = &self.plugins {
            let claim = plugins.claim(&body.repository).await?;
            if body.open_pull_request {
                let supported = plugins.supports_pull_requests(&claim).await?;
                if !supported {
                    return Err(Status::failed_precondition(format!(
                        "open_pull_request: the provider of {:?} ({}) cannot open pull requests; create the agent without it",
                        body.repository,
                        claim.plugin.name()
                    )));
                }
            }
        }
        let id = AgentId::new();
        // The call's trace span (observability::rpc) names the agent it made.
        tracing::Span::current().record("agent", id.to_string());
        // The new agent's id, never its prompt.
        audit_note.set(id.to_string(), Some(&caller.team));
        let name = if body.name.trim().is_empty() {
            validate::name_from_prompt(&body.prompt)
        } else {
            body.name.trim().to_string()
        };
        let work_branch = if body.work_branch.is_empty() {
            format!("flotilla/{}-{}", id.short(), validate::slug(&name, 40))
        } else {
            validate::branch("work_branch", &body.work_branch)?;
            body.work_branch.clone()
        };
        let spec = AgentSpec {
            name,
            prompt: body.prompt,
            repository: body.repository,
            base_branch,
            work_branch,
            model,
            region,
            team: caller.team.clone(),
            open_pull_request: body.open_pull_request,
            egress_allow: body.egress_allow,
            scripted,
            user: caller.user.clone(),
        };
        let record = match self.replica.write(Command::CreateAgent { id, spec: spec.into() }).await {
            Ok(Response::Agent(record)) => *record,
            // A retried write that had in fact been applied: the agent is there, which is what was asked.
            Err(WriteError::Refused(ApplyError::AgentExists(existing))) if existing == id => self.find(id).await?,
            Ok(other) => {
                return Err(Status::internal(format!(
                    "unexpected answer to create-agent: {other:?}"
                )))
            }
            Err(error) => return Err(write_status(error)),
        };
        Ok(tonic::Response::new(v1::CreateAgentResponse {
            agent: Some(self.present(&caller, &record)),
        }))
    }

    async fn get_agent(&self, request: Request<v1::GetAgentRequest>) -> Result<tonic::Response<v1::Agent>, Status> {
        let caller = principal(&request)?;
        let id = validate::agent_id(&request.get_ref().id)?;
        let record = self.find_visible(&caller, id).await?;
        Ok(tonic::Response::new(self.present(&caller, &record)))
    }

    async fn list_agents(
        &self,
        request: Request<v1::ListAgentsRequest>,
    ) -> Result<tonic::Response<v1::ListAgentsResponse>, Status> {
        let caller = principal(&request)?;
        let body = request.into_inner();
        let page_size = validate::page_size(body.page_size)?;
        if body.search.len() > validate::MAX_SEARCH_BYTES {
            return Err(invalid(format!(
                "search: at most {} bytes, found {}",
                validate::MAX_SEARCH_BYTES,
                body.search.len()
            )));
        }
        if !body.region.is_empty() {
            validate::region(&body.region)?;
        }
        let mut statuses = Vec::new();
        for value in &body.statuses {
            let status = v1::AgentStatus::try_from(*value)
                .ok()
                .and_then(convert::status_from_wire)
                .ok_or_else(|| invalid(format!("statuses: {value} is not an agent status")))?;
            statuses.push(status);
        }
        let digest = filter_digest(&body);
        let after = if body.page_token.is_empty() {
            None
        } else {
            let token = decode_page_token(&body.page_token)?;
            if token.filter != digest {
                return Err(invalid(
                    "page_token: issued for a different filter; start again without a token".to_string(),
                ));
            }
            Some(token.after)
        };
        let needle = super::agent_list::Needle::new(&body.search);
        self.settle().await?;
        let filter = super::agent_list::ListFilter {
            statuses: &statuses,
            repository: &body.repository,
            region: &body.region,
            needle: needle.as_ref(),
        };
        let (agents, resume_after) = self
            .replica
            .reader()
            .read(|state| super::agent_list::list_page(state, &caller, &filter, after, page_size));
        let next_page_token = match resume_after {
            Some(after) => encode_page_token(&PageToken { after, filter: digest }),
            None => String::new(),
        };
        Ok(tonic::Response::new(v1::ListAgentsResponse {
            agents,
            next_page_token,
        }))
    }

    type WatchAgentStream = WatchStream;

    async fn watch_agent(
        &self,
        request: Request<v1::WatchAgentRequest>,
    ) -> Result<tonic::Response<Self::WatchAgentStream>, Status> {
        let caller = principal(&request)?;
        let body = request.into_inner();
        let id = validate::agent_id(&body.id)?;
        let permit = self.watches.acquire(&caller)?;
        // Subscribe before reading, so nothing applied in between is missed.
        let mut durable = self
            .watch_hub
            .subscribe(id)
            .ok_or_else(|| Status::unavailable("the node is stopping"))?;
        let live = self
            .live_hub
            .subscribe(id)
            .await
            .map_err(|error| Status::unavailable(format!("cannot subscribe to live events: {error}")))?;
        // Waits (bounded) until this node has applied what the cluster acknowledged: a watch
        // through a lagging node starts once the agent is here, rather than failing.
        let record = self.find_visible(&caller, id).await?;
        if body.after_sequence > record.last_sequence {
            return Err(Status::out_of_range(format!(
                "after_sequence {} is beyond agent {id}'s last sequence {}",
                body.after_sequence, record.last_sequence
            )));
        }
        let first = self.replica.reader().read(|state| state.first_retained_sequence(id));
        if let Some(first) = first {
            if body.after_sequence + 1 < first {
                return Err(Status::out_of_range(format!(
                    "events of agent {id} before sequence {first} are no longer kept; resume from {}",
                    first - 1
                )));
            }
        }
        let (sender, receiver) = mpsc::channel::<WatchMessage>(WATCH_BUFFER_MESSAGES);
        let reader = self.replica.reader().clone();
        let hub = self.watch_hub.clone();
        let hide = self.hides_summary(&caller, &record.spec.team);
        let present = move |mut event: v1::AgentEvent| {
            if hide {
                super::visibility::hide_event(&mut event);
            }
            event
        };
        let snapshot = self.present(&caller, &record);
        tokio::spawn(async move {
            // Held for as long as the watch streams.
            let _permit = permit;
            let mut live = live;
            let mut last = body.after_sequence;
            let snapshot = v1::WatchAgentResponse {
                kind: Some(watch_agent_response::Kind::Snapshot(snapshot)),
            };
            if sender.send(Box::new(Ok(snapshot))).await.is_err() {
                return;
            }
            let scripted = record.scripted;
            loop {
                // Catch up from the state: covers the first replay and any lag of the broadcast.
                // In steps, so a long history is never copied whole.
                loop {
                    let missed = reader.agent_events_after_bounded(id, last, WATCH_REPLAY_STEP_EVENTS);
                    if missed.is_empty() {
                        break;
                    }
                    for event in missed {
                        last = event.sequence;
                        if send_event(&sender, present(convert::event(&event, scripted)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
                let finished = reader.read(|state| {
                    state
                        .agents
                        .get(&id)
                        .map(|agent| agent.status.is_terminal() && agent.last_sequence <= last)
                });
                match finished {
                    Some(true) => return,
                    Some(false) => {}
                    None => {
                        let _ = sender.send(Box::new(Err(agent_deleted(id)))).await;
                        return;
                    }
                }
                loop {
                    tokio::select! {
                        received = durable.events().recv() => match received {
                            Ok(event) => {
                                if event.sequence == last + 1 {
                                    last = event.sequence;
                                    if send_event(&sender, present(convert::event(&event, scripted))).await.is_err() {
                                        return;
                                    }
                                    if is_terminal_event(&event) {
                                        break;
                                    }
                                } else if event.sequence > last + 1 {
                                    break;
                                }
                            }
                            Err(broadcast::error::RecvError::Lagged(_)) => break,
                            // The hub dropped the agent's channel (it lagged, or the agent was
                            // deleted): subscribe again, then catch up from the state.
                            Err(broadcast::error::RecvError::Closed) => {
                                match hub.subscribe(id) {
                                    Some(again) => durable = again,
                                    None => return,
                                }
                                break;
                            }
                        },
                        received = live.recv() => match received {
                            Some(bytes) => {
                                if let Ok(event) = v1::AgentEvent::decode(bytes.as_slice()) {
                                    if send_event(&sender, present(event)).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            None => return,
                        },
                        _ = sender.closed() => return,
                    }
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver).map(|message| *message),
        )))
    }

    async fn send_follow_up(
        &self,
        request: Request<v1::SendFollowUpRequest>,
    ) -> Result<tonic::Response<v1::SendFollowUpResponse>, Status> {
        let caller = principal(&request)?;
        let audit_note = super::audit::note_of(&request);
        let body = request.into_inner();
        let id = validate::agent_id(&body.id)?;
        audit_note.set(id.to_string(), None);
        validate::prompt("text", &body.text, validate::MAX_FOLLOW_UP_BYTES)?;
        self.require_acknowledged(&caller, id).await?;
        self.note_team(&audit_note, id);
        match self
            .replica
            .write(Command::FollowUp {
                agent: id,
                text: body.text,
            })
            .await
        {
            Ok(Response::FollowUp { agent, index }) => Ok(tonic::Response::new(v1::SendFollowUpResponse {
                agent: Some(self.present(&caller, &agent)),
                index,
            })),
            Ok(other) => Err(Status::internal(format!("unexpected answer to follow-up: {other:?}"))),
            Err(error) => Err(write_status(error)),
        }
    }

    async fn stop_agent(&self, request: Request<v1::StopAgentRequest>) -> Result<tonic::Response<v1::Agent>, Status> {
        let caller = principal(&request)?;
        let audit_note = super::audit::note_of(&request);
        let body = request.into_inner();
        let id = validate::agent_id(&body.id)?;
        audit_note.set(id.to_string(), None);
        if body.reason.len() > validate::MAX_REASON_BYTES {
            return Err(invalid(format!("reason: at most {} bytes", validate::MAX_REASON_BYTES)));
        }
        self.require_acknowledged(&caller, id).await?;
        self.note_team(&audit_note, id);
        let reason = if body.reason.is_empty() {
            "stopped by request".to_string()
        } else {
            body.reason
        };
        match self.replica.write(Command::StopAgent { agent: id, reason }).await {
            Ok(Response::Agent(agent)) => Ok(tonic::Response::new(self.present(&caller, &agent))),
            Ok(other) => Err(Status::internal(format!("unexpected answer to stop-agent: {other:?}"))),
            Err(error) => Err(write_status(error)),
        }
    }

    async fn delete_agent(
        &self,
        request: Request<v1::DeleteAgentRequest>,
    ) -> Result<tonic::Response<v1::DeleteAgentResponse>, Status> {
        let caller = principal(&request)?;
        let audit_note = super::audit::note_of(&request);
        let id = validate::agent_id(&request.get_ref().id)?;
        audit_note.set(id.to_string(), None);
        self.require_acknowledged(&caller, id).await?;
        self.note_team(&audit_note, id);
        match self.replica.write(Command::DeleteAgent { agent: id }).await {
            Ok(Response::Agent(agent)) => {
                tracing::info!(agent = %id, team = %agent.spec.team, by = %caller.key_id, "agent deleted");
                Ok(tonic::Response::new(v1::DeleteAgentResponse {
                    agent: Some(self.present(&caller, &agent)),
                }))
            }
            Ok(other) => Err(Status::internal(format!(
                "unexpected answer to delete-agent: {other:?}"
            ))),
            Err(error) => Err(write_status(error)),
        }
    }

    type AttachStream = AttachStream;

    async fn attach(
        &self,
        request: Request<Streaming<v1::AttachRequest>>,
    ) -> Result<tonic::Response<Self::AttachStream>, Status> {
        let caller = principal(&request)?;
        let authorization = request.metadata().get("authorization").cloned();
        let audit_note = super::audit::note_of(&request);
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| invalid("attach: the stream must open with an `open` message".to_string()))?;
        let Some(v1::attach_request::Kind::Open(open)) = first.kind.clone() else {
            return Err(invalid("attach: the first message must be `open`".to_string()));
        };
        let id = validate::agent_id(&open.agent_id)?;
        audit_note.set(id.to_string(), None);
        let record = self.find_visible(&caller, id).await?;
        audit_note.set(
            id.to_string(),
            Some(crate::server::authz::owning_team(&record.spec.team)),
        );
        if record.status.is_terminal() {
            return Err(Status::failed_precondition(format!(
                "agent {id} is {}; its machine is gone",
                record.status
            )));
        }
        if record.status != AgentStatus::Running {
            return Err(Status::failed_precondition(format!(
                "agent {id} is {}; it has no machine to attach to yet",
                record.status
            )));
        }
        let owner = record
            .assignment
            .map(|assignment| assignment.node)
            .ok_or_else(|| Status::failed_precondition(format!("agent {id} is not placed on a node")))?;
        let stream = if owner == self.replica.node_id() {
            let epoch = record.assignment.map(|assignment| assignment.epoch).unwrap_or_default();
            self.attach_local(id, epoch, open, inbound).await?
        } else {
            self.attach_remote(owner, authorization, first, inbound).await?
        };
        Ok(tonic::Response::new(stream))
    }
}

/// One message towards a watcher, boxed: a channel allocates its first block of 32 slots when
/// it is made, and a `WatchAgentResponse` (an agent record inline) is 488 bytes, so unboxed
/// every open watch would hold over 15 KiB of empty slots.
type WatchMessage = Box<Result<v1::WatchAgentResponse, Status>>;

async fn send_event(sender: &mpsc::Sender<WatchMessage>, event: v1::AgentEvent) -> Result<(), ()> {
    sender
        .send(Box::new(Ok(v1::WatchAgentResponse {
            kind: Some(watch_agent_response::Kind::Event(event)),
        })))
        .await
        .map_err(|_| ())
}

fn is_terminal_event(event: &flotilla_raft::DurableEvent) -> bool {
    matches!(&event.kind, flotilla_raft::EventKind::StatusChanged { to, .. } if to.is_terminal())
}

/// Output chunks buffered towards one attached client.
pub const ATTACH_BUFFER_MESSAGES: usize = 64;
/// Largest chunk read from a terminal at once.
pub const ATTACH_READ_BYTES: usize = 16 * 1024;

impl AgentApi {
    /// Serves an attach whose agent runs on this node.
    async fn attach_local(
        &self,
        agent: AgentId,
        epoch: Epoch,
        open: v1::AttachOpen,
        inbound: Streaming<v1::AttachRequest>,
    ) -> Result<AttachStream, Status> {
        let running = running_machine(agent, epoch)
            .await
            .ok_or_else(|| Status::failed_precondition(format!("agent {agent} has no machine on this node yet")))?;
        let terminal = chosen_terminal(agent, &open, &running)?;
        if open.takeover && !running.try_take_over() {
            return Err(Status::failed_precondition(format!(
                "agent {agent} is already taken over by another client; attach without take-over to watch"
            )));
        }
        let size = open.size.unwrap_or(v1::TerminalSize { rows: 24, cols: 80 });
        let session = match running
            .open_pty(terminal.as_deref(), !open.takeover, pty_size(size))
            .await
        {
            Ok(session) => Arc::new(session),
            Err(error) => {
                if open.takeover {
                    running.hand_back();
                }
                return Err(Status::failed_precondition(format!(
                    "cannot attach to agent {agent}: {error}"
                )));
            }
        };
        running.count_attached(true);
        let (sender, receiver) = mpsc::channel(ATTACH_BUFFER_MESSAGES);
        let mode = if open.takeover {
            "take-over: the agent waits until you release or detach"
        } else {
            "read-only"
        };
        let _ = sender
            .send(Ok(v1::AttachResponse {
                kind: Some(v1::attach_response::Kind::Notice(format!(
                    "attached to {} of agent {agent} on node {} ({mode})",
                    terminal.as_deref().unwrap_or(DEFAULT_TERMINAL_LABEL),
                    self.replica.node_id()
                ))),
            }))
            .await;
        let pump = spawn_output_pump(session.clone(), sender.clone());
        tokio::spawn(relay_client_input(
            AttachedClient {
                inbound,
                sender,
                controlling: open.takeover,
            },
            session,
            running,
            pump,
        ));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver)))
    }

    /// Passes an attach on to the node that runs the agent, with the caller's credentials.
    async fn attach_remote(
        &self,
        owner: u64,
        authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
        first: v1::AttachRequest,
        inbound: Streaming<v1::AttachRequest>,
    ) -> Result<AttachStream, Status> {
        let address = self
            .replica
            .reader()
            .read(|state| state.nodes.get(&owner).map(|node| node.info.grpc_address.clone()))
            .ok_or_else(|| Status::unavailable(format!("node {owner} that runs the agent is unknown")))?;
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{address}"))
            .and_then(|endpoint| endpoint.tls_config(self.node_tls.clone()))
            .map_err(|error| Status::internal(error.to_string()))?
            .connect()
            .await
            .map_err(|error| Status::unavailable(format!("cannot reach node {owner} at {address}: {error}")))?;
        let mut client = v1::agent_service_client::AgentServiceClient::new(channel);
        let outbound = futures::stream::once(async move { first })
            .chain(futures::StreamExt::filter_map(inbound, |message| async move {
                message.ok()
            }));
        let mut request = Request::new(outbound);
        if let Some(authorization) = authorization {
            request.metadata_mut().insert("authorization", authorization);
        }
        let response = client.attach(request).await?;
        Ok(Box::pin(response.into_inner()))
    }
}

/// How an attach without a terminal name is described.
pub const DEFAULT_TERMINAL_LABEL: &str = "the shell";

/// The terminal an attach asked for (`None`: the default one), if the machine has it.
fn chosen_terminal(agent: AgentId, open: &v1::AttachOpen, running: &RunningMachine) -> Result<Option<String>, Status> {
    if open.terminal.is_empty() {
        Ok(None)
    } else if running.terminals.contains(&open.terminal) {
        Ok(Some(open.terminal.clone()))
    } else {
        Err(Status::not_found(format!(
            "agent {agent} has no terminal {:?}; its terminals: {}",
            open.terminal,
            running.terminals.join(", ")
        )))
    }
}

/// A client's terminal size, within what a pty accepts.
fn pty_size(size: v1::TerminalSize) -> PtySize {
    PtySize {
        rows: size.rows.clamp(1, 1000) as u16,
        cols: size.cols.clamp(1, 1000) as u16,
    }
}

type AttachSender = mpsc::Sender<Result<v1::AttachResponse, Status>>;

/// Copies the terminal's output to the client until either side ends.
fn spawn_output_pump(session: Arc<PtySession>, output: AttachSender) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buffer = vec![0u8; ATTACH_READ_BYTES];
        loop {
            match session.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(count) => {
                    let message = v1::AttachResponse {
                        kind: Some(v1::attach_response::Kind::Output(buffer[..count].to_vec())),
                    };
                    if output.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// The client end of an attach: what it sends, where its answers go, and whether it types.
struct AttachedClient {
    inbound: Streaming<v1::AttachRequest>,
    sender: AttachSender,
    /// Taken over: its input goes to the terminal (until it releases).
    controlling: bool,
}

fn notice(text: &str) -> Result<v1::AttachResponse, Status> {
    Ok(v1::AttachResponse {
        kind: Some(v1::attach_response::Kind::Notice(text.to_string())),
    })
}

/// Passes the client's input, resizes and release to the terminal until the client goes; then
/// gives the machine back to the agent.
async fn relay_client_input(
    mut client: AttachedClient,
    session: Arc<PtySession>,
    running: Arc<RunningMachine>,
    pump: tokio::task::JoinHandle<()>,
) {
    loop {
        tokio::select! {
            message = client.inbound.message() => match message {
                Ok(Some(request)) => match request.kind {
                    Some(v1::attach_request::Kind::Input(bytes)) => {
                        if client.controlling {
                            if session.write_all(&bytes).await.is_err() {
                                break;
                            }
                        } else {
                            let _ = client
                                .sender
                                .try_send(notice("read-only: input ignored (attach with take-over to type)"));
                        }
                    }
                    Some(v1::attach_request::Kind::Resize(size)) => {
                        let _ = session.resize(pty_size(size));
                    }
                    Some(v1::attach_request::Kind::Release(true)) if client.controlling => {
                        client.controlling = false;
                        running.hand_back();
                        let _ = client
                            .sender
                            .try_send(notice("released: the agent goes on; you are watching read-only"));
                    }
                    _ => {}
                },
                Ok(None) | Err(_) => break,
            },
            _ = client.sender.closed() => break,
        }
    }
    if client.controlling {
        running.hand_back();
    }
    running.count_attached(false);
    pump.abort();
    drop(session);
}
