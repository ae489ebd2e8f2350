//! Every tool against a machine of each driver: a real bubblewrap machine on the `host` base
//! image (as root, like the driver), and a fake machine (no root, no namespaces), so the tools
//! are known to behave the same on both. Each scenario runs once per driver, in a temporary
//! directory, with a machine of its own that it destroys; the bubblewrap run keeps the
//! scenario's name, the fake run is the same name under `on_fake`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_sandbox::fake::FakeDriver;
use flotilla_sandbox::{
    BaseImage, BwrapConfig, BwrapDriver, ExecRequest, MachineDriver, MachineHandle, MachineLimits, MachineSpec,
    Terminal,
};
use serde_json::json;

use super::{run_tool, tool_specs, ToolLimits, ToolOutput};

/// Deadline for conditions a healthy machine meets in milliseconds; generous because tests
/// share two cores.
const CONDITION_DEADLINE: Duration = Duration::from_secs(20);

/// Which driver a scenario's machine comes from.
#[derive(Debug, Clone, Copy)]
enum Driver {
    Bubblewrap,
    Fake,
}

struct TestMachine {
    driver: Arc<dyn MachineDriver>,
    machine: MachineHandle,
    checkout: PathBuf,
    limits: ToolLimits,
    // Last, so that it is removed after the machine (fields drop in order).
    _scratch: tempfile::TempDir,
}

impl TestMachine {
    async fn start(kind: Driver, name: &str) -> TestMachine {
        let limits = MachineLimits {
            command_timeout_ms: 60_000,
            ..MachineLimits::default()
        };
        TestMachine::start_with_limits(kind, name, limits).await
    }

    async fn start_with_limits(kind: Driver, name: &str, limits: MachineLimits) -> TestMachine {
        let scratch = tempfile::Builder::new()
            .prefix("flotilla-tools-test")
            .tempdir()
            .expect("scratch dir");
        let machines_root = scratch.path().join("node-data/machines");
        let driver: Arc<dyn MachineDriver> = match kind {
            Driver::Bubblewrap => Arc::new(BwrapDriver::new(BwrapConfig::new(machines_root)).expect("driver")),
            Driver::Fake => Arc::new(FakeDriver::new(machines_root).expect("fake driver")),
        };
        let base = driver.prepare_base(BaseImage::Host).await.expect("host base image");
        let checkout = scratch.path().join("checkout");
        std::fs::create_dir_all(checkout.join("src")).unwrap();
        std::fs::write(checkout.join("README.md"), "# demo\nfirst line\nsecond line\n").unwrap();
        std::fs::write(
            checkout.join("src/main.rs"),
            "fn main() {\n    println!(\"hello\");\n}\n",
        )
        .unwrap();
        let mut spec = MachineSpec::new(name, base, &checkout);
        spec.limits = limits;
        let machine = driver.create(spec).await.expect("create machine");
        TestMachine {
            driver,
            machine,
            checkout,
            limits: ToolLimits {
                max_output_bytes: 4096,
                default_timeout_ms: 30_000,
                max_timeout_ms: 60_000,
            },
            _scratch: scratch,
        }
    }

    async fn tool(&self, name: &str, arguments: serde_json::Value) -> ToolOutput {
        run_tool(
            self.driver.as_ref(),
            &self.machine,
            name,
            &arguments.to_string(),
            &self.limits,
        )
        .await
    }

    async fn tool_ok(&self, name: &str, arguments: serde_json::Value) -> String {
        let output = self.tool(name, arguments.clone()).await;
        assert!(!output.failed, "{name} {arguments} failed: {}", output.content);
        output.content
    }

    async fn tool_failed(&self, name: &str, arguments: serde_json::Value) -> String {
        let output = self.tool(name, arguments.clone()).await;
        assert!(
            output.failed,
            "{name} {arguments} should have failed: {}",
            output.content
        );
        output.content
    }

