//! Tests of the plugin commands: uploads, commits, versions and settings.

use super::*;

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `bytes` split into chunks of `chunk_bytes`, staged under `upload` at `at_ms`.
fn stage(state: &mut ClusterState, at_ms: u64, upload: UploadId, bytes: &[u8], chunk_bytes: usize) -> u32 {
    let chunks: Vec<&[u8]> = bytes.chunks(chunk_bytes).collect();
    for (index, chunk) in chunks.iter().enumerate() {
        run_at(
            state,
            at_ms,
            Command::PutPluginChunk {
                upload,
                index: index as u32,
                bytes: chunk.to_vec(),
            },
        )
        .unwrap();
    }
    chunks.len() as u32
}

fn commit(upload: UploadId, name: &str, version: &str, bytes: &[u8], chunk_count: u32, enable: bool) -> Command {
    Command::CommitPlugin {
        upload,
        name: name.to_string(),
        version: version.to_string(),
        sha256: sha256_hex(bytes),
        kind: PluginKind::VcsProvider,
        size_bytes: bytes.len() as u64,
        chunk_count,
        granted_hosts: vec!["api.github.com".to_string()],
        enable,
    }
}

/// Uploads and commits a plugin whose bytes say its name and version.
fn add_plugin(state: &mut ClusterState, name: &str, version: &str, enable: bool) -> PluginRecord {
    let bytes = format!("component of {name} {version}").into_bytes();
    let upload = UploadId::new();
    let chunk_count = stage(state, 1_000, upload, &bytes, 7);
    match run(state, commit(upload, name, version, &bytes, chunk_count, enable)).unwrap() {
        Response::Plugin(record) => *record,
        other => panic!("unexpected {other:?}"),
    }
}

fn enabled_versions(state: &ClusterState, name: &str) -> Vec<String> {
    state
        .enabled_plugins()
        .filter(|record| record.name == name)
        .map(|record| record.version.clone())
        .collect()
}

#[test]
fn a_commit_moves_the_staged_chunks_to_the_plugin() {
    let mut state = ClusterState::default();
    let bytes: Vec<u8> = (0..=255u8).cycle().take(1_000).collect();
    let upload = UploadId::new();
    let chunk_count = stage(&mut state, 1_000, upload, &bytes, 300);
    assert_eq!(chunk_count, 4);
    assert_eq!(state.plugin_uploads[&upload].started_at_ms, 1_000);
    assert_eq!(state.plugin_bytes_held(), 1_000);

    let mut changes = Changes::default();
    let result = apply(
        &mut state,
        &mut changes,
        &Request {
            version: COMMAND_VERSION,
            at_ms: 2_000,
            command: commit(upload, "github", "1.0.0", &bytes, chunk_count, true),
        },
    )
    .unwrap();
    let Response::Plugin(record) = result else {
        panic!("a commit answers with the plugin");
    };
    assert_eq!(
        *record,
        PluginRecord {
            name: "github".into(),
            version: "1.0.0".into(),
            sha256: sha256_hex(&bytes),
            size_bytes: 1_000,
            kind: PluginKind::VcsProvider,
            enabled: true,
            granted_hosts: vec!["api.github.com".into()],
            uploaded_at_ms: 2_000,
            chunk_count: 4,
        }
    );
    let key = PluginKey::new("github", "1.0.0");
    assert_eq!(state.plugin_bytes(&key), Some(bytes));
    assert!(state.plugin_uploads.is_empty() && state.upload_chunks.is_empty());
    assert_eq!(state.plugin_bytes_held(), 1_000, "moved, not copied");
    assert_eq!(changes.plugins, BTreeSet::from([key.clone()]));
    assert_eq!(changes.plugin_chunks.len(), 4);
    assert_eq!(changes.upload_chunks.len(), 4);
    assert_eq!(changes.plugin_uploads, BTreeSet::from([upload]));
}

