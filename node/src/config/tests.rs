use super::*;

#[test]
fn an_otlp_endpoint_is_an_http_url_with_a_host() {
    assert_eq!(otlp_endpoint(None).unwrap(), None);
    let url = otlp_endpoint(Some("http://127.0.0.1:4317".to_string()))
        .unwrap()
        .unwrap();
    assert_eq!(url.port(), Some(4317));
    for bad in [
        "127.0.0.1:4317",
        "grpc://collector:4317",
        "https://collector:4317",
        "not a url",
    ] {
        let error = otlp_endpoint(Some(bad.to_string())).unwrap_err().to_string();
        assert!(error.starts_with("otlp_endpoint: "), "{error}");
        assert!(error.contains(bad), "{error}");
    }
}

#[test]
fn builtins_are_chosen_by_name_and_an_unknown_one_names_its_line() {
    let parsed = parse_config(Path::new("node.toml"), "[plugins]\nbuiltins = [\"git\", \"github\"]\n").unwrap();
    let names: Vec<&str> = parsed
        .plugins
        .chosen_builtins()
        .iter()
        .map(|plugin| plugin.name)
        .collect();
    assert_eq!(names, ["github", "git"], "match order, plain git last");
    let all = parse_config(Path::new("node.toml"), "").unwrap();
    assert_eq!(
        all.plugins.chosen_builtins().len(),
        flotilla_builtin_plugins::BUILTIN.len()
    );
    let error = parse_config(Path::new("node.toml"), "[plugins]\nbuiltins = [\"svn\"]\n")
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("config file node.toml line 2"), "{error}");
    assert!(error.contains("\"svn\" is not a built-in plugin"), "{error}");
}

#[test]
fn raft_timing_has_defaults_and_a_bad_value_names_its_line() {
    let parsed = parse_config(Path::new("node.toml"), "[node]\nslots = 2\n").unwrap();
    assert_eq!(raft_timing(&parsed.node).unwrap(), RaftTiming::default());
    let parsed = parse_config(
        Path::new("node.toml"),
        "[node]\nraft_heartbeat_ms = 1000\nraft_election_timeout_ms = 5000\n",
    )
    .unwrap();
    assert_eq!(
        raft_timing(&parsed.node).unwrap(),
        RaftTiming {
            heartbeat_ms: 1_000,
            election_timeout_ms: 5_000
        }
    );
    let error = parse_config(Path::new("node.toml"), "[node]\nslots = 2\nraft_heartbeat_ms = 0\n")
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("config file node.toml line 3"), "{error}");
    assert!(error.contains("node.raft_heartbeat_ms: 0 is outside"), "{error}");
    let error = parse_config(Path::new("node.toml"), "[node]\nraft_election_timeout_ms = 99\n")
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("config file node.toml line 2"), "{error}");
    // Each value in range, the pair not: an election timeout shorter than three heartbeats.
    let parsed = parse_config(
        Path::new("node.toml"),
        "[node]\nraft_heartbeat_ms = 500\nraft_election_timeout_ms = 1000\n",
    )
    .unwrap();
    let error = raft_timing(&parsed.node).unwrap_err().to_string();
    assert!(
        error.starts_with(
            "node.raft_election_timeout_ms: 1000 ms is less than 3 heartbeats of node.raft_heartbeat_ms (500 ms)"
        ),
        "{error}"
    );
}

#[test]
fn an_sts_endpoint_is_an_http_url_and_a_bad_one_names_file_line_and_field() {
    let parsed = parse_config(
        Path::new("node.toml"),
        "[aws]\nsts_endpoint = \"http://127.0.0.1:5000\"\n",
    )
    .unwrap();
    assert_eq!(
        parsed.aws.sts_endpoint.map(|endpoint| endpoint.0).as_deref(),
        Some("http://127.0.0.1:5000")
    );
    let error = parse_config(Path::new("node.toml"), "\n[aws]\nsts_endpoint = \"sts.local\"\n")
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("config file node.toml line 3"), "{error}");
    assert!(
        error.contains("aws.sts_endpoint: \"sts.local\" is not a URL"),
        "{error}"
    );
}

