//! Workspaces from the mirror. The repository actor fetches the mirror when no fetch began
//! after the agent asked; then finding the start commit, the clone and the checkout run on a
//! task of their own under the mirror's shared lock, so that a burst of agents of one
//! repository fetches once and clones side by side instead of one after the other.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ractor::RpcReplyPort;

use super::{git, GitError, RepoError, RepoState, Workspace};
use crate::push_bundle;

/// What an agent asks for.
pub(super) struct Wanted {
    pub base_branch: String,
    pub work_branch: String,
    pub recorded: Option<String>,
    pub path: PathBuf,
}

/// Where a workspace starts, read in the mirror.
pub(super) struct Start {
    commit: String,
    tree: String,
    resumed: bool,
}

/// A commit and its tree in `mirror`, in one git call; `None` when `name` is no commit there.
async fn commit_and_tree(mirror: &Path, name: &str) -> Option<(String, String)> {
    // `--revs-only`: a name that is no revision prints nothing (it is never taken for a path).
    let output = git(
        &[
            "rev-parse",
            "--revs-only",
            &format!("{name}^{{commit}}"),
            &format!("{name}^{{tree}}"),
        ],
        Some(mirror),
    )
    .await
    .ok()?;
    let mut lines = output.lines();
    match (lines.next(), lines.next()) {
        (Some(commit), Some(tree)) => Some((commit.trim().to_string(), tree.trim().to_string())),
        _ => None,
    }
}

/// The commit and tree at each of the branches `names` (full ref names) in `mirror`, read in
/// one `git for-each-ref` (a new agent's start needs both its work branch and its base: one
/// git process instead of two). A branch at something other than a commit (an annotated tag)
/// is peeled as [`commit_and_tree`] does, in a call of its own; a failed read finds nothing,
/// as a failed `rev-parse` did.
async fn branch_tips<const N: usize>(mirror: &Path, names: [&str; N]) -> [Option<(String, String)>; N] {
    let mut args = vec![
        "for-each-ref",
        "--format=%(objecttype) %(objectname) %(tree) %(refname)",
    ];
    args.extend_from_slice(&names);
    let listed = git(&args, Some(mirror)).await.unwrap_or_default();
    let mut tips: [Option<(String, String)>; N] = std::array::from_fn(|_| None);
    for (name, tip) in names.iter().zip(tips.iter_mut()) {
        // for-each-ref also lists refs beneath a name: only the exact name counts.
        let line = listed.lines().find(|line| line.splitn(4, ' ').nth(3) == Some(name));
        *tip = match line.map(|line| line.splitn(4, ' ').collect::<Vec<_>>()) {
            Some(fields) if fields[0] == "commit" => Some((fields[1].to_string(), fields[2].to_string())),
            Some(_) => commit_and_tree(mirror, name).await,
            None => None,
        };
    }
    tips
}

impl RepoState {
    /// Fetches the mirror unless a fetch started after the agent asked (the actor's only
    /// serial step of a workspace).
    pub(super) async fn refresh_for(&mut self, requested_at: Instant) -> Result<(), RepoError> {
        if self.refreshed_at.is_some_and(|fetched| fetched >= requested_at) {
            return Ok(());
        }
        let _exclusive = self.mirror_lock.clone().write_owned().await;
        let started = Instant::now();
        self.refresh().await?;
        tracing::debug!(url = %self.args.url, elapsed_ms = started.elapsed().as_millis() as u64, "mirror fetched");
        // Still exclusive: no clone is linking the loose objects this removes.
        if let Err(error) = pack_loose_objects(&self.args.mirror).await {
            tracing::warn!(url = %self.args.url, %error, "packing the mirror's loose objects failed; clones copy them one by one");
        }
        Ok(())
    }

    /// Finds where the workspace starts and clones it, on a task of its own holding the mirror
    /// shared, and answers `reply` from there. At most one per agent being provisioned is in
    /// flight: each agent waits for its answer.
    pub(super) async fn spawn_workspace(&self, wanted: Wanted, reply: RpcReplyPort<Result<Workspace, RepoError>>) {
        let mirror = self.args.mirror.clone();
        let url = self.args.url.clone();
        self.spawn_shared(async move {
            let result = async {
                let start = workspace_start(&mirror, &url, &wanted).await?;
                make_workspace(&mirror, &url, start, &wanted.work_branch, &wanted.path).await
            }
            .await;
            let _ = reply.send(result);
        })
        .await;
    }
}