#[test]
fn a_commit_that_does_not_match_its_chunks_is_refused_without_change() {
    let mut state = ClusterState::default();
    let bytes = b"0123456789abcdef".to_vec();
    let upload = UploadId::new();
    stage(&mut state, 1_000, upload, &bytes, 4);
    // Chunk 2 of 4 never arrives.
    let gap = UploadId::new();
    for index in [0, 1, 3] {
        run(
            &mut state,
            Command::PutPluginChunk {
                upload: gap,
                index,
                bytes: b"abcd".to_vec(),
            },
        )
        .unwrap();
    }
    let before = state.clone();
    let refusals = [
        (
            commit(gap, "github", "1.0.0", b"abcdabcdabcdabcd", 4, false),
            "chunk 2 of 4 is missing",
        ),
        (
            commit(upload, "github", "1.0.0", &bytes, 3, false),
            "holds 4 chunks; the commit says 3",
        ),
        (
            commit(upload, "github", "1.0.0", &bytes, 5, false),
            "chunk 4 of 5 is missing",
        ),
        (
            commit(upload, "github", "1.0.0", &bytes, 0, false),
            "at least one chunk",
        ),
        (
            commit(upload, "github", "1.0.0", b"0123456789abcdeX", 4, false),
            "has sha256",
        ),
        (
            commit(upload, "github", "1.0.0", &bytes[..15], 4, false),
            "holds 16 bytes; the commit says 15",
        ),
        (
            commit(upload, "GitHub", "1.0.0", &bytes, 4, false),
            "plugin name \"GitHub\" is not valid",
        ),
        (
            commit(upload, "github", "1.0", &bytes, 4, false),
            "plugin version \"1.0\" is not valid",
        ),
        (
            commit(upload, "github", "1.0.0+build", &bytes, 4, false),
            "build metadata",
        ),
    ];
    for (command, expected) in refusals {
        let refusal = run(&mut state, command).expect_err(expected);
        assert!(
            matches!(&refusal, ApplyError::Invalid(message) if message.contains(expected)),
            "{expected:?} in {refusal}"
        );
        assert_eq!(state, before, "a refused commit ({expected}) changes nothing");
    }
    let mut bad_digest = commit(upload, "github", "1.0.0", &bytes, 4, false);
    if let Command::CommitPlugin { sha256, .. } = &mut bad_digest {
        *sha256 = sha256.to_uppercase();
    }
    assert!(matches!(run(&mut state, bad_digest), Err(ApplyError::Invalid(_))));
    let unknown = UploadId::new();
    assert_eq!(
        run(&mut state, commit(unknown, "github", "1.0.0", &bytes, 4, false)),
        Err(ApplyError::UploadNotFound(unknown))
    );
    assert_eq!(state, before);
    run(&mut state, commit(upload, "github", "1.0.0", &bytes, 4, false)).unwrap();
}

#[test]
fn a_second_upload_of_a_version_is_refused_with_plugin_exists() {
    let mut state = ClusterState::default();
    add_plugin(&mut state, "github", "1.0.0", false);
    let bytes = b"another build".to_vec();
    let upload = UploadId::new();
    let chunk_count = stage(&mut state, 1_000, upload, &bytes, 100);
    let before = state.clone();
    assert_eq!(
        run(&mut state, commit(upload, "github", "1.0.0", &bytes, chunk_count, true)),
        Err(ApplyError::PluginExists {
            name: "github".into(),
            version: "1.0.0".into()
        })
    );
    assert_eq!(state, before, "the upload stays staged for its node to abort");
    run(&mut state, commit(upload, "github", "1.0.1", &bytes, chunk_count, true)).unwrap();
}

#[test]
fn chunks_are_bounded_in_size_index_and_per_upload_total() {
    let mut state = ClusterState::default();
    let upload = UploadId::new();
    let chunk = |index: u32, bytes: Vec<u8>| Command::PutPluginChunk { upload, index, bytes };
    let before = state.clone();
    assert!(matches!(
        run(&mut state, chunk(0, Vec::new())),
        Err(ApplyError::Invalid(_))
    ));
    assert!(matches!(
        run(&mut state, chunk(0, vec![0; MAX_PLUGIN_CHUNK_BYTES + 1])),
        Err(ApplyError::TooLarge {
            limit: MAX_PLUGIN_CHUNK_BYTES,
            ..
        })
    ));
    assert!(matches!(
        run(&mut state, chunk(MAX_PLUGIN_CHUNKS, vec![1])),
        Err(ApplyError::Invalid(message)) if message.contains("past the 1024 chunks")
    ));
    assert_eq!(state, before);

    let full_chunks = (MAX_PLUGIN_BYTES / MAX_PLUGIN_CHUNK_BYTES) as u32;
    for index in 0..full_chunks {
        run(&mut state, chunk(index, vec![7; MAX_PLUGIN_CHUNK_BYTES])).unwrap();
    }
    assert_eq!(state.staged_bytes(upload), MAX_PLUGIN_BYTES as u64);
    // Writing a chunk again replaces it, so a retried write does not count twice.
    run(&mut state, chunk(0, vec![8; MAX_PLUGIN_CHUNK_BYTES])).unwrap();
    assert_eq!(state.staged_bytes(upload), MAX_PLUGIN_BYTES as u64);
    let before = state.clone();
    assert!(matches!(
        run(&mut state, chunk(full_chunks, vec![1])),
        Err(ApplyError::TooLarge { limit: MAX_PLUGIN_BYTES, found, .. }) if found == MAX_PLUGIN_BYTES + 1
    ));
    assert_eq!(state, before);
}