#[test]
fn local_repository_directories_are_absolute_paths_and_a_bad_one_names_its_line() {
    let parsed = parse_config(Path::new("node.toml"), "[repos]\nallow_local = [\"/srv/git\"]\n").unwrap();
    assert_eq!(parsed.repos.policy().allow_local(), [PathBuf::from("/srv/git")]);
    assert!(parse_config(Path::new("node.toml"), "")
        .unwrap()
        .repos
        .policy()
        .allow_local()
        .is_empty());
    let text = "[repos]\nallow_local = [\n  \"/srv/git\",\n  \"srv/other\",\n]\n";
    let error = parse_config(Path::new("node.toml"), text).unwrap_err().to_string();
    // The span is the array's: the line of `allow_local`.
    assert!(error.starts_with("config file node.toml line 2"), "{error}");
    assert!(
        error.contains("allow_local: \"srv/other\" is not an absolute directory path"),
        "{error}"
    );
    let error = parse_config(Path::new("node.toml"), "[repos]\nallow = []\n")
        .unwrap_err()
        .to_string();
    assert!(error.contains("line 2") && error.contains("allow"), "{error}");
}

#[test]
fn machine_sizes_take_units_and_a_bad_one_names_file_line_and_field() {
    let text = "[machines]\nmemory = \"1GiB\"\ndisk = \"10GiB\"\nmax_processes = 256\ndisk_backing = \"ext4\"\n";
    let parsed = parse_config(Path::new("node.toml"), text).unwrap();
    assert_eq!(parsed.machines.memory, Some(1 << 30));
    assert_eq!(parsed.machines.disk, Some(10 << 30));
    assert_eq!(parsed.machines.max_processes, Some(256));
    assert_eq!(
        parsed.machines.disk_backing,
        Some(flotilla_sandbox::DiskBacking::Ext4Image)
    );
    let error = parse_config(
        Path::new("node.toml"),
        "[machines]\nmemory = \"1GiB\"\ndisk = \"10 gallons\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(error.starts_with("config file node.toml line 3"), "{error}");
    assert!(error.contains("machines.disk"), "{error}");
    assert!(error.contains("unknown unit \"gallons\""), "{error}");
    let error = parse_config(Path::new("node.toml"), "[machines]\ndisk_backing = \"zfs\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("line 2") && error.contains("machines.disk_backing"),
        "{error}"
    );
}

#[test]
fn a_bad_field_names_file_line_and_field() {
    let text = "[node]\nregion = \"eu\"\nslots = \"many\"\n";
    let error = parse_config(Path::new("node.toml"), text).unwrap_err().to_string();
    assert!(error.starts_with("config file node.toml line 3 column 9"), "{error}");
    assert!(error.contains("invalid type"), "{error}");
}

#[test]
fn an_unknown_field_is_named() {
    let text = "[node]\nslotz = 3\n";
    let error = parse_config(Path::new("node.toml"), text).unwrap_err().to_string();
    assert!(error.contains("line 2"), "{error}");
    assert!(error.contains("slotz"), "{error}");
}

#[test]
fn models_are_declared_by_name() {
    let text = "[models.local]\nprovider = \"openai\"\nbase_url = \"http://127.0.0.1:8080/v1\"\nmodel = \"served-model-id\"\napi_key_env = \"LOCAL_API_KEY\"\n\n[models.demo]\nprovider = \"scripted\"\nmodel = \"demo\"\nscript = \"demo.json\"\n";
    let models = parse_config(Path::new("node.toml"), text).unwrap().models;
    assert_eq!(models.len(), 2);
    assert_eq!(models["local"].model, "served-model-id");
    let bad = "[models.local]\nprovider = \"openai\"\nmodel = \"m\"\napi_key = \"sk-on-the-command-line\"\n";
    let error = parse_config(Path::new("node.toml"), bad).unwrap_err().to_string();
    assert!(error.contains("line 4") && error.contains("api_key"), "{error}");
}

#[test]
fn flags_override_the_file() {
    let dir = tempfile_dir();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, "[node]\ndata_dir = \"/tmp/x\"\nslots = 3\nregion = \"eu\"\n").unwrap();
    let config = NodeArgs {
        config: Some(path),
        slots: Some(5),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    assert_eq!(config.slots, 5);
    assert_eq!(config.region, "eu");
    assert_eq!(config.data_dir, PathBuf::from("/tmp/x"));
    assert_eq!(config.mesh_port, 7421);
}

#[test]
fn compiled_plugin_code_lives_under_the_data_dir_unless_told_otherwise() {
    let dir = tempfile_dir();
    let path = dir.path().join("cache.toml");
    let resolve = |flag: Option<&str>, file: &str| {
        std::fs::write(&path, format!("[node]\ndata_dir = \"/srv/flotilla\"\n{file}")).unwrap();
        NodeArgs {
            config: Some(path.clone()),
            compiled_plugin_cache: flag.map(PathBuf::from),
            ..Default::default()
        }
        .resolve()
        .unwrap()
        .compiled_plugin_cache()
    };
    assert_eq!(resolve(None, ""), PathBuf::from("/srv/flotilla/plugins-compiled"));
    let in_file = "[plugins]\ncompiled_cache = \"/var/cache/flotilla\"\n";
    assert_eq!(resolve(None, in_file), PathBuf::from("/var/cache/flotilla"));
    assert_eq!(resolve(Some("/fast/disk"), in_file), PathBuf::from("/fast/disk"));
}

#[test]
fn machine_uid_ranges_come_from_the_file_and_one_that_does_not_fit_is_refused() {
    let dir = tempfile_dir();
    let path = dir.path().join("uids.toml");
    let resolve = |machines: &str| {
        std::fs::write(&path, format!("[node]\ndata_dir = \"/tmp/x\"\n[machines]\n{machines}")).unwrap();
        NodeArgs {
            config: Some(path.clone()),
            ..Default::default()
        }
        .resolve()
    };
    let config = resolve("uid_range_start = 2000000000\nuid_ranges = 100\n").unwrap();
    assert_eq!(config.machines.uid_ranges.first_host_id, 2_000_000_000);
    assert_eq!(config.machines.uid_ranges.ranges, 100);
    let defaults = resolve("").unwrap();
    assert_eq!(
        defaults.machines.uid_ranges,
        flotilla_sandbox::uid_range::UidRangeConfig::default()
    );
    let error = resolve("uid_range_start = 4000000000\nuid_ranges = 10000\n")
        .unwrap_err()
        .to_string();
    assert!(error.contains("machines.uid_range_start"), "{error}");
    assert!(error.contains("do not fit"), "{error}");
}

#[test]
fn a_config_check_names_the_file_and_the_field_at_fault() {
    let dir = tempfile_dir();
    let path = dir.path().join("check.toml");
    let check = |text: &str| {
        std::fs::write(&path, text).unwrap();
        NodeArgs {
            config: Some(path.clone()),
            check_config: true,
            ..Default::default()
        }
        .check()
    };
    let summary = check("[node]\ndata_dir = \"/var/lib/flotilla\"\nregion = \"eu-west\"\n").unwrap();
    assert!(summary.contains("is valid: region eu-west"), "{summary}");
    assert!(
        summary.contains("raft heartbeat 250 ms and election timeout 1000–2000 ms"),
        "{summary}"
    );
    let summary =
        check("[node]\ndata_dir = \"/var/lib/flotilla\"\nraft_heartbeat_ms = 1000\nraft_election_timeout_ms = 4000\n")
            .unwrap();
    assert!(
        summary.contains("raft heartbeat 1000 ms and election timeout 4000–8000 ms"),
        "{summary}"
    );
    let error = check("[node]\ndata_dir = \"/var/lib/flotilla\"\nraft_heartbeat_ms = 1000\n").unwrap_err();
    assert!(
        error.starts_with(&format!(
            "config file {}: node.raft_election_timeout_ms: 1000 ms is less than 3 heartbeats",
            path.display()
        )),
        "{error}"
    );
    let error = check("[node]\ndata_dir = \"/var/lib/flotilla\"\nslots = 20000\n").unwrap_err();
    assert!(
        error.starts_with(&format!("config file {}: slots: must be at most", path.display())),
        "{error}"
    );
    let error = check("[node]\nslots = \"many\"\n").unwrap_err();
    assert!(error.contains("line 2 column 9"), "{error}");
}

fn tempfile_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("flotilla-config-test-")
        .tempdir()
        .unwrap()
}
