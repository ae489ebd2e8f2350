//! Input checks for the public API. Each returns a message that names the field and says what
//! was wanted and what was found.

use flotilla_raft::AgentId;
use flotilla_state::host_pattern::{HostPattern, HostPatternError};

pub const MAX_PROMPT_BYTES: usize = 256 * 1024;
pub const MAX_FOLLOW_UP_BYTES: usize = 256 * 1024;
pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_MODEL_CHARS: usize = 128;
pub const MAX_REPOSITORY_CHARS: usize = 2048;
pub const MAX_BRANCH_CHARS: usize = 255;
pub const MAX_SEARCH_BYTES: usize = 1024;
pub const MAX_REASON_BYTES: usize = 4096;
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page of `ListAgents`: a page is built under the state's read lock.
pub const MAX_PAGE_SIZE: usize = 500;
pub const MAX_EGRESS_HOSTS: usize = 64;

/// Why a request field is not acceptable: each message names the field and says what was
/// wanted and what was found. Becomes `InvalidArgument` (see `server::status`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("{field}: required")]
    Required { field: &'static str },
    #[error("id: {text:?} is not an agent id (a 26-character ULID)")]
    NotAnAgentId { text: String },
    #[error(
        "region {text:?} is not valid: use 1 to 63 lowercase letters, digits and inner dashes, like \"eu-west-1\""
    )]
    Region { text: String },
    #[error("{field}: required, found an empty text")]
    EmptyText { field: String },
    #[error("{field}: at most {limit} bytes, found {found}")]
    TooManyBytes { field: String, limit: usize, found: usize },
    #[error("{field}: at most {limit} characters, found {found}")]
    TooManyCharacters { field: String, limit: usize, found: usize },
    #[error("{field}: contains control characters")]
    ControlCharacters { field: String },
    #[error("repository: {text:?} contains white space or control characters")]
    RepositoryCharacters { text: String },
    #[error("repository: {text:?} is not a URL git can clone: {reason}")]
    RepositoryNotAUrl { text: String, reason: String },
    #[error("repository: {text:?} has no host")]
    RepositoryWithoutHost { text: String },
    #[error("repository: {text:?} names no repository path")]
    RepositoryWithoutPath { text: String },
    #[error("repository: scheme {scheme:?} is not supported (use https, http, ssh, git or file)")]
    RepositoryScheme { scheme: String },
    /// A form git reads as something other than a network address (a helper program, a
    /// relative path...): refused whatever the node's config says.
    #[error("{0}")]
    RepositoryRefused(flotilla_actors::repo_url::RepositoryUrlRefused),
    #[error("repository: {text:?} is a path; name it as a file:// URL (file://{text})")]
    RepositoryPath { text: String },
    #[error("{field}: {text:?} is not a valid git branch name")]
    Branch { field: String, text: String },
    #[error("page_size: must not be negative, found {size}")]
    NegativePageSize { size: i32 },
    #[error("page_size: at most {MAX_PAGE_SIZE}, found {size}")]
    PageSizeTooLarge { size: i32 },
    #[error("{field}: at most {limit} hosts, found {found}")]
    TooManyHosts { field: String, limit: usize, found: usize },
    #[error("egress_allow: invalid egress host pattern {:?}: {}", .0.pattern, .0.reason)]
    EgressPattern(HostPatternError),
    #[error("{field}: {source}")]
    HostPattern { field: String, source: HostPatternError },
    /// A rule of the replicated state refused the field (it words its own message).
    #[error("{field}: {reason}")]
    Refused {
        field: String,
        reason: flotilla_raft::PluginFieldError,
    },
}

pub fn agent_id(text: &str) -> Result<AgentId, InvalidInput> {
    if text.is_empty() {
        return Err(InvalidInput::Required { field: "id" });
    }
    text.parse()
        .map_err(|_| InvalidInput::NotAnAgentId { text: text.to_string() })
}

pub fn region(text: &str) -> Result<(), InvalidInput> {
    let valid = !text.is_empty()
        && text.len() <= 63
        && text
            .chars()
            .all(|character| character.is_ascii_lowercase() || character.is_ascii_digit() || character == '-')
        && !text.starts_with('-')
        && !text.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(InvalidInput::Region { text: text.to_string() })
    }
}