    async fn shell(&self, command: &str) -> String {
        let output = self
            .driver
            .exec(&self.machine, ExecRequest::new(command))
            .await
            .expect("exec");
        assert!(output.success(), "{command:?}: {}", output.last_lines(10));
        output.stdout_text()
    }

    async fn destroy(self) {
        self.driver.destroy(&self.machine).await.expect("destroy machine");
    }
}

#[test]
fn every_tool_has_an_object_schema() {
    let specs = tool_specs();
    let names: Vec<&str> = specs.iter().map(|(name, _, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "run_command",
            "read_file",
            "write_file",
            "edit_file",
            "list_dir",
            "search",
            "read_terminal"
        ]
    );
    for (name, description, schema) in &specs {
        assert!(!description.is_empty(), "{name}");
        assert_eq!(schema["type"], "object", "{name}");
        assert_eq!(schema["additionalProperties"], false, "{name}");
    }
}

/// What the agent reads when its command runs into a limit of the machine (bubblewrap only:
/// the fake driver enforces no memory, disk or process limit).
#[tokio::test]
async fn run_command_names_the_limit_a_hog_ran_into() {
    // Memory leaves room for the fork bomb's 64 shells, so that the bomb meets the process
    // limit and not the memory limit first.
    let limits = MachineLimits {
        memory_bytes: 256 * flotilla_sandbox::limits::MIB,
        disk_bytes: 16 * flotilla_sandbox::limits::MIB,
        max_processes: 64,
        command_timeout_ms: 60_000,
        ..MachineLimits::default()
    };
    let machine = TestMachine::start_with_limits(Driver::Bubblewrap, "hogs", limits).await;
    for (command, expected) in [
        (
            "head -c 1000000000 /dev/zero | tail -n 1 >/dev/null",
            "out of memory: killed at the machine's memory limit of 256 MiB",
        ),
        (
            "dd if=/dev/zero of=/tmp/fill bs=1M count=64",
            "disk limit 16 MiB reached",
        ),
        ("bomb() { bomb | bomb & }; bomb; sleep 2", "process limit 64 reached"),
    ] {
        let output = machine.tool("run_command", json!({ "command": command })).await;
        assert!(output.failed, "{command}: {}", output.content);
        assert!(output.content.starts_with(expected), "{command}: {}", output.content);
        if command.starts_with("dd") {
            machine.tool("run_command", json!({"command": "rm /tmp/fill"})).await;
        }
        let after = machine.tool("run_command", json!({"command": "echo still-here"})).await;
        assert!(
            after.content.contains("still-here"),
            "after {command}: {}",
            after.content
        );
    }
    machine.destroy().await;
}

/// Declares each scenario as a test on bubblewrap (named after the scenario) and on the fake
/// driver (the same name under `on_fake`).
macro_rules! on_both_drivers {
    ($($scenario:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $scenario() {
                scenarios::$scenario(Driver::Bubblewrap).await
            }
        )*
        mod on_fake {
            use super::{scenarios, Driver};
            $(
                #[tokio::test]
                async fn $scenario() {
                    scenarios::$scenario(Driver::Fake).await
                }
            )*
        }
    };
}

on_both_drivers!(
    run_command_reports_exit_code_and_both_streams,
    run_command_times_out_and_caps_its_output,
    read_file_numbers_lines_and_honours_ranges,
    write_then_read_round_trips_content_that_looks_like_shell,
    edit_file_replaces_exactly_one_occurrence,
    list_dir_sorts_and_marks_directories,
    search_finds_text_and_regular_expressions,
    read_terminal_shows_a_started_terminal,
    paths_outside_the_workspace_are_refused,
    bad_arguments_are_answers_that_name_the_field,
);

mod scenarios {
    use super::*;

