//! Workspaces from the mirror. The repository actor fetches the mirror when no fetch began
//! after the agent asked; then finding the start commit, the copy of the generation's skeleton
//! (see [`super::skeleton`]) and the checkout run on a task of their own under the mirror's
//! shared lock, so that a burst of agents of one repository fetches once and makes its
//! workspaces side by side instead of one after the other.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ractor::RpcReplyPort;

use super::skeleton::{self, Skeleton};
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

impl RepoState {
    /// Fetches the mirror unless a fetch started after the agent asked (the actor's only
    /// serial step of a workspace).
    pub(super) async fn refresh_for(&mut self, requested_at: Instant) -> Result<(), RepoError> {
        if self.refreshed_at.is_some_and(|fetched| fetched >= requested_at) {
            return Ok(());
        }
        let _exclusive = self.hold_exclusive().await;
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
        let cache = self.skeleton.clone();
        self.spawn_shared(|generation| async move {
            let result = make_from_generation(&cache, generation, &mirror, &url, &wanted).await;
            let _ = reply.send(result);
        })
        .await;
    }

    /// Holds the mirror exclusively, for a fetch, a push or a restore (anything that moves its
    /// branches or repacks it), and starts its next generation: the next workspace makes a new
    /// skeleton.
    pub(super) async fn hold_exclusive(&self) -> tokio::sync::OwnedRwLockWriteGuard<u64> {
        let mut exclusive = self.mirror_lock.clone().write_owned().await;
        *exclusive += 1;
        exclusive
    }
}

/// A workspace from the skeleton of `generation`, which the caller holds the mirror shared under.
async fn make_from_generation(
    cache: &skeleton::SkeletonCache,
    generation: u64,
    mirror: &Path,
    url: &str,
    wanted: &Wanted,
) -> Result<Workspace, RepoError> {
    let skeleton = skeleton::skeleton_of(cache, mirror, url, generation)
        .await
        .map_err(|error| RepoError::Workspace {
            path: wanted.path.display().to_string(),
            message: format!("cannot make the workspace skeleton: {error}"),
        })?;
    let start = workspace_start(mirror, url, wanted, &skeleton).await?;
    make_workspace(mirror, &skeleton, start, &wanted.work_branch, &wanted.path).await
}

