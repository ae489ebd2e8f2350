//! The skeleton every workspace of a mirror generation is copied from.
//!
//! A workspace used to be a local clone of the mirror: three programs (git, the shell that
//! starts `git-upload-pack`, `git-upload-pack`), a fourth to point its `origin` at the real
//! origin and a fifth to read the mirror's branches, about 10 ms of CPU per agent on the
//! 2-vCPU guest where each program start costs about one before it does anything, for the
//! same clone made again and again by a burst of agents of one repository. The skeleton is that
//! clone made once per generation of the mirror: every fetch, push or restore holds the mirror
//! exclusively and raises the generation ([`super::RepoState::hold_exclusive`]), and the first
//! workspace after that makes the skeleton again. A workspace is then the skeleton's `.git`
//! without its objects (HEAD, config with the origin's URL, packed-refs: small files,
//! copied), the mirror's object files hard-linked as a local clone links them (so the
//! workspace is self-contained: a machine sees nothing outside it), and one `git checkout` of
//! the work branch, which leaves the worktree's files to git and its checks.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{git, GitError};

/// A mirror's branch as `git for-each-ref` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Head {
    /// `commit`, or what else the branch names (an annotated tag, say).
    pub kind: String,
    pub id: String,
    /// The tree of `id` when it is a commit.
    pub tree: String,
}

/// The clone of one mirror generation, and the mirror's branches as they were then (a
/// workspace's start is read from them: the branches change only under the exclusive hold
/// that starts the next generation).
pub(super) struct Skeleton {
    generation: u64,
    git_dir: PathBuf,
    heads: HashMap<String, Head>,
}

impl Skeleton {
    /// The mirror's branch `name` (a full ref name) at this generation.
    pub(super) fn head(&self, name: &str) -> Option<&Head> {
        self.heads.get(name)
    }

    pub(super) fn git_dir(&self) -> &Path {
        &self.git_dir
    }
}

/// The skeleton of the generation last asked for, shared by the repository actor's detached
/// copies.
pub(super) type SkeletonCache = Arc<tokio::sync::Mutex<Option<Arc<Skeleton>>>>;

/// Where the skeleton of `mirror` (`REPOS/DIGEST.git`) lives: `REPOS/DIGEST.skeleton`.
pub(super) fn skeleton_path(mirror: &Path) -> PathBuf {
    mirror.with_extension("skeleton")
}

/// The skeleton of `generation`, made now unless the cache holds it. The caller holds the
/// mirror shared, under `generation`: no fetch or push changes the mirror meanwhile, and every
/// caller of an older generation has let go of the mirror before this one could start.
pub(super) async fn skeleton_of(
    cache: &SkeletonCache,
    mirror: &Path,
    url: &str,
    generation: u64,
) -> Result<Arc<Skeleton>, GitError> {
    let mut slot = cache.lock().await;
    if let Some(skeleton) = slot.as_ref().filter(|skeleton| skeleton.generation == generation) {
        return Ok(skeleton.clone());
    }
    *slot = None;
    let made = Arc::new(make(mirror, url, generation).await?);
    *slot = Some(made.clone());
    Ok(made)
}

async fn make(mirror: &Path, url: &str, generation: u64) -> Result<Skeleton, GitError> {
    let dir = skeleton_path(mirror);
    remove_if_present(&dir).await?;
    let target = dir.display().to_string();
    // `--shared`: the skeleton borrows the mirror's objects (workspaces link the mirror's own);
    // `--template=`: no sample hooks.
    git(
        &[
            "clone",
            "--shared",
            "--quiet",
            "--no-checkout",
            "--template=",
            &mirror.display().to_string(),
            &target,
        ],
        None,
    )
    .await?;
    // A workspace's `origin` is the real origin, not the node's mirror.
    git(&["remote", "set-url", "origin", url], Some(&dir)).await?;
    let listed = git(
        &[
            "for-each-ref",
            "--format=%(objecttype) %(objectname) %(tree) %(refname)",
            "refs/heads/",
        ],
        Some(mirror),
    )
    .await?;
    Ok(Skeleton {
        generation,
        git_dir: dir.join(".git"),
        heads: parse_heads(&listed),
    })
}

async fn remove_if_present(dir: &Path) -> Result<(), GitError> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(GitError::Spawn(format!(
            "cannot remove the old workspace skeleton {}: {error}",
            dir.display()
        ))),
    }
}

/// `for-each-ref` lines (`TYPE ID TREE REFNAME`; the tree is empty for what is no commit).
fn parse_heads(listed: &str) -> HashMap<String, Head> {
    listed
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(4, ' ');
            let (kind, id, tree, name) = (fields.next()?, fields.next()?, fields.next()?, fields.next()?);
            let head = Head {
                kind: kind.to_string(),
                id: id.to_string(),
                tree: tree.to_string(),
            };
            Some((name.to_string(), head))
        })
        .collect()
}