    pub(super) async fn run_command_reports_exit_code_and_both_streams(driver: Driver) {
        let machine = TestMachine::start(driver, "run-command").await;
        let content = machine
            .tool_ok("run_command", json!({"command": "pwd; echo to-stderr >&2"}))
            .await;
        assert_eq!(
            content,
            "exit code 0\n--- stdout ---\n/workspace\n--- stderr ---\nto-stderr\n"
        );

        let in_src = machine
            .tool_ok("run_command", json!({"command": "pwd", "cwd": "src"}))
            .await;
        assert!(in_src.contains("/workspace/src\n"), "{in_src}");

        let failing = machine.tool_failed("run_command", json!({"command": "exit 3"})).await;
        assert_eq!(failing, "exit code 3\n(no output)\n");

        let outside = machine
            .tool_failed("run_command", json!({"command": "pwd", "cwd": "../etc"}))
            .await;
        assert!(outside.contains("cwd \"../etc\" is outside /workspace"), "{outside}");
        let missing = machine
            .tool_failed("run_command", json!({"command": "pwd", "cwd": "nowhere"}))
            .await;
        assert!(missing.contains("cwd nowhere does not exist"), "{missing}");
        machine.destroy().await;
    }

    pub(super) async fn run_command_times_out_and_caps_its_output(driver: Driver) {
        let machine = TestMachine::start(driver, "run-command-limits").await;
        let started = Instant::now();
        let timed_out = machine
            .tool(
                "run_command",
                // Long enough for `echo` to have run on a loaded machine, far below the sleep.
                json!({"command": "echo before; sleep 30", "timeout_ms": 3000}),
            )
            .await;
        assert!(timed_out.failed);
        assert!(
            timed_out
                .content
                .starts_with("timed out: the command was killed after 3000 ms"),
            "{}",
            timed_out.content
        );
        assert!(timed_out.content.contains("before"), "{}", timed_out.content);
        assert!(started.elapsed() < CONDITION_DEADLINE, "the timeout was not enforced");

        let loud = machine
            .tool("run_command", json!({"command": "seq 1 100000; echo the-end"}))
            .await;
        assert!(!loud.failed, "{}", loud.content);
        assert!(loud.truncated);
        assert!(
            loud.content.len() <= machine.limits.max_output_bytes,
            "{}",
            loud.content.len()
        );
        assert!(loud.content.contains("[output cut: "), "{}", loud.content);
        assert!(loud.content.contains(" bytes omitted]"), "{}", loud.content);
        assert!(
            loud.content.contains("\n1\n2\n3\n"),
            "the head is kept: {}",
            loud.content
        );
        assert!(
            loud.content.trim_end().ends_with("the-end"),
            "the tail is kept: {}",
            loud.content
        );
        machine.destroy().await;
    }

    pub(super) async fn read_file_numbers_lines_and_honours_ranges(driver: Driver) {
        let machine = TestMachine::start(driver, "read-file").await;
        let whole = machine.tool_ok("read_file", json!({"path": "README.md"})).await;
        assert_eq!(whole, "     1\t# demo\n     2\tfirst line\n     3\tsecond line\n");

        let middle = machine
            .tool_ok(
                "read_file",
                json!({"path": "README.md", "start_line": 2, "end_line": 2}),
            )
            .await;
        assert_eq!(middle, "     2\tfirst line\n[lines 2-2 of 3]");
        let tail = machine
            .tool_ok("read_file", json!({"path": "/workspace/README.md", "start_line": 3}))
            .await;
        assert_eq!(tail, "     3\tsecond line\n[lines 3-3 of 3]");

        let past = machine
            .tool_failed("read_file", json!({"path": "README.md", "start_line": 9}))
            .await;
        assert_eq!(past, "README.md has 3 lines; start_line 9 is past the end");
        let backwards = machine
            .tool_failed(
                "read_file",
                json!({"path": "README.md", "start_line": 3, "end_line": 2}),
            )
            .await;
        assert!(backwards.contains("end_line 2 is before start_line 3"), "{backwards}");
        let missing = machine.tool_failed("read_file", json!({"path": "missing.txt"})).await;
        assert_eq!(missing, "missing.txt does not exist");
        let directory = machine.tool_failed("read_file", json!({"path": "src"})).await;
        assert!(directory.contains("src is a directory"), "{directory}");

        machine.shell("seq 1 5000 > long.txt").await;
        let long = machine.tool("read_file", json!({"path": "long.txt"})).await;
        assert!(!long.failed && long.truncated, "{long:?}");
        assert!(long.content.len() <= machine.limits.max_output_bytes);
        assert!(
            long.content.contains("of 5000; read on with start_line "),
            "{}",
            long.content
        );
        machine.destroy().await;
    }

