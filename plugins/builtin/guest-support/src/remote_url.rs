//! Repository URLs taken apart: every form git accepts for a remote (https, http, ssh, scp-like,
//! file), normalised so that one repository's URLs compare equal host by host.

/// How a repository URL reaches its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Https,
    Http,
    /// `ssh://` URLs and scp-like `user@host:path` ones.
    Ssh,
    File,
}

impl Scheme {
    /// The port a URL of this scheme need not name.
    fn default_port(self) -> &'static str {
        match self {
            Scheme::Https => "443",
            Scheme::Http => "80",
            Scheme::Ssh => "22",
            Scheme::File => "",
        }
    }
}

/// A repository URL taken apart: `https://github.com/acme/widgets.git`,
/// `git@github.com:acme/widgets.git`, `ssh://git@host:2222/acme/widgets`, `file:///srv/x.git`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteUrl {
    pub scheme: Scheme,
    /// Lowercase host with `:port` when the URL names a port other than the scheme's default
    /// (for ssh, the ssh port). Empty for `file:///path`.
    pub host: String,
    /// The path's non-empty segments; the last one without a trailing `.git`.
    pub segments: Vec<String>,
}

/// Takes a repository URL apart, or `None` if it is not one: unknown schemes (`git://`,
/// `ftp://`), local paths without `file://`, a missing host, `.`/`..` segments, spaces.
/// User info, query and fragment are dropped; default ports (443, 80, 22) are dropped.
pub fn parse_remote_url(url: &str) -> Option<RemoteUrl> {
    let url = url.trim();
    let has_forbidden_character = url
        .chars()
        .any(|character| character.is_whitespace() || character.is_control() || character == '\\');
    if url.is_empty() || has_forbidden_character {
        return None;
    }
    let (scheme, host, path) = match url.split_once("://") {
        Some((scheme, rest)) => split_url_with_scheme(scheme, rest)?,
        None => split_scp_like_url(url)?,
    };
    let segments = path_segments(path)?;
    Some(RemoteUrl { scheme, host, segments })
}

/// `scheme://[user@]host[:port]/path[?query][#fragment]` as scheme, normalised host and path.
fn split_url_with_scheme<'a>(scheme: &str, rest: &'a str) -> Option<(Scheme, String, &'a str)> {
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "https" => Scheme::Https,
        "http" => Scheme::Http,
        "ssh" | "git+ssh" | "ssh+git" => Scheme::Ssh,
        "file" => Scheme::File,
        _ => return None,
    };
    let rest = cut_query_and_fragment(rest);
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, ""),
    };
    let host = match authority.rsplit_once('@') {
        Some((_user_info, host)) => host,
        None => authority,
    };
    let host = normalise_host(host, scheme)?;
    if host.is_empty() && scheme != Scheme::File {
        return None;
    }
    Some((scheme, host, path))
}

/// scp-like `[user@]host:path`: a colon before any slash, and not a Windows drive.
fn split_scp_like_url(url: &str) -> Option<(Scheme, String, &str)> {
    let colon = url.find(':')?;
    let before_colon = &url[..colon];
    if before_colon.contains('/') || before_colon.len() < 2 && !before_colon.contains('@') {
        return None;
    }
    let host = match before_colon.rsplit_once('@') {
        Some((_user, host)) => host,
        None => before_colon,
    };
    let host = normalise_host(host, Scheme::Ssh)?;
    if host.is_empty() || host.contains(':') {
        return None;
    }
    Some((Scheme::Ssh, host, &url[colon + 1..]))
}

/// The path's non-empty segments, the last without `.git`; `None` for `.`, `..` or a bare
/// `.git`.
fn path_segments(path: &str) -> Option<Vec<String>> {
    let mut segments: Vec<String> = path
        .split('/')
        .filter(|segment| !segment.is_empty())
        .map(str::to_string)
        .collect();
    if segments.iter().any(|segment| segment == "." || segment == "..") {
        return None;
    }
    if let Some(last) = segments.last_mut() {
        if let Some(stripped) = last.strip_suffix(".git") {
            if stripped.is_empty() {
                return None;
            }
            *last = stripped.to_string();
        }
    }
    Some(segments)
}

fn cut_query_and_fragment(rest: &str) -> &str {
    match rest.find(['?', '#']) {
        Some(position) => &rest[..position],
        None => rest,
    }
}

/// Lowercases `host`, checks its port is a number and drops the scheme's default port.
fn normalise_host(host: &str, scheme: Scheme) -> Option<String> {
    let host = host.to_ascii_lowercase();
    let (name, port) = split_host_port(&host);
    let name_is_valid = if name.starts_with('[') {
        name.ends_with(']') && name.len() > 2
    } else {
        name.bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_'))
    };
    if !name_is_valid {
        return None;
    }
    match port {
        None => Some(host),
        Some(port) if port.is_empty() || !port.bytes().all(|byte| byte.is_ascii_digit()) => None,
        Some(port) if port == scheme.default_port() => Some(name.to_string()),
        Some(_) => Some(host),
    }
}

