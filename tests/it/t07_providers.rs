//! The built-in VCS provider plugins (`flotilla-builtin-plugins`), in process, through the real
//! plugin host (`flotilla-plugins`): no node. Each forge provider matches its forge's URL forms
//! and refuses others, gives a clone spec whose auth header the host fills with the token,
//! opens a pull request on a fake of the forge's REST API that checks the request as the forge
//! would, passes the forge's own error words back for a duplicate, a bad token and an unknown
//! repository, and reads one sample webhook delivery. Plain git takes file:// and http:// URLs,
//! clones through a real git over smart HTTP, and has no pull requests.

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use flotilla_builtin_plugins::BUILTIN;
use flotilla_plugins::{
    CallError, HostConfig, Plugin, PluginFailure, PluginHost, PullRequest, PullRequestInput, RepoRef, SecretSource,
    WebhookEvent, WebhookInput,
};
use flotilla_tests::fakes::{
    basic_authorization, create_bare_repository, git_extra_header_env, FakeForge, ForgeKind, GitHttpServer,
};
use serde_json::{json, Value};

const FORGE_TOKEN: &str = "forge-token-0123";
/// A secret that exists but is not the forge's token.
const WRONG_TOKEN_SECRET: &str = "stale-token";
const WRONG_TOKEN: &str = "forge-token-revoked";
/// Bounds one plugin call or one git command; each takes well under a second.
const STEP_DEADLINE: Duration = Duration::from_secs(30);
/// Compiling a component with a debug build of the host can take a few seconds.
const LOAD_DEADLINE: Duration = Duration::from_secs(120);

/// Every secret any provider here may name, for every plugin.
struct TestSecrets(HashMap<&'static str, &'static str>);

impl SecretSource for TestSecrets {
    fn secret(&self, _plugin: &str, name: &str) -> Option<String> {
        self.0.get(name).map(|value| value.to_string())
    }
}

fn plugin_host() -> Arc<PluginHost> {
    let secrets = TestSecrets(HashMap::from([
        ("github-token", FORGE_TOKEN),
        ("gitlab-token", FORGE_TOKEN),
        ("bitbucket-token", FORGE_TOKEN),
        ("gitea-token", FORGE_TOKEN),
        ("git-token", FORGE_TOKEN),
        (WRONG_TOKEN_SECRET, WRONG_TOKEN),
    ]));
    let host = PluginHost::new(HostConfig::default(), Arc::new(secrets))
        .unwrap_or_else(|error| panic!("could not start the plugin host: {error}"));
    Arc::new(host)
}

/// Loads the built-in plugin `name` with `settings` and `granted_hosts`.
async fn load_builtin(
    host: &Arc<PluginHost>,
    name: &str,
    settings: &[(&str, &str)],
    granted_hosts: Vec<String>,
) -> Plugin {
    let builtin = BUILTIN
        .iter()
        .find(|builtin| builtin.name == name)
        .unwrap_or_else(|| panic!("no built-in plugin {name}"));
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect();
    let host = host.clone();
    let load = tokio::task::spawn_blocking(move || {
        host.load(builtin.name, builtin.version, builtin.bytes, granted_hosts)
            .map(|plugin| plugin.with_settings(settings.into_iter().collect()))
    });
    tokio::time::timeout(LOAD_DEADLINE, load)
        .await
        .unwrap_or_else(|_| panic!("loading {name} took longer than {LOAD_DEADLINE:?}"))
        .expect("the load task panicked")
        .unwrap_or_else(|error| panic!("could not load the built-in {name} plugin: {error}"))
}

/// Awaits one plugin call within [`STEP_DEADLINE`].
async fn within<T>(what: &str, call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP_DEADLINE, call)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP_DEADLINE:?}"))
}

fn repo_ref(host: &str, owner: &str, name: &str, web_url: &str) -> RepoRef {
    RepoRef {
        host: host.to_string(),
        owner: owner.to_string(),
        name: name.to_string(),
        web_url: web_url.to_string(),
    }
}

fn pull_request_input(repository_url: String) -> PullRequestInput {
    PullRequestInput {
        repository_url,
        head_branch: "flotilla/fix-typo".to_string(),
        base_branch: "main".to_string(),
        title: "Fix a typo".to_string(),
        body: "Found and fixed by an agent.".to_string(),
        draft: false,
    }
}