    pub(super) async fn write_then_read_round_trips_content_that_looks_like_shell(driver: Driver) {
        let machine = TestMachine::start(driver, "write-file").await;
        let tricky = "it's \"quoted\" $(touch /workspace/injected) `touch /workspace/injected2` $HOME\n\
                  ${PATH} \\n back\\slash ' \" \n\ttab and üñíçødé\nno newline at end";
        let written = machine
            .tool_ok(
                "write_file",
                json!({"path": "deep/new dir/it's $(x).txt", "content": tricky}),
            )
            .await;
        assert_eq!(
            written,
            format!("wrote {} bytes to deep/new dir/it's $(x).txt", tricky.len())
        );
        let on_node = machine.checkout.join("deep/new dir/it's $(x).txt");
        // The overlay keeps the machine's writes out of the checkout; the machine sees them.
        assert!(!on_node.exists());
        let raw = machine.shell("cat \"deep/new dir/it's \\$(x).txt\"").await;
        assert_eq!(raw, tricky);
        let listing = machine.shell("ls -A").await;
        assert!(!listing.contains("injected"), "a value ran as shell code: {listing}");
        assert!(!listing.contains("flotilla-partial"), "{listing}");

        let read = machine
            .tool_ok("read_file", json!({"path": "deep/new dir/it's $(x).txt"}))
            .await;
        let unnumbered: Vec<&str> = read.lines().map(|line| line.split_once('\t').unwrap().1).collect();
        assert_eq!(unnumbered.join("\n"), tricky);

        let empty = machine
            .tool_ok("write_file", json!({"path": "empty.txt", "content": ""}))
            .await;
        assert_eq!(empty, "wrote 0 bytes to empty.txt");
        assert_eq!(
            machine.tool_ok("read_file", json!({"path": "empty.txt"})).await,
            "(empty.txt is empty)"
        );

        // More than one command's worth of content goes through in parts.
        let large: String = (0..200_000).map(|index| format!("{index}\n")).collect();
        machine
            .tool_ok("write_file", json!({"path": "large.txt", "content": large}))
            .await;
        let summary = machine.shell("wc -c < large.txt; tail -n 1 large.txt").await;
        assert_eq!(summary, format!("{}\n199999\n", large.len()));
        machine.destroy().await;
    }

    pub(super) async fn edit_file_replaces_exactly_one_occurrence(driver: Driver) {
        let machine = TestMachine::start(driver, "edit-file").await;
        let edited = machine
            .tool_ok(
                "edit_file",
                json!({"path": "src/main.rs", "old_string": "\"hello\"", "new_string": "\"$(hi) `there`\""}),
            )
            .await;
        assert_eq!(edited, "replaced 1 occurrence in src/main.rs at line 2");
        assert_eq!(
            machine.shell("cat src/main.rs").await,
            "fn main() {\n    println!(\"$(hi) `there`\");\n}\n"
        );

        let none = machine
            .tool_failed(
                "edit_file",
                json!({"path": "src/main.rs", "old_string": "goodbye", "new_string": "x"}),
            )
            .await;
        assert!(none.contains("old_string was not found in src/main.rs"), "{none}");
        let many = machine
            .tool_failed(
                "edit_file",
                json!({"path": "README.md", "old_string": "line", "new_string": "row"}),
            )
            .await;
        assert!(many.contains("old_string occurs 2 times in README.md"), "{many}");
        assert_eq!(
            machine.shell("cat README.md").await,
            "# demo\nfirst line\nsecond line\n"
        );
        let missing = machine
            .tool_failed(
                "edit_file",
                json!({"path": "nope.rs", "old_string": "a", "new_string": "b"}),
            )
            .await;
        assert_eq!(missing, "nope.rs does not exist");
        machine.destroy().await;
    }