/// `("host", Some("8080"))` for `host:8080`, `("[::1]", Some("8080"))` for `[::1]:8080`.
pub fn split_host_port(host: &str) -> (&str, Option<&str>) {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => match host[end + 1..].strip_prefix(':') {
                Some(port) => (&host[..=end], Some(port)),
                None => (host, None),
            },
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    }
}

/// Whether `host` (with or without a port) is the local machine: the only hosts a forge may
/// be reached on over plain `http://`.
pub fn is_loopback_host(host: &str) -> bool {
    let (name, _port) = split_host_port(host);
    name == "localhost" || name == "[::1]" || name.starts_with("127.")
}

impl RemoteUrl {
    /// The host the forge's web and API answer on: the URL's host, without the ssh port for
    /// ssh URLs (that port is sshd's, not the web server's).
    pub fn web_host(&self) -> String {
        match self.scheme {
            Scheme::Ssh => split_host_port(&self.host).0.to_string(),
            _ => self.host.clone(),
        }
    }

    /// `http` for a forge on loopback reached over `http://`, `https` everywhere else.
    pub fn web_scheme(&self) -> &'static str {
        if self.scheme == Scheme::Http && is_loopback_host(&self.host) {
            "http"
        } else {
            "https"
        }
    }

    /// `https://HOST` (or `http://127.0.0.1:PORT` for a loopback forge).
    pub fn web_origin(&self) -> String {
        format!("{}://{}", self.web_scheme(), self.web_host())
    }

    /// Whether this URL's host is one of `claimed_hosts` (lowercase `host` or `host:port`).
    /// An ssh URL matches on the host name alone, since its port is sshd's.
    pub fn host_is_one_of(&self, claimed_hosts: &[String]) -> bool {
        claimed_hosts.iter().any(|claimed| match self.scheme {
            Scheme::Ssh => split_host_port(claimed).0 == split_host_port(&self.host).0,
            _ => *claimed == self.host,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(url: &str) -> RemoteUrl {
        parse_remote_url(url).unwrap_or_else(|| panic!("{url} should parse"))
    }

    #[test]
    fn https_urls_lose_user_info_suffix_query_and_default_port() {
        let url = parsed("https://x-access-token:abc@GitHub.com:443/acme/widgets.git?x=1#readme");
        assert_eq!(url.scheme, Scheme::Https);
        assert_eq!(url.host, "github.com");
        assert_eq!(url.segments, ["acme", "widgets"]);
        assert_eq!(url.web_origin(), "https://github.com");
    }

    #[test]
    fn scp_like_and_ssh_urls_parse_and_match_on_the_host_name() {
        let scp = parsed("git@github.com:acme/widgets.git");
        assert_eq!((scp.scheme, scp.host.as_str()), (Scheme::Ssh, "github.com"));
        assert_eq!(scp.segments, ["acme", "widgets"]);
        let ssh = parsed("ssh://git@gitlab.example.com:2222/group/sub/project.git");
        assert_eq!(ssh.host, "gitlab.example.com:2222");
        assert_eq!(ssh.web_origin(), "https://gitlab.example.com");
        assert!(ssh.host_is_one_of(&["gitlab.example.com".to_string()]));
        assert_eq!(parsed("ssh://git@github.com:22/a/b").host, "github.com");
    }

    #[test]
    fn loopback_http_keeps_http_and_its_port() {
        let url = parsed("http://127.0.0.1:8080/acme/widgets");
        assert_eq!(url.web_origin(), "http://127.0.0.1:8080");
        assert!(url.host_is_one_of(&["127.0.0.1:8080".to_string()]));
        assert!(!url.host_is_one_of(&["127.0.0.1".to_string()]));
        assert_eq!(
            parsed("http://forge.example.com/a/b").web_origin(),
            "https://forge.example.com"
        );
        assert_eq!(parsed("http://[::1]:3000/a/b").web_origin(), "http://[::1]:3000");
    }

    #[test]
    fn file_urls_have_an_empty_host() {
        let url = parsed("file:///srv/git/widgets.git");
        assert_eq!((url.scheme, url.host.as_str()), (Scheme::File, ""));
        assert_eq!(url.segments, ["srv", "git", "widgets"]);
    }

    #[test]
    fn non_urls_are_refused() {
        for url in [
            "",
            "/srv/git/widgets.git",
            "./widgets",
            "C:\\repos\\widgets",
            "c:/repos",
            "git://github.com/acme/widgets.git",
            "ftp://example.com/a/b",
            "https://",
            "https:///acme/widgets",
            "https://github.com/acme/../widgets",
            "https://github.com:abc/acme/widgets",
            "https://github.com/acme/wid gets",
            "https://github.com/acme/.git",
        ] {
            assert_eq!(parse_remote_url(url), None, "{url:?} should be refused");
        }
    }
}
