//! A repository on a forge: the URL that named it, taken apart, and its owner and name, from
//! which the forge's pages, clone URL and API paths follow.

use crate::remote_url::RemoteUrl;
use crate::types::RepoRef;

/// A repository on a claimed forge host: GitHub's and Gitea's OWNER/REPO, Bitbucket's
/// WORKSPACE/REPO, GitLab's GROUP[/SUBGROUP...]/PROJECT (whose owner holds the `/`s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgeRepository {
    pub url: RemoteUrl,
    pub owner: String,
    pub name: String,
}

impl ForgeRepository {
    /// `OWNER/NAME`, the repository's path on the forge.
    pub fn full_path(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }

    /// The repository's page: `{origin}/{owner}/{name}`.
    pub fn web_url(&self) -> String {
        format!("{}/{}", self.url.web_origin(), self.full_path())
    }

    /// The URL git clones and pushes: the page with `.git`.
    pub fn clone_url(&self) -> String {
        format!("{}.git", self.web_url())
    }

    pub fn repo_ref(self) -> RepoRef {
        RepoRef {
            host: self.url.web_host(),
            web_url: self.web_url(),
            owner: self.owner,
            name: self.name,
        }
    }
}

/// The owner and name of a path of exactly two plain segments, the form of most forges.
pub fn owner_and_name(segments: &[String]) -> Option<(String, String)> {
    let [owner, name] = segments else {
        return None;
    };
    (is_plain_name(owner) && is_plain_name(name)).then(|| (owner.clone(), name.clone()))
}

/// Whether `segment` is a plausible owner or repository name on a forge: ASCII letters,
/// digits, `-`, `_` and `.`, not starting with a dot.
pub fn is_plain_name(segment: &str) -> bool {
    !segment.is_empty()
        && !segment.starts_with('.')
        && segment
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote_url::parse_remote_url;

    #[test]
    fn two_plain_segments_name_an_owner_and_a_repository() {
        let segments = |path: &str| path.split('/').map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            owner_and_name(&segments("acme/widgets")),
            Some(("acme".to_string(), "widgets".to_string()))
        );
        assert_eq!(owner_and_name(&segments("acme")), None);
        assert_eq!(owner_and_name(&segments("acme/widgets/pull")), None);
        assert_eq!(owner_and_name(&segments("acme/.hidden")), None);
    }

    #[test]
    fn pages_and_clone_urls_follow_the_web_origin() {
        let repository = ForgeRepository {
            url: parse_remote_url("git@gitlab.com:acme/platform/widgets.git").unwrap(),
            owner: "acme/platform".to_string(),
            name: "widgets".to_string(),
        };
        assert_eq!(repository.clone_url(), "https://gitlab.com/acme/platform/widgets.git");
        assert_eq!(
            repository.repo_ref(),
            RepoRef {
                host: "gitlab.com".to_string(),
                owner: "acme/platform".to_string(),
                name: "widgets".to_string(),
                web_url: "https://gitlab.com/acme/platform/widgets".to_string(),
            }
        );
    }
}
