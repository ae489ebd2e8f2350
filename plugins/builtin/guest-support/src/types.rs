//! Plain mirrors of the WIT `vcs` records a provider returns or receives, so that the pure logic
//! does not depend on `wit-bindgen`'s generated types (the glue converts at the boundary).

/// A repository as a provider names it (mirrors the WIT `repo-ref`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRef {
    pub host: String,
    pub owner: String,
    pub name: String,
    pub web_url: String,
}

/// How the node clones and pushes a repository (mirrors the WIT `clone-spec`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneSpec {
    pub url: String,
    /// `(name, value)`; the value holds secret placeholders that the host fills in.
    pub auth_header: Option<(String, String)>,
}

/// What the node asks a provider to open (mirrors the WIT `pull-request-input`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequestInput {
    pub repository_url: String,
    pub head_branch: String,
    pub base_branch: String,
    pub title: String,
    pub body: String,
    pub draft: bool,
}

impl PullRequestInput {
    /// The title, starting with `prefix` when the pull request is a draft, for forges that mark
    /// drafts by title (GitLab's "Draft: ", Gitea's "WIP: ") rather than with a field.
    pub fn title_marking_draft(&self, prefix: &str) -> String {
        if self.draft && !self.title.starts_with(prefix) {
            format!("{prefix}{}", self.title)
        } else {
            self.title.clone()
        }
    }
}

/// A pull request the forge opened (mirrors the WIT `pull-request`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    pub url: String,
    pub number: u64,
}

/// What a webhook delivery describes (mirrors the WIT `webhook-event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    /// "push", "pull-request" or "comment" (see [`crate::WebhookKind`]).
    pub kind: String,
    pub repository_url: String,
    pub branch: Option<String>,
    pub pull_request_number: Option<u64>,
    pub actor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drafts_are_marked_once_in_the_title() {
        let mut input = PullRequestInput {
            repository_url: "https://forge.example/a/b".to_string(),
            head_branch: "x".to_string(),
            base_branch: "main".to_string(),
            title: "Fix it".to_string(),
            body: String::new(),
            draft: true,
        };
        assert_eq!(input.title_marking_draft("WIP: "), "WIP: Fix it");
        input.title = "WIP: Fix it".to_string();
        assert_eq!(input.title_marking_draft("WIP: "), "WIP: Fix it");
        input.draft = false;
        input.title = "Fix it".to_string();
        assert_eq!(input.title_marking_draft("WIP: "), "Fix it");
    }
}