#[test]
fn staged_uploads_are_bounded_and_stale_ones_make_room() {
    let mut state = ClusterState::default();
    let start_ms = 1_000;
    let put = |upload| Command::PutPluginChunk {
        upload,
        index: 0,
        bytes: b"x".to_vec(),
    };
    let early: Vec<UploadId> = (0..MAX_STAGED_UPLOADS / 2).map(|_| UploadId::new()).collect();
    let late: Vec<UploadId> = (0..MAX_STAGED_UPLOADS / 2).map(|_| UploadId::new()).collect();
    for upload in &early {
        run_at(&mut state, start_ms, put(*upload)).unwrap();
    }
    for upload in &late {
        run_at(&mut state, start_ms + STALE_UPLOAD_MS / 2, put(*upload)).unwrap();
    }
    // An upload in progress may go on at its limit.
    run_at(
        &mut state,
        start_ms + 1,
        Command::PutPluginChunk {
            upload: early[0],
            index: 1,
            bytes: b"y".to_vec(),
        },
    )
    .unwrap();

    let newcomer = UploadId::new();
    let before = state.clone();
    assert_eq!(
        run_at(&mut state, start_ms + STALE_UPLOAD_MS - 1, put(newcomer)),
        Err(ApplyError::TooManyUploads {
            limit: MAX_STAGED_UPLOADS
        }),
        "no upload is stale yet"
    );
    assert_eq!(state, before);

    // Now the early uploads have been idle for the stale period, except early[0], which
    // wrote a chunk 1 ms later.
    let mut changes = Changes::default();
    apply(
        &mut state,
        &mut changes,
        &Request {
            version: COMMAND_VERSION,
            at_ms: start_ms + STALE_UPLOAD_MS,
            command: put(newcomer),
        },
    )
    .unwrap();
    let staged: BTreeSet<UploadId> = state.plugin_uploads.keys().copied().collect();
    let expected: BTreeSet<UploadId> = late.iter().copied().chain([early[0], newcomer]).collect();
    assert_eq!(staged, expected, "the stale uploads made room and the others stay");
    assert!(state.upload_chunks.keys().all(|(upload, _)| expected.contains(upload)));
    assert_eq!(state.staged_bytes(early[0]), 2);
    let dropped: BTreeSet<UploadId> = early[1..].iter().copied().collect();
    assert!(changes.plugin_uploads.is_superset(&dropped));
    assert!(changes.upload_chunks.contains(&(early[1], 0)));
}

#[test]
fn abort_drops_the_upload_and_only_its_chunks() {
    let mut state = ClusterState::default();
    let (aborted, kept) = (UploadId::new(), UploadId::new());
    stage(&mut state, 1_000, aborted, b"abcdef", 2);
    stage(&mut state, 1_000, kept, b"ghijkl", 2);
    run(&mut state, Command::AbortUpload { upload: aborted }).unwrap();
    assert_eq!(state.plugin_uploads.keys().collect::<Vec<_>>(), vec![&kept]);
    assert_eq!(state.upload_chunks.len(), 3);
    assert_eq!(state.staged_bytes(kept), 6);
    let before = state.clone();
    assert_eq!(
        run(&mut state, Command::AbortUpload { upload: aborted }),
        Err(ApplyError::UploadNotFound(aborted))
    );
    assert_eq!(state, before);
}

