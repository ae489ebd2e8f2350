//! Authorization: which role may call which method, in one table. The [`super::auth`] wrapper
//! looks every call's method up here before the service sees it; a method without an entry is
//! refused, so a new RPC fails closed until it is given a rule. Team scoping (a key sees its own
//! team's agents only) needs the record, so the services do it with [`Principal::sees_team`],
//! answering NOT_FOUND exactly as for an unknown id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use flotilla_raft::{Role, DEFAULT_TEAM};
use tonic::Status;

/// What a method needs from the caller's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    /// Any valid key (who am I).
    AnyKey,
    /// Read the caller's team's agents: viewer and up.
    ReadAgents,
    /// Create and drive the caller's team's agents: member and up.
    WriteAgents,
    /// Manage keys: a team admin its own team's (checked by the service), the cluster admin all.
    ManageKeys,
    /// Teams, nodes, membership and plugins: the cluster-admin key only.
    ClusterAdmin,
    /// Change a team's settings: a team admin its own team's (checked by the service), the
    /// cluster admin every team's.
    ManageSettings,
}

impl Permission {
    fn needs(self) -> &'static str {
        match self {
            Permission::AnyKey => "any key",
            Permission::ReadAgents => "role viewer, member, admin or cluster-admin",
            Permission::WriteAgents => "role member, admin or cluster-admin",
            Permission::ManageKeys => "role admin or cluster-admin",
            Permission::ClusterAdmin => "role cluster-admin",
            Permission::ManageSettings => "role admin or cluster-admin",
        }
    }
}

/// Every public method and what it needs. Keep in step with the services: a test checks that
/// every method of every `flotilla.v1` service has exactly one entry.
pub const METHOD_PERMISSIONS: &[(&str, Permission)] = &[
    ("/flotilla.v1.AgentService/CreateAgent", Permission::WriteAgents),
    ("/flotilla.v1.AgentService/GetAgent", Permission::ReadAgents),
    ("/flotilla.v1.AgentService/ListAgents", Permission::ReadAgents),
    ("/flotilla.v1.AgentService/WatchAgent", Permission::ReadAgents),
    ("/flotilla.v1.AgentService/SendFollowUp", Permission::WriteAgents),
    ("/flotilla.v1.AgentService/StopAgent", Permission::WriteAgents),
    // Attaching can type into the agent's terminal and pause its turns.
    ("/flotilla.v1.AgentService/Attach", Permission::WriteAgents),
    ("/flotilla.v1.ClusterService/GetCluster", Permission::ClusterAdmin),
    ("/flotilla.v1.ClusterService/AddNode", Permission::ClusterAdmin),
    ("/flotilla.v1.ClusterService/RemoveNode", Permission::ClusterAdmin),
    ("/flotilla.v1.ClusterService/DrainNode", Permission::ClusterAdmin),
    ("/flotilla.v1.ClusterService/CreateJoinToken", Permission::ClusterAdmin),
    ("/flotilla.v1.AdminService/UploadPlugin", Permission::ClusterAdmin),
    ("/flotilla.v1.AdminService/ListPlugins", Permission::ClusterAdmin),
    ("/flotilla.v1.AdminService/EnablePlugin", Permission::ClusterAdmin),
    ("/flotilla.v1.AdminService/DisablePlugin", Permission::ClusterAdmin),
    ("/flotilla.v1.AdminService/RemovePlugin", Permission::ClusterAdmin),
    ("/flotilla.v1.AdminService/GrantHosts", Permission::ClusterAdmin),
    ("/flotilla.v1.AdminService/ConfigurePlugin", Permission::ClusterAdmin),
    // The whole state: every team's agents, key digests and sealed secrets.
    ("/flotilla.v1.AdminService/Backup", Permission::ClusterAdmin),
    ("/flotilla.v1.AccessService/CreateTeam", Permission::ClusterAdmin),
    ("/flotilla.v1.AccessService/ListTeams", Permission::ClusterAdmin),
    ("/flotilla.v1.AccessService/CreateKey", Permission::ManageKeys),
    ("/flotilla.v1.AccessService/ListKeys", Permission::ManageKeys),
    ("/flotilla.v1.AccessService/GetKeyInfo", Permission::AnyKey),
    ("/flotilla.v1.AccessService/RevokeKey", Permission::ManageKeys),
    // The team is checked by the method: another team answers NOT_FOUND.
    ("/flotilla.v1.AccessService/GetTeam", Permission::ManageKeys),
    // Scopes are checked by the secret service itself (`secrets::can_manage_secrets`).
    ("/flotilla.v1.SecretService/SetSecret", Permission::WriteAgents),
    ("/flotilla.v1.SecretService/RemoveSecret", Permission::WriteAgents),
    ("/flotilla.v1.SecretService/ListSecrets", Permission::ReadAgents),
    ("/flotilla.v1.AgentService/DeleteAgent", Permission::WriteAgents),
    ("/flotilla.v1.SettingsService/GetSettings", Permission::ReadAgents),
    ("/flotilla.v1.SettingsService/SetSetting", Permission::ManageSettings),
    ("/flotilla.v1.SettingsService/ListModels", Permission::ReadAgents),
    // A team admin reads its own team's entries (checked by the service), the cluster admin all.
    ("/flotilla.v1.AuditService/ListAuditEvents", Permission::ManageKeys),
    // A team's keys read their own team's limits; only the cluster admin sets them.
    ("/flotilla.v1.LimitsService/GetTeamLimits", Permission::ReadAgents),
    ("/flotilla.v1.LimitsService/SetTeamLimits", Permission::ClusterAdmin),
];

