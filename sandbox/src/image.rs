//! Base images: the lowest, read-only layer of every machine.
//!
//! `host` is a skeleton (a filtered copy of the node's `/etc`, `/bin → usr/bin` and friends,
//! empty `/home`, `/tmp`, `/workspace`) whose `/usr` is the node's, bound read-only at start.
//! Only an allow-list of `/etc` is copied: inside a machine the node's uid owns what it owns on
//! the node, so `/etc/shadow`, SSH host keys and the like must simply not be there. Its
//! `/etc/profile` is the image's own ([`HOST_PROFILE`]), not the node's.
//!
//! `debian` is a debootstrap'd bookworm (minbase plus git, build-essential, curl,
//! ca-certificates, tmux), fetched from the mirror the node's apt uses.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::driver::{last_lines, BaseImage, BaseLayer};
use crate::error::{Result, SandboxError};

/// Bumped when the host skeleton's layout changes, so an old one is rebuilt rather than reused.
const HOST_LAYOUT_VERSION: &str = "host-v2";
/// Beside an image's `rootfs`: a random id written once per build of the image.
const IMAGE_ID_FILE: &str = "image-id";
/// The node's package database: it changes whenever a package of the node's `/usr` does.
const HOST_PACKAGE_DATABASE: &str = "/var/lib/dpkg/status";
const DEBIAN_SUITE: &str = "bookworm";
const DEBIAN_PACKAGES: &str = "git,build-essential,curl,ca-certificates,tmux,socat";
const DEFAULT_DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";

/// `/etc` entries copied into the host image. Everything else of the node's `/etc` stays out.
const HOST_ETC_ALLOW_LIST: &[&str] = &[
    "alternatives",
    "bash.bashrc",
    "bash_completion",
    "bash_completion.d",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "environment",
    "ethertypes",
    "gai.conf",
    "gitconfig",
    "group",
    "host.conf",
    "hosts",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "locale.gen",
    "localtime",
    "login.defs",
    "magic",
    "magic.mime",
    "mailcap",
    "manpath.config",
    "mime.types",
    "nanorc",
    "networks",
    "nsswitch.conf",
    "os-release",
    "passwd",
    "profile.d",
    "protocols",
    "python3",
    "rpc",
    "services",
    "shells",
    "skel",
    "ssl",
    "terminfo",
    "timezone",
    "vim",
    "xattr.conf",
];

/// The host image's `/etc/profile`, read by every login shell (each command in a machine runs in
/// one, `sh -lc`): the `PATH` for the user's id (with the `sbin` directories for root), a prompt
/// for an interactive shell other than bash and bash's own `bash.bashrc` for bash, then
/// `/etc/profile.d/*.sh` (where an environment's `install` adds its own), as a Debian node's
/// profile does. It reads the effective uid from `/proc/self/status` with shell builtins:
/// Debian's runs `id -u` once, twice in `dash`, which were two program starts (about 2 ms of CPU
/// and 3 ms of wall time here) before every command.
const HOST_PROFILE: &str = r#"# /etc/profile of a Flotilla machine (the host image): read by login shells.
machine_uid=
while read -r machine_key machine_real machine_effective machine_rest; do
    if [ "$machine_key" = "Uid:" ]; then
        machine_uid=$machine_effective
        break
    fi
done < /proc/self/status
if [ "$machine_uid" = 0 ]; then
    PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
else
    PATH="/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"
fi
export PATH
if [ "${PS1-}" ]; then
    if [ "${BASH-}" ] && [ "$BASH" != "/bin/sh" ]; then
        if [ -f /etc/bash.bashrc ]; then
            . /etc/bash.bashrc
        fi
    elif [ "$machine_uid" = 0 ]; then
        PS1='# '
    else
        PS1='$ '
    fi
