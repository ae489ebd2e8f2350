//! Which hosts a plugin may reach with `http.send`: the admin's grants, matched against a request
//! URL. Pure functions, so every rule is tested without a network.

use std::net::IpAddr;

use flotilla_state::host_pattern::{Host as PatternHost, HostPattern};
use url::{Host, Url};

/// Whether `grant` is a grant this module understands (the node can refuse others up front).
/// Grants are host patterns (see [`flotilla_state::host_pattern`]).
pub fn is_valid_grant(grant: &str) -> bool {
    grant.parse::<HostPattern>().is_ok()
}

/// `host` or `host:port` of a URL, as refusals name it and grants are written.
pub(crate) fn authority(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    }
}

/// Loopback hosts may be reached over plain http (test forges, a local Gitea).
pub(crate) fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(Host::Ipv4(address)) => IpAddr::V4(address).is_loopback(),
        Some(Host::Ipv6(address)) => IpAddr::V6(address).is_loopback(),
        Some(Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// Whether one of `grants` lets a plugin send a request to `url`, by the host-pattern port
/// rule: a grant without a port admits only 443, so plain http needs its port written (`:80`).
/// For a name, the addresses it resolves to must then pass [`crate::address_guard::route`].
pub(crate) fn is_granted(grants: &[String], url: &Url) -> bool {
    let Some(host) = url.host_str().and_then(|host| host.parse::<PatternHost>().ok()) else {
        return false;
    };
    let Some(port) = url.port_or_known_default() else {
        return false;
    };
    grants
        .iter()
        .filter_map(|grant| grant.parse::<HostPattern>().ok())
        .any(|grant| grant.matches_host(&host, port))
}

/// Whether a clone URL a provider returned is one the node may hand to git, and whether its auth
/// header may travel with it. `requested` is the URL the provider was asked about.
///
/// Allowed: `https://`, `http://`, `ssh://`, scp-like `[USER@]HOST:PATH`, and `file://` only when
/// the requested URL was itself a `file://` URL (a provider must not turn a remote repository
/// into a path on the node). Refused: other transports (git's `ext::` runs commands), anything
/// git could read as an option, passwords in the URL (secrets go through placeholders), and an
/// auth header on anything but https or loopback http (it would travel in clear or nowhere).
pub(crate) fn check_clone_url(requested: &str, clone_url: &str, has_auth_header: bool) -> Result<(), CloneUrlRefused> {
    let refused_url = || clone_url.to_string();
    if clone_url.is_empty() || clone_url.starts_with('-') {
        return Err(CloneUrlRefused::EmptyOrOption {
            clone_url: refused_url(),
        });
    }
    if clone_url
        .chars()
        .any(|character| character.is_whitespace() || character.is_control())
    {
        return Err(CloneUrlRefused::Whitespace {
            clone_url: refused_url(),
        });
    }
    let header_allowed = match Url::parse(clone_url) {
        Ok(url) if clone_url.contains("://") => {
            if url.password().is_some() {
                return Err(CloneUrlRefused::Password);
            }
            match url.scheme() {
                "https" => true,
                "http" => is_loopback(&url),
                "ssh" => false,
                "file" if requested.trim_start().starts_with("file://") => false,
                "file" => {
                    return Err(CloneUrlRefused::LocalPath {
                        clone_url: refused_url(),
                        requested: requested.to_string(),
                    })
                }
                scheme => {
                    return Err(CloneUrlRefused::Transport {
                        clone_url: refused_url(),
                        scheme: scheme.to_string(),
                    })
                }
            }
        }
        // `user@host:path` (git's scp-like syntax): a host, then a colon, no "::" transport.
        _ => {
            let Some((user_and_host, path)) = clone_url.split_once(':') else {
                return Err(CloneUrlRefused::NotAUrl {
                    clone_url: refused_url(),
                });
            };
            let host = user_and_host.rsplit('@').next().unwrap_or_default();
            if host.is_empty() || host.contains('/') || path.is_empty() || path.starts_with(':') {
                return Err(CloneUrlRefused::NotAUrl {
                    clone_url: refused_url(),
                });
            }
            false
        }
    };
    if has_auth_header && !header_allowed {
        return Err(CloneUrlRefused::AuthHeaderInClear {
            clone_url: refused_url(),
        });
    }
    Ok(())
}

/// Why a clone URL a provider returned is not handed to git.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CloneUrlRefused {
    #[error("clone url {clone_url:?} is empty or starts with '-'")]
    EmptyOrOption { clone_url: String },
    #[error("clone url {clone_url:?} holds whitespace or control characters")]
    Whitespace { clone_url: String },
    #[error("clone url holds a password; use an auth header with a placeholder")]
    Password,
    #[error("clone url {clone_url} is a local path but {requested} is not")]
    LocalPath { clone_url: String, requested: String },
    #[error("clone url {clone_url}: transport {scheme} is not allowed")]
    Transport { clone_url: String, scheme: String },
    #[error("clone url {clone_url:?} is neither a URL nor [USER@]HOST:PATH")]
    NotAUrl { clone_url: String },
    #[error("clone url {clone_url}: an auth header goes only with https (or http on a loopback host)")]
    AuthHeaderInClear { clone_url: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granted(grants: &[&str], url: &str) -> bool {
        let grants: Vec<String> = grants.iter().map(|grant| grant.to_string()).collect();
        is_granted(&grants, &Url::parse(url).expect("test url parses"))
    }

    #[test]
    fn exact_hosts_match_on_the_default_port_only() {
        assert!(granted(&["api.github.com"], "https://api.github.com/repos"));
        assert!(granted(&["API.GitHub.com"], "https://api.github.com:443/repos"));
        assert!(!granted(&["api.github.com"], "https://api.github.com:8443/repos"));
        assert!(!granted(&["api.github.com"], "https://github.com/"));
        assert!(!granted(&["api.github.com"], "https://api.github.com.evil.net/"));
    }

    #[test]
    fn a_grant_without_a_port_admits_443_only() {
        assert!(granted(&["example.com"], "https://example.com/"));
        assert!(!granted(&["example.com"], "http://example.com/"));
        assert!(granted(&["example.com:80"], "http://example.com/"));
        assert!(!granted(&["example.com:80"], "https://example.com/"));
        assert!(granted(&["example.com:443"], "https://example.com/"));
        assert!(!granted(&["127.0.0.1"], "http://127.0.0.1/"));
        assert!(granted(&["127.0.0.0/8:8080"], "http://127.0.0.2:8080/"));
    }

    #[test]
    fn ports_must_match_when_granted_with_one() {
        assert!(granted(&["127.0.0.1:8080"], "http://127.0.0.1:8080/x"));
        assert!(!granted(&["127.0.0.1:8080"], "http://127.0.0.1:8081/x"));
        assert!(!granted(&["127.0.0.1:8080"], "http://127.0.0.1/x"));
        assert!(granted(&["gitea.internal:443"], "https://gitea.internal/x"));
        assert!(granted(&["[::1]:9000"], "http://[::1]:9000/x"));
    }

    #[test]
    fn wildcards_match_subdomains_but_not_the_domain_itself() {
        assert!(granted(&["*.example.com"], "https://api.example.com/"));
        assert!(granted(&["*.example.com"], "https://a.b.example.com/"));
        assert!(!granted(&["*.example.com"], "https://example.com/"));
        assert!(!granted(&["*.example.com"], "https://badexample.com/"));
        assert!(!granted(&["*.example.com"], "https://api.example.com:8443/"));
        assert!(granted(&["*.example.com:8443"], "https://api.example.com:8443/"));
    }

    #[test]
    fn malformed_grants_match_nothing() {
        for grant in [
            "",
            "*",
            "*.",
            "a.*.com",
            "host:notaport",
            "host/path",
            "user@host",
            "[::1",
        ] {
            assert!(!is_valid_grant(grant), "{grant:?} should be refused");
            assert!(!granted(&[grant], "https://host/"), "{grant:?} should match nothing");
        }
    }

    #[test]
    fn authority_names_the_port_only_when_not_the_default() {
        assert_eq!(
            authority(&Url::parse("https://a.example.com:443/x").unwrap()),
            "a.example.com"
        );
        assert_eq!(
            authority(&Url::parse("http://127.0.0.1:8080/x").unwrap()),
            "127.0.0.1:8080"
        );
    }

    #[test]
    fn clone_urls_of_every_git_transport_pass() {
        let requested = "https://github.com/acme/widgets";
        assert_eq!(
            check_clone_url(requested, "https://github.com/acme/widgets.git", true),
            Ok(())
        );
        assert_eq!(
            check_clone_url(requested, "http://127.0.0.1:8080/widgets.git", true),
            Ok(())
        );
        assert_eq!(
            check_clone_url(requested, "ssh://git@github.com/acme/widgets.git", false),
            Ok(())
        );
        assert_eq!(
            check_clone_url(requested, "git@github.com:acme/widgets.git", false),
            Ok(())
        );
        assert_eq!(
            check_clone_url("file:///srv/git/w.git", "file:///srv/git/w.git", false),
            Ok(())
        );
    }

    #[test]
    fn dangerous_clone_urls_are_refused() {
        let requested = "https://github.com/acme/widgets";
        for clone_url in [
            "",
            "--upload-pack=touch /tmp/pwned",
            "ext::sh -c touch% /tmp/pwned",
            "ext::sh",
            "https://user:password@github.com/acme/widgets.git",
            "file:///var/lib/flotilla/secrets.git",
            "git://github.com/acme/widgets.git",
            "https://github.com/acme/widgets.git\nextra",
            "https://github.com/acme/widgets .git",
        ] {
            assert!(
                check_clone_url(requested, clone_url, false).is_err(),
                "{clone_url:?} should be refused"
            );
        }
    }

    #[test]
    fn auth_headers_travel_only_over_https_or_loopback_http() {
        let requested = "https://example.com/acme/widgets";
        assert!(check_clone_url(requested, "http://git.example.com/widgets.git", true).is_err());
        assert!(check_clone_url(requested, "http://git.example.com/widgets.git", false).is_ok());
        assert!(check_clone_url(requested, "ssh://git@example.com/widgets.git", true).is_err());
        assert!(check_clone_url(requested, "git@example.com:widgets.git", true).is_err());
        assert!(check_clone_url("file:///srv/w.git", "file:///srv/w.git", true).is_err());
    }

    #[test]
    fn loopback_is_recognised() {
        for url in [
            "http://127.0.0.1:1/",
            "http://127.5.0.1/",
            "http://[::1]/",
            "http://localhost:3000/",
        ] {
            assert!(is_loopback(&Url::parse(url).unwrap()), "{url}");
        }
        for url in ["http://10.0.0.1/", "http://example.com/", "http://[::2]/"] {
            assert!(!is_loopback(&Url::parse(url).unwrap()), "{url}");
        }
    }
}
