//! Which repository URLs the node hands to git.
//!
//! A repository URL comes from a client and, through a provider plugin, from a forge: it is
//! hostile. git reads more into a URL than a network address. `ext::CMD` and other
//! `<transport>::` forms run a helper program on the node, an unknown `scheme://` is handed to a
//! `git-remote-<scheme>` helper, and `file://` URLs and plain paths read any repository on the
//! node's disk (another team's mirror, the node's own data). So:
//!
//! - [`classify`] (a pure function) follows git's own rules for telling these forms apart and
//!   refuses helpers, unknown schemes, option-like URLs and relative paths;
//! - [`RepositoryPolicy::check`] admits a local repository only when its path, after resolving
//!   `..` and symbolic links, lies under a directory the node's config lists
//!   (`[repos] allow_local`), compared by whole path components.
//!
//! The create path checks a URL on the node that takes the request; the repository actor checks
//! it again, with its own node's config, before every clone, fetch and push.

use std::path::{Component, Path, PathBuf};

/// Where git would go for a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepositoryLocation {
    /// An https, http, ssh, git or scp-like (`user@host:path`) URL.
    Remote,
    /// A repository on this node's disk: a `file://` URL (its path decoded as git decodes it)
    /// or an absolute path.
    Local { path: PathBuf, form: LocalForm },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalForm {
    FileUrl,
    Path,
}

/// The name of the setting that lists the directories local repositories may come from.
pub const ALLOW_LOCAL_SETTING: &str = "[repos] allow_local";

/// Schemes git clones natively (no helper program). `file` is local and goes through the policy.
const REMOTE_SCHEMES: &[&str] = &["https", "http", "ssh", "git"];

/// Bytes of a gitfile (`.git` as a file: `gitdir: PATH`) read to follow it.
const MAX_GITFILE_BYTES: u64 = 4096;

/// Why a repository URL is refused. Each message names the URL, the problem and, where an
/// operator could change the answer, the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepositoryUrlRefused {
    #[error(
        "repository {url:?}: git's \"{transport}::\" transport runs a helper program on the node and is refused; use an https, http, ssh, git or scp-like (user@host:path) URL"
    )]
    TransportHelper { url: String, transport: String },
    #[error(
        "repository {url:?}: scheme {scheme:?} is refused (git would hand it to a helper program); use https, http, ssh, git or file"
    )]
    Scheme { url: String, scheme: String },
    #[error("repository {url:?}: {part} starts with \"-\", which git could read as an option")]
    OptionLike { url: String, part: &'static str },
    #[error(
        "repository {url:?}: a relative or ~ path is refused (it depends on the node's working directory); name a file:// URL under a directory of the node's {ALLOW_LOCAL_SETTING}"
    )]
    RelativePath { url: String },
    #[error("repository {url:?}: a file:// URL names a path on the node (file:///PATH), found host {host:?}")]
    FileUrlHost { url: String, host: String },
    #[error("repository {url:?}: the local path contains a NUL byte")]
    NulByte { url: String },
    #[error(
        "repository {url:?}: local repositories are refused on this node: its {ALLOW_LOCAL_SETTING} lists no directory"
    )]
    LocalNotConfigured { url: String },
    #[error(
        "repository {url:?}: {path} is not under a directory of the node's {ALLOW_LOCAL_SETTING} ({allowed}); symbolic links and \"..\" are resolved before comparing"
    )]
    LocalNotAllowed { url: String, path: String, allowed: String },
    #[error("repository {url:?}: cannot resolve the local path {path}: {reason}")]
    Unresolvable { url: String, path: String, reason: String },
}

impl RepositoryUrlRefused {
    /// Whether the node's policy refused an otherwise well-formed URL (an operator could allow
    /// it with the setting), as opposed to a URL the node never takes.
    pub fn denied_by_policy(&self) -> bool {
        matches!(
            self,
            RepositoryUrlRefused::LocalNotConfigured { .. }
                | RepositoryUrlRefused::LocalNotAllowed { .. }
                | RepositoryUrlRefused::Unresolvable { .. }
        )
    }
}

/// Which local directories repositories may come from. The default lists none: every
/// `file://` URL and path is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepositoryPolicy {
    allow_local: Vec<PathBuf>,
}

impl RepositoryPolicy {
    /// `allow_local` must hold absolute paths (the config checks that when it is read).
    pub fn new(allow_local: Vec<PathBuf>) -> Self {
        RepositoryPolicy { allow_local }
    }

    pub fn allow_local(&self) -> &[PathBuf] {
        &self.allow_local
    }