pub fn prompt(field: &str, text: &str, limit: usize) -> Result<(), InvalidInput> {
    // All whitespace: nothing after the leading whitespace (`trim` would also walk back over
    // every trailing whitespace character of a long text).
    if text.trim_start().is_empty() {
        return Err(InvalidInput::EmptyText {
            field: field.to_string(),
        });
    }
    if text.len() > limit {
        return Err(InvalidInput::TooManyBytes {
            field: field.to_string(),
            limit,
            found: text.len(),
        });
    }
    Ok(())
}

/// Accepts the URL forms git itself clones from: http(s), ssh, git and file URLs, and the
/// scp-like `user@host:path`. Whether a `file://` URL's directory is allowed is the node's
/// policy, checked after this (`RepositoryPolicy::check`).
pub fn repository(text: &str) -> Result<(), InvalidInput> {
    if text.is_empty() {
        return Err(InvalidInput::Required { field: "repository" });
    }
    if text.len() > MAX_REPOSITORY_CHARS {
        return Err(InvalidInput::TooManyCharacters {
            field: "repository".to_string(),
            limit: MAX_REPOSITORY_CHARS,
            found: text.len(),
        });
    }
    // First, so that `ext::sh -c ...` is refused for what it is rather than for its spaces.
    let location = flotilla_actors::repo_url::classify(text).map_err(InvalidInput::RepositoryRefused)?;
    if let flotilla_actors::repo_url::RepositoryLocation::Local {
        form: flotilla_actors::repo_url::LocalForm::Path,
        ..
    } = location
    {
        return Err(InvalidInput::RepositoryPath { text: text.to_string() });
    }
    if text
        .chars()
        .any(|character| character.is_whitespace() || character.is_control())
    {
        return Err(InvalidInput::RepositoryCharacters { text: text.to_string() });
    }
    if let Some((user_host, path)) = text.split_once(':') {
        if !text.contains("://") && user_host.contains('@') && !path.is_empty() {
            let host = user_host.rsplit('@').next().unwrap_or_default();
            if !host.is_empty() {
                return Ok(());
            }
        }
    }
    let url = url::Url::parse(text).map_err(|error| InvalidInput::RepositoryNotAUrl {
        text: text.to_string(),
        reason: error.to_string(),
    })?;
    let needs_host = match url.scheme() {
        "https" | "http" | "ssh" | "git" => true,
        "file" => false,
        other => {
            return Err(InvalidInput::RepositoryScheme {
                scheme: other.to_string(),
            })
        }
    };
    if needs_host && url.host_str().is_none_or(str::is_empty) {
        return Err(InvalidInput::RepositoryWithoutHost { text: text.to_string() });
    }
    if url.path().trim_matches('/').is_empty() {
        return Err(InvalidInput::RepositoryWithoutPath { text: text.to_string() });
    }
    Ok(())
}

/// A subset of git's ref-name rules (git-check-ref-format) that catches every realistic mistake.
pub fn branch(field: &str, text: &str) -> Result<(), InvalidInput> {
    let bad = text.is_empty()
        || text.len() > MAX_BRANCH_CHARS
        || text.starts_with('-')
        || text.starts_with('/')
        || text.ends_with('/')
        || text.ends_with('.')
        || text.ends_with(".lock")
        || text.contains("..")
        || text.contains("//")
        || text.contains("@{")
        || text == "@"
        || text
            .chars()
            .any(|character| character.is_control() || " ~^:?*[\\".contains(character));
    if bad {
        Err(InvalidInput::Branch {
            field: field.to_string(),
            text: text.to_string(),
        })
    } else {
        Ok(())
    }
}

pub fn short_text(field: &str, text: &str, limit: usize) -> Result<(), InvalidInput> {
    if text.chars().count() > limit {
        return Err(InvalidInput::TooManyCharacters {
            field: field.to_string(),
            limit,
            found: text.chars().count(),
        });
    }
    if text.chars().any(char::is_control) {
        return Err(InvalidInput::ControlCharacters {
            field: field.to_string(),
        });
    }
    Ok(())
}