fi
unset machine_key machine_real machine_effective machine_rest machine_uid
if [ -d /etc/profile.d ]; then
    for machine_profile in /etc/profile.d/*.sh; do
        if [ -r "$machine_profile" ]; then
            . "$machine_profile"
        fi
    done
    unset machine_profile
fi
"#;

/// Inside an allow-listed directory, these are still left out.
const HOST_ETC_DENY_LIST: &[&str] = &["ssl/private"];

/// Top-level entries that are symlinks into `/usr` on a merged-/usr system and real
/// directories otherwise (then they are bound read-only like `/usr`).
const USR_LINKS: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

pub(crate) fn images_dir(root: &Path) -> PathBuf {
    root.join("images")
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SandboxError + 'a {
    move |error| SandboxError::io(action, path, error)
}

/// Creates (once) and returns the host base layer.
pub(crate) fn prepare_host(root: &Path) -> Result<BaseLayer> {
    let image_dir = images_dir(root).join(HOST_LAYOUT_VERSION);
    let rootfs = image_dir.join("rootfs");
    let host_read_only_binds = host_binds();
    if !rootfs.exists() {
        let building = images_dir(root).join(format!(".building-{HOST_LAYOUT_VERSION}-{}", ulid::Ulid::new()));
        let result = build_host_skeleton(&building.join("rootfs"));
        if let Err(error) = result {
            let _ = std::fs::remove_dir_all(&building);
            return Err(error);
        }
        // Another preparer may have won the race; its tree is as good as ours.
        if let Err(error) = std::fs::rename(&building, &image_dir) {
            let _ = std::fs::remove_dir_all(&building);
            if !rootfs.exists() {
                return Err(SandboxError::io("move the host image into place at", &image_dir, error));
            }
        }
    }
    let identity = format!(
        "{HOST_LAYOUT_VERSION}/{}/{}",
        image_id(&image_dir)?,
        host_packages_state()
    );
    Ok(BaseLayer {
        image: BaseImage::Host,
        rootfs,
        host_read_only_binds,
        identity,
    })
}

/// The id of one build of the image in `image_dir`, written by the first caller after the
/// build (an image built before ids existed gets one now; install layers keyed on it then
/// rebuild once).
pub(crate) fn image_id(image_dir: &Path) -> Result<String> {
    let path = image_dir.join(IMAGE_ID_FILE);
    if let Ok(id) = std::fs::read_to_string(&path) {
        return Ok(id.trim().to_string());
    }
    // Written whole under another name, then linked into place: a racing preparer either wins
    // or reads the winner's complete id, never a half-written one.
    let id = ulid::Ulid::new().to_string();
    let written = image_dir.join(format!(".{IMAGE_ID_FILE}-{id}"));
    std::fs::write(&written, &id).map_err(io_error("write", &written))?;
    let linked = std::fs::hard_link(&written, &path);
    let _ = std::fs::remove_file(&written);
    match linked {
        Ok(()) => Ok(id),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            let id = std::fs::read_to_string(&path).map_err(io_error("read", &path))?;
            Ok(id.trim().to_string())
        }
        Err(error) => Err(SandboxError::io("link the image id into place at", &path, error)),
    }
}

/// When the node's package database last changed (nanoseconds), or "unknown" on a node
/// without dpkg: the host image's `/usr` is the node's own, and an upgrade changes it.
fn host_packages_state() -> String {
    std::fs::metadata(HOST_PACKAGE_DATABASE)
        .and_then(|metadata| metadata.modified())
        .ok()
        .and_then(|modified| modified.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|since| since.as_nanos().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

fn host_binds() -> Vec<PathBuf> {
    let mut binds = vec![PathBuf::from("/usr")];
    for name in USR_LINKS {
        let path = Path::new("/").join(name);
        if let Ok(metadata) = std::fs::symlink_metadata(&path) {
            if metadata.is_dir() {
                binds.push(path);
            }
        }
    }
    binds
}

fn build_host_skeleton(rootfs: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(rootfs).map_err(io_error("create", rootfs))?;
    let directories: &[(&str, u32)] = &[
        ("usr", 0o755),
        ("etc", 0o755),
        ("home", 0o755),
        ("root", 0o700),
        ("tmp", 0o1777),
        ("var", 0o755),
        ("var/tmp", 0o1777),
        ("var/cache", 0o755),
        ("var/lib", 0o755),
        ("run", 0o755),
        ("opt", 0o755),
        ("srv", 0o755),
        ("mnt", 0o755),
        ("proc", 0o555),
        ("dev", 0o755),
        ("workspace", 0o755),
    ];
    for (relative, mode) in directories {
        let path = rootfs.join(relative);
        std::fs::create_dir_all(&path).map_err(io_error("create", &path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).map_err(io_error("chmod", &path))?;
    }
    for name in USR_LINKS {
        let host_path = Path::new("/").join(name);
        let Ok(metadata) = std::fs::symlink_metadata(&host_path) else {
            continue;
        };
        let image_path = rootfs.join(name);
        if metadata.file_type().is_symlink() {
            let target = std::fs::read_link(&host_path).map_err(io_error("read the link", &host_path))?;
            std::os::unix::fs::symlink(&target, &image_path).map_err(io_error("create the link", &image_path))?;
        } else if metadata.is_dir() {
            std::fs::create_dir_all(&image_path).map_err(io_error("create", &image_path))?;
        }
    }
    let etc = Path::new("/etc");
    for name in HOST_ETC_ALLOW_LIST {
        let source = etc.join(name);
        if std::fs::symlink_metadata(&source).is_ok() {
            copy_tree(&source, &rootfs.join("etc").join(name), Path::new(name))?;
        }
    }
    let profile = rootfs.join("etc/profile");
    std::fs::write(&profile, HOST_PROFILE).map_err(io_error("write", &profile))?;
    std::fs::set_permissions(&profile, std::fs::Permissions::from_mode(0o644)).map_err(io_error("chmod", &profile))?;
    // The machine's hostname is its own; `localhost` must resolve without the network.
    let hosts = rootfs.join("etc/hosts");
    if !hosts.exists() {
        std::fs::write(&hosts, "127.0.0.1 localhost\n::1 localhost\n").map_err(io_error("write", &hosts))?;
    }
    Ok(())
}

/// Copies a tree keeping symlinks as symlinks and modes; skips sockets, devices and the deny list.
fn copy_tree(source: &Path, destination: &Path, relative: &Path) -> Result<()> {
    if HOST_ETC_DENY_LIST.iter().any(|denied| relative == Path::new(denied)) {
        return Ok(());
    }
    let metadata = std::fs::symlink_metadata(source).map_err(io_error("inspect", source))?;
    let kind = metadata.file_type();
    if kind.is_symlink() {
        let target = std::fs::read_link(source).map_err(io_error("read the link", source))?;
        std::os::unix::fs::symlink(&target, destination).map_err(io_error("create the link", destination))?;
    } else if kind.is_dir() {
        std::fs::create_dir_all(destination).map_err(io_error("create", destination))?;
        std::fs::set_permissions(destination, metadata.permissions()).map_err(io_error("chmod", destination))?;
        for entry in std::fs::read_dir(source).map_err(io_error("list", source))? {
            let entry = entry.map_err(io_error("list", source))?;
            let name = entry.file_name();
            copy_tree(&entry.path(), &destination.join(&name), &relative.join(&name))?;
        }
    } else if kind.is_file() {
        // An unreadable file (mode 0600 of another service) is a secret by definition: skip it.
        match std::fs::copy(source, destination) {
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {}
            Err(error) => return Err(SandboxError::io("copy", source, error)),
        }
    }
    Ok(())
}

/// The mirror apt uses on this node, from deb822 `.sources` files or `sources.list`.
pub(crate) fn apt_mirror() -> String {
    let mut candidates = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
        paths.sort();
        for path in paths {
            if path.extension().is_some_and(|extension| extension == "sources") {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    candidates.extend(mirrors_from_deb822(&text));
                }
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list") {
        candidates.extend(mirrors_from_sources_list(&text));
    }
    candidates
        .into_iter()
        .next()
        .unwrap_or_else(|| DEFAULT_DEBIAN_MIRROR.to_string())
}

/// Main-archive URIs (not security) of stanzas whose suites include bookworm.
pub(crate) fn mirrors_from_deb822(text: &str) -> Vec<String> {
    let mut mirrors = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(':')))
                .map(|value| value.trim().to_string())
        };
        let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) else {
            continue;
        };
        if field("Types").is_some_and(|types| !types.split_whitespace().any(|kind| kind == "deb")) {
            continue;
        }
        if suites.split_whitespace().any(|suite| suite == DEBIAN_SUITE) {
            mirrors.extend(uris.split_whitespace().map(str::to_string));
        }
    }
    mirrors
}

pub(crate) fn mirrors_from_sources_list(text: &str) -> Vec<String> {
    let mut mirrors = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().filter(|word| !word.starts_with('[')).collect();
        // Options in brackets may contain spaces; skip through their closing bracket.
        let words: Vec<&str> = if rest.trim_start().starts_with('[') {
            let after = rest.split_once(']').map(|(_, after)| after).unwrap_or("");
            after.split_whitespace().collect()
        } else {
            words
        };
        if words.len() >= 2 && words[1] == DEBIAN_SUITE {
            mirrors.push(words[0].to_string());
        }
    }
    mirrors
}

/// Runs debootstrap (minutes) unless the image is already there.
pub(crate) async fn prepare_debian(root: &Path) -> Result<BaseLayer> {
    let image_dir = images_dir(root).join("debian");
    let rootfs = image_dir.join("rootfs");
    if rootfs.join("usr/bin/tmux").exists() {
        let identity = debian_identity(&image_dir).await?;
        return Ok(BaseLayer {
            image: BaseImage::Debian,
            rootfs,
            host_read_only_binds: Vec::new(),
            identity,
        });
    }
    let debootstrap = ["/usr/sbin/debootstrap", "/usr/bin/debootstrap"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .ok_or_else(|| SandboxError::MissingTool {
            tool: "debootstrap".to_string(),
            hint: "apt-get install debootstrap, or run scripts/setup".to_string(),
        })?;
    let building = images_dir(root).join(format!(".building-debian-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&building).map_err(io_error("create", &building))?;
    let mirror = apt_mirror();
    let output = tokio::process::Command::new(&debootstrap)
        .args([
            "--variant=minbase",
            &format!("--include={DEBIAN_PACKAGES}"),
            DEBIAN_SUITE,
        ])
        .arg(building.join("rootfs"))
        .arg(&mirror)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|error| SandboxError::io("run", &debootstrap, error))?;
    if !output.status.success() {
        let _ = std::fs::remove_dir_all(&building);
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        return Err(SandboxError::HostCommand {
            program: format!("debootstrap {DEBIAN_SUITE} from {mirror}"),
            detail: format!("{}; last output lines:\n{}", output.status, last_lines(&text, 20)),
        });
    }
    let workspace = building.join("rootfs/workspace");
    std::fs::create_dir_all(&workspace).map_err(io_error("create", &workspace))?;
    let _ = std::fs::remove_dir_all(&image_dir);
    std::fs::rename(&building, &image_dir).map_err(io_error("move the debian image into place at", &image_dir))?;
    let identity = debian_identity(&image_dir).await?;
    Ok(BaseLayer {
        image: BaseImage::Debian,
        rootfs,
        host_read_only_binds: Vec::new(),
        identity,
    })
}

async fn debian_identity(image_dir: &Path) -> Result<String> {
    let image_dir = image_dir.to_path_buf();
    let id = tokio::task::spawn_blocking(move || image_id(&image_dir))
        .await
        .map_err(|error| SandboxError::ImageNotPrepared {
            image: "debian".into(),
            detail: error.to_string(),
        })??;
    Ok(format!("{DEBIAN_SUITE}/{id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_mirror_skips_security_and_other_suites() {
        let text = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                    Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n";
        assert_eq!(mirrors_from_deb822(text), vec!["http://mirror.example/debian"]);
    }

    #[test]
    fn sources_list_mirror_with_options() {
        let text = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://a.example/debian bookworm main\n\
                    deb http://b.example/debian bookworm-updates main\ndeb http://c.example/debian bookworm main\n";
        assert_eq!(
            mirrors_from_sources_list(text),
            vec!["http://a.example/debian", "http://c.example/debian"]
        );
    }

    #[test]
    fn host_skeleton_has_no_secrets_and_links_into_usr() {
        let root = tempfile::tempdir().unwrap();
        let layer = prepare_host(root.path()).unwrap();
        let etc = layer.rootfs.join("etc");
        assert!(etc.join("passwd").exists());
        assert!(!etc.join("shadow").exists());
        assert!(!etc.join("ssh").exists());
        assert!(!etc.join("ssl/private").exists());
        assert!(layer.host_read_only_binds.contains(&PathBuf::from("/usr")));
        if std::fs::symlink_metadata("/bin").unwrap().file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(layer.rootfs.join("bin")).unwrap(),
                std::fs::read_link("/bin").unwrap()
            );
        }
        // A second prepare reuses the first tree, and so keeps its identity.
        assert_eq!(prepare_host(root.path()).unwrap(), layer);
        assert!(
            layer.identity.starts_with(&format!("{HOST_LAYOUT_VERSION}/")),
            "{}",
            layer.identity
        );
        // The login shells' profile is the image's own, not the node's.
        assert_eq!(std::fs::read_to_string(etc.join("profile")).unwrap(), HOST_PROFILE);
    }

    #[test]
    fn an_image_id_is_written_once_per_build() {
        let root = tempfile::tempdir().unwrap();
        let first = image_id(root.path()).unwrap();
        assert_eq!(first.len(), 26, "{first}");
        assert_eq!(image_id(root.path()).unwrap(), first);
        let rebuilt = tempfile::tempdir().unwrap();
        assert_ne!(image_id(rebuilt.path()).unwrap(), first, "a rebuilt image has a new id");
    }
}
