use super::*;

fn local(path: &str, form: LocalForm) -> RepositoryLocation {
    RepositoryLocation::Local {
        path: PathBuf::from(path),
        form,
    }
}

#[test]
fn remote_forms_git_clones_natively_are_remote() {
    for url in [
        "https://github.com/org/repo.git",
        "http://127.0.0.1:8080/repo.git",
        "ssh://git@host/org/repo",
        "git://host/repo.git",
        "git@github.com:org/repo.git",
        "host.example:org/repo.git",
    ] {
        assert_eq!(classify(url), Ok(RepositoryLocation::Remote), "{url}");
    }
}

#[test]
fn file_urls_and_absolute_paths_are_local_with_git_decoding() {
    assert_eq!(
        classify("file:///srv/git/a.git"),
        Ok(local("/srv/git/a.git", LocalForm::FileUrl))
    );
    // git decodes %-escapes and leaves ".." to the kernel.
    assert_eq!(
        classify("file:///srv/git/%2e%2e/etc"),
        Ok(local("/srv/git/../etc", LocalForm::FileUrl))
    );
    assert_eq!(classify("/srv/git/a.git"), Ok(local("/srv/git/a.git", LocalForm::Path)));
    // A slash before the first colon makes a path, not an scp-like URL.
    assert_eq!(classify("/srv/git/a:b"), Ok(local("/srv/git/a:b", LocalForm::Path)));
}

#[test]
fn helpers_unknown_schemes_options_and_relative_paths_are_refused() {
    let refused = |url: &str| classify(url).unwrap_err();
    assert_eq!(
        refused("ext::sh -c touch% /tmp/pwned"),
        RepositoryUrlRefused::TransportHelper {
            url: "ext::sh -c touch% /tmp/pwned".into(),
            transport: "ext".into()
        }
    );
    assert!(
        refused("ext::sh -c x").to_string().contains("runs a helper program"),
        "{}",
        refused("ext::sh -c x")
    );
    assert!(matches!(refused("fd::3"), RepositoryUrlRefused::TransportHelper { .. }));
    assert!(matches!(
        refused("custom-helper::anything"),
        RepositoryUrlRefused::TransportHelper { .. }
    ));
    assert!(matches!(
        refused("https::https://host/x"),
        RepositoryUrlRefused::TransportHelper { .. }
    ));
    assert!(matches!(
        refused("foo://host/repo"),
        RepositoryUrlRefused::Scheme { .. }
    ));
    // git compares schemes case-sensitively and hands "FILE" to a helper.
    assert!(matches!(refused("FILE:///etc"), RepositoryUrlRefused::Scheme { .. }));
    assert!(matches!(refused("-uevil"), RepositoryUrlRefused::OptionLike { .. }));
    assert!(matches!(
        refused("ssh://-oProxyCommand=x/r"),
        RepositoryUrlRefused::OptionLike { .. }
    ));
    assert!(matches!(
        refused("-oProxyCommand=x@h:r"),
        RepositoryUrlRefused::OptionLike { .. }
    ));
    assert!(matches!(
        refused("u@-oProxyCommand=x:r"),
        RepositoryUrlRefused::OptionLike { .. }
    ));
    for relative in ["repo", "./repo", "../repo", "~/repo", "~user/repo", "sub/dir:x"] {
        assert_eq!(
            refused(relative),
            RepositoryUrlRefused::RelativePath { url: relative.into() },
            "{relative}"
        );
    }
    assert!(matches!(
        refused("file://host/srv/x"),
        RepositoryUrlRefused::FileUrlHost { .. }
    ));
    assert!(matches!(
        refused("file:///srv/x%00y"),
        RepositoryUrlRefused::NulByte { .. }
    ));
}

fn policy(directories: &[&Path]) -> RepositoryPolicy {
    RepositoryPolicy::new(directories.iter().map(|directory| directory.to_path_buf()).collect())
}