/// Loose objects in the mirror from which a fetch packs them. Every fence an agent takes
/// writes one (`hash-object`), and a local clone links each loose object (and makes its
/// directory) one by one: 200 of them tripled a clone's CPU. Git's own `gc --auto` waits for
/// thousands.
const PACK_LOOSE_OBJECTS_FROM: usize = 32;
/// Loose objects packed at most in one go (the list is held in memory and sent to git).
const MAX_LOOSE_OBJECTS_PACKED: usize = 50_000;

/// The ids of the loose objects in `objects` (a repository's object directory), at most
/// [`MAX_LOOSE_OBJECTS_PACKED`]; anything that is not a loose object's file is left out.
fn loose_object_ids(objects: &Path) -> std::io::Result<Vec<String>> {
    let mut ids = Vec::new();
    for fan_out in std::fs::read_dir(objects)? {
        let fan_out = fan_out?;
        let prefix = fan_out.file_name().to_string_lossy().into_owned();
        if prefix.len() != 2 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        for object in std::fs::read_dir(fan_out.path())? {
            let rest = object?.file_name().to_string_lossy().into_owned();
            if push_bundle::is_object_id(&format!("{prefix}{rest}")) {
                ids.push(format!("{prefix}{rest}"));
                if ids.len() == MAX_LOOSE_OBJECTS_PACKED {
                    return Ok(ids);
                }
            }
        }
    }
    Ok(ids)
}

/// Packs the mirror's loose objects into one pack and removes the loose copies, when there are
/// at least [`PACK_LOOSE_OBJECTS_FROM`]; exactly those objects, with no walk of the history.
/// Answers how many were packed. The caller holds the mirror exclusively.
async fn pack_loose_objects(mirror: &Path) -> Result<usize, GitError> {
    let objects = mirror.join("objects");
    let ids = tokio::task::spawn_blocking(move || loose_object_ids(&objects))
        .await
        .map_err(|error| GitError::Spawn(error.to_string()))?
        .map_err(|error| GitError::Spawn(format!("cannot list the mirror's loose objects: {error}")))?;
    if ids.len() < PACK_LOOSE_OBJECTS_FROM {
        return Ok(0);
    }
    let pack_base = mirror.join("objects").join("pack").join("pack");
    let mut list = ids.join("\n");
    list.push('\n');
    super::fence::git_stdin(&["pack-objects", "-q", &pack_base.display().to_string()], mirror, &list).await?;
    git(&["prune-packed", "-q"], Some(mirror)).await?;
    Ok(ids.len())
}

/// The commit the workspace starts at, read in the mirror. The record wins over the origin: a
/// branch moved by a fenced owner is not built on.
async fn workspace_start(mirror: &Path, url: &str, wanted: &Wanted) -> Result<Start, RepoError> {
    let (found, resumed) = match wanted.recorded.as_deref() {
        Some(recorded) => {
            let found = if push_bundle::is_object_id(recorded) {
                commit_and_tree(mirror, recorded).await
            } else {
                None
            };
            let found = found.ok_or_else(|| RepoError::Workspace {
                path: wanted.path.display().to_string(),
                message: format!(
                    "the recorded commit {recorded} of {} is neither at the origin nor in this node's mirror",
                    wanted.work_branch
                ),
            })?;
            (found, true)
        }
        None => {
            let work = format!("refs/heads/{}", wanted.work_branch);
            let base = format!("refs/heads/{}", wanted.base_branch);
            let [work_tip, base_tip] = branch_tips(mirror, [&work, &base]).await;
            match work_tip {
                Some(tip) => (tip, true),
                None => {
                    let base = base_tip.ok_or_else(|| RepoError::NoSuchBranch {
                        url: url.to_string(),
                        branch: wanted.base_branch.clone(),
                    })?;
                    (base, false)
                }
            }
        }
    };
    let (commit, tree) = found;
    Ok(Start { commit, tree, resumed })
}

impl RepoState {
    /// A copy for work off the actor on the mirror as it is (cloned already).
    pub(super) fn detached(&self) -> RepoState {
        RepoState {
            args: self.args.clone(),
            cloned: self.cloned,
            refreshed_at: self.refreshed_at,
            mirror_lock: self.mirror_lock.clone(),
            object_format: self.object_format.clone(),
            fences: self.fences.clone(),
        }
    }

    /// Runs `work` on a task of its own holding the mirror shared: it may add objects and
    /// per-agent refs, and runs beside workspace clones and other agents' work, never beside
    /// a fetch or a push.
    pub(super) async fn spawn_shared(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        let shared = self.mirror_lock.clone().read_owned().await;
        tokio::spawn(async move {
            work.await;
            drop(shared);
        });
    }