/// The commit and tree of the mirror's branch `name` (a full ref name) at the skeleton's
/// generation; a branch at something other than a commit (an annotated tag) is peeled as
/// [`commit_and_tree`] does.
async fn branch_tip(mirror: &Path, skeleton: &Skeleton, name: &str) -> Option<(String, String)> {
    let head = skeleton.head(name)?;
    if head.kind == "commit" {
        Some((head.id.clone(), head.tree.clone()))
    } else {
        commit_and_tree(mirror, name).await
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
async fn workspace_start(mirror: &Path, url: &str, wanted: &Wanted, skeleton: &Skeleton) -> Result<Start, RepoError> {
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
            let work_tip = branch_tip(mirror, skeleton, &work).await;
            let base_tip = branch_tip(mirror, skeleton, &base).await;
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
            skeleton: self.skeleton.clone(),
            object_format: self.object_format.clone(),
            fences: self.fences.clone(),
        }
    }

    /// Runs the work `make` returns on a task of its own holding the mirror shared, and hands
    /// it the mirror's generation: it may add objects and per-agent refs, and runs beside
    /// workspaces and other agents' work, never beside a fetch or a push.
    pub(super) async fn spawn_shared<F, W>(&self, make: F)
    where
        F: FnOnce(u64) -> W,
        W: std::future::Future<Output = ()> + Send + 'static,
    {
        let shared = self.mirror_lock.clone().read_owned().await;
        let work = make(*shared);
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

/// The workspace at `path`, on `work_branch` at the start: a copy of the generation's skeleton
/// with the mirror's objects hard-linked where the filesystem allows (so it is self-contained:
/// a machine sees nothing outside it), and git's checkout of the start commit.
async fn make_workspace(
    mirror: &Path,
    skeleton: &Skeleton,
    start: Start,
    work_branch: &str,
    path: &Path,
) -> Result<Workspace, RepoError> {
    let started = Instant::now();
    let workspace_error = |message: String| RepoError::Workspace {
        path: path.display().to_string(),
        message,
    };
    let _ = tokio::fs::remove_dir_all(path).await;
    let (skeleton_git, mirror_dir, target) = (
        skeleton.git_dir().to_path_buf(),
        mirror.to_path_buf(),
        path.to_path_buf(),
    );
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&target)?;
        skeleton::copy_into(&skeleton_git, &mirror_dir, &target.join(".git"))
    })
    .await
    .map_err(|error| workspace_error(error.to_string()))?
    .map_err(|error| workspace_error(format!("cannot copy the repository into the workspace: {error}")))?;
    git(&["checkout", "--quiet", "-B", work_branch, &start.commit], Some(path))
        .await
        .map_err(|error| workspace_error(error.to_string()))?;
    tracing::debug!(path = %path.display(), elapsed_ms = started.elapsed().as_millis() as u64, "workspace made");
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
        let shared = self.mirror_lock.clone().read_owned().await;
        make_from_generation(&self.skeleton, *shared, &self.args.mirror, &self.args.url, &wanted).await
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
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

    /// A bare origin with `main` in `dir`, and a repository actor for it with its mirror under
    /// `dir/repos`: the origin's URL, the mirror's path and the actor.
    async fn repository(dir: &Path) -> (String, PathBuf, ActorRef<RepoMsg>) {
        let url = origin_with_main(dir).await;
        std::fs::create_dir_all(dir.join("repos")).unwrap();
        let mirror = mirror_path(&dir.join("repos"), &url);
        let args = RepoArgs {
            url: url.clone(),
            mirror: mirror.clone(),
            git: allowing(dir),
            providers: None,
        };
        let (repo, _) = Actor::spawn(None, RepoActor, args).await.unwrap();
        (url, mirror, repo)
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
        let (url, _, repo) = repository(dir.path()).await;
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

    /// The workspaces of one generation of the mirror are copied from one skeleton; a fetch
    /// starts the next generation and a new skeleton. A workspace is whole without the
    /// skeleton and the mirror: its objects are its own links, its checkout is clean, and its
    /// remote-tracking branches are the mirror's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn workspaces_of_a_generation_share_a_skeleton_and_stand_on_their_own() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (url, mirror, repo) = repository(dir.path()).await;
        let skeleton_head = super::skeleton::skeleton_path(&mirror).join(".git/HEAD");
        let asked_early = Instant::now();
        let first = workspace_at(&repo, &dir.path().join("w0"), asked_early).await;
        let made = std::fs::metadata(&skeleton_head).unwrap().ino();
        let same_generation = workspace_at(&repo, &dir.path().join("w1"), asked_early).await;
        assert_eq!(same_generation.head_commit, first.head_commit);
        assert_eq!(
            std::fs::metadata(&skeleton_head).unwrap().ino(),
            made,
            "no fetch between them: one skeleton"
        );

        let advanced = advance_origin(dir.path()).await;
        let later = workspace_at(&repo, &dir.path().join("w2"), Instant::now()).await;
        assert_eq!(later.head_commit, advanced);
        assert_ne!(
            std::fs::metadata(&skeleton_head).unwrap().ino(),
            made,
            "a fetch started a new generation and its skeleton"
        );
        let pack = std::fs::read_dir(mirror.join("objects/pack"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .find(|path| path.extension().is_some_and(|extension| extension == "pack"))
            .expect("the mirror has a pack");
        let linked = later.path.join(".git/objects/pack").join(pack.file_name().unwrap());
        assert_eq!(
            std::fs::metadata(&linked).unwrap().ino(),
            std::fs::metadata(&pack).unwrap().ino(),
            "the mirror's objects are linked, not copied"
        );

        repo.stop(None);
        std::fs::remove_dir_all(super::skeleton::skeleton_path(&mirror)).unwrap();
        std::fs::remove_dir_all(&mirror).unwrap();
        let path = Some(later.path.as_path());
        git(&["fsck", "--connectivity-only", "--no-progress"], path)
            .await
            .unwrap();
        assert_eq!(git(&["status", "--porcelain"], path).await.unwrap(), "");
        assert_eq!(git(&["rev-parse", "origin/main"], path).await.unwrap(), advanced);
        assert_eq!(git(&["remote", "get-url", "origin"], path).await.unwrap(), url);
        assert_eq!(
            git(&["rev-parse", "--abbrev-ref", "HEAD"], path).await.unwrap(),
            later.branch
        );
        assert_eq!(std::fs::read_to_string(later.path.join("next.txt")).unwrap(), "next\n");
    }

    /// Loose objects the node wrote into the mirror (fence commits) are packed by the next
    /// fetch once there are enough of them, and stay readable; fewer are left alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetch_packs_the_mirror_s_loose_objects_once_there_are_many() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mirror, repo) = repository(dir.path()).await;
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
            "a workspace made after the packing is whole"
        );
        repo.stop(None);
    }
}