#[test]
fn local_repositories_need_an_allowed_directory() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("git");
    std::fs::create_dir_all(allowed.join("a.git")).unwrap();
    let url = format!("file://{}/a.git", allowed.display());
    let error = RepositoryPolicy::default().check(&url).unwrap_err();
    assert_eq!(error, RepositoryUrlRefused::LocalNotConfigured { url: url.clone() });
    assert!(error.denied_by_policy());
    assert!(error.to_string().contains("[repos] allow_local"), "{error}");
    assert!(policy(&[&allowed]).check(&url).is_ok());
    // A path under the directory that does not exist yet is still under it.
    assert!(policy(&[&allowed])
        .check(&format!("file://{}/new.git", allowed.display()))
        .is_ok());
    assert!(policy(&[&allowed])
        .check(&format!("{}/a.git", allowed.display()))
        .is_ok());
}

#[test]
fn directories_compare_by_whole_components_after_dot_dot() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("git");
    let sibling = dir.path().join("gitx");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(sibling.join("r.git")).unwrap();
    let policy = policy(&[&allowed]);
    let error = policy
        .check(&format!("file://{}/r.git", sibling.display()))
        .unwrap_err();
    assert!(matches!(error, RepositoryUrlRefused::LocalNotAllowed { .. }), "{error}");
    assert!(error.to_string().contains("[repos] allow_local"), "{error}");
    let escape = format!("file://{}/../gitx/r.git", allowed.display());
    assert!(matches!(
        policy.check(&escape).unwrap_err(),
        RepositoryUrlRefused::LocalNotAllowed { .. }
    ));
    let encoded = format!("file://{}/%2e%2e/gitx/r.git", allowed.display());
    assert!(matches!(
        policy.check(&encoded).unwrap_err(),
        RepositoryUrlRefused::LocalNotAllowed { .. }
    ));
    let below_missing = format!("file://{}/missing/../../gitx/r.git", allowed.display());
    assert!(matches!(
        policy.check(&below_missing).unwrap_err(),
        RepositoryUrlRefused::Unresolvable { .. }
    ));
}

#[test]
fn links_inside_the_allowed_directory_that_point_out_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("git");
    let outside = dir.path().join("secret.git");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, allowed.join("link.git")).unwrap();
    std::os::unix::fs::symlink(&outside, allowed.join("sibling.git")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("not-yet"), allowed.join("dangling.git")).unwrap();
    std::fs::create_dir_all(allowed.join("worktree")).unwrap();
    std::fs::write(
        allowed.join("worktree/.git"),
        format!("gitdir: {}\n", outside.display()),
    )
    .unwrap();
    let policy = policy(&[&allowed]);
    for name in ["link.git", "link.git/../secret.git"] {
        let url = format!("file://{}/{name}", allowed.display());
        let error = policy.check(&url).unwrap_err();
        assert_eq!(
            error,
            RepositoryUrlRefused::LocalNotAllowed {
                url: url.clone(),
                path: outside.display().to_string(),
                allowed: allowed.display().to_string(),
            },
            "{name}"
        );
    }
    // git tries NAME.git when NAME is not a repository.
    let error = policy
        .check(&format!("file://{}/sibling", allowed.display()))
        .unwrap_err();
    assert!(matches!(error, RepositoryUrlRefused::LocalNotAllowed { .. }), "{error}");
    // A gitfile sends git elsewhere.
    let error = policy
        .check(&format!("file://{}/worktree", allowed.display()))
        .unwrap_err();
    assert!(matches!(error, RepositoryUrlRefused::LocalNotAllowed { .. }), "{error}");
    let error = policy
        .check(&format!("file://{}/dangling.git", allowed.display()))
        .unwrap_err();
    assert!(matches!(error, RepositoryUrlRefused::Unresolvable { .. }), "{error}");
    // An allowed directory reached through a link is its target.
    std::os::unix::fs::symlink(&allowed, dir.path().join("alias")).unwrap();
    std::fs::create_dir_all(allowed.join("ok.git")).unwrap();
    assert!(policy
        .check(&format!("file://{}/alias/ok.git", dir.path().display()))
        .is_ok());
}