    pub(super) async fn list_dir_sorts_and_marks_directories(driver: Driver) {
        let machine = TestMachine::start(driver, "list-dir").await;
        machine.shell("mkdir -p a-dir && touch b-file .hidden").await;
        let listing = machine.tool_ok("list_dir", json!({})).await;
        assert_eq!(listing, ".hidden\nREADME.md\na-dir/\nb-file\nsrc/\n");
        assert_eq!(machine.tool_ok("list_dir", json!({"path": "src"})).await, "main.rs\n");
        assert_eq!(
            machine.tool_ok("list_dir", json!({"path": "a-dir"})).await,
            "(a-dir is empty)"
        );
        let file = machine.tool_failed("list_dir", json!({"path": "README.md"})).await;
        assert!(file.contains("README.md is not a directory"), "{file}");

        machine.shell("mkdir many && cd many && seq 1 1500 | xargs touch").await;
        let many = machine.tool("list_dir", json!({"path": "many"})).await;
        assert!(many.truncated, "{}", many.content);
        assert!(many.content.len() <= machine.limits.max_output_bytes);
        machine.destroy().await;
    }

    pub(super) async fn search_finds_text_and_regular_expressions(driver: Driver) {
        let machine = TestMachine::start(driver, "search").await;
        machine
            .shell("mkdir -p .git && echo 'line in git' > .git/config && printf 'a.c\\nabc\\n' > dots.txt")
            .await;
        let text = machine.tool_ok("search", json!({"pattern": "line"})).await;
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort();
        assert_eq!(lines, ["README.md:2:first line", "README.md:3:second line"]);

        assert_eq!(
            machine.tool_ok("search", json!({"pattern": "a.c"})).await,
            "dots.txt:1:a.c\n",
            "a fixed string by default"
        );
        let regex = machine
            .tool_ok("search", json!({"pattern": "a.c", "regex": true}))
            .await;
        assert_eq!(regex, "dots.txt:1:a.c\ndots.txt:2:abc\n");
        let anchored = machine
            .tool_ok(
                "search",
                json!({"pattern": "^fn [a-z]+\\(", "regex": true, "path": "src"}),
            )
            .await;
        assert_eq!(anchored, "src/main.rs:1:fn main() {\n");
        let dash = machine.tool_ok("search", json!({"pattern": "-nothing-"})).await;
        assert_eq!(dash, "no matches for text \"-nothing-\"");
        let bad = machine
            .tool_failed("search", json!({"pattern": "(", "regex": true}))
            .await;
        assert!(bad.contains("searching for regular expression \"(\" failed"), "{bad}");
        machine.destroy().await;
    }

