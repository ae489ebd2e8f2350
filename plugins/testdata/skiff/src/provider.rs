// The "skiff" VCS provider, included by the lib.rs of `skiff` and `skiff-v2`, each of which
// defines `MARKER`. Settings:
//
// - `hosts`: comma-separated `host:port` list of the hosts whose repositories it claims;
// - `api-base`: base URL of the forge's REST API (`http://127.0.0.1:PORT`), needed to open pull
//   requests;
// - `username`: the user of the HTTP Basic credentials git sends (default "skiff").
//
// The token is the secret `skiff-token`, named only in placeholders that the host fills in.

wit_bindgen::generate!({ path: "../../wit", world: "vcs-provider" });

use flotilla::plugin::http;
use flotilla::plugin::log::{log, Level};
use flotilla::plugin::settings;
use flotilla::plugin::types::{Header, HttpRequest};
use flotilla::plugin::vcs::RemoteError;
use serde_json::Value;

/// The secret that holds the forge token.
const TOKEN_SECRET: &str = "skiff-token";
/// The Basic user when the `username` setting is absent or blank.
const DEFAULT_USERNAME: &str = "skiff";
/// Longest error message taken from a forge's answer, in bytes.
const MAX_MESSAGE_BYTES: usize = 500;

/// A repository URL on one of the claimed hosts.
#[derive(Debug, PartialEq, Eq)]
struct Repository {
    /// "http" or "https".
    scheme: &'static str,
    /// `host[:port]`, lowercase, as listed in `hosts`.
    host: String,
    owner: String,
    /// Without `.git`.
    name: String,
}

impl Repository {
    fn web_url(&self) -> String {
        format!("{}://{}/{}/{}", self.scheme, self.host, self.owner, self.name)
    }

    fn clone_url(&self) -> String {
        format!("{}.git", self.web_url())
    }
}

/// The entries of a `hosts` setting: trimmed, lowercase, blanks dropped.
fn parse_hosts(setting: &str) -> Vec<String> {
    setting
        .split(',')
        .map(|host| host.trim().to_ascii_lowercase())
        .filter(|host| !host.is_empty())
        .collect()
}

/// An owner or repository name: ASCII letters, digits, `-`, `_` and `.`, but not `.` or `..`.
/// Such a segment goes into an API path as it is, with nothing to escape.
fn is_name_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
}

/// The repository `url` names if it is `http(s)://HOST/OWNER/NAME[.git][/]` with HOST (compared
/// lowercase) among `hosts`. URLs with user information, a query or a fragment are not claimed.
fn match_repository(url: &str, hosts: &[String]) -> Option<Repository> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = if scheme.eq_ignore_ascii_case("http") {
        "http"
    } else if scheme.eq_ignore_ascii_case("https") {
        "https"
    } else {
        return None;
    };
    let (authority, path) = rest.split_once('/')?;
    if authority.contains('@') || path.contains(['?', '#']) {
        return None;
    }
    let host = authority.to_ascii_lowercase();
    if !hosts.contains(&host) {
        return None;
    }
    let path = path.strip_suffix('/').unwrap_or(path);
    let (owner, name) = path.split_once('/')?;
    let name = name.strip_suffix(".git").unwrap_or(name);
    if !is_name_segment(owner) || !is_name_segment(name) {
        return None;
    }
    Some(Repository {
        scheme,
        host,
        owner: owner.to_string(),
        name: name.to_string(),
    })
}

/// A setting's value, trimmed; `None` when absent or blank.
fn setting(key: &str) -> Option<String> {
    settings::get(key)
        .map(|value| value.trim().to_string())
        .filter(|value| !value.is_empty())
}

/// The `api-base` setting without trailing slashes; `None` when absent or blank.
fn normalize_api_base(value: &str) -> Option<String> {
    let base = value.trim().trim_end_matches('/');
    (!base.is_empty()).then(|| base.to_string())
}

/// Whether `username` fits a `{{basic:USER:secret:NAME}}` placeholder and a Basic credential.
fn is_usable_username(username: &str) -> bool {
    !username.is_empty()
        && !username
            .chars()
            .any(|character| matches!(character, ':' | '{' | '}') || character.is_control())
}

/// The JSON body of a "create a pull request" request.
fn pull_request_json(title: &str, body: &str, head: &str, base: &str, draft: bool, opened_by: &str) -> String {
    serde_json::json!({
        "title": title,
        "body": body,
        "head": head,
        "base": base,
        "draft": draft,
        "opened_by": opened_by,
    })
    .to_string()
}

