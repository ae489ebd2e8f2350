//! Secrets on this node: the cluster's key-encryption key (`DATA_DIR/kek`), the store that
//! opens replicated secrets for machines, for the node's own settings and for plugins, and the
//! `SecretService` API. Values are sealed on the node that receives them and opened only on the
//! node that uses them; the log, the store and snapshots hold sealed bytes only.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use anyhow::{anyhow, bail, Context};
use flotilla_actors::secrets::{Kek, MachineSecrets, Redactor, SecretValues};
use flotilla_proto::v1;
use flotilla_proto::v1::secret_service_server::SecretService;
use flotilla_raft::secrets::{validate_secret_name, MAX_SECRET_VALUE_BYTES};
use flotilla_raft::{AgentRecord, Command, Replica, Role, SecretScope};

use super::write_status;
use tonic::{Request, Response, Status};

use super::auth::{principal, Principal};

/// The cluster's key-encryption key as this node holds it: loaded at start, created by the
/// node that bootstraps the cluster, received in the `Join` answer by a node that joins.
#[derive(Clone, Default)]
pub struct NodeKek(Arc<OnceLock<Kek>>);

impl NodeKek {
    /// Loads `DATA_DIR/kek`; creates it when there is none and `create` (the node bootstraps).
    pub async fn open(data_dir: &Path, create: bool) -> anyhow::Result<NodeKek> {
        let dir = data_dir.to_path_buf();
        let kek = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Kek>> {
            if let Some(kek) = Kek::load(&dir)? {
                return Ok(Some(kek));
            }
            if !create {
                return Ok(None);
            }
            let kek = Kek::generate();
            kek.store(&dir)?;
            tracing::info!(kek = kek.id(), "created the cluster's key-encryption key");
            Ok(Some(kek))
        })
        .await
        .context("reading the key-encryption key")??;
        let cell = NodeKek::default();
        if let Some(kek) = kek {
            let _ = cell.0.set(kek);
        }
        Ok(cell)
    }

    pub fn get(&self) -> Option<&Kek> {
        self.0.get()
    }

    /// The key in hex for a `Join` answer; empty when this node holds none.
    pub fn hex(&self) -> String {
        self.get().map(Kek::to_hex).unwrap_or_default()
    }

    /// Takes the key a `Join` answer carried: kept in `DATA_DIR/kek` when this node has none;
    /// another key than the one held is an error (the data dir belongs to another cluster).
    pub async fn adopt(&self, data_dir: &Path, hex: &str) -> anyhow::Result<()> {
        if hex.is_empty() {
            return Ok(());
        }
        let kek =
            Kek::from_hex(hex).ok_or_else(|| anyhow!("the join answer carried a malformed key-encryption key"))?;
        if let Some(held) = self.get() {
            if held.id() != kek.id() {
                bail!(
                    "this node holds key-encryption key {} but the cluster's is {}: {} belongs to another cluster",
                    held.id(),
                    kek.id(),
                    data_dir.join(flotilla_actors::secrets::KEK_FILE).display()
                );
            }
            return Ok(());
        }
        let dir = data_dir.to_path_buf();
        let stored = kek.clone();
        tokio::task::spawn_blocking(move || stored.store(&dir))
            .await
            .context("storing the key-encryption key")??;
        let _ = self.0.set(kek);
        Ok(())
    }
}

/// Opens replicated secrets for this node: machines' team and user secrets, the node's own
/// (cluster scope, before `DATA_DIR/secrets/NAME`), and plugins' granted secrets.
pub struct NodeSecretStore {
    pub replica: Replica,
    pub kek: NodeKek,
    pub data_dir: PathBuf,
    /// Values of node-level secrets this node has used: redacted from agents' output.
    used: RwLock<Vec<(String, String)>>,
    /// Assumes the AWS role a team's secrets name, for its machines.
    aws: std::sync::Arc<super::aws::RoleAssumer>,
    /// The node-level secret files read at start, for log redaction.
    secret_files: RwLock<Vec<(String, String)>>,
}

impl NodeSecretStore {
    pub fn new(replica: Replica, kek: NodeKek, data_dir: PathBuf, aws: super::aws::SessionSettings) -> NodeSecretStore {
        NodeSecretStore {
            replica,
            kek,
            data_dir,
            used: RwLock::new(Vec::new()),
            aws: std::sync::Arc::new(super::aws::RoleAssumer::new(aws)),
            secret_files: RwLock::new(Vec::new()),
        }
    }

    pub(super) fn used_values(&self) -> Vec<(String, String)> {
        self.used.read().expect("secret list lock poisoned").clone()
    }

    pub(super) fn secret_files(&self) -> Vec<(String, String)> {
        self.secret_files.read().expect("secret list lock poisoned").clone()
    }

    pub(super) fn set_secret_files(&self, files: Vec<(String, String)>) {
        *self.secret_files.write().expect("secret list lock poisoned") = files;
    }