    /// [`RepoState::take_fence`] on a detached copy of a cloned mirror.
    pub(super) async fn take_fence_cloned(mut self, fence: crate::origin_fence::OwnerFence) -> Result<(), RepoError> {
        self.take_fence(fence).await
    }
}

/// A local clone of the mirror at `path` (objects hard-linked where the filesystem allows, so
/// it is self-contained: a machine sees nothing outside it), on `work_branch` at the start.
async fn make_workspace(
    mirror: &Path,
    url: &str,
    start: Start,
    work_branch: &str,
    path: &Path,
) -> Result<Workspace, RepoError> {
    let started = Instant::now();
    let workspace_error = |error: GitError| RepoError::Workspace {
        path: path.display().to_string(),
        message: error.to_string(),
    };
    let _ = tokio::fs::remove_dir_all(path).await;
    let target = path.display().to_string();
    // A local clone holds every object of the mirror, the start commit included. `--template=`:
    // no sample hooks and other template files copied into each workspace (nothing runs them;
    // copying them was a quarter of the clone's CPU).
    git(
        &[
            "clone",
            "--local",
            "--quiet",
            "--no-checkout",
            "--template=",
            &mirror.display().to_string(),
            &target,
        ],
        None,
    )
    .await
    .map_err(workspace_error)?;
    git(&["checkout", "--quiet", "-B", work_branch, &start.commit], Some(path))
        .await
        .map_err(workspace_error)?;
    // Pushes go to the real origin, not to the node's mirror.
    git(&["remote", "set-url", "origin", url], Some(path))
        .await
        .map_err(workspace_error)?;
    tracing::debug!(path = %path.display(), elapsed_ms = started.elapsed().as_millis() as u64, "workspace cloned");
    Ok(Workspace {
        path: path.to_path_buf(),
        branch: work_branch.to_string(),
        // `checkout -B` put HEAD at the start commit.
        head_commit: start.commit,
        tree: start.tree,
        resumed: start.resumed,
    })
}

#[cfg(test)]
impl RepoState {
    /// A workspace asked for now, made on the caller's task (the tests drive the state directly).
    pub(super) async fn prepare(
        &mut self,
        base_branch: &str,
        work_branch: &str,
        recorded: Option<&str>,
        path: &Path,
    ) -> Result<Workspace, RepoError> {
        self.refresh_for(Instant::now()).await?;
        let wanted = Wanted {
            base_branch: base_branch.to_string(),
            work_branch: work_branch.to_string(),
            recorded: recorded.map(str::to_string),
            path: path.to_path_buf(),
        };
        let start = workspace_start(&self.args.mirror, &self.args.url, &wanted).await?;
        make_workspace(&self.args.mirror, &self.args.url, start, work_branch, path).await
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Instant;

    use ractor::{Actor, ActorRef};

    use super::super::tests::{allowing, origin_with_main};
    use super::super::{git, mirror_path, RepoActor, RepoArgs, RepoMsg, Workspace};
    use super::{loose_object_ids, PACK_LOOSE_OBJECTS_FROM};

    async fn workspace_at(repo: &ActorRef<RepoMsg>, path: &Path, requested_at: Instant) -> Workspace {
        ractor::call!(repo, |reply| RepoMsg::PrepareWorkspace {
            base_branch: "main".to_string(),
            work_branch: format!("flotilla/{}", path.file_name().unwrap().to_string_lossy()),
            recorded: None,
            path: path.to_path_buf(),
            requested_at,
            reply,
        })
        .unwrap()
        .unwrap()
    }

    /// A new commit on the seed's main, pushed to the origin; answers it.
    async fn advance_origin(dir: &Path) -> String {
        let seed = dir.join("seed");
        std::fs::write(seed.join("next.txt"), "next\n").unwrap();
        git(&["add", "."], Some(&seed)).await.unwrap();
        git(
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@example.test",
                "commit",
                "--quiet",
                "-m",
                "next",
            ],
            Some(&seed),
        )
        .await
        .unwrap();
        let origin = dir.join("origin.git").display().to_string();
        git(&["push", "--quiet", &origin, "main"], Some(&seed)).await.unwrap();
        git(&["rev-parse", "HEAD"], Some(&seed)).await.unwrap()
    }

