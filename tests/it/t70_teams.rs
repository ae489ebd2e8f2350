//! Teams, users and keys on one node: two teams, every role, every public method called by
//! every kind of key (the table below covers each method the descriptors name), another team's
//! agent answering exactly as an unknown id, keys made, listed, revoked and expired through the
//! CLI and the API.

use std::time::{Duration, Instant};

use flotilla_proto::v1;
use flotilla_proto::v1::access_service_client::AccessServiceClient;
use flotilla_proto::v1::settings_service_client::SettingsServiceClient;
use flotilla_tests::{
    admin_client, agent_client, cluster_client, run_cli, wait_for, BearerAuth, ClusterOptions, TestCluster,
};
use prost::Message as _;
use tonic::Code;

use crate::common::{cli, cli_key, create, DEADLINE};

pub(crate) type SettingsClient =
    SettingsServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerAuth>>;
type AccessClient =
    AccessServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerAuth>>;

/// A revoked or expired key is refused on its next call within this bound.
const REFUSAL_BOUND: Duration = Duration::from_secs(1);
/// Lifetime of the key that expires in this test.
const SHORT_LIFETIME_SECONDS: u64 = 3;

pub(crate) fn settings_client(endpoint: &str, key: &str) -> SettingsClient {
    SettingsServiceClient::with_interceptor(flotilla_tests::channel(endpoint), BearerAuth::new(key))
}

type AuditClient = flotilla_proto::v1::audit_service_client::AuditServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerAuth>,
>;
type LimitsClient = flotilla_proto::v1::limits_service_client::LimitsServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerAuth>,
>;

fn audit_and_limits_clients(endpoint: &str, key: &str) -> (AuditClient, LimitsClient) {
    let channel = flotilla_tests::channel(endpoint);
    (
        flotilla_proto::v1::audit_service_client::AuditServiceClient::with_interceptor(
            channel.clone(),
            BearerAuth::new(key),
        ),
        flotilla_proto::v1::limits_service_client::LimitsServiceClient::with_interceptor(channel, BearerAuth::new(key)),
    )
}

fn access_client(endpoint: &str, key: &str) -> AccessClient {
    AccessServiceClient::with_interceptor(flotilla_tests::channel(endpoint), BearerAuth::new(key))
}

/// What a call must answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Anything but UNAUTHENTICATED, PERMISSION_DENIED or NOT_FOUND of the agent.
    Allowed,
    Denied,
    /// NOT_FOUND with the message an unknown id gets.
    Hidden,
}

/// The keys of the test, by what they are.
struct Keys {
    red_admin: String,
    red_member: String,
    red_viewer: String,
    blue_member: String,
}