    /// Opens one replicated secret; `None` when there is none (or this node cannot open it,
    /// which is logged by name).
    fn open(&self, scope: &SecretScope, name: &str) -> Option<String> {
        let record = self
            .replica
            .reader()
            .read(|state| state.secrets.get(&(scope.clone(), name.to_string())).cloned())?;
        let Some(kek) = self.kek.get() else {
            tracing::warn!(secret = name, %scope, "this node holds no key-encryption key; the secret is not opened");
            return None;
        };
        match kek.open(scope, name, &record.sealed) {
            Ok(value) => Some(value),
            Err(error) => {
                tracing::warn!(%error, "a secret could not be opened");
                None
            }
        }
    }

    /// A node-level secret: the cluster-scope replicated secret when there is one, else the
    /// file `DATA_DIR/secrets/NAME`. Reads a file: call where blocking is allowed.
    pub fn node_secret(&self, name: &str) -> Option<String> {
        let value = self
            .open(&SecretScope::Cluster, name)
            .or_else(|| super::runtime::read_secret(&self.data_dir, name))?;
        let added = {
            let mut used = self.used.write().expect("secret list lock poisoned");
            let added = !used.iter().any(|(known, _)| known == name);
            if added {
                used.push((name.to_string(), value.clone()));
            }
            added
        };
        if added {
            super::known_secrets::refresh(self);
        }
        Some(value)
    }

    /// Whether plugin `plugin` may read secret `name`: the admin named it in the plugin's
    /// settings (`token-secret`, or the comma-separated `secrets`), or, with no `token-secret`
    /// set, it is the provider's conventional `PLUGIN-token`.
    fn granted(&self, plugin: &str, name: &str) -> bool {
        self.replica.reader().read(|state| {
            let settings = state.plugin_settings.get(plugin);
            let setting = |key: &str| {
                settings
                    .and_then(|settings| settings.get(key))
                    .filter(|value| !value.is_empty())
            };
            match setting("token-secret") {
                Some(token) if token == name => return true,
                None if name == format!("{plugin}-token") => return true,
                _ => {}
            }
            setting("secrets").is_some_and(|list| list.split(',').any(|granted| granted.trim() == name))
        })
    }
}

#[async_trait::async_trait]
impl MachineSecrets for NodeSecretStore {
    fn for_agent(&self, agent: &AgentRecord) -> Result<SecretValues, String> {
        let team = agent.spec.team.clone();
        let user = agent.spec.user.clone();
        let records = self.replica.reader().read(|state| {
            let team_scope = SecretScope::Team { team: team.clone() };
            let user_scope = SecretScope::User {
                team: team.clone(),
                user: user.clone(),
            };
            let mut records: Vec<_> = state
                .secrets
                .values()
                .filter(|record| record.scope == team_scope)
                .cloned()
                .collect();
            if !user.is_empty() {
                records.extend(
                    state
                        .secrets
                        .values()
                        .filter(|record| record.scope == user_scope)
                        .cloned(),
                );
            }
            records
        });
        if records.is_empty() {
            return Ok(SecretValues::default());
        }
        let kek = self
            .kek
            .get()
            .ok_or_else(|| "this node holds no key-encryption key (DATA_DIR/kek)".to_string())?;
        let mut values = Vec::with_capacity(records.len());
        for record in records {
            let value = kek
                .open(&record.scope, &record.name, &record.sealed)
                .map_err(|error| error.to_string())?;
            values.push((record.name, value));
        }
        Ok(SecretValues {
            values,
            ..SecretValues::default()
        })
    }

    fn node_values(&self) -> Vec<(String, String)> {
        self.used_values()
    }

    fn known_redactor(&self) -> Redactor {
        (*crate::log_redact::known()).clone()
    }

    async fn run_credentials(&self, agent: &AgentRecord, secrets: &SecretValues) -> Result<SecretValues, String> {
        let Some(role_arn) = super::aws::role_arn(secrets) else {
            return Ok(SecretValues::default());
        };
        let kek = self
            .kek
            .get()
            .ok_or_else(|| "this node holds no key-encryption key (DATA_DIR/kek)".to_string())?;
        let external_id = super::aws::external_id(kek, &agent.spec.team);
        let session_name = format!("flotilla-{}", agent.id);
        self.aws
            .assume(&role_arn, &external_id, &session_name)
            .await
            .map_err(|error| error.to_string())
    }
}

impl flotilla_plugins::SecretSource for NodeSecretStore {
    fn secret(&self, plugin: &str, name: &str) -> Option<String> {
        if !self.granted(plugin, name) {
            tracing::warn!(
                plugin,
                secret = name,
                "a plugin asked for a secret its settings do not grant"
            );
            return None;
        }
        self.node_secret(name)
    }
}

/// Who may set, remove and list secrets of `scope`: the one place the rule lives. Cluster
/// secrets: cluster admins. Team secrets: the team's admins and cluster admins. User secrets:
/// that user, unless a viewer.
pub fn can_manage_secrets(principal: &Principal, scope: &SecretScope) -> Result<(), Status> {
    let cluster_admin = principal.role == Role::ClusterAdmin;
    let allowed = match scope {
        SecretScope::Cluster => cluster_admin,
        SecretScope::Team { team } => cluster_admin || (principal.role == Role::Admin && principal.team == *team),
        // A viewer reads only: it keeps no secrets of its own either.
        SecretScope::User { team, user } => {
            principal.role != Role::Viewer && principal.team == *team && principal.user == *user
        }
    };
    if allowed {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "key {} (user {:?}, team {:?}) may not manage {scope} secrets",
            principal.key_id, principal.user, principal.team
        )))
    }
}