pub fn page_size(size: i32) -> Result<usize, InvalidInput> {
    match size {
        0 => Ok(DEFAULT_PAGE_SIZE),
        size if size < 0 => Err(InvalidInput::NegativePageSize { size }),
        size if size as usize > MAX_PAGE_SIZE => Err(InvalidInput::PageSizeTooLarge { size }),
        size => Ok(size as usize),
    }
}

/// Each entry must be a host pattern (the egress proxy's syntax).
pub fn egress_allow(patterns: &[String]) -> Result<(), InvalidInput> {
    if patterns.len() > MAX_EGRESS_HOSTS {
        return Err(InvalidInput::TooManyHosts {
            field: "egress_allow".to_string(),
            limit: MAX_EGRESS_HOSTS,
            found: patterns.len(),
        });
    }
    for pattern in patterns {
        pattern.parse::<HostPattern>().map_err(InvalidInput::EgressPattern)?;
    }
    Ok(())
}

/// A plugin's name and version, as `AdminService` requests name them.
pub fn plugin_ref(name: &str, version: &str) -> Result<(), InvalidInput> {
    flotilla_raft::validate_plugin_name(name).map_err(|reason| InvalidInput::Refused {
        field: "name".to_string(),
        reason,
    })?;
    flotilla_raft::validate_plugin_version(version).map_err(|reason| InvalidInput::Refused {
        field: "version".to_string(),
        reason,
    })
}

/// The hosts granted to a plugin, as host patterns (the egress allowlist's syntax); returns
/// them normalised (lowercase, no trailing dot) without duplicates, in the order given.
pub fn granted_hosts(field: &str, hosts: &[String]) -> Result<Vec<String>, InvalidInput> {
    if hosts.len() > flotilla_raft::MAX_GRANTED_HOSTS {
        return Err(InvalidInput::TooManyHosts {
            field: field.to_string(),
            limit: flotilla_raft::MAX_GRANTED_HOSTS,
            found: hosts.len(),
        });
    }
    let mut normalised: Vec<String> = Vec::with_capacity(hosts.len());
    for host in hosts {
        let pattern = host
            .parse::<HostPattern>()
            .map_err(|source| InvalidInput::HostPattern {
                field: field.to_string(),
                source,
            })?
            .to_string();
        if !normalised.contains(&pattern) {
            normalised.push(pattern);
        }
    }
    flotilla_raft::validate_granted_hosts(&normalised).map_err(|reason| InvalidInput::Refused {
        field: field.to_string(),
        reason,
    })?;
    Ok(normalised)
}