/// `html_url` and `number` of a created pull request's JSON, or what is wrong with it.
fn parse_created(body: &[u8]) -> Result<(String, u64), String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|error| format!("the forge's answer is not JSON ({error})"))?;
    let url = value
        .get("html_url")
        .and_then(Value::as_str)
        .filter(|url| !url.is_empty())
        .ok_or_else(|| "the forge's answer has no html_url string".to_string())?;
    let number = value
        .get("number")
        .and_then(Value::as_u64)
        .ok_or_else(|| "the forge's answer has no non-negative integer number".to_string())?;
    Ok((url.to_string(), number))
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The forge's words for a refusal: the `message` string of a JSON answer, else the body as
/// text; at most [`MAX_MESSAGE_BYTES`] either way.
fn remote_message(body: &[u8]) -> String {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|value| value.get("message").and_then(Value::as_str).map(str::to_string));
    let text = message.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    cut(text, MAX_MESSAGE_BYTES)
}

/// `text` percent-encoded for a query string (unreserved characters kept).
fn query_value(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// The repository of `url` among the hosts of the `hosts` setting.
fn claimed_repository(url: &str) -> Option<Repository> {
    let hosts = parse_hosts(&settings::get("hosts").unwrap_or_default());
    match_repository(url, &hosts)
}

/// The `Authorization` value git sends: Basic credentials of `username` and the token.
fn basic_authorization(username: &str) -> String {
    format!("Basic {{{{basic:{username}:secret:{TOKEN_SECRET}}}}}")
}

/// The `Authorization` value of API requests.
fn bearer_authorization() -> String {
    format!("Bearer {{{{secret:{TOKEN_SECRET}}}}}")
}

fn header(name: &str, value: String) -> Header {
    Header {
        name: name.to_string(),
        value,
    }
}

struct Skiff;

impl Guest for Skiff {
    fn info() -> ProviderInfo {
        ProviderInfo {
            name: "skiff".to_string(),
            display_name: "Skiff".to_string(),
            url_patterns: vec!["http(s)://HOST/OWNER/REPO".to_string()],
            supports_pull_requests: true,
        }
    }

    fn match_url(url: String) -> Option<RepoRef> {
        let repository = claimed_repository(&url)?;
        Some(RepoRef {
            web_url: repository.web_url(),
            host: repository.host,
            owner: repository.owner,
            name: repository.name,
        })
    }

    fn clone_spec(url: String) -> Result<CloneSpec, PluginError> {
        let repository = claimed_repository(&url)
            .ok_or_else(|| PluginError::InvalidInput(format!("not a skiff repository url: {url}")))?;
        let username = setting("username").unwrap_or_else(|| DEFAULT_USERNAME.to_string());
        if !is_usable_username(&username) {
            return Err(PluginError::InvalidInput(
                "setting username must not contain ':', '{', '}' or control characters".to_string(),
            ));
        }
        Ok(CloneSpec {
            url: repository.clone_url(),
            auth_header: Some(header("Authorization", basic_authorization(&username))),
        })
    }

    fn create_pull_request(input: PullRequestInput) -> Result<PullRequest, PluginError> {
        let api_base = settings::get("api-base")
            .as_deref()
            .and_then(normalize_api_base)
            .ok_or_else(|| PluginError::InvalidInput("setting api-base is not set".to_string()))?;
        let repository = claimed_repository(&input.repository_url).ok_or_else(|| {
            PluginError::InvalidInput(format!("not a skiff repository url: {}", input.repository_url))
        })?;
        log(
            Level::Info,
            &format!(
                "opening a pull request on {}/{} from {} into {}",
                repository.owner, repository.name, input.head_branch, input.base_branch
            ),
        );
        let body = pull_request_json(
            &input.title,
            &input.body,
            &input.head_branch,
            &input.base_branch,
            input.draft,
            MARKER,
        );
        let response = http::send(&HttpRequest {
            method: "POST".to_string(),
            url: format!(
                "{api_base}/api/repos/{}/{}/pulls",
                repository.owner, repository.name
            ),
            headers: vec![
                header("Authorization", bearer_authorization()),
                header("Content-Type", "application/json".to_string()),
                header("Accept", "application/json".to_string()),
            ],
            body: Some(body.into_bytes()),
        })
        .map_err(PluginError::Http)?;
        if !(200..300).contains(&response.status) {
            let refused = PluginError::Remote(RemoteError {
                status: response.status,
                message: remote_message(&response.body),
            });
            if response.status != 422 || !remote_message(&response.body).contains("already exists") {
                return Err(refused);
            }
            // An earlier call opened it and its answer was lost: answer that pull request.
            let found = http::send(&HttpRequest {
                method: "GET".to_string(),
                url: format!(
                    "{api_base}/api/repos/{}/{}/pulls?head={}&base={}",
                    repository.owner,
                    repository.name,
                    query_value(&input.head_branch),
                    query_value(&input.base_branch)
                ),
                headers: vec![
                    header("Authorization", bearer_authorization()),
                    header("Accept", "application/json".to_string()),
                ],
                body: None,
            })
            .map_err(PluginError::Http)?;
            let first = serde_json::from_slice::<Value>(&found.body)
                .ok()
                .and_then(|list| list.as_array().and_then(|list| list.first()).cloned());
            return match first {
                Some(existing) if found.status == 200 => {
                    log(Level::Info, "the pull request was already open; answering it");
                    let (url, number) = parse_created(existing.to_string().as_bytes()).map_err(|problem| {
                        PluginError::Remote(RemoteError {
                            status: found.status,
                            message: problem,
                        })
                    })?;
                    Ok(PullRequest { url, number })
                }
                _ => Err(refused),
            };
        }
        let (url, number) = parse_created(&response.body).map_err(|problem| {
            PluginError::Remote(RemoteError {
                status: response.status,
                message: cut(
                    format!("{problem}: {}", String::from_utf8_lossy(&response.body)),
                    MAX_MESSAGE_BYTES,
                ),
            })
        })?;
        Ok(PullRequest { url, number })
    }

    fn parse_webhook(_input: WebhookInput) -> Result<Option<WebhookEvent>, PluginError> {
        Ok(None)
    }
}

export!(Skiff);

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> Vec<String> {
        parse_hosts(" 127.0.0.1:4242 ,, Forge.Example:8443,")
    }

    fn repository(scheme: &'static str, host: &str, owner: &str, name: &str) -> Repository {
        Repository {
            scheme,
            host: host.to_string(),
            owner: owner.to_string(),
            name: name.to_string(),
        }
    }

    #[test]
    fn hosts_are_trimmed_lowercase_and_never_blank() {
        assert_eq!(hosts(), vec!["127.0.0.1:4242", "forge.example:8443"]);
        assert!(parse_hosts("").is_empty());
        assert!(parse_hosts(" , ").is_empty());
    }

    #[test]
    fn claimed_urls_match() {
        let hosts = hosts();
        let widgets = repository("http", "127.0.0.1:4242", "acme", "widgets");
        for url in [
            "http://127.0.0.1:4242/acme/widgets",
            "http://127.0.0.1:4242/acme/widgets/",
            "http://127.0.0.1:4242/acme/widgets.git",
            "http://127.0.0.1:4242/acme/widgets.git/",
            "HTTP://127.0.0.1:4242/acme/widgets",
        ] {
            assert_eq!(match_repository(url, &hosts), Some(repository("http", "127.0.0.1:4242", "acme", "widgets")), "{url}");
        }
        assert_eq!(widgets.web_url(), "http://127.0.0.1:4242/acme/widgets");
        assert_eq!(widgets.clone_url(), "http://127.0.0.1:4242/acme/widgets.git");
        assert_eq!(
            match_repository("https://FORGE.example:8443/Team_1/my-repo.v2.git", &hosts),
            Some(repository("https", "forge.example:8443", "Team_1", "my-repo.v2"))
        );
    }

    #[test]
    fn other_urls_do_not_match() {
        let hosts = hosts();
        for url in [
            "",
            "127.0.0.1:4242/acme/widgets",
            "ftp://127.0.0.1:4242/acme/widgets",
            "ssh://127.0.0.1:4242/acme/widgets",
            "http://127.0.0.1/acme/widgets",
            "http://127.0.0.1:4243/acme/widgets",
            "http://127.0.0.1:42420/acme/widgets",
            "http://forge.example/acme/widgets",
            "http://127.0.0.1:4242",
            "http://127.0.0.1:4242/",
            "http://127.0.0.1:4242/acme",
            "http://127.0.0.1:4242/acme/",
            "http://127.0.0.1:4242/acme/widgets/pulls",
            "http://127.0.0.1:4242/acme/widgets//",
            "http://127.0.0.1:4242//acme/widgets",
            "http://127.0.0.1:4242/acme//widgets",
            "http://127.0.0.1:4242/acme/.git",
            "http://127.0.0.1:4242/../widgets",
            "http://127.0.0.1:4242/acme/..",
            "http://127.0.0.1:4242/acme/wid%2Fgets",
            "http://127.0.0.1:4242/acme/wid gets",
            "http://127.0.0.1:4242/acme/widgets?tab=code",
            "http://127.0.0.1:4242/acme/widgets#readme",
            "http://user@127.0.0.1:4242/acme/widgets",
            "http://127.0.0.1:4242@evil.example/acme/widgets",
            "http://evil.example/127.0.0.1:4242/acme",
        ] {
            assert_eq!(match_repository(url, &hosts), None, "{url}");
        }
        assert_eq!(match_repository("http://127.0.0.1:4242/acme/widgets", &[]), None);
    }

    #[test]
    fn api_base_loses_trailing_slashes() {
        assert_eq!(normalize_api_base("http://127.0.0.1:1/"), Some("http://127.0.0.1:1".to_string()));
        assert_eq!(normalize_api_base(" http://127.0.0.1:1// "), Some("http://127.0.0.1:1".to_string()));
        assert_eq!(normalize_api_base("http://127.0.0.1:1/x"), Some("http://127.0.0.1:1/x".to_string()));
        assert_eq!(normalize_api_base(" / "), None);
        assert_eq!(normalize_api_base(""), None);
    }

    #[test]
    fn usernames_must_fit_a_basic_placeholder() {
        assert!(is_usable_username("skiff"));
        assert!(is_usable_username("x-access-token"));
        assert!(!is_usable_username(""));
        assert!(!is_usable_username("a:b"));
        assert!(!is_usable_username("a}}b"));
        assert!(!is_usable_username("a\nb"));
    }

    #[test]
    fn authorizations_name_the_token_in_placeholders() {
        assert_eq!(basic_authorization("skiff"), "Basic {{basic:skiff:secret:skiff-token}}");
        assert_eq!(bearer_authorization(), "Bearer {{secret:skiff-token}}");
    }

    #[test]
    fn the_request_body_is_json_with_every_field() {
        let title = "Say \"hi\" \\ twice\n\t\u{1}\u{7f} é 🚀";
        let body = pull_request_json(title, "", "agent/work", "main", true, "skiff 1");
        let value: Value = serde_json::from_str(&body).expect("the body is JSON");
        assert_eq!(value["title"], title);
        assert_eq!(value["body"], "");
        assert_eq!(value["head"], "agent/work");
        assert_eq!(value["base"], "main");
        assert_eq!(value["draft"], true);
        assert_eq!(value["opened_by"], "skiff 1");
        assert_eq!(value.as_object().map(|object| object.len()), Some(6));
        assert!(body.contains("\\u0001"), "{body}");
    }

    #[test]
    fn created_answers_give_url_and_number() {
        assert_eq!(
            parse_created(br#"{"title":"x","number":7,"head":{"n":[1,2]},"html_url":"http://h/a/b/pulls/7"}"#),
            Ok(("http://h/a/b/pulls/7".to_string(), 7))
        );
        for body in [
            &b"not json"[..],
            br#"[1]"#,
            br#"{"number":7}"#,
            br#"{"html_url":"http://h/a/b/pulls/7"}"#,
            br#"{"html_url":"","number":7}"#,
            br#"{"html_url":"http://h","number":-1}"#,
            br#"{"html_url":"http://h","number":7.5}"#,
            br#"{"html_url":"http://h","number":"7"}"#,
        ] {
            assert!(parse_created(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn refusals_give_the_forges_message_or_the_body() {
        assert_eq!(remote_message(br#"{"message":"bad credentials"}"#), "bad credentials");
        assert_eq!(remote_message(br#"{"message":42}"#), r#"{"message":42}"#);
        assert_eq!(remote_message(b"upstream down"), "upstream down");
        assert_eq!(remote_message(b""), "");
        let long = "é".repeat(400);
        let cut_message = remote_message(long.as_bytes());
        assert_eq!(cut_message.len(), 500);
        assert!(long.starts_with(&cut_message));
        let odd = format!("a{}", "é".repeat(400));
        assert_eq!(remote_message(odd.as_bytes()).len(), 499);
    }
}
