//! What the plain git provider decides: it takes any repository URL git can push to (the
//! fallback after the forge providers), clones it as it is, optionally with Basic auth, and
//! has no pull requests or webhooks. Plain functions, tested natively.

use flotilla_guest_support::{parse_remote_url, CloneSpec, Failure, RepoRef, Scheme, Settings};

pub const NAME: &str = "git";
pub const DISPLAY_NAME: &str = "Plain git";
/// Plain git has no default token: without `token-secret` (and `username`) clones carry no
/// credentials.
pub const NO_DEFAULT_TOKEN_SECRET: &str = "";

pub fn url_patterns() -> Vec<String> {
    vec![
        "https://HOST/PATH".to_string(),
        "http://HOST/PATH".to_string(),
        "ssh://[USER@]HOST[:PORT]/PATH".to_string(),
        "[USER@]HOST:PATH".to_string(),
        "file:///PATH".to_string(),
    ]
}

pub fn match_url(url: &str) -> Option<RepoRef> {
    let parsed = parse_remote_url(url)?;
    let (name, parents) = parsed.segments.split_last()?;
    Some(RepoRef {
        host: parsed.host.clone(),
        owner: parents.join("/"),
        name: name.clone(),
        // A plain git server has no web page; the URL itself is the best link there is.
        web_url: url.trim().to_string(),
    })
}

pub fn clone_spec(url: &str, settings: &Settings) -> Result<CloneSpec, Failure> {
    let parsed = parse_remote_url(url).ok_or_else(|| {
        Failure::InvalidInput(format!(
            "{url:?} is not a git repository URL (file://, http(s)://, ssh:// or user@host:path)"
        ))
    })?;
    if parsed.segments.is_empty() {
        return Err(Failure::InvalidInput(format!("{url:?} names no repository path")));
    }
    // Headers only travel over HTTP; ssh and file URLs authenticate (or not) by other means.
    let over_http = matches!(parsed.scheme, Scheme::Http | Scheme::Https);
    // The token goes only to the hosts the admin listed (`hosts`): plain git takes any URL,
    // and a repository on another host must not receive it.
    let listed = settings.extra_hosts.contains(&parsed.host);
    let auth_header = match (&settings.username, settings.token_secret.is_empty()) {
        (Some(username), false) if over_http && listed => Some((
            "Authorization".to_string(),
            format!("Basic {}", settings.basic_placeholder(username)?),
        )),
        _ => None,
    };
    Ok(CloneSpec {
        url: url.trim().to_string(),
        auth_header,
    })
}

/// Why `create-pull-request` fails on plain git, whatever the input.
pub fn pull_requests_unsupported() -> Failure {
    Failure::Unsupported("plain git has no pull requests".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(username: Option<&str>, token_secret: Option<&str>) -> Settings {
        let (username, token_secret) = (username.map(str::to_string), token_secret.map(str::to_string));
        Settings::read(
            move |key| match key {
                "username" => username.clone(),
                "token-secret" => token_secret.clone(),
                "hosts" => Some("git.example.com".to_string()),
                _ => None,
            },
            NO_DEFAULT_TOKEN_SECRET,
        )
    }

    #[test]
    fn any_git_url_matches() {
        let file = match_url("file:///srv/git/widgets.git").unwrap();
        assert_eq!(
            file,
            RepoRef {
                host: String::new(),
                owner: "srv/git".to_string(),
                name: "widgets".to_string(),
                web_url: "file:///srv/git/widgets.git".to_string(),
            }
        );
        let http = match_url("http://127.0.0.1:8080/widgets.git").unwrap();
        assert_eq!(
            (http.host.as_str(), http.owner.as_str(), http.name.as_str()),
            ("127.0.0.1:8080", "", "widgets")
        );
        assert!(match_url("https://git.example.com/team/widgets.git").is_some());
        assert!(match_url("ssh://git@git.example.com:2222/team/widgets.git").is_some());
        assert!(match_url("git@git.example.com:team/widgets.git").is_some());
        for url in [
            "/srv/git/widgets.git",
            "git://example.com/a.git",
            "https://example.com/",
            "not a url",
        ] {
            assert_eq!(match_url(url), None, "{url}");
        }
    }

    #[test]
    fn clones_carry_basic_auth_only_when_configured_and_over_http() {
        let url = "https://git.example.com/team/widgets.git";
        let none = clone_spec(url, &settings(None, None)).unwrap();
        assert_eq!((none.url.as_str(), none.auth_header), (url, None));
        assert_eq!(clone_spec(url, &settings(Some("bot"), None)).unwrap().auth_header, None);
        let with_token = clone_spec(url, &settings(Some("bot"), Some("git-token"))).unwrap();
        assert_eq!(
            with_token.auth_header,
            Some((
                "Authorization".to_string(),
                "Basic {{basic:bot:secret:git-token}}".to_string()
            ))
        );
        let elsewhere = clone_spec(
            "https://other.example.com/team/widgets.git",
            &settings(Some("bot"), Some("git-token")),
        )
        .unwrap();
        assert_eq!(
            elsewhere.auth_header, None,
            "a host the settings do not list gets no token"
        );
        let file = clone_spec("file:///srv/git/widgets.git", &settings(Some("bot"), Some("git-token"))).unwrap();
        assert_eq!(file.auth_header, None);
    }

    #[test]
    fn pull_requests_are_unsupported() {
        assert_eq!(
            pull_requests_unsupported(),
            Failure::Unsupported("plain git has no pull requests".to_string())
        );
    }
}