/// A lowercase, dash-separated form of a name for branch names.
pub fn slug(text: &str, max_chars: usize) -> String {
    let mut slug = String::new();
    for character in text.chars() {
        if character.is_ascii_alphanumeric() {
            slug.push(character.to_ascii_lowercase());
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
        if slug.len() >= max_chars {
            break;
        }
    }
    let slug = slug.trim_matches('-').to_string();
    if slug.is_empty() {
        "agent".to_string()
    } else {
        slug
    }
}

/// A name from the first words of a prompt.
pub fn name_from_prompt(prompt: &str) -> String {
    let words: Vec<&str> = prompt.split_whitespace().take(8).collect();
    let name = words.join(" ");
    name.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories() {
        for good in [
            "https://github.com/org/repo.git",
            "http://127.0.0.1:8080/repo.git",
            "ssh://git@host/org/repo",
            "git@github.com:org/repo.git",
            "file:///tmp/repo.git",
        ] {
            assert_eq!(repository(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "not a url",
            "ftp://host/repo",
            "https://",
            "https://host/",
            "git@host:",
            "/tmp/repo",
            "ext::sh -c touch% /tmp/x",
            "fd::3",
            "~/repo",
        ] {
            assert!(repository(bad).is_err(), "{bad}");
        }
        assert_eq!(
            repository("/srv/git/a.git").unwrap_err().to_string(),
            "repository: \"/srv/git/a.git\" is a path; name it as a file:// URL (file:///srv/git/a.git)"
        );
        let helper = repository("ext::sh -c touch% /tmp/x").unwrap_err().to_string();
        assert!(
            helper.starts_with(
                "repository \"ext::sh -c touch% /tmp/x\": git's \"ext::\" transport runs a helper program"
            ),
            "{helper}"
        );
    }

    #[test]
    fn branches_and_regions() {
        assert!(branch("base_branch", "main").is_ok());
        assert!(branch("base_branch", "feature/x-1").is_ok());
        for bad in ["", "-x", "a..b", "a b", "x.lock", "a:b", "a/"] {
            assert!(branch("base_branch", bad).is_err(), "{bad}");
        }
        assert!(region("eu-west-1").is_ok());
        for bad in ["", "EU", "eu_west", "-eu", &"a".repeat(64)] {
            assert!(region(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn page_sizes_and_prompts() {
        assert_eq!(page_size(0), Ok(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(10), Ok(10));
        assert!(page_size(-1).is_err());
        assert!(page_size(1001).is_err());
        assert!(prompt("prompt", "   ", MAX_PROMPT_BYTES).is_err());
        assert!(prompt("prompt", &"x".repeat(MAX_PROMPT_BYTES + 1), MAX_PROMPT_BYTES).is_err());
    }

    #[test]
    fn plugin_refs_and_granted_hosts() {
        assert_eq!(plugin_ref("github", "1.2.0"), Ok(()));
        let name = plugin_ref("GitHub", "1.2.0").unwrap_err().to_string();
        assert!(name.starts_with("name: plugin name \"GitHub\" is not valid"), "{name}");
        let version = plugin_ref("github", "latest").unwrap_err().to_string();
        assert!(
            version.starts_with("version: plugin version \"latest\" is not valid"),
            "{version}"
        );
        assert_eq!(
            granted_hosts(
                "granted_hosts",
                &[
                    "API.GitHub.com".into(),
                    "api.github.com.".into(),
                    "127.0.0.1:8080".into()
                ]
            ),
            Ok(vec!["api.github.com".to_string(), "127.0.0.1:8080".to_string()])
        );
        for bad in ["", "*", "a b", "host:notaport"] {
            assert!(granted_hosts("hosts", &[bad.to_string()]).is_err(), "{bad:?}");
        }
        let too_many: Vec<String> = (0..=64).map(|index| format!("h{index}.example.com")).collect();
        assert!(granted_hosts("hosts", &too_many)
            .unwrap_err()
            .to_string()
            .contains("at most 64"));
        assert_eq!(
            granted_hosts("hosts", &["*".to_string()]).unwrap_err().to_string(),
            "hosts: invalid host pattern \"*\": a bare \"*\" would allow every host; list the hosts, or leave the allowlist unset"
        );
        assert!(egress_allow(&["http://not a host".to_string()])
            .unwrap_err()
            .to_string()
            .starts_with("egress_allow: invalid egress host pattern \"http://not a host\": "));
        for (bad, reason) in [
            ("", "pattern is empty"),
            ("example.com:0", "port 0 is not between 1 and 65535"),
            ("example.com:65536", "port 65536 is not between 1 and 65535"),
            (
                "10.0.0.0/33",
                "prefix length /33 is longer than the 32 bits of the address",
            ),
            (
                "10.1.0.0/8",
                "10.1.0.0/8 has bits set after its prefix; the network is 10.0.0.0/8",
            ),
        ] {
            assert_eq!(
                egress_allow(&[bad.to_string()]).unwrap_err().to_string(),
                format!("egress_allow: invalid egress host pattern {bad:?}: {reason}")
            );
            assert_eq!(
                granted_hosts("hosts", &[bad.to_string()]).unwrap_err().to_string(),
                format!("hosts: invalid host pattern {bad:?}: {reason}")
            );
        }
        assert_eq!(
            egress_allow(&["10.0.0.0/8".into(), "[fd00::1]:8443".into(), "10.1.2.3".into()]),
            Ok(())
        );
        assert_eq!(
            granted_hosts("hosts", &["[FD00:0::/8]:8443".into()]),
            Ok(vec!["[fd00::/8]:8443".to_string()])
        );
    }

    #[test]
    fn slugs() {
        assert_eq!(slug("Add a greeting function!", 40), "add-a-greeting-function");
        assert_eq!(slug("***", 40), "agent");
        assert_eq!(name_from_prompt("  fix   the bug\nnow "), "fix the bug now");
    }
}
