//! Unit tests of the bubblewrap driver's pure parts (no machine; see `machine_tests` for those).

use std::path::Path;

use crate::environment::Terminal;

use super::create::{create_dirs_inside, lookup_user, read_inside, sanitize_name, MAX_NAME_CHARS};
use super::terminals::{terminal_session_argv, terminal_tail};

#[test]
fn names_are_sanitized() {
    assert_eq!(sanitize_name("Install: my/Repo!"), "install--my-repo");
    assert_eq!(sanitize_name("!!!"), "machine");
    assert_eq!(sanitize_name(&"x".repeat(100)).len(), MAX_NAME_CHARS);
}

#[test]
fn users_are_found_in_passwd() {
    let passwd = "root:x:0:0:root:/root:/bin/bash\nagent:x:1000:1001::/home/agent:/bin/sh\n";
    assert_eq!(
        lookup_user(passwd, "agent"),
        Some((1000, 1001, "/home/agent".to_string()))
    );
    assert_eq!(lookup_user(passwd, "nobody"), None);
}

#[test]
fn terminal_tail_skips_blank_rows_before_a_dead_pane() {
    let captured = "1\n2\ncounted\n\n\n\nPane is dead (status 0)\n\n";
    assert_eq!(terminal_tail(captured, 2), "counted\nPane is dead (status 0)");
    assert_eq!(terminal_tail("a\nb   \n\n", 5), "a\nb");
    assert_eq!(terminal_tail("", 5), "");
}

#[test]
fn terminal_session_argv_addresses_windows_by_index() {
    let mut shell = Terminal::new("shell", "exec bash -l");
    shell.login = false;
    let terminals = [
        Terminal::new("Run Next.js", "npm run dev"),
        shell,
        Terminal::new("watch", "it's; echo done;"),
    ];
    let argv = terminal_session_argv(&terminals);
    let text = argv.join(" ");
    assert!(
        text.starts_with("tmux -f /dev/null start-server ; set-option -g exit-empty off ;"),
        "{text}"
    );
    assert!(
        text.contains("new-session -d -s flotilla -x 200 -y 50 -n Run Next.js -c /workspace"),
        "{text}"
    );
    assert!(text.contains("new-window -d -t flotilla:2 -n watch"), "{text}");
    // Each window's command is executed by tmux directly: a login shell for the environment's
    // terminals, a plain one around a command that starts its own login shell.
    assert!(
        text.contains("-n shell -c /workspace /bin/sh -c exec bash -l\n ;"),
        "{text}"
    );
    assert_eq!(argv[argv.len() - 3..], ["/bin/sh", "-lc", "it's; echo done;\n"]);
    // Only the separators end in `;`: tmux would end a command at any other such argument.
    let separators = argv.iter().filter(|argument| argument.as_str() == ";").count();
    let ending_in_semicolon = argv.iter().filter(|argument| argument.ends_with(';')).count();
    assert_eq!(separators, 6, "{argv:?}");
    assert_eq!(ending_in_semicolon, separators, "{argv:?}");
}

#[test]
fn paths_inside_a_layer_do_not_follow_symlinks_out() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::write(outside.path().join("secret"), "x").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("etc/passwd")).unwrap();
    assert_eq!(read_inside(root.path(), Path::new("etc/passwd")), None);
    assert_eq!(read_inside(root.path(), Path::new("../secret")), None);

    std::os::unix::fs::symlink(outside.path(), root.path().join("home")).unwrap();
    create_dirs_inside(root.path(), Path::new("home/agent"), None).unwrap();
    assert!(!outside.path().join("agent").exists());
    create_dirs_inside(root.path(), Path::new("../escaped"), None).unwrap();
    assert!(!root.path().parent().unwrap().join("escaped").exists());
    create_dirs_inside(root.path(), Path::new("srv/agent"), None).unwrap();
    assert!(root.path().join("srv/agent").is_dir());
}