/// Makes `target` (a workspace's `.git`, which must not exist) from the skeleton's `.git`
/// without its objects, copied, and the mirror's objects, hard-linked (copied where the
/// filesystem refuses a link). Only directories and regular files are taken: both trees are
/// the node's own, made by git, and anything else in them is refused rather than followed.
pub(super) fn copy_into(skeleton_git: &Path, mirror: &Path, target: &Path) -> io::Result<()> {
    copy_tree(skeleton_git, target, Place::Skeleton)?;
    copy_tree(&mirror.join("objects"), &target.join("objects"), Place::Objects)
}

/// Whether `source`, in the skeleton's tree at `from`, is the skeleton's own `objects`.
fn is_skeleton_objects(skeleton_git: &Path, source: &Path) -> bool {
    source.parent() == Some(skeleton_git) && source.file_name() == Some(std::ffi::OsStr::new("objects"))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The skeleton's `.git`: files copied, its `objects` left out (it borrows the mirror's).
    Skeleton,
    /// The mirror's `objects`: files hard-linked; a temporary object git is still writing is
    /// left out.
    Objects,
}

fn copy_tree(from: &Path, to: &Path, place: Place) -> io::Result<()> {
    copy_below(from, from, to, place)
}

fn copy_below(root: &Path, from: &Path, to: &Path, place: Place) -> io::Result<()> {
    std::fs::create_dir(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        let kind = entry.file_type()?;
        let (source, target) = (entry.path(), to.join(&name));
        if kind.is_dir() {
            if place == Place::Skeleton && is_skeleton_objects(root, &source) {
                // Made by the objects' own copy.
                continue;
            }
            copy_below(root, &source, &target, place)?;
        } else if kind.is_file() {
            match place {
                Place::Skeleton => {
                    std::fs::copy(&source, &target)?;
                }
                Place::Objects => {
                    if name.to_string_lossy().starts_with("tmp_") {
                        continue;
                    }
                    if std::fs::hard_link(&source, &target).is_err() {
                        std::fs::copy(&source, &target)?;
                    }
                }
            }
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is neither a directory nor a regular file", source.display()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_read_from_for_each_ref_lines() {
        let heads = parse_heads(
            "commit 1111 2222 refs/heads/main\ntag 3333  refs/heads/odd name\n\ncommit 4444 5555 refs/heads/a/b\n",
        );
        assert_eq!(heads.len(), 3);
        assert_eq!(
            heads["refs/heads/main"],
            Head {
                kind: "commit".into(),
                id: "1111".into(),
                tree: "2222".into()
            }
        );
        assert_eq!(heads["refs/heads/odd name"].kind, "tag");
        assert_eq!(heads["refs/heads/odd name"].tree, "");
        assert_eq!(heads["refs/heads/a/b"].id, "4444");
    }

    #[test]
    fn a_copy_links_the_mirror_s_objects_copies_the_rest_and_refuses_a_symlink() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (skeleton, mirror) = (dir.path().join("skeleton/.git"), dir.path().join("mirror"));
        std::fs::create_dir_all(skeleton.join("objects/info")).unwrap();
        std::fs::write(skeleton.join("objects/info/alternates"), "/elsewhere\n").unwrap();
        std::fs::create_dir_all(skeleton.join("refs/heads/objects")).unwrap();
        std::fs::write(skeleton.join("refs/heads/objects/x"), "1111\n").unwrap();
        std::fs::write(skeleton.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::create_dir_all(mirror.join("objects/pack")).unwrap();
        std::fs::create_dir_all(mirror.join("objects/ab")).unwrap();
        std::fs::write(mirror.join("objects/pack/pack-1.pack"), "pack").unwrap();
        std::fs::write(mirror.join("objects/ab/cdef"), "loose").unwrap();
        std::fs::write(mirror.join("objects/ab/tmp_obj_x"), "half").unwrap();

        let target = dir.path().join("workspace/.git");
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        copy_into(&skeleton, &mirror, &target).unwrap();
        assert_eq!(
            std::fs::read_to_string(target.join("HEAD")).unwrap(),
            "ref: refs/heads/main\n"
        );
        assert_ne!(
            std::fs::metadata(target.join("HEAD")).unwrap().ino(),
            std::fs::metadata(skeleton.join("HEAD")).unwrap().ino(),
            "a small file is a copy of its own"
        );
        assert_eq!(
            std::fs::read_to_string(target.join("refs/heads/objects/x")).unwrap(),
            "1111\n",
            "only the skeleton's own objects are left out"
        );
        assert!(
            !target.join("objects/info/alternates").exists(),
            "the skeleton's objects are left out"
        );
        for object in ["objects/pack/pack-1.pack", "objects/ab/cdef"] {
            assert_eq!(
                std::fs::metadata(target.join(object)).unwrap().ino(),
                std::fs::metadata(mirror.join(object)).unwrap().ino(),
                "{object} is linked"
            );
        }
        assert!(!target.join("objects/ab/tmp_obj_x").exists());

        std::os::unix::fs::symlink("/etc", mirror.join("objects/pack/escape")).unwrap();
        let again = dir.path().join("again/.git");
        std::fs::create_dir_all(again.parent().unwrap()).unwrap();
        let refused = copy_into(&skeleton, &mirror, &again).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::InvalidData, "{refused}");
    }
}