#[test]
fn enabling_a_version_disables_the_other_versions_of_its_name() {
    let mut state = ClusterState::default();
    add_plugin(&mut state, "github", "1.0.0", true);
    add_plugin(&mut state, "jira", "0.1.0", true);
    assert_eq!(enabled_versions(&state, "github"), vec!["1.0.0"]);
    // A commit with `enable` takes over from the enabled version.
    add_plugin(&mut state, "github", "1.1.0", true);
    assert_eq!(enabled_versions(&state, "github"), vec!["1.1.0"]);
    add_plugin(&mut state, "github", "2.0.0-rc.1", false);
    assert_eq!(enabled_versions(&state, "github"), vec!["1.1.0"]);

    let set = |version: &str, enabled| Command::SetPluginEnabled {
        name: "github".into(),
        version: version.into(),
        enabled,
    };
    let mut changes = Changes::default();
    let result = apply(&mut state, &mut changes, &request(set("1.0.0", true))).unwrap();
    assert!(matches!(result, Response::Plugin(record) if record.enabled && record.version == "1.0.0"));
    assert_eq!(enabled_versions(&state, "github"), vec!["1.0.0"]);
    assert_eq!(
        changes.plugins,
        BTreeSet::from([PluginKey::new("github", "1.0.0"), PluginKey::new("github", "1.1.0")])
    );
    assert_eq!(
        enabled_versions(&state, "jira"),
        vec!["0.1.0"],
        "other names are left alone"
    );
    run(&mut state, set("1.0.0", true)).unwrap();
    assert_eq!(
        enabled_versions(&state, "github"),
        vec!["1.0.0"],
        "enabling twice is harmless"
    );

    run(&mut state, set("1.0.0", false)).unwrap();
    assert!(enabled_versions(&state, "github").is_empty());

    let before = state.clone();
    assert_eq!(
        run(&mut state, set("3.0.0", true)),
        Err(ApplyError::PluginNotFound {
            name: "github".into(),
            version: "3.0.0".into()
        })
    );
    assert_eq!(state, before);
}

#[test]
fn plugin_settings_are_kept_by_name_within_bounds() {
    let mut state = ClusterState::default();
    let set = |pairs: &[(&str, &str)]| Command::SetPluginSettings {
        name: "github".into(),
        settings: pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect(),
    };
    // A name with no uploaded version (a built-in) may have settings.
    let result = run(&mut state, set(&[("api-base", "https://ghe.example.com/api/v3")])).unwrap();
    assert!(matches!(result, Response::PluginSettings(settings) if settings.len() == 1));
    assert_eq!(
        state.plugin_settings["github"]["api-base"],
        "https://ghe.example.com/api/v3"
    );
    let before = state.clone();
    for (pairs, expected) in [
        (vec![("API", "x")], "setting key"),
        (vec![("", "x")], "setting key"),
        (vec![("hosts", "a\nb")], "control characters"),
    ] {
        let refusal = run(&mut state, set(&pairs)).expect_err(expected);
        assert!(
            matches!(&refusal, ApplyError::Invalid(message) if message.contains(expected)),
            "{expected:?} in {refusal}"
        );
    }
    let long = "x".repeat(crate::types::MAX_PLUGIN_SETTING_VALUE_BYTES + 1);
    assert!(run(&mut state, set(&[("hosts", long.as_str())])).is_err());
    assert_eq!(state, before);
    // An empty map clears them.
    run(&mut state, set(&[])).unwrap();
    assert!(!state.plugin_settings.contains_key("github"));
}

#[test]
fn granting_hosts_replaces_the_list_within_bounds() {
    let mut state = ClusterState::default();
    add_plugin(&mut state, "github", "1.0.0", false);
    let grant = |hosts: Vec<String>| Command::GrantPluginHosts {
        name: "github".into(),
        version: "1.0.0".into(),
        hosts,
    };
    let hosts = vec!["github.example.com".to_string(), "*.githubusercontent.com".to_string()];
    let result = run(&mut state, grant(hosts.clone())).unwrap();
    assert!(matches!(result, Response::Plugin(record) if record.granted_hosts == hosts));
    assert_eq!(state.plugins[&PluginKey::new("github", "1.0.0")].granted_hosts, hosts);

    let before = state.clone();
    let too_many: Vec<String> = (0..=crate::types::MAX_GRANTED_HOSTS)
        .map(|index| format!("h{index}.example.com"))
        .collect();
    for (hosts, expected) in [
        (too_many, "at most 64"),
        (vec!["a".repeat(254)], "1 to 253 characters"),
        (vec![String::new()], "1 to 253 characters"),
        (vec!["a b".to_string()], "white space"),
    ] {
        let refusal = run(&mut state, grant(hosts)).expect_err(expected);
        assert!(
            matches!(&refusal, ApplyError::Invalid(message) if message.contains(expected)),
            "{expected:?} in {refusal}"
        );
    }
    assert!(matches!(
        run(
            &mut state,
            Command::GrantPluginHosts {
                name: "gitlab".into(),
                version: "1.0.0".into(),
                hosts: Vec::new(),
            }
        ),
        Err(ApplyError::PluginNotFound { .. })
    ));
    assert_eq!(state, before);
    run(&mut state, grant(Vec::new())).unwrap();
    assert!(state.plugins[&PluginKey::new("github", "1.0.0")]
        .granted_hosts
        .is_empty());
}

