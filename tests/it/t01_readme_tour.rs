//! The README's tour runs as written: the command blocks of "A five-minute tour", "Teams and
//! keys", "Team settings, retention and privacy mode" and "Audit log and limits", in order, as
//! one bash script (`set -euo pipefail`), on three real nodes with the scripted model.
//!
//! The script runs in network, mount and process namespaces of its own (`unshare`): the tour's
//! fixed ports (7420, 7430, 7440) and its `/tmp/fl` (a private tmpfs on /tmp) collide with
//! nothing, and when the script ends the kernel stops every node it started. Only its first
//! line, `cargo build --bin flotilla`, is left out: the test runs the binary the suite built,
//! which the tour's next line puts on PATH through `target/` (a link to the build's directory).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const SECTIONS: [&str; 4] = [
    "## A five-minute tour",
    "## Teams and keys",
    "## Team settings, retention and privacy mode",
    "## Audit log and limits",
];
const BUILD_LINE: &str = "cargo build --bin flotilla";
const TOUR_DEADLINE: Duration = Duration::from_secs(300);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is one level below the workspace root")
        .to_path_buf()
}

/// The ```sh blocks of the named sections, in the README's order.
fn tour_script(readme: &str) -> String {
    let mut script = String::new();
    let mut in_section = false;
    let mut in_block = false;
    for line in readme.lines() {
        if line.starts_with("## ") {
            in_section = SECTIONS.contains(&line.trim_end());
            continue;
        }
        if !in_section {
            continue;
        }
        if in_block {
            if line.trim_end() == "```" {
                in_block = false;
                script.push('\n');
            } else if line.trim() != BUILD_LINE {
                script.push_str(line);
                script.push('\n');
            }
        } else if line.trim_end() == "```sh" {
            in_block = true;
        }
    }
    script
}

#[tokio::test]
async fn t01_the_readme_tour_runs_as_written() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    let script = tour_script(&readme);
    for section in SECTIONS {
        assert!(readme.contains(section), "the README has no section {section:?}");
    }
    assert!(
        script.contains("flotilla agent create"),
        "the tour has no agent create:\n{script}"
    );

    // A directory outside /tmp (the script gets a private /tmp) with `target` linked to the
    // directory of the binary under test.
    let binary = flotilla_tests::flotilla_bin();
    let target = binary
        .parent()
        .and_then(Path::parent)
        .expect("the binary is in target/debug")
        .to_path_buf();
    let work = tempfile::Builder::new()
        .prefix("readme-tour-")
        .tempdir_in(&target)
        .expect("a directory under the target directory");
    std::os::unix::fs::symlink(&target, work.path().join("target")).expect("link target/");
    let script_path = work.path().join("tour.sh");
    std::fs::write(&script_path, format!("set -euo pipefail\nset -x\n{script}")).expect("write the script");
    let log_path = work.path().join("tour.log");
    let log = std::fs::File::create(&log_path).expect("log");

    let inner = format!(
        "ip link set lo up && mount -t tmpfs tmpfs /tmp && cd {} && exec bash {}",
        work.path().display(),
        script_path.display()
    );
    let mut child = tokio::process::Command::new("unshare")
        .args([
            "--net",
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--mount-proc",
            "--",
        ])
        .args(["bash", "-c", &inner])
        .env(
            "FLOTILLA_COMPILED_PLUGIN_CACHE",
            flotilla_tests::shared_compiled_plugin_cache(),
        )
        .env_remove("FLOTILLA_TOKEN")
        .env_remove("FLOTILLA_CA_CERT")
        .env_remove("FLOTILLA_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("unshare (util-linux) runs");
    let status = match tokio::time::timeout(TOUR_DEADLINE, child.wait()).await {
        Ok(status) => Some(status.expect("wait for the tour")),
        Err(_) => {
            let _ = child.kill().await;
            None
        }
    };
    let mut output = String::new();
    std::fs::File::open(&log_path)
        .and_then(|mut file| file.read_to_string(&mut output))
        .expect("read the log");
    let tail: Vec<&str> = output
        .lines()
        .rev()
        .take(120)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let tail = tail.join("\n");
    match status {
        None => panic!("the tour did not end within {TOUR_DEADLINE:?}; last lines:\n{tail}"),
        Some(status) => assert!(status.success(), "the tour failed ({status}); last lines:\n{tail}"),
    }
    // What the tour's commands print when they work.
    for expected in ["3 members up", "leader", "1.2.0", "openai-key", "red"] {
        assert!(
            output.contains(expected),
            "the tour's output lacks {expected:?}; last lines:\n{tail}"
        );
    }
}