/// The forge's status and words, from a `remote` plugin error; panics on anything else.
fn remote_error(error: CallError) -> (u16, String) {
    match error {
        CallError::Plugin {
            failure: PluginFailure::Remote { status, message },
            ..
        } => (status, message),
        other => panic!("expected the forge's error, got: {other}"),
    }
}

// ---------------------------------------------------------------- one forge, end to end

/// What differs between forges in [`check_forge`].
struct ForgeCase {
    plugin: &'static str,
    kind: ForgeKind,
    /// The repository's path on the forge (GitLab: with a subgroup).
    repository: &'static str,
    /// URL forms of the public forge's repository, all naming `public_ref`.
    public_urls: &'static [&'static str],
    public_ref: RepoRef,
    /// URLs this provider must not claim.
    refused_urls: &'static [&'static str],
    /// The clone URL and Basic auth user for the first of `public_urls`.
    public_clone_url: &'static str,
    git_user: &'static str,
    /// Whether the provider needs `api-base` to find the fake (Bitbucket Cloud's API has its
    /// own host).
    needs_api_base: bool,
    /// The API path after the fake's prefix.
    pull_request_path: String,
    /// Headers the request must carry, exactly.
    pull_request_headers: Vec<(&'static str, String)>,
    /// The JSON body the request must carry, for [`pull_request_input`].
    pull_request_body: Value,
    /// The created pull request's page, after the fake's origin.
    pull_request_page: String,
    /// The path (after the fake's prefix) and query of the lookup a provider sends when the
    /// forge refuses a second pull request of the same branches.
    lookup: (String, Option<String>),
    /// A create the forge refuses for its own reasons, whose words reach the caller.
    refusal: Refusal,
    bad_token_error: (u16, &'static str),
    unknown_repository_error: (u16, &'static str),
    webhook: WebhookInput,
    /// The event `webhook` describes.
    webhook_event: WebhookEvent,
}

/// A create the forge refuses: its branches and title, the forge's status and words, and
/// whether the provider first looks for an open pull request (it does when the forge's answer
/// may mean one is already open).
struct Refusal {
    head: &'static str,
    base: &'static str,
    title: &'static str,
    error: (u16, &'static str),
    looked_up: bool,
}

async fn check_forge(case: ForgeCase) {
    let forge = FakeForge::start(case.kind, FORGE_TOKEN, &[case.repository]).await;
    let host = plugin_host();
    let api_base = forge.api_base();
    let forge_host = forge.host();
    let mut settings = vec![("hosts", forge_host.as_str())];
    if case.needs_api_base {
        settings.push(("api-base", api_base.as_str()));
    }
    let plugin = load_builtin(&host, case.plugin, &settings, vec![forge.host()]).await;
    let loaded = LoadedForge {
        case: &case,
        forge: &forge,
        host: &host,
        plugin: &plugin,
    };

    loaded.check_info().await;
    let loopback_url = loaded.check_url_matching().await;
    loaded.check_clone_spec().await;
    let created = loaded.check_a_pull_request_is_opened(&loopback_url).await;
    loaded
        .check_opening_again_finds_the_open_pull_request(&loopback_url, &created)
        .await;
    loaded
        .check_the_forge_errors_in_its_own_words(&settings, &loopback_url)
        .await;
    check_the_sample_webhook(&host, &plugin, case.plugin, case.webhook, &case.webhook_event).await;
}

/// A forge provider loaded against its fake forge: what [`check_forge`]'s steps share.
struct LoadedForge<'a> {
    case: &'a ForgeCase,
    forge: &'a FakeForge,
    host: &'a Arc<PluginHost>,
    plugin: &'a Plugin,
}

impl LoadedForge<'_> {
    async fn check_info(&self) {
        let plugin_name = self.case.plugin;
        let info = within("info", self.host.info(self.plugin)).await.unwrap();
        assert_eq!(info.name, plugin_name);
        assert!(info.supports_pull_requests, "{plugin_name} should open pull requests");
    }

    /// URLs: the public forge's forms, the loopback forge from `hosts`, and refusals. Returns
    /// the loopback forge's URL of the repository.
    async fn check_url_matching(&self) -> String {
        let (case, forge, host, plugin) = (self.case, self.forge, self.host, self.plugin);
        let plugin_name = case.plugin;
        for url in case.public_urls {
            let matched = within("match-url", host.match_url(plugin, url)).await.unwrap();
            assert_eq!(matched.as_ref(), Some(&case.public_ref), "{plugin_name} on {url}");
        }
        let loopback_url = forge.repository_url(case.repository);
        let matched = within("match-url", host.match_url(plugin, &format!("{loopback_url}.git")))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{plugin_name} should claim {loopback_url}.git (a host in its settings)"));
        assert_eq!(
            (matched.host.as_str(), matched.web_url.as_str()),
            (forge.host().as_str(), loopback_url.as_str())
        );
        for url in case.refused_urls {
            let matched = within("match-url", host.match_url(plugin, url)).await.unwrap();
            assert_eq!(matched, None, "{plugin_name} should not claim {url}");
        }
        loopback_url
    }

    /// Clone spec: https, with the token as Basic auth, filled in by the host.
    async fn check_clone_spec(&self) {
        let case = self.case;
        let plugin_name = case.plugin;
        let spec = within("clone-spec", self.host.clone_spec(self.plugin, case.public_urls[0]))
            .await
            .unwrap();
        assert_eq!(spec.url, case.public_clone_url);
        assert_eq!(
            spec.auth_header,
            Some((
                "Authorization".to_string(),
                basic_authorization(case.git_user, FORGE_TOKEN)
            )),
            "{plugin_name}'s clone auth header"
        );
    }

    /// A pull request, checked by the fake as the forge would.
    async fn check_a_pull_request_is_opened(&self, loopback_url: &str) -> PullRequest {
        let (case, forge) = (self.case, self.forge);
        let plugin_name = case.plugin;
        let created = within(
            "create-pull-request",
            self.host
                .create_pull_request(self.plugin, pull_request_input(loopback_url.to_string())),
        )
        .await
        .unwrap_or_else(|error| panic!("{plugin_name} could not open a pull request: {error}"));
        assert_eq!(created.number, 1);
        assert_eq!(created.url, format!("{}{}", forge.origin(), case.pull_request_page));
        let requests = forge.requests();
        assert_eq!(requests.len(), 1, "{plugin_name} sent {requests:#?}");
        let request = &requests[0];
        assert_eq!(request.method, "POST");
        assert_eq!(
            request.path,
            format!("{}{}", case.kind.api_prefix(), case.pull_request_path)
        );
        for (name, value) in &case.pull_request_headers {
            assert_eq!(
                request.header(name),
                Some(value.as_str()),
                "{plugin_name}'s {name} header"
            );
        }
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(request.json(), case.pull_request_body, "{plugin_name}'s request body");
        let opened = forge.pull_requests();
        assert_eq!(opened.len(), 1);
        assert_eq!(
            (opened[0].head.as_str(), opened[0].base.as_str()),
            ("flotilla/fix-typo", "main")
        );
        created
    }

    /// Opening it again (the first answer lost, say) finds the open one: same number and page,
    /// after the forge's refusal and one lookup, and nothing new is opened.
    async fn check_opening_again_finds_the_open_pull_request(&self, loopback_url: &str, created: &PullRequest) {
        let (case, forge) = (self.case, self.forge);
        let plugin_name = case.plugin;
        let again = within(
            "create-pull-request (again)",
            self.host
                .create_pull_request(self.plugin, pull_request_input(loopback_url.to_string())),
        )
        .await
        .unwrap_or_else(|error| panic!("{plugin_name} should find the open pull request: {error}"));
        assert_eq!(
            &again, created,
            "{plugin_name} answers the pull request it opened before"
        );
        let requests = forge.requests();
        assert_eq!(requests.len(), 3, "{plugin_name} sent {requests:#?}");
        assert_eq!(requests[1].method, "POST");
        let lookup = &requests[2];
        assert_eq!(lookup.method, "GET");
        assert_eq!(
            (lookup.path.clone(), lookup.query.clone()),
            (
                format!("{}{}", case.kind.api_prefix(), case.lookup.0),
                case.lookup.1.clone()
            ),
            "{plugin_name}'s lookup"
        );
        for (name, value) in &case.pull_request_headers {
            assert_eq!(
                lookup.header(name),
                Some(value.as_str()),
                "{plugin_name}'s lookup {name} header"
            );
        }
        assert!(lookup.body.is_empty(), "{plugin_name}'s lookup has no body");
        assert_eq!(forge.pull_requests().len(), 1);
    }

    /// The forge's errors, in its own words: a create it refuses, an unknown repository and a
    /// bad token (a second copy of the plugin loaded with `settings` and a stale token secret).
    async fn check_the_forge_errors_in_its_own_words(&self, settings: &[(&str, &str)], loopback_url: &str) {
        let (case, forge, host, plugin) = (self.case, self.forge, self.host, self.plugin);
        let plugin_name = case.plugin;
        self.check_a_refused_create(loopback_url).await;

        let unknown = within(
            "create-pull-request (unknown repository)",
            host.create_pull_request(
                plugin,
                pull_request_input(forge.repository_url(&missing_repository(case.repository))),
            ),
        )
        .await
        .expect_err("an unknown repository should fail");
        let (status, message) = remote_error(unknown);
        assert_eq!((status, message.as_str()), case.unknown_repository_error);

        let mut stale_settings = settings.to_vec();
        stale_settings.push(("token-secret", WRONG_TOKEN_SECRET));
        let stale = load_builtin(host, plugin_name, &stale_settings, vec![forge.host()]).await;
        let refused = within(
            "create-pull-request (bad token)",
            host.create_pull_request(&stale, pull_request_input(loopback_url.to_string())),
        )
        .await
        .expect_err("a bad token should fail");
        let (status, message) = remote_error(refused);
        assert_eq!((status, message.as_str()), case.bad_token_error);
        assert_eq!(
            forge.pull_requests().len(),
            1,
            "no refused request may open a pull request"
        );
    }

    /// The create of [`ForgeCase::refusal`]: the forge's status and words reach the caller,
    /// after a lookup only where the forge's answer may mean one is already open.
    async fn check_a_refused_create(&self, loopback_url: &str) {
        let (case, forge) = (self.case, self.forge);
        let plugin_name = case.plugin;
        let mut refused_input = pull_request_input(loopback_url.to_string());
        refused_input.head_branch = case.refusal.head.to_string();
        refused_input.base_branch = case.refusal.base.to_string();
        refused_input.title = case.refusal.title.to_string();
        let sent_before = forge.requests().len();
        let refused = within(
            "create-pull-request (refused)",
            self.host.create_pull_request(self.plugin, refused_input),
        )
        .await
        .expect_err("the forge refuses this pull request");
        let (status, message) = remote_error(refused);
        assert_eq!(status, case.refusal.error.0, "{plugin_name}: {message}");
        assert!(
            message.contains(case.refusal.error.1),
            "{plugin_name}'s refusal should say {:?}, said {message:?}",
            case.refusal.error.1
        );
        let methods: Vec<String> = forge.requests()[sent_before..]
            .iter()
            .map(|request| request.method.clone())
            .collect();
        let expected: &[&str] = if case.refusal.looked_up {
            &["POST", "GET"]
        } else {
            &["POST"]
        };
        assert_eq!(methods, expected, "{plugin_name}'s requests for a refused create");
    }
}

/// One sample webhook delivery.
async fn check_the_sample_webhook(
    host: &PluginHost,
    plugin: &Plugin,
    plugin_name: &str,
    webhook: WebhookInput,
    webhook_event: &WebhookEvent,
) {
    let event = within("parse-webhook", host.parse_webhook(plugin, webhook))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{plugin_name} ignored its sample delivery"));
    assert_eq!(&event, webhook_event);
}

/// `acme/missing` for `acme/widgets` (`acme/platform/missing` for a subgroup's project).
fn missing_repository(repository: &str) -> String {
    let (namespace, _name) = repository.rsplit_once('/').expect("a repository path has an owner");
    format!("{namespace}/missing")
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

#[tokio::test]
async fn github_provider_speaks_the_github_api() {
    let push = json!({
        "ref": "refs/heads/flotilla/fix-typo",
        "before": "0000000000000000000000000000000000000000",
        "after": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
        "repository": {"full_name": "acme/widgets", "html_url": "https://github.com/acme/widgets"},
        "pusher": {"name": "octocat", "email": "octocat@example.com"},
        "sender": {"login": "octocat", "id": 1}
    });
    check_forge(ForgeCase {
        plugin: "github",
        kind: ForgeKind::GitHub,
        repository: "acme/widgets",
        public_urls: &[
            "https://github.com/acme/widgets",
            "https://github.com/acme/widgets.git",
            "git@github.com:acme/widgets.git",
            "ssh://git@github.com/acme/widgets.git",
        ],
        public_ref: repo_ref("github.com", "acme", "widgets", "https://github.com/acme/widgets"),
        refused_urls: &[
            "https://gitlab.com/acme/widgets",
            "https://github.com/acme",
            "https://github.example.com/acme/widgets",
            "file:///srv/git/widgets.git",
        ],
        public_clone_url: "https://github.com/acme/widgets.git",
        git_user: "x-access-token",
        needs_api_base: false,
        pull_request_path: "/repos/acme/widgets/pulls".to_string(),
        pull_request_headers: vec![
            ("authorization", format!("Bearer {FORGE_TOKEN}")),
            ("accept", "application/vnd.github+json".to_string()),
            ("x-github-api-version", "2022-11-28".to_string()),
            ("user-agent", "flotilla".to_string()),
        ],
        pull_request_body: json!({
            "title": "Fix a typo",
            "head": "flotilla/fix-typo",
            "base": "main",
            "body": "Found and fixed by an agent.",
            "draft": false
        }),
        pull_request_page: "/acme/widgets/pull/1".to_string(),
        lookup: (
            "/repos/acme/widgets/pulls".to_string(),
            Some("state=open&head=acme%3Aflotilla%2Ffix-typo&base=main".to_string()),
        ),
        refusal: Refusal {
            head: "flotilla/other",
            base: "main",
            title: "",
            error: (422, "Invalid request.\n\n\"title\" wasn't supplied."),
            looked_up: false,
        },
        bad_token_error: (401, "Bad credentials"),
        unknown_repository_error: (404, "Not Found"),
        webhook: WebhookInput {
            headers: headers(&[
                ("X-GitHub-Event", "push"),
                ("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
                ("Content-Type", "application/json"),
            ]),
            body: push.to_string().into_bytes(),
        },
        webhook_event: WebhookEvent {
            kind: "push".to_string(),
            repository_url: "https://github.com/acme/widgets".to_string(),
            branch: Some("flotilla/fix-typo".to_string()),
            pull_request_number: None,
            actor: Some("octocat".to_string()),
        },
    })
    .await;
}

#[tokio::test]
async fn gitlab_provider_speaks_the_gitlab_api() {
    let merge_request = json!({
        "object_kind": "merge_request",
        "event_type": "merge_request",
        "user": {"username": "jsmith", "name": "John Smith"},
        "project": {"path_with_namespace": "acme/platform/widgets", "web_url": "https://gitlab.com/acme/platform/widgets"},
        "object_attributes": {"iid": 1, "source_branch": "flotilla/fix-typo", "target_branch": "main", "action": "open"}
    });
    check_forge(ForgeCase {
        plugin: "gitlab",
        kind: ForgeKind::GitLab,
        repository: "acme/platform/widgets",
        public_urls: &[
            "https://gitlab.com/acme/platform/widgets.git",
            "https://gitlab.com/acme/platform/widgets",
            "https://gitlab.com/acme/platform/widgets/-/merge_requests/4",
            "git@gitlab.com:acme/platform/widgets.git",
        ],
        public_ref: repo_ref(
            "gitlab.com",
            "acme/platform",
            "widgets",
            "https://gitlab.com/acme/platform/widgets",
        ),
        refused_urls: &[
            "https://github.com/acme/widgets",
            "https://gitlab.com/acme",
            "https://gitlab.example.com/acme/widgets",
        ],
        public_clone_url: "https://gitlab.com/acme/platform/widgets.git",
        git_user: "oauth2",
        needs_api_base: false,
        pull_request_path: "/projects/acme%2Fplatform%2Fwidgets/merge_requests".to_string(),
        pull_request_headers: vec![("private-token", FORGE_TOKEN.to_string())],
        pull_request_body: json!({
            "source_branch": "flotilla/fix-typo",
            "target_branch": "main",
            "title": "Fix a typo",
            "description": "Found and fixed by an agent."
        }),
        pull_request_page: "/acme/platform/widgets/-/merge_requests/1".to_string(),
        lookup: (
            "/projects/acme%2Fplatform%2Fwidgets/merge_requests".to_string(),
            Some("state=opened&source_branch=flotilla%2Ffix-typo&target_branch=main".to_string()),
        ),
        // One open merge request per source branch: another target is refused, and the lookup
        // (for that target) finds none, so GitLab's words stand.
        refusal: Refusal {
            head: "flotilla/fix-typo",
            base: "develop",
            title: "Fix a typo",
            error: (
                409,
                "Another open merge request already exists for this source branch: !1",
            ),
            looked_up: true,
        },
        bad_token_error: (401, "401 Unauthorized"),
        unknown_repository_error: (404, "404 Project Not Found"),
        webhook: WebhookInput {
            headers: headers(&[
                ("X-Gitlab-Event", "Merge Request Hook"),
                ("X-Gitlab-Token", "webhook-secret"),
                ("Content-Type", "application/json"),
            ]),
            body: merge_request.to_string().into_bytes(),
        },
        webhook_event: WebhookEvent {
            kind: "pull-request".to_string(),
            repository_url: "https://gitlab.com/acme/platform/widgets".to_string(),
            branch: Some("flotilla/fix-typo".to_string()),
            pull_request_number: Some(1),
            actor: Some("jsmith".to_string()),
        },
    })
    .await;
}

#[tokio::test]
async fn bitbucket_provider_speaks_the_bitbucket_cloud_api() {
    let push = json!({
        "actor": {"display_name": "Jane Doe", "nickname": "jdoe"},
        "repository": {"full_name": "acme/widgets", "links": {"html": {"href": "https://bitbucket.org/acme/widgets"}}},
        "push": {"changes": [{
            "old": {"type": "branch", "name": "flotilla/fix-typo"},
            "new": {"type": "branch", "name": "flotilla/fix-typo"}
        }]}
    });
    check_forge(ForgeCase {
        plugin: "bitbucket",
        kind: ForgeKind::Bitbucket,
        repository: "acme/widgets",
        public_urls: &[
            "https://bitbucket.org/acme/widgets.git",
            "https://jdoe@bitbucket.org/acme/widgets.git",
            "git@bitbucket.org:acme/widgets.git",
        ],
        public_ref: repo_ref("bitbucket.org", "acme", "widgets", "https://bitbucket.org/acme/widgets"),
        refused_urls: &["https://github.com/acme/widgets", "https://bitbucket.org/acme"],
        public_clone_url: "https://bitbucket.org/acme/widgets.git",
        git_user: "x-token-auth",
        needs_api_base: true,
        pull_request_path: "/repositories/acme/widgets/pullrequests".to_string(),
        pull_request_headers: vec![("authorization", format!("Bearer {FORGE_TOKEN}"))],
        pull_request_body: json!({
            "title": "Fix a typo",
            "description": "Found and fixed by an agent.",
            "source": {"branch": {"name": "flotilla/fix-typo"}},
            "destination": {"branch": {"name": "main"}},
            "draft": false
        }),
        pull_request_page: "/acme/widgets/pull-requests/1".to_string(),
        lookup: (
            "/repositories/acme/widgets/pullrequests".to_string(),
            Some(
                "q=source.branch.name%20%3D%20%22flotilla%2Ffix-typo%22%20AND%20\
                 destination.branch.name%20%3D%20%22main%22%20AND%20state%20%3D%20%22OPEN%22"
                    .to_string(),
            ),
        ),
        // Bitbucket's 400 may mean "already open": the provider looks, finds none, and passes
        // the validation error on.
        refusal: Refusal {
            head: "flotilla/other",
            base: "main",
            title: "",
            error: (400, "title: This field is required."),
            looked_up: true,
        },
        bad_token_error: (401, "Token is invalid, expired, or not supported for this endpoint."),
        unknown_repository_error: (404, "Repository acme/missing not found"),
        webhook: WebhookInput {
            headers: headers(&[
                ("X-Event-Key", "repo:push"),
                ("X-Request-UUID", "afe1a6d6-1f6e-4b0c-9c4e-5bdc3a3c0a4b"),
                ("Content-Type", "application/json"),
            ]),
            body: push.to_string().into_bytes(),
        },
        webhook_event: WebhookEvent {
            kind: "push".to_string(),
            repository_url: "https://bitbucket.org/acme/widgets".to_string(),
            branch: Some("flotilla/fix-typo".to_string()),
            pull_request_number: None,
            actor: Some("jdoe".to_string()),
        },
    })
    .await;
}

#[tokio::test]
async fn gitea_provider_speaks_the_gitea_api() {
    let pull_request = json!({
        "action": "opened",
        "number": 1,
        "pull_request": {"number": 1, "head": {"ref": "flotilla/fix-typo"}, "base": {"ref": "main"}},
        "repository": {"full_name": "acme/widgets", "html_url": "https://codeberg.org/acme/widgets"},
        "sender": {"login": "jdoe"}
    });
    check_forge(ForgeCase {
        plugin: "gitea",
        kind: ForgeKind::Gitea,
        repository: "acme/widgets",
        public_urls: &[
            "https://codeberg.org/acme/widgets",
            "https://codeberg.org/acme/widgets.git",
            "git@codeberg.org:acme/widgets.git",
        ],
        public_ref: repo_ref("codeberg.org", "acme", "widgets", "https://codeberg.org/acme/widgets"),
        refused_urls: &[
            "https://github.com/acme/widgets",
            "https://gitea.example.com/acme/widgets",
        ],
        public_clone_url: "https://codeberg.org/acme/widgets.git",
        git_user: "flotilla",
        needs_api_base: false,
        pull_request_path: "/repos/acme/widgets/pulls".to_string(),
        pull_request_headers: vec![("authorization", format!("token {FORGE_TOKEN}"))],
        pull_request_body: json!({
            "head": "flotilla/fix-typo",
            "base": "main",
            "title": "Fix a typo",
            "body": "Found and fixed by an agent."
        }),
        pull_request_page: "/acme/widgets/pulls/1".to_string(),
        lookup: ("/repos/acme/widgets/pulls/main/flotilla/fix-typo".to_string(), None),
        refusal: Refusal {
            head: "flotilla/other",
            base: "main",
            title: "",
            error: (422, "Title: Required"),
            looked_up: false,
        },
        bad_token_error: (401, "invalid username, password or token"),
        unknown_repository_error: (404, "The target couldn't be found."),
        webhook: WebhookInput {
            headers: headers(&[
                ("X-Forgejo-Event", "pull_request"),
                ("X-Gitea-Event", "pull_request"),
                ("Content-Type", "application/json"),
            ]),
            body: pull_request.to_string().into_bytes(),
        },
        webhook_event: WebhookEvent {
            kind: "pull-request".to_string(),
            repository_url: "https://codeberg.org/acme/widgets".to_string(),
            branch: Some("flotilla/fix-typo".to_string()),
            pull_request_number: Some(1),
            actor: Some("jdoe".to_string()),
        },
    })
    .await;
}

// ---------------------------------------------------------------- every built-in

#[tokio::test]
async fn every_builtin_loads_and_names_itself() {
    let host = plugin_host();
    for builtin in BUILTIN {
        let plugin = load_builtin(&host, builtin.name, &[], Vec::new()).await;
        let info = within("info", host.info(&plugin)).await.unwrap();
        assert_eq!(info.name, builtin.name);
        assert!(
            !info.display_name.is_empty() && !info.url_patterns.is_empty(),
            "{info:?}"
        );
        assert_eq!(info.supports_pull_requests, builtin.name != "git", "{info:?}");
    }
}

// ---------------------------------------------------------------- plain git

/// Runs git with no user configuration and never a prompt, plus `env`.
async fn git(args: &[&str], cwd: &Path, env: &[(String, String)]) -> Output {
    let mut command = tokio::process::Command::new("git");
    command
        .args(args)
        .current_dir(cwd)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_ASKPASS")
        .env_remove("SSH_ASKPASS")
        .envs(env.iter().map(|(name, value)| (name.as_str(), value.as_str())))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    within(&format!("git {args:?}"), command.output())
        .await
        .unwrap_or_else(|error| panic!("could not run git {args:?}: {error}"))
}

#[tokio::test]
async fn plain_git_takes_any_git_url_clones_with_basic_auth_and_has_no_pull_requests() {
    let host = plugin_host();
    // The token goes only to the hosts the admin lists: here the test's git server.
    let projects = tempfile::tempdir().expect("a temporary directory for the git server");
    create_bare_repository(projects.path(), "widgets", &[("README.md", "widgets\n")]);
    let server = GitHttpServer::start(projects.path(), "agent", FORGE_TOKEN).await;
    let server_host = server.address().to_string();
    let plugin = load_builtin(
        &host,
        "git",
        &[
            ("username", "agent"),
            ("token-secret", "git-token"),
            ("hosts", server_host.as_str()),
        ],
        Vec::new(),
    )
    .await;

    let file = within("match-url", host.match_url(&plugin, "file:///srv/git/team/widgets.git"))
        .await
        .unwrap();
    assert_eq!(
        file,
        Some(repo_ref(
            "",
            "srv/git/team",
            "widgets",
            "file:///srv/git/team/widgets.git"
        ))
    );
    let http = within(
        "match-url",
        host.match_url(&plugin, "http://127.0.0.1:8080/widgets.git"),
    )
    .await
    .unwrap();
    assert_eq!(
        http,
        Some(repo_ref(
            "127.0.0.1:8080",
            "",
            "widgets",
            "http://127.0.0.1:8080/widgets.git"
        ))
    );
    for url in ["/srv/git/widgets.git", "git://127.0.0.1/widgets.git", "not a url"] {
        let matched = within("match-url", host.match_url(&plugin, url)).await.unwrap();
        assert_eq!(matched, None, "plain git should not claim {url:?}");
    }

    // A host the admin did not list gets no token.
    let unlisted = within(
        "clone-spec",
        host.clone_spec(&plugin, "http://127.0.0.1:8080/widgets.git"),
    )
    .await
    .unwrap();
    assert!(
        unlisted.auth_header.is_none(),
        "a token went to an unlisted host: {unlisted:?}"
    );

    // The resolved header is what git sends: clone through a real smart-HTTP server with it.
    let spec = within(
        "clone-spec",
        host.clone_spec(&plugin, &server.repository_url("widgets")),
    )
    .await
    .unwrap();
    assert_eq!(spec.url, server.repository_url("widgets"));
    let (header_name, header_value) = spec.auth_header.clone().expect("http clones carry the token");
    assert_eq!(
        (header_name.as_str(), header_value.as_str()),
        ("Authorization", server.authorization().as_str())
    );
    let workspace = tempfile::tempdir().expect("a temporary directory for the clone");
    let cloned = git(
        &["clone", "--quiet", &spec.url, "widgets"],
        workspace.path(),
        &git_extra_header_env(&header_value),
    )
    .await;
    assert!(
        cloned.status.success(),
        "git clone with the plugin's clone spec failed: {}",
        String::from_utf8_lossy(&cloned.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(workspace.path().join("widgets/README.md")).unwrap(),
        "widgets\n"
    );

    let input = pull_request_input(server.repository_url("widgets"));
    let error = within("create-pull-request", host.create_pull_request(&plugin, input))
        .await
        .expect_err("plain git cannot open pull requests");
    match error {
        CallError::Plugin {
            failure: PluginFailure::Unsupported(message),
            ..
        } => assert_eq!(message, "plain git has no pull requests"),
        other => panic!("expected unsupported, got: {other}"),
    }
    let delivery = WebhookInput {
        headers: headers(&[("X-GitHub-Event", "push")]),
        body: b"{}".to_vec(),
    };
    assert_eq!(
        within("parse-webhook", host.parse_webhook(&plugin, delivery))
            .await
            .unwrap(),
        None
    );
}