/// What `path` (`/package.Service/Method`) needs; `None` for a method without a rule.
pub fn permission_of(path: &str) -> Option<Permission> {
    METHOD_PERMISSIONS
        .iter()
        .find(|(method, _)| *method == path)
        .map(|(_, permission)| *permission)
}

/// Whether `role` holds `permission` (team scoping aside).
pub fn role_allows(role: Role, permission: Permission) -> bool {
    match role {
        Role::ClusterAdmin => true,
        Role::Admin => permission != Permission::ClusterAdmin,
        Role::Member => matches!(
            permission,
            Permission::AnyKey | Permission::ReadAgents | Permission::WriteAgents
        ),
        Role::Viewer => matches!(permission, Permission::AnyKey | Permission::ReadAgents),
    }
}

/// Who is calling, attached to each authenticated request. The identity later features (audit,
/// secrets, settings) key on: the team and user own what the call creates; the key id names the
/// key in audit entries and quotas without revealing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub key_id: String,
    pub team: String,
    pub user: String,
    pub role: Role,
    pub expires_at_ms: Option<u64>,
}

impl Principal {
    /// Whether the caller may see what belongs to `team` (an empty team is the default team,
    /// which agents created before teams existed belong to).
    pub fn sees_team(&self, team: &str) -> bool {
        self.role == Role::ClusterAdmin || self.team == owning_team(team)
    }

    /// Whether the caller changes the settings of `team`.
    pub fn manages_settings_of(&self, team: &str) -> bool {
        self.manages_keys_of(team)
    }

    /// Whether summaries and diffs of `team`'s agents are hidden from the caller: the team
    /// turned `display_summary` off and the caller is not its admin or the cluster admin.
    pub fn summary_hidden(&self, team: &str, settings: &flotilla_raft::TeamSettings) -> bool {
        !settings.display_summary && !self.manages_settings_of(owning_team(team))
    }

    /// Whether the caller manages the keys of `team`.
    pub fn manages_keys_of(&self, team: &str) -> bool {
        self.role == Role::ClusterAdmin || (self.role == Role::Admin && self.team == team)
    }
}

/// The team a record with `team` belongs to.
pub fn owning_team(team: &str) -> &str {
    if team.is_empty() {
        DEFAULT_TEAM
    } else {
        team
    }
}

/// Refuses a call `principal` may not make; `path` is the gRPC method.
pub fn authorize(principal: &Principal, path: &str) -> Result<(), Status> {
    let permission = permission_of(path).ok_or_else(|| {
        Status::permission_denied(format!(
            "method {path} has no authorization rule on this node; it is refused for every key"
        ))
    })?;
    if role_allows(principal.role, permission) {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "key {} (user {}, team {}) has role {}; {path} needs {}",
        principal.key_id,
        principal.user,
        principal.team,
        principal.role,
        permission.needs()
    )))
}

/// Most watches one key holds open at once on one node.
pub const MAX_WATCHES_PER_KEY: usize = 32;

/// Watch streams open on this node (one per `WatchAgent` call being served).
pub const WATCHERS: &str = "flotilla_watchers";

/// Open watches per key on this node. Entries go when their count reaches zero, so the map
/// holds at most one entry per key with a watch open.
#[derive(Clone, Default)]
pub struct WatchQuota {
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open watch; dropping it gives the slot back.
pub struct WatchPermit {
    quota: WatchQuota,
    key_id: String,
}

impl WatchQuota {
    pub fn acquire(&self, principal: &Principal) -> Result<WatchPermit, Status> {
        let mut open = self.open.lock().expect("watch quota lock poisoned");
        let count = open.entry(principal.key_id.clone()).or_default();
        if *count >= MAX_WATCHES_PER_KEY {
            return Err(Status::resource_exhausted(format!(
                "key {} has {MAX_WATCHES_PER_KEY} watches open on this node, the most one key may hold; close one first",
                principal.key_id
            )));
        }
        *count += 1;
        ::metrics::gauge!(WATCHERS).increment(1.0);
        Ok(WatchPermit {
            quota: self.clone(),
            key_id: principal.key_id.clone(),
        })
    }