/// Calls `method` with `key`, aimed at `agent` where it takes an agent; the status it answered
/// (`Ok` as OK). Every method of every public service must have an arm: an unknown one panics.
async fn call(endpoint: &str, key: &str, method: &str, agent: &str) -> Result<(), tonic::Status> {
    let mut agents = agent_client(endpoint, key).await;
    let mut cluster = cluster_client(endpoint, key).await;
    let mut admin = admin_client(endpoint, key).await;
    let mut access = access_client(endpoint, key);
    let mut secrets = flotilla_proto::v1::secret_service_client::SecretServiceClient::with_interceptor(
        flotilla_tests::channel(endpoint),
        BearerAuth::new(key),
    );
    let mut settings = settings_client(endpoint, key);
    let (mut audit, mut limits) = audit_and_limits_clients(endpoint, key);
    let id = agent.to_string();
    let plugin = || v1::PluginRef {
        name: "git".to_string(),
        version: "9.9.9".to_string(),
    };
    match method {
        "AgentService/CreateAgent" => agents
            .create_agent(crate::common::create_request("t70", "a table row"))
            .await
            .map(drop),
        "AgentService/GetAgent" => agents.get_agent(v1::GetAgentRequest { id }).await.map(drop),
        "AgentService/ListAgents" => agents.list_agents(v1::ListAgentsRequest::default()).await.map(drop),
        "AgentService/WatchAgent" => agents
            .watch_agent(v1::WatchAgentRequest { id, after_sequence: 0 })
            .await
            .map(drop),
        "AgentService/SendFollowUp" => agents
            .send_follow_up(v1::SendFollowUpRequest {
                id,
                text: "and the tests".to_string(),
            })
            .await
            .map(drop),
        "AgentService/StopAgent" => agents
            .stop_agent(v1::StopAgentRequest {
                id,
                reason: String::new(),
            })
            .await
            .map(drop),
        "AgentService/Attach" => {
            let open = v1::AttachRequest {
                kind: Some(v1::attach_request::Kind::Open(v1::AttachOpen {
                    agent_id: id,
                    ..Default::default()
                })),
            };
            agents.attach(tokio_stream::iter(vec![open])).await.map(drop)
        }
        "ClusterService/GetCluster" => cluster.get_cluster(v1::GetClusterRequest {}).await.map(drop),
        "ClusterService/AddNode" => cluster
            .add_node(v1::AddNodeRequest {
                node_id: 99,
                voter: false,
            })
            .await
            .map(drop),
        "ClusterService/RemoveNode" => cluster
            .remove_node(v1::RemoveNodeRequest { node_id: 99 })
            .await
            .map(drop),
        // Aimed at the red team's secrets.
        "SecretService/SetSecret" => secrets
            .set_secret(v1::SetSecretRequest {
                name: "T70_RED".to_string(),
                value: b"red-value-for-t70".to_vec(),
                scope: v1::SecretScopeKind::Team as i32,
                team: "red".to_string(),
            })
            .await
            .map(drop),
        "SecretService/RemoveSecret" => secrets
            .remove_secret(v1::RemoveSecretRequest {
                name: "T70_RED".to_string(),
                scope: v1::SecretScopeKind::Team as i32,
                team: "red".to_string(),
            })
            .await
            .map(drop),
        "SecretService/ListSecrets" => secrets.list_secrets(v1::ListSecretsRequest {}).await.map(drop),
        "ClusterService/CreateJoinToken" => cluster
            .create_join_token(v1::CreateJoinTokenRequest { expires_in_seconds: 60 })
            .await
            .map(drop),
        "ClusterService/DrainNode" => cluster
            .drain_node(v1::DrainNodeRequest {
                node_id: 99,
                drain: false,
            })
            .await
            .map(drop),
        "AdminService/UploadPlugin" => admin
            .upload_plugin(tokio_stream::iter(Vec::<v1::UploadPluginRequest>::new()))
            .await
            .map(drop),
        "AdminService/ListPlugins" => admin.list_plugins(v1::ListPluginsRequest::default()).await.map(drop),
        "AdminService/EnablePlugin" => admin.enable_plugin(plugin()).await.map(drop),
        "AdminService/DisablePlugin" => admin.disable_plugin(plugin()).await.map(drop),
        "AdminService/RemovePlugin" => admin.remove_plugin(plugin()).await.map(drop),
        "AdminService/GrantHosts" => admin.grant_hosts(v1::GrantHostsRequest::default()).await.map(drop),
        "AdminService/Backup" => admin.backup(v1::BackupRequest {}).await.map(drop),
        "AdminService/ConfigurePlugin" => admin
            .configure_plugin(v1::ConfigurePluginRequest::default())
            .await
            .map(drop),
        "AccessService/CreateTeam" => access
            .create_team(v1::CreateTeamRequest {
                name: "green".to_string(),
            })
            .await
            .map(drop),
        "AccessService/ListTeams" => access.list_teams(v1::ListTeamsRequest {}).await.map(drop),
        "AccessService/GetTeam" => access
            .get_team(v1::GetTeamRequest {
                name: "red".to_string(),
            })
            .await
            .map(drop),
        "AccessService/CreateKey" => access
            .create_key(v1::CreateKeyRequest {
                team: "red".to_string(),
                user: "table".to_string(),
                role: "viewer".to_string(),
                expires_in_seconds: 0,
            })
            .await
            .map(drop),
        "AccessService/ListKeys" => access.list_keys(v1::ListKeysRequest::default()).await.map(drop),
        "AccessService/GetKeyInfo" => access.get_key_info(v1::GetKeyInfoRequest {}).await.map(drop),
        "AccessService/RevokeKey" => access
            .revoke_key(v1::RevokeKeyRequest {
                id: "key_00000000000000000000".to_string(),
            })
            .await
            .map(drop),
        "AgentService/DeleteAgent" => agents.delete_agent(v1::DeleteAgentRequest { id }).await.map(drop),
        "SettingsService/GetSettings" => settings.get_settings(v1::GetSettingsRequest::default()).await.map(drop),
        "SettingsService/SetSetting" => settings
            .set_setting(v1::SetSettingRequest {
                team: String::new(),
                name: "display_summary".to_string(),
                value: "on".to_string(),
            })
            .await
            .map(drop),
        "SettingsService/ListModels" => settings.list_models(v1::ListModelsRequest::default()).await.map(drop),
        "AuditService/ListAuditEvents" => audit
            .list_audit_events(v1::ListAuditEventsRequest::default())
            .await
            .map(drop),
        "LimitsService/GetTeamLimits" => limits
            .get_team_limits(v1::GetTeamLimitsRequest::default())
            .await
            .map(drop),
        "LimitsService/SetTeamLimits" => limits
            .set_team_limits(v1::SetTeamLimitsRequest {
                team: "red".to_string(),
                max_running_agents: 100,
                ..Default::default()
            })
            .await
            .map(drop),
        other => panic!("no row for method {other}: add it to the table of t70"),
    }
}

