//! A VCS provider for a loopback test forge: answers every export, asks for its token through a
//! `{{secret:token}}` placeholder, opens pull requests with one `http.send`, and takes its display
//! name from the `display-name` setting.

wit_bindgen::generate!({ path: "../../wit", world: "vcs-provider" });

use flotilla::plugin::http;
use flotilla::plugin::log::{log, Level};
use flotilla::plugin::settings;
use flotilla::plugin::types::{Header, HttpRequest};
use flotilla::plugin::vcs::RemoteError;

struct WellBehaved;

/// `http://HOST/OWNER/NAME` or `https://HOST/OWNER/NAME`, with an optional `.git`.
fn split_repository_url(url: &str) -> Option<(String, String, String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let mut parts = rest.trim_end_matches('/').split('/');
    let host = parts.next()?.to_string();
    let owner = parts.next()?.to_string();
    let name = parts.next()?.trim_end_matches(".git").to_string();
    if parts.next().is_some() || host.is_empty() || owner.is_empty() || name.is_empty() {
        return None;
    }
    Some((scheme.to_string(), host, owner, name))
}

fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for character in text.chars() {
        match character {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Guest for WellBehaved {
    fn info() -> ProviderInfo {
        ProviderInfo {
            name: "loopback-forge".to_string(),
            display_name: settings::get("display-name").unwrap_or_else(|| "Loopback Forge".to_string()),
            url_patterns: vec!["http://127.0.0.1:PORT/OWNER/REPO".to_string()],
            supports_pull_requests: true,
        }
    }

    fn match_url(url: String) -> Option<RepoRef> {
        let (scheme, host, owner, name) = split_repository_url(&url)?;
        Some(RepoRef {
            web_url: format!("{scheme}://{host}/{owner}/{name}"),
            host,
            owner,
            name,
        })
    }

    fn clone_spec(url: String) -> Result<CloneSpec, PluginError> {
        let (scheme, host, owner, name) = split_repository_url(&url)
            .ok_or_else(|| PluginError::InvalidInput(format!("not a repository url: {url}")))?;
        Ok(CloneSpec {
            url: format!("{scheme}://{host}/{owner}/{name}.git"),
            auth_header: Some(Header {
                name: "Authorization".to_string(),
                value: "Bearer {{secret:token}}".to_string(),
            }),
        })
    }

    fn create_pull_request(input: PullRequestInput) -> Result<PullRequest, PluginError> {
        let (scheme, host, owner, name) = split_repository_url(&input.repository_url)
            .ok_or_else(|| PluginError::InvalidInput(format!("not a repository url: {}", input.repository_url)))?;
        log(
            Level::Info,
            &format!("opening a pull request on {owner}/{name} from {}", input.head_branch),
        );
        let body = format!(
            "{{\"title\":{},\"head\":{},\"base\":{},\"body\":{},\"draft\":{}}}",
            json_string(&input.title),
            json_string(&input.head_branch),
            json_string(&input.base_branch),
            json_string(&input.body),
            input.draft
        );
        let response = http::send(&HttpRequest {
            method: "POST".to_string(),
            url: format!("{scheme}://{host}/api/repos/{owner}/{name}/pulls"),
            headers: vec![
                Header {
                    name: "Authorization".to_string(),
                    value: "Bearer {{secret:token}}".to_string(),
                },
                Header {
                    name: "Content-Type".to_string(),
                    value: "application/json".to_string(),
                },
            ],
            body: Some(body.into_bytes()),
        })
        .map_err(PluginError::Http)?;
        let text = String::from_utf8_lossy(&response.body).into_owned();
        if !(200..300).contains(&response.status) {
            return Err(PluginError::Remote(RemoteError {
                status: response.status,
                message: text,
            }));
        }
        // The test forge answers `NUMBER URL`.
        let (number, url) = text
            .trim()
            .split_once(' ')
            .ok_or_else(|| PluginError::InvalidInput(format!("unexpected forge answer: {text}")))?;
        let number = number
            .parse()
            .map_err(|_| PluginError::InvalidInput(format!("unexpected pull request number: {number}")))?;
        Ok(PullRequest {
            url: url.to_string(),
            number,
        })
    }

    fn parse_webhook(input: WebhookInput) -> Result<Option<WebhookEvent>, PluginError> {
        let Some(event) = input
            .headers
            .iter()
            .find(|header| header.name.eq_ignore_ascii_case("x-forge-event"))
        else {
            return Err(PluginError::InvalidInput("missing x-forge-event header".to_string()));
        };
        if event.value == "ping" {
            return Ok(None);
        }
        let body = String::from_utf8(input.body)
            .map_err(|_| PluginError::InvalidInput("webhook body is not utf-8".to_string()))?;
        let mut repository_url = None;
        let mut branch = None;
        for line in body.lines() {
            match line.split_once('=') {
                Some(("repository", value)) => repository_url = Some(value.to_string()),
                Some(("branch", value)) => branch = Some(value.to_string()),
                _ => {}
            }
        }
        Ok(Some(WebhookEvent {
            kind: event.value.clone(),
            repository_url: repository_url
                .ok_or_else(|| PluginError::InvalidInput("webhook body names no repository".to_string()))?,
            branch,
            pull_request_number: None,
            actor: None,
        }))
    }
}

export!(WellBehaved);