    #[cfg(test)]
    fn open_for(&self, key_id: &str) -> usize {
        self.open
            .lock()
            .expect("watch quota lock poisoned")
            .get(key_id)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        ::metrics::gauge!(WATCHERS).decrement(1.0);
        let mut open = self.quota.open.lock().expect("watch quota lock poisoned");
        if let Some(count) = open.get_mut(&self.key_id) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn principal(role: Role, team: &str) -> Principal {
        Principal {
            key_id: "key_1".to_string(),
            team: team.to_string(),
            user: "ana".to_string(),
            role,
            expires_at_ms: None,
        }
    }

    /// Every method of every public service, from the descriptors the server is built from.
    fn public_methods() -> Vec<String> {
        let set = prost_types::FileDescriptorSet::decode(flotilla_proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set decodes");
        let mut methods = Vec::new();
        for file in set.file.iter().filter(|file| file.package() == "flotilla.v1") {
            for service in &file.service {
                for method in &service.method {
                    methods.push(format!("/flotilla.v1.{}/{}", service.name(), method.name()));
                }
            }
        }
        methods
    }

    #[test]
    fn every_public_method_has_exactly_one_rule() {
        let methods = public_methods();
        assert!(methods.len() >= 20, "found only {methods:?}");
        for method in &methods {
            let rules = METHOD_PERMISSIONS.iter().filter(|(path, _)| path == method).count();
            assert_eq!(rules, 1, "{method} has {rules} authorization rules, wanted exactly one");
        }
        for (path, _) in METHOD_PERMISSIONS {
            assert!(
                methods.contains(&path.to_string()),
                "rule for {path}, which no service has"
            );
        }
    }

    #[test]
    fn a_method_without_a_rule_is_refused_even_to_the_cluster_admin() {
        let error = authorize(
            &principal(Role::ClusterAdmin, DEFAULT_TEAM),
            "/flotilla.v1.AgentService/New",
        )
        .expect_err("no rule");
        assert_eq!(error.code(), tonic::Code::PermissionDenied);
        assert!(error.message().contains("no authorization rule"), "{}", error.message());
    }

    #[test]
    fn roles_grant_what_the_table_says() {
        use Permission::*;
        let expected = [
            (Role::Viewer, [true, true, false, false, false, false]),
            (Role::Member, [true, true, true, false, false, false]),
            (Role::Admin, [true, true, true, true, false, true]),
            (Role::ClusterAdmin, [true, true, true, true, true, true]),
        ];
        for (role, grants) in expected {
            for (permission, granted) in [
                AnyKey,
                ReadAgents,
                WriteAgents,
                ManageKeys,
                ClusterAdmin,
                ManageSettings,
            ]
            .into_iter()
            .zip(grants)
            {
                assert_eq!(role_allows(role, permission), granted, "{role} {permission:?}");
            }
        }
        let viewer = principal(Role::Viewer, "red");
        let denied = authorize(&viewer, "/flotilla.v1.AgentService/StopAgent").expect_err("viewer write");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("has role viewer"), "{}", denied.message());
        authorize(&viewer, "/flotilla.v1.AgentService/GetAgent").expect("viewer read");
    }

    #[test]
    fn teams_see_their_own_agents_and_the_cluster_admin_sees_all() {
        let red = principal(Role::Admin, "red");
        assert!(red.sees_team("red"));
        assert!(!red.sees_team("blue"));
        assert!(!red.sees_team(""));
        assert!(principal(Role::Viewer, DEFAULT_TEAM).sees_team(""));
        assert!(principal(Role::ClusterAdmin, DEFAULT_TEAM).sees_team("blue"));
        assert!(red.manages_keys_of("red"));
        assert!(!red.manages_keys_of("blue"));
        assert!(!principal(Role::Member, "red").manages_keys_of("red"));
    }

    #[test]
    fn watches_per_key_are_capped_and_given_back() {
        let quota = WatchQuota::default();
        let caller = principal(Role::Viewer, "red");
        let permits: Vec<WatchPermit> = (0..MAX_WATCHES_PER_KEY)
            .map(|_| quota.acquire(&caller).expect("under the cap"))
            .collect();
        let refused = quota.acquire(&caller).err().expect("over the cap");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        drop(permits);
        assert_eq!(quota.open_for("key_1"), 0);
        quota.acquire(&caller).expect("slots given back");
    }
}
