//! The files in deploy/ as an operator installs them: the systemd unit passes
//! `systemd-analyze verify` and starts the node with flags that exist, and every sample node
//! config (the TOML files and the one in the Kubernetes example) passes the node's own loader
//! (`flotilla node --check-config`).

use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla_tests::flotilla_bin;

/// Where the unit expects the binary; the test points it at the one just built.
const INSTALLED_BINARY: &str = "/usr/local/bin/flotilla";
const UNIT_NAME: &str = "flotilla-node.service";
/// Directories of deploy/ whose files are not node configs of this module's concern.
const NOT_NODE_CONFIGS: &[&str] = &["local", "grafana"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives one level below the workspace root")
        .join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

/// `systemd-analyze verify` of `unit_text`, written as `flotilla-node.service` in a directory of
/// its own. Returns every line it printed about the unit; verify exits 0 on many mistakes (an
/// unknown key, a bad value) and only prints them, so a clean unit is one it says nothing of.
fn verify_unit(unit_text: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join(UNIT_NAME);
    std::fs::write(&unit, unit_text).unwrap();
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap_or_else(|error| {
            panic!("cannot run systemd-analyze (Debian package systemd; scripts/setup installs it): {error}")
        });
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Lines about other units of the host (a broken unit elsewhere) are not this unit's fault.
    let mut complaints: Vec<String> = printed
        .lines()
        .filter(|line| line.contains("flotilla-node"))
        .map(str::to_string)
        .collect();
    if !output.status.success() {
        complaints.push(format!(
            "systemd-analyze verify exited with {}: {printed}",
            output.status
        ));
    }
    complaints
}

/// The unit with its binary path pointing at the built binary (verify checks that every
/// Exec*= command exists and is executable).
fn unit_with_built_binary() -> String {
    let unit = read(&deploy_dir().join("systemd").join(UNIT_NAME));
    assert!(
        unit.contains(&format!(
            "ExecStart={INSTALLED_BINARY} node --config /etc/flotilla/node.toml"
        )),
        "the unit must start `{INSTALLED_BINARY} node --config /etc/flotilla/node.toml`"
    );
    unit.replace(INSTALLED_BINARY, &flotilla_bin().display().to_string())
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let complaints = verify_unit(&unit_with_built_binary());
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify found fault with deploy/systemd/{UNIT_NAME}:\n{}",
        complaints.join("\n")
    );
    // The check can fail: the same unit with one bad value is caught.
    let broken = unit_with_built_binary().replace("KillMode=mixed", "KillMode=gently");
    assert!(
        !verify_unit(&broken).is_empty(),
        "systemd-analyze verify said nothing of KillMode=gently: the check above proves nothing"
    );
}

#[test]
fn the_systemd_unit_uses_only_flags_the_node_has_and_the_settings_a_node_needs() {
    let unit = read(&deploy_dir().join("systemd").join(UNIT_NAME));
    let help = Command::new(flotilla_bin()).args(["node", "--help"]).output().unwrap();
    assert!(help.status.success(), "flotilla node --help failed");
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    let commands: Vec<&str> = unit
        .lines()
        .filter(|line| line.starts_with("ExecStart") && line.contains(INSTALLED_BINARY))
        .collect();
    assert_eq!(
        commands.len(),
        2,
        "ExecStartPre (--check-config) and ExecStart: {commands:?}"
    );
    for command in commands {
        for flag in command.split_whitespace().filter(|word| word.starts_with("--")) {
            assert!(
                help.contains(&format!("{flag} ")) || help.lines().any(|line| line.trim() == flag),
                "{UNIT_NAME} passes {flag}, which `flotilla node --help` does not list: {command}"
            );
        }
    }
    let settings: Vec<&str> = unit.lines().filter(|line| !line.starts_with('#')).collect();
    for wanted in [
        "Delegate=yes",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        "Restart=on-failure",
        "StateDirectory=flotilla",
        "EnvironmentFile=-/etc/flotilla/node.env",
    ] {
        assert!(settings.contains(&wanted), "{UNIT_NAME} lacks {wanted}");
    }
    // Directives that would break machines (see the unit's comments) stay out.
    for refused in [
        "PrivateUsers=",
        "PrivateDevices=",
        "ProtectKernelTunables=",
        "ProtectKernelLogs=",
        "ProtectControlGroups=",
        "ProtectClock=",
        "ProtectHostname=",
        "RestrictNamespaces=",
        "MemoryDenyWriteExecute=",
        "OOMScoreAdjust=",
    ] {
        assert!(
            !settings.iter().any(|line| line.starts_with(refused)),
            "{UNIT_NAME} sets {refused}, which breaks machines"
        );
    }
}