    pub(super) async fn read_terminal_shows_a_started_terminal(driver: Driver) {
        let machine = TestMachine::start(driver, "read-terminal").await;
        machine
            .driver
            .start_terminals(
                &machine.machine,
                &[Terminal::new("server", "echo listening-on-3000; sleep 1000")],
            )
            .await
            .expect("start terminals");
        let deadline = Instant::now() + CONDITION_DEADLINE;
        loop {
            let output = machine
                .tool("read_terminal", json!({"name": "server", "lines": 20}))
                .await;
            assert!(!output.failed, "{}", output.content);
            if output.content.contains("listening-on-3000") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {CONDITION_DEADLINE:?} waiting for the terminal's output: {}",
                output.content
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let unknown = machine.tool_failed("read_terminal", json!({"name": "missing"})).await;
        assert!(unknown.contains("could not read terminal \"missing\""), "{unknown}");
        machine.destroy().await;
    }

    pub(super) async fn paths_outside_the_workspace_are_refused(driver: Driver) {
        let machine = TestMachine::start(driver, "confinement").await;
        machine.shell("ln -s /etc etc-link && ln -s ../etc up-link").await;
        let escape = machine.tool_failed("read_file", json!({"path": "../x"})).await;
        assert!(escape.contains("path \"../x\" is outside /workspace"), "{escape}");
        let absolute = machine.tool_failed("read_file", json!({"path": "/etc/passwd"})).await;
        assert!(
            absolute.contains("path \"/etc/passwd\" is outside /workspace"),
            "{absolute}"
        );
        for link in ["etc-link/passwd", "up-link/passwd"] {
            let through_link = machine.tool_failed("read_file", json!({"path": link})).await;
            // A fake machine has no root filesystem of its own: a relative link out of its
            // workspace lands in the machine's directory on the host, still refused, but not
            // at /etc.
            let expected = match (driver, link) {
                (Driver::Fake, "up-link/passwd") => format!("path {link:?} is outside /workspace (it resolves to "),
                _ => format!("path {link:?} is outside /workspace (it resolves to /etc/passwd)"),
            };
            assert!(through_link.contains(&expected), "{through_link}");
            assert!(through_link.contains("symbolic link"), "{through_link}");
        }
        let write = machine
            .tool_failed("write_file", json!({"path": "etc-link/evil", "content": "x"}))
            .await;
        assert!(write.contains("outside /workspace"), "{write}");
        let edit = machine
            .tool_failed(
                "edit_file",
                json!({"path": "etc-link/hostname", "old_string": "a", "new_string": "b"}),
            )
            .await;
        assert!(edit.contains("outside /workspace"), "{edit}");
        let list = machine.tool_failed("list_dir", json!({"path": "etc-link"})).await;
        assert!(list.contains("outside /workspace"), "{list}");
        let search = machine
            .tool_failed("search", json!({"pattern": "root", "path": "etc-link"}))
            .await;
        assert!(search.contains("outside /workspace"), "{search}");
        let cwd = machine
            .tool_failed("run_command", json!({"command": "pwd", "cwd": "etc-link"}))
            .await;
        assert!(cwd.contains("outside /workspace"), "{cwd}");
        // An absolute path inside the workspace is fine.
        machine
            .tool_ok("read_file", json!({"path": "/workspace/src/../README.md"}))
            .await;
        assert!(!machine.shell("ls /etc").await.contains("evil"));
        machine.destroy().await;
    }

    pub(super) async fn bad_arguments_are_answers_that_name_the_field(driver: Driver) {
        let machine = TestMachine::start(driver, "bad-arguments").await;
        let wrong_type = machine.tool_failed("read_file", json!({"path": 7})).await;
        assert!(
            wrong_type.starts_with("invalid arguments for read_file: field `path`"),
            "{wrong_type}"
        );
        let missing = machine.tool_failed("write_file", json!({"path": "a"})).await;
        assert!(missing.contains("missing field `content`"), "{missing}");
        let negative = machine
            .tool_failed("run_command", json!({"command": "true", "timeout_ms": -1}))
            .await;
        assert!(negative.contains("field `timeout_ms`"), "{negative}");
        let malformed = run_tool(
            machine.driver.as_ref(),
            &machine.machine,
            "list_dir",
            "{\"path\":",
            &machine.limits,
        )
        .await;
        assert!(malformed.failed);
        assert!(
            malformed.content.starts_with("invalid arguments for list_dir:"),
            "{}",
            malformed.content
        );
        let unknown = machine.tool_failed("delete_everything", json!({})).await;
        assert!(unknown.contains("unknown tool \"delete_everything\""), "{unknown}");
        machine.destroy().await;
    }
}