#[test]
fn removing_deletes_a_disabled_version_and_its_bytes_but_refuses_an_enabled_one() {
    let mut state = ClusterState::default();
    let enabled = add_plugin(&mut state, "github", "1.1.0", true);
    let disabled = add_plugin(&mut state, "github", "1.0.0", false);
    assert!(disabled.chunk_count > 1);
    let remove = |record: &PluginRecord| Command::RemovePlugin {
        name: record.name.clone(),
        version: record.version.clone(),
    };
    let before = state.clone();
    assert_eq!(
        run(&mut state, remove(&enabled)),
        Err(ApplyError::PluginEnabled {
            name: "github".into(),
            version: "1.1.0".into()
        })
    );
    assert_eq!(state, before);

    let mut changes = Changes::default();
    let result = apply(&mut state, &mut changes, &request(remove(&disabled))).unwrap();
    assert_eq!(result, Response::Plugin(Box::new(disabled.clone())));
    assert!(!state.plugins.contains_key(&disabled.key()));
    assert!(state.plugin_chunks.keys().all(|(key, _)| *key == enabled.key()));
    assert_eq!(changes.plugin_chunks.len(), disabled.chunk_count as usize);
    assert_eq!(state.plugin_bytes_held(), enabled.size_bytes);
    let before = state.clone();
    assert!(matches!(
        run(&mut state, remove(&disabled)),
        Err(ApplyError::PluginNotFound { .. })
    ));
    assert_eq!(state, before);
}

#[test]
fn the_number_of_plugin_versions_is_bounded() {
    let mut state = ClusterState::default();
    for patch in 0..MAX_PLUGINS {
        add_plugin(&mut state, "tool", &format!("1.0.{patch}"), false);
    }
    let upload = UploadId::new();
    let bytes = b"one too many".to_vec();
    let chunk_count = stage(&mut state, 1_000, upload, &bytes, 100);
    let before = state.clone();
    assert_eq!(
        run(&mut state, commit(upload, "tool", "2.0.0", &bytes, chunk_count, false)),
        Err(ApplyError::TooManyPlugins { limit: MAX_PLUGINS })
    );
    assert_eq!(state, before);
}

#[test]
fn plugin_names_and_versions() {
    use crate::types::{validate_plugin_name, validate_plugin_version};
    for good in ["github", "a", "gitea-forgejo", "tool2", &"x".repeat(64)] {
        assert_eq!(validate_plugin_name(good), Ok(()), "{good}");
    }
    for bad in ["", "GitHub", "git_hub", "git hub", "tool.v2", &"x".repeat(65)] {
        assert!(validate_plugin_name(bad).is_err(), "{bad:?}");
    }
    for good in ["0.1.0", "1.2.3", "10.20.30", "1.0.0-rc.1", "1.0.0-alpha-2"] {
        assert_eq!(validate_plugin_version(good), Ok(()), "{good}");
    }
    for bad in [
        "",
        "1",
        "1.0",
        "v1.0.0",
        "01.0.0",
        "1.0.0+build.5",
        "1.0.0 ",
        &format!("1.0.0-{}", "a".repeat(60)),
    ] {
        assert!(validate_plugin_version(bad).is_err(), "{bad:?}");
    }
    let mut versions = vec!["1.10.0", "1.9.0", "1.0.0", "1.0.0-rc.1"];
    versions.sort_by(|left, right| crate::types::plugin_version_order(left, right));
    assert_eq!(versions, vec!["1.0.0-rc.1", "1.0.0", "1.9.0", "1.10.0"]);
}