/// Every `*.toml` under deploy/ (but deploy/local and deploy/grafana), as relative paths.
fn sample_configs(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
            if !(dir == deploy_dir().as_path() && NOT_NODE_CONFIGS.contains(&name)) {
                sample_configs(&path, found);
            }
        } else if path.extension().is_some_and(|extension| extension == "toml") {
            found.push(path);
        }
    }
}

/// `flotilla node --config FILE --check-config EXTRA...`: (success, what it printed).
fn check_config(file: &Path, extra: &[&str]) -> (bool, String) {
    let output = Command::new(flotilla_bin())
        .args(["node", "--config"])
        .arg(file)
        .arg("--check-config")
        .args(extra)
        .env_remove("FLOTILLA_JOIN_TOKEN")
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), printed)
}

/// The `node.toml: |` block of the Kubernetes example's ConfigMap.
fn kubernetes_node_toml() -> String {
    let manifest = read(&deploy_dir().join("kubernetes").join("flotilla.yaml"));
    let mut lines = manifest.lines().skip_while(|line| line.trim() != "node.toml: |");
    assert!(
        lines.next().is_some(),
        "flotilla.yaml has no `node.toml: |` ConfigMap entry"
    );
    let block: Vec<&str> = lines
        .take_while(|line| line.is_empty() || line.starts_with("    "))
        .map(|line| line.strip_prefix("    ").unwrap_or(line))
        .collect();
    assert!(block.len() > 3, "the ConfigMap's node.toml is empty");
    block.join("\n")
}

#[test]
fn every_sample_config_passes_the_nodes_own_check() {
    let mut configs = Vec::new();
    sample_configs(&deploy_dir(), &mut configs);
    configs.sort();
    let names: Vec<String> = configs.iter().map(|path| path.display().to_string()).collect();
    for role in ["first-node.toml", "joining-node.toml", "agent-node.toml"] {
        assert!(
            names.iter().any(|name| name.ends_with(&format!("config/{role}"))),
            "deploy/config/{role} is missing; found {names:?}"
        );
    }
    for config in &configs {
        let (valid, printed) = check_config(config, &[]);
        assert!(valid, "{} fails the node's check:\n{printed}", config.display());
        assert!(printed.contains("is valid"), "{printed}");
    }

    // The Kubernetes example's file, with the flag every pod adds (its pod IP).
    let dir = tempfile::tempdir().unwrap();
    let kubernetes = dir.path().join("node.toml");
    std::fs::write(&kubernetes, kubernetes_node_toml()).unwrap();
    let (valid, printed) = check_config(&kubernetes, &["--advertise", "10.244.1.7:7420"]);
    assert!(
        valid,
        "the ConfigMap of deploy/kubernetes/flotilla.yaml fails the node's check:\n{printed}"
    );

    // The check can fail, and says where: a wrong type names file, line and column; a value
    // refused after parsing names the file and the field.
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[node]\ndata_dir = \"/var/lib/flotilla\"\nslots = \"many\"\n").unwrap();
    let (valid, printed) = check_config(&broken, &[]);
    assert!(!valid, "a config with slots = \"many\" passed: {printed}");
    assert!(
        printed.contains(&format!("config file {} line 3 column 9", broken.display())),
        "{printed}"
    );
    std::fs::write(
        &broken,
        "[node]\ndata_dir = \"/var/lib/flotilla\"\nlisten = \"0.0.0.0:7420\"\n",
    )
    .unwrap();
    let (valid, printed) = check_config(&broken, &[]);
    assert!(
        !valid,
        "listening on 0.0.0.0 with no advertise address passed: {printed}"
    );
    assert!(
        printed.contains(&format!("config file {}: advertise:", broken.display())),
        "{printed}"
    );
}