    /// A workspace asked for before the last fetch began is served from that fetch; one asked
    /// for later fetches again and sees what the origin got meanwhile. Workspaces asked for at
    /// once are made side by side, each on its own branch and at the same start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetch_covers_the_workspaces_asked_for_before_it_and_later_ones_fetch_again() {
        let dir = tempfile::tempdir().unwrap();
        let url = origin_with_main(dir.path()).await;
        std::fs::create_dir_all(dir.path().join("repos")).unwrap();
        let args = RepoArgs {
            url: url.clone(),
            mirror: mirror_path(&dir.path().join("repos"), &url),
            git: allowing(dir.path()),
            providers: None,
        };
        let (repo, _) = Actor::spawn(None, RepoActor, args).await.unwrap();
        let asked_early = Instant::now();
        let first = workspace_at(&repo, &dir.path().join("w0"), Instant::now()).await;

        let advanced = advance_origin(dir.path()).await;
        assert_ne!(first.head_commit, advanced);
        let covered = workspace_at(&repo, &dir.path().join("w1"), asked_early).await;
        assert_eq!(
            covered.head_commit, first.head_commit,
            "a workspace asked for before the last fetch began does not fetch again"
        );

        let asked_now = Instant::now();
        let burst: Vec<Workspace> = futures::future::join_all((2..10).map(|index| {
            let repo = repo.clone();
            let path = dir.path().join(format!("w{index}"));
            async move { workspace_at(&repo, &path, asked_now).await }
        }))
        .await;
        for workspace in &burst {
            assert_eq!(
                workspace.head_commit, advanced,
                "a workspace asked for later sees the new commit"
            );
            let head = git(&["rev-parse", "HEAD"], Some(&workspace.path)).await.unwrap();
            assert_eq!(head, advanced);
            let branch = git(&["rev-parse", "--abbrev-ref", "HEAD"], Some(&workspace.path))
                .await
                .unwrap();
            assert_eq!(branch, workspace.branch);
            let tree = git(&["rev-parse", "HEAD^{tree}"], Some(&workspace.path)).await.unwrap();
            assert_eq!(tree, workspace.tree);
            let remote = git(&["remote", "get-url", "origin"], Some(&workspace.path))
                .await
                .unwrap();
            assert_eq!(remote, url, "pushes go to the origin, not the mirror");
            assert!(
                !workspace.path.join(".git").join("hooks").exists(),
                "no template files are copied into a workspace"
            );
        }
        repo.stop(None);
    }

    /// Loose objects the node wrote into the mirror (fence commits) are packed by the next
    /// fetch once there are enough of them, and stay readable; fewer are left alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetch_packs_the_mirror_s_loose_objects_once_there_are_many() {
        let dir = tempfile::tempdir().unwrap();
        let url = origin_with_main(dir.path()).await;
        std::fs::create_dir_all(dir.path().join("repos")).unwrap();
        let mirror = mirror_path(&dir.path().join("repos"), &url);
        let args = RepoArgs {
            url: url.clone(),
            mirror: mirror.clone(),
            git: allowing(dir.path()),
            providers: None,
        };
        let (repo, _) = Actor::spawn(None, RepoActor, args).await.unwrap();
        workspace_at(&repo, &dir.path().join("w0"), Instant::now()).await;
        let write_loose = |count: usize, tag: &'static str| {
            let mirror = mirror.clone();
            async move {
                let mut written = Vec::new();
                for index in 0..count {
                    let text = format!("{tag} {index}\n");
                    written.push(
                        super::super::fence::git_stdin(&["hash-object", "-w", "--stdin"], &mirror, &text)
                            .await
                            .unwrap(),
                    );
                }
                written
            }
        };
        let few = write_loose(PACK_LOOSE_OBJECTS_FROM - 1, "few").await;
        workspace_at(&repo, &dir.path().join("w1"), Instant::now()).await;
        let loose = loose_object_ids(&mirror.join("objects")).unwrap();
        assert!(
            few.iter().all(|id| loose.contains(id)),
            "fewer than the threshold stay loose"
        );

        let many = write_loose(PACK_LOOSE_OBJECTS_FROM, "many").await;
        let workspace = workspace_at(&repo, &dir.path().join("w2"), Instant::now()).await;
        assert_eq!(
            loose_object_ids(&mirror.join("objects")).unwrap(),
            Vec::<String>::new(),
            "the fetch packed every loose object"
        );
        for id in few.iter().chain(&many) {
            git(&["cat-file", "-e", id], Some(&mirror)).await.unwrap();
        }
        let head = git(&["rev-parse", "HEAD"], Some(&workspace.path)).await.unwrap();
        assert_eq!(
            head, workspace.head_commit,
            "a workspace cloned after the packing is whole"
        );
        repo.stop(None);
    }
}