    /// Classifies `url` and, for a local repository, checks it against `allow_local`. Reads the
    /// file system (to resolve links): call it off the async runtime ([`Self::check_blocking`]).
    pub fn check(&self, url: &str) -> Result<RepositoryLocation, RepositoryUrlRefused> {
        let location = classify(url)?;
        if let RepositoryLocation::Local { path, .. } = &location {
            self.check_local(url, path)?;
        }
        Ok(location)
    }

    /// [`Self::check`], on a blocking thread when it reads the file system: a remote URL is only
    /// parsed, in place, which spares every create of one a thread hand-off.
    pub async fn check_blocking(&self, url: &str) -> Result<RepositoryLocation, RepositoryUrlRefused> {
        let location = classify(url)?;
        if !matches!(location, RepositoryLocation::Local { .. }) {
            return Ok(location);
        }
        let policy = self.clone();
        let owned = url.to_string();
        tokio::task::spawn_blocking(move || policy.check(&owned))
            .await
            .unwrap_or_else(|error| {
                Err(RepositoryUrlRefused::Unresolvable {
                    url: url.to_string(),
                    path: String::new(),
                    reason: format!("the check did not finish: {error}"),
                })
            })
    }

    fn check_local(&self, url: &str, path: &Path) -> Result<(), RepositoryUrlRefused> {
        if self.allow_local.is_empty() {
            return Err(RepositoryUrlRefused::LocalNotConfigured { url: url.to_string() });
        }
        let unresolvable = |path: &Path, reason: String| RepositoryUrlRefused::Unresolvable {
            url: url.to_string(),
            path: path.display().to_string(),
            reason,
        };
        let allowed: Vec<PathBuf> = self
            .allow_local
            .iter()
            .map(|directory| resolve(directory).map_err(|reason| unresolvable(directory, reason)))
            .collect::<Result<_, _>>()?;
        let inside = |resolved: &Path| allowed.iter().any(|directory| resolved.starts_with(directory));
        // git opens the first of these that is a repository (or a gitfile), so each that exists
        // must stay inside: `x.git` beside `x` could be a link out.
        for candidate in git_candidates(path) {
            let resolved = resolve(&candidate).map_err(|reason| unresolvable(&candidate, reason))?;
            let mut targets = vec![resolved.clone()];
            if let Some(gitdir) = gitfile_target(&resolved) {
                targets.push(resolve(&gitdir).map_err(|reason| unresolvable(&gitdir, reason))?);
            }
            if let Some(outside) = targets.iter().find(|target| !inside(target)) {
                return Err(RepositoryUrlRefused::LocalNotAllowed {
                    url: url.to_string(),
                    path: outside.display().to_string(),
                    allowed: self
                        .allow_local
                        .iter()
                        .map(|directory| directory.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        Ok(())
    }
}

/// The protocols git may use for a repository at `location`, for `GIT_ALLOW_PROTOCOL`: git
/// itself then refuses helpers and `file` whatever a URL, a redirect or a config says.
pub fn allowed_git_protocols(location: &RepositoryLocation) -> &'static str {
    match location {
        RepositoryLocation::Remote => "https:http:ssh:git",
        RepositoryLocation::Local { .. } => "https:http:ssh:git:file",
    }
}

/// Tells apart the forms git reads a repository string as (transport.c and connect.c), and
/// refuses those that run helper programs or depend on the node's working directory.
pub fn classify(url: &str) -> Result<RepositoryLocation, RepositoryUrlRefused> {
    let refused_url = || url.to_string();
    if url.starts_with('-') {
        return Err(RepositoryUrlRefused::OptionLike {
            url: refused_url(),
            part: "the URL",
        });
    }
    let scheme_length = url
        .char_indices()
        .take_while(|(index, character)| {
            character.is_ascii_alphanumeric() || (*index > 0 && matches!(character, '+' | '-' | '.'))
        })
        .count();
    let (scheme, rest) = url.split_at(scheme_length);
    if scheme_length > 0 && rest.starts_with("::") {
        return Err(RepositoryUrlRefused::TransportHelper {
            url: refused_url(),
            transport: scheme.to_string(),
        });
    }
    if scheme_length > 0 {
        if let Some(after) = rest.strip_prefix("://") {
            return classify_url(url, scheme, after);
        }
    }
    // git's url_is_local_not_ssh: no colon, or a slash before the first colon, is a path.
    let local = match (url.find(':'), url.find('/')) {
        (None, _) => true,
        (Some(colon), Some(slash)) => slash < colon,
        (Some(_), None) => false,
    };
    if !local {
        // scp-like `[user@]host:path`: the host must not read as an ssh option.
        let before_colon = &url[..url.find(':').unwrap_or(0)];
        let host = before_colon.rsplit('@').next().unwrap_or_default();
        if host.trim_start_matches('[').starts_with('-') {
            return Err(RepositoryUrlRefused::OptionLike {
                url: refused_url(),
                part: "the host",
            });
        }
        return Ok(RepositoryLocation::Remote);
    }
    if !url.starts_with('/') {
        return Err(RepositoryUrlRefused::RelativePath { url: refused_url() });
    }
    if url.contains('\0') {
        return Err(RepositoryUrlRefused::NulByte { url: refused_url() });
    }
    Ok(RepositoryLocation::Local {
        path: PathBuf::from(url),
        form: LocalForm::Path,
    })
}

fn classify_url(url: &str, scheme: &str, after: &str) -> Result<RepositoryLocation, RepositoryUrlRefused> {
    if scheme == "file" {
        // git decodes %-escapes of a URL before using its path; the path is not normalised
        // (`..` is left to the kernel, which resolves it after any link).
        let Some(slash) = after.find('/') else {
            return Err(RepositoryUrlRefused::FileUrlHost {
                url: url.to_string(),
                host: after.to_string(),
            });
        };
        if slash > 0 {
            return Err(RepositoryUrlRefused::FileUrlHost {
                url: url.to_string(),
                host: after[..slash].to_string(),
            });
        }
        let decoded = percent_encoding::percent_decode_str(after).collect::<Vec<u8>>();
        if decoded.contains(&0) {
            return Err(RepositoryUrlRefused::NulByte { url: url.to_string() });
        }
        use std::os::unix::ffi::OsStringExt as _;
        return Ok(RepositoryLocation::Local {
            path: PathBuf::from(std::ffi::OsString::from_vec(decoded)),
            form: LocalForm::FileUrl,
        });
    }
    if !REMOTE_SCHEMES.contains(&scheme) {
        return Err(RepositoryUrlRefused::Scheme {
            url: url.to_string(),
            scheme: scheme.to_string(),
        });
    }
    let authority = after.split('/').next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    if host.trim_start_matches('[').starts_with('-') {
        return Err(RepositoryUrlRefused::OptionLike {
            url: url.to_string(),
            part: "the host",
        });
    }
    Ok(RepositoryLocation::Remote)
}

/// The paths git tries for a local repository, in its order (enter_repo in git's path.c).
fn git_candidates(path: &Path) -> Vec<PathBuf> {
    let text = path.as_os_str().to_os_string();
    let with = |suffix: &str| {
        let mut candidate = text.clone();
        candidate.push(suffix);
        PathBuf::from(candidate)
    };
    let candidates = [with("/.git"), path.to_path_buf(), with(".git/.git"), with(".git")];
    candidates
        .into_iter()
        .filter(|candidate| std::fs::symlink_metadata(candidate).is_ok() || candidate == path)
        .collect()
}

/// The directory a gitfile (`gitdir: PATH`) at `path` points to, if `path` is one.
fn gitfile_target(path: &Path) -> Option<PathBuf> {
    use std::io::Read as _;
    if !std::fs::metadata(path).ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_GITFILE_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    let target = text.lines().next()?.strip_prefix("gitdir:")?.trim();
    let target = Path::new(target);
    Some(match path.parent() {
        Some(parent) if target.is_relative() => parent.join(target),
        _ => target.to_path_buf(),
    })
}

/// `path` with `..` and symbolic links resolved as the kernel would. A path that does not exist
/// (yet) resolves through its deepest existing ancestor; `..` below a missing directory is
/// refused, since the kernel would not resolve it.
fn resolve(path: &Path) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err("not an absolute path".to_string());
    }
    let mut missing: Vec<&std::ffi::OsStr> = Vec::new();
    let mut existing = path;
    loop {
        match std::fs::canonicalize(existing) {
            Ok(resolved) => {
                let mut resolved = resolved;
                for name in missing.iter().rev() {
                    resolved.push(name);
                }
                return Ok(resolved);
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                // A dangling link would be followed once its target appears.
                if std::fs::symlink_metadata(existing).is_ok() {
                    return Err(format!(
                        "{} is a symbolic link to a path that does not exist",
                        existing.display()
                    ));
                }
                let Some(parent) = existing.parent() else {
                    return Err(error.to_string());
                };
                match existing.components().next_back() {
                    Some(Component::Normal(name)) => missing.push(name),
                    Some(Component::CurDir) => {}
                    _ => return Err("\"..\" below a directory that does not exist".to_string()),
                }
                existing = parent;
            }
            Err(error) => return Err(error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests;