/// Every method of every public service, as `Service/Method`.
fn public_methods() -> Vec<String> {
    let set = prost_types::FileDescriptorSet::decode(flotilla_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    set.file
        .iter()
        .filter(|file| file.package() == "flotilla.v1")
        .flat_map(|file| {
            file.service.iter().flat_map(|service| {
                service
                    .method
                    .iter()
                    .map(move |method| format!("{}/{}", service.name(), method.name()))
            })
        })
        .collect()
}

/// What `who` ("red-admin", "red-member", "red-viewer", "blue-member") must get from `method`
/// aimed at a red agent.
fn expected(who: &str, method: &str) -> Expect {
    let (service, name) = method.split_once('/').expect("Service/Method");
    let writer = who != "red-viewer";
    match service {
        "AgentService" => {
            let on_agent = !matches!(name, "CreateAgent" | "ListAgents");
            let writes = matches!(
                name,
                "CreateAgent" | "SendFollowUp" | "StopAgent" | "Attach" | "DeleteAgent"
            );
            if writes && !writer {
                Expect::Denied
            } else if on_agent && who == "blue-member" {
                Expect::Hidden
            } else {
                Expect::Allowed
            }
        }
        // Team secrets are the team admins'; anyone who reads agents lists what they may see.
        "SecretService" => match name {
            "ListSecrets" => Expect::Allowed,
            _ if who == "red-admin" => Expect::Allowed,
            _ => Expect::Denied,
        },
        // Each key reads its own team's settings and models; its admin changes the settings.
        "SettingsService" => match name {
            "SetSetting" if who != "red-admin" => Expect::Denied,
            _ => Expect::Allowed,
        },
        "AccessService" => match name {
            "GetKeyInfo" => Expect::Allowed,
            "CreateKey" | "ListKeys" | "RevokeKey" | "GetTeam" if who == "red-admin" => Expect::Allowed,
            _ => Expect::Denied,
        },
        // A team admin reads its own team's audit entries.
        "AuditService" if who == "red-admin" => Expect::Allowed,
        // Every key reads its own team's limits; only the cluster admin sets them.
        "LimitsService" if name == "GetTeamLimits" => Expect::Allowed,
        // Nodes, membership, plugins and limits: the cluster-admin key only.
        _ => Expect::Denied,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_answers_each_role_and_team_as_the_table_says() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let endpoint = cluster.nodes[0].endpoint();
    let root = cluster.admin_token();
    let keys = make_teams_and_keys(&endpoint, &root);

    let red_agent = create(
        &mut agent_client(&endpoint, &keys.red_member).await,
        "red-1",
        "red work",
    )
    .await;
    assert_eq!(red_agent.team, "red");
    assert_eq!(red_agent.user, "rita");
    let blue_agent = create(
        &mut agent_client(&endpoint, &keys.blue_member).await,
        "blue-1",
        "blue work",
    )
    .await;
    assert_eq!(blue_agent.team, "blue");
    check_lists_hold_one_team(&endpoint, &keys, &root, &red_agent, &blue_agent).await;

    let unknown = "01ARZ3NDEKTSV4RRFFQ69G5FAV".to_string();
    let unknown_message = agent_client(&endpoint, &keys.blue_member)
        .await
        .get_agent(v1::GetAgentRequest { id: unknown.clone() })
        .await
        .expect_err("an unknown id")
        .message()
        .replace(&unknown, &red_agent.id);

    let mut methods = public_methods();
    assert!(methods.len() >= 28, "{methods:?}");
    // Stopping, then deleting, last keeps the agent for the other rows.
    methods.sort_by_key(|method| (method.ends_with("/DeleteAgent"), method.ends_with("/StopAgent")));
    let principals = [
        ("red-admin", &keys.red_admin),
        ("red-member", &keys.red_member),
        ("red-viewer", &keys.red_viewer),
        ("blue-member", &keys.blue_member),
    ];
    let mut rows = 0;
    for method in &methods {
        for (who, key) in principals {
            let answer = call(&endpoint, key, method, &red_agent.id).await;
            let want = expected(who, method);
            let code = answer.as_ref().err().map(|status| status.code());
            match want {
                Expect::Allowed => assert!(
                    !matches!(
                        code,
                        Some(Code::Unauthenticated | Code::PermissionDenied | Code::NotFound)
                    ) || ((method.ends_with("/RevokeKey") || method.ends_with("/RemoveSecret"))
                        && code == Some(Code::NotFound))
                        // The red admin's row deleted the agent already.
                        || (method.ends_with("/DeleteAgent") && who == "red-member" && code == Some(Code::NotFound)),
                    "{who} {method}: wanted it allowed, got {answer:?}"
                ),
                Expect::Denied => assert_eq!(code, Some(Code::PermissionDenied), "{who} {method}: {answer:?}"),
                Expect::Hidden => {
                    let status = answer.expect_err("another team's agent");
                    assert_eq!(status.code(), Code::NotFound, "{who} {method}: {status:?}");
                    assert_eq!(status.message(), unknown_message, "{who} {method}: ids must not leak");
                }
            }
            rows += 1;
        }
    }
    eprintln!("{rows} method × key rows checked over {} methods", methods.len());
    // The red agent was deleted by its admin's row: gone for every key.
    let mut root_agents = agent_client(&endpoint, &root).await;
    let gone = root_agents
        .get_agent(v1::GetAgentRequest {
            id: red_agent.id.clone(),
        })
        .await
        .expect_err("a deleted agent");
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    // The cluster-admin key reaches every team's agents.
    for agent in [&blue_agent] {
        root_agents
            .get_agent(v1::GetAgentRequest { id: agent.id.clone() })
            .await
            .unwrap_or_else(|status| panic!("cluster-admin get {}: {status}", agent.id));
    }
}

/// Teams red and blue; a red admin (made by the cluster-admin key through the CLI) who makes
/// the red member and viewer; a blue member. A team admin cannot make keys of another team.
fn make_teams_and_keys(endpoint: &str, root: &str) -> Keys {
    cli(endpoint, root, &["team", "create", "red"]);
    cli(endpoint, root, &["team", "create", "blue"]);
    let teams = cli(endpoint, root, &["team", "list"]);
    assert_eq!(teams.lines().collect::<Vec<_>>(), ["default", "blue", "red"], "{teams}");
    let duplicate = run_cli(endpoint, root, &["team", "create", "red"]);
    assert!(!duplicate.status.success());
    assert!(
        String::from_utf8_lossy(&duplicate.stderr).contains("team red already exists"),
        "{duplicate:?}"
    );
    let red_admin = cli_key(endpoint, root, "red", "ana", "admin");
    let red_member = cli_key(endpoint, &red_admin, "red", "rita", "member");
    let red_viewer = cli_key(endpoint, &red_admin, "red", "vic", "viewer");
    let blue_member = cli_key(endpoint, root, "blue", "bob", "member");
    let cross = run_cli(
        endpoint,
        &red_admin,
        &["key", "create", "--team", "blue", "--user", "eve", "--role", "admin"],
    );
    assert!(!cross.status.success());
    assert!(
        String::from_utf8_lossy(&cross.stderr).contains("permission denied"),
        "{cross:?}"
    );
    let escalate = run_cli(
        endpoint,
        &red_admin,
        &[
            "key",
            "create",
            "--team",
            "red",
            "--user",
            "eve",
            "--role",
            "cluster-admin",
        ],
    );
    assert!(
        !escalate.status.success(),
        "a team admin cannot make a cluster-admin key"
    );
    Keys {
        red_admin,
        red_member,
        red_viewer,
        blue_member,
    }
}

async fn check_lists_hold_one_team(
    endpoint: &str,
    keys: &Keys,
    root: &str,
    red_agent: &v1::Agent,
    blue_agent: &v1::Agent,
) {
    let ids_for = |key: String| async move {
        agent_client(endpoint, &key)
            .await
            .list_agents(v1::ListAgentsRequest {
                search: "work".to_string(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner()
            .agents
            .into_iter()
            .map(|agent| agent.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids_for(keys.red_viewer.clone()).await, vec![red_agent.id.clone()]);
    assert_eq!(ids_for(keys.blue_member.clone()).await, vec![blue_agent.id.clone()]);
    assert_eq!(
        ids_for(root.to_string()).await,
        [blue_agent.id.clone(), red_agent.id.clone()],
        "the cluster-admin key lists every team, newest first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_listed_described_revoked_and_expire() {
    let cluster = TestCluster::start(1, ClusterOptions::default()).await;
    let endpoint = cluster.nodes[0].endpoint();
    let root = cluster.admin_token();
    cli(&endpoint, &root, &["team", "create", "red"]);
    let admin = cli_key(&endpoint, &root, "red", "ana", "admin");
    let member = cli_key(&endpoint, &admin, "red", "rita", "member");

    let info = cli(&endpoint, &member, &["key", "info"]);
    let fields: Vec<&str> = info.split_whitespace().collect();
    assert!(fields[0].starts_with("key_"), "{info}");
    assert_eq!(&fields[1..5], ["red", "rita", "member", "expires"], "{info}");
    assert_eq!(fields[5], "never", "{info}");
    let member_id = fields[0].to_string();
    let root_info = cli(&endpoint, &root, &["--output", "json", "key", "info"]);
    assert!(root_info.contains("\"cluster-admin\""), "{root_info}");

    let listed = cli(&endpoint, &admin, &["key", "list"]);
    assert_eq!(
        listed.lines().count(),
        2,
        "the red admin sees red's two keys only: {listed}"
    );
    assert!(!listed.contains("flt_"), "a list never shows a secret: {listed}");
    assert!(listed.contains(&member_id), "{listed}");
    let all = cli(&endpoint, &root, &["key", "list"]);
    assert_eq!(all.lines().count(), 3, "the cluster-admin key sees every key: {all}");

    let mut member_access = access_client(&endpoint, &member);
    cli(&endpoint, &admin, &["key", "revoke", &member_id]);
    let revoked_at = Instant::now();
    let status = member_access
        .get_key_info(v1::GetKeyInfoRequest {})
        .await
        .expect_err("a revoked key");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        revoked_at.elapsed() < REFUSAL_BOUND,
        "refused after {:?}",
        revoked_at.elapsed()
    );
    let again = run_cli(&endpoint, &admin, &["key", "revoke", &member_id]);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("not found"),
        "{again:?}"
    );

    let short = access_client(&endpoint, &root)
        .create_key(v1::CreateKeyRequest {
            team: "red".to_string(),
            user: "tmp".to_string(),
            role: "viewer".to_string(),
            expires_in_seconds: SHORT_LIFETIME_SECONDS,
        })
        .await
        .expect("a short key")
        .into_inner();
    let expires_at = short.key.as_ref().and_then(|key| key.expires_at).expect("an expiry");
    let mut short_access = access_client(&endpoint, &short.secret);
    short_access
        .get_key_info(v1::GetKeyInfoRequest {})
        .await
        .expect("the key works before its expiry");
    let refused = wait_for("the short key to be refused", DEADLINE, || {
        let mut client = short_access.clone();
        async move {
            match client.get_key_info(v1::GetKeyInfoRequest {}).await {
                Err(status) if status.code() == Code::Unauthenticated => Some(status),
                _ => None,
            }
        }
    })
    .await;
    assert!(refused.message().contains("expired"), "{refused:?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let late = now - (expires_at.seconds as f64 + f64::from(expires_at.nanos) / 1e9);
    eprintln!("expired key refused {late:.3} s after its expiry");
    assert!(late < REFUSAL_BOUND.as_secs_f64() + 0.5, "refused {late:.3} s late");
    assert!(late >= 0.0, "refused {:.3} s before its expiry", -late);
}