/// The team a secret of `scope` belongs to, for the audit log.
fn scope_team(scope: &SecretScope) -> Option<&str> {
    match scope {
        SecretScope::Cluster => None,
        SecretScope::Team { team } | SecretScope::User { team, .. } => Some(team),
    }
}

/// Whether `principal` sees a secret of `scope` in a list.
fn can_see(principal: &Principal, scope: &SecretScope) -> bool {
    match scope {
        SecretScope::Team { team } => principal.team == *team || can_manage_secrets(principal, scope).is_ok(),
        _ => can_manage_secrets(principal, scope).is_ok(),
    }
}

fn requested_scope(principal: &Principal, kind: i32, team: &str) -> Result<SecretScope, Status> {
    let team = if team.is_empty() {
        principal.team.clone()
    } else {
        team.to_string()
    };
    match v1::SecretScopeKind::try_from(kind) {
        Ok(v1::SecretScopeKind::Unspecified | v1::SecretScopeKind::Team) => Ok(SecretScope::Team { team }),
        Ok(v1::SecretScopeKind::User) => Ok(SecretScope::User {
            team: principal.team.clone(),
            user: principal.user.clone(),
        }),
        Ok(v1::SecretScopeKind::Cluster) => Ok(SecretScope::Cluster),
        Err(_) => Err(Status::invalid_argument(format!("scope {kind} is not a secret scope"))),
    }
}

pub struct SecretApi {
    pub replica: Replica,
    pub kek: NodeKek,
}

#[tonic::async_trait]
impl SecretService for SecretApi {
    async fn set_secret(&self, request: Request<v1::SetSecretRequest>) -> Result<Response<v1::SecretInfo>, Status> {
        let caller = principal(&request)?;
        let audit_note = super::audit::note_of(&request);
        let body = request.into_inner();
        let scope = requested_scope(&caller, body.scope, &body.team)?;
        // The secret's name and scope, never its value.
        audit_note.set(format!("{scope}/{}", body.name), scope_team(&scope));
        can_manage_secrets(&caller, &scope)?;
        validate_secret_name(&scope, &body.name).map_err(Status::invalid_argument)?;
        if body.value.is_empty() || body.value.len() > MAX_SECRET_VALUE_BYTES {
            return Err(Status::invalid_argument(format!(
                "secret value is {} bytes; it must be between 1 and {MAX_SECRET_VALUE_BYTES}",
                body.value.len()
            )));
        }
        if std::str::from_utf8(&body.value).is_err() {
            return Err(Status::invalid_argument("secret value is not UTF-8 text"));
        }
        let kek = self.kek.get().ok_or_else(|| {
            Status::unavailable("this node holds no key-encryption key yet (it has not joined); try another node")
        })?;
        let sealed = kek.seal(&scope, &body.name, &body.value);
        self.replica
            .write(Command::SetSecret {
                scope: scope.clone(),
                name: body.name.clone(),
                sealed,
                by: caller.user.clone(),
            })
            .await
            .map_err(write_status)?;
        let updated_at_ms = self.replica.reader().read(|state| {
            state
                .secrets
                .get(&(scope.clone(), body.name.clone()))
                .map_or(0, |record| record.updated_at_ms)
        });
        Ok(Response::new(v1::SecretInfo {
            name: body.name,
            scope: scope.to_string(),
            updated_at_ms,
            updated_by: caller.user,
        }))
    }

    async fn remove_secret(
        &self,
        request: Request<v1::RemoveSecretRequest>,
    ) -> Result<Response<v1::RemoveSecretResponse>, Status> {
        let caller = principal(&request)?;
        let audit_note = super::audit::note_of(&request);
        let body = request.into_inner();
        let scope = requested_scope(&caller, body.scope, &body.team)?;
        // The secret's name and scope, never its value.
        audit_note.set(format!("{scope}/{}", body.name), scope_team(&scope));
        can_manage_secrets(&caller, &scope)?;
        self.replica
            .write(Command::RemoveSecret { scope, name: body.name })
            .await
            .map_err(write_status)?;
        Ok(Response::new(v1::RemoveSecretResponse {}))
    }

    async fn list_secrets(
        &self,
        request: Request<v1::ListSecretsRequest>,
    ) -> Result<Response<v1::ListSecretsResponse>, Status> {
        let caller = principal(&request)?;
        let secrets = self.replica.reader().read(|state| {
            state
                .secrets
                .values()
                .filter(|record| can_see(&caller, &record.scope))
                .map(|record| v1::SecretInfo {
                    name: record.name.clone(),
                    scope: record.scope.to_string(),
                    updated_at_ms: record.updated_at_ms,
                    updated_by: record.updated_by.clone(),
                })
                .collect()
        });
        Ok(Response::new(v1::ListSecretsResponse { secrets }))
    }
}
