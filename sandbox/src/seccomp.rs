//! The system-call filter of every machine process: the deny list, the reason for each entry,
//! and the compiled classic-BPF programs.
//!
//! Every process of a machine runs under two programs. The first answers EPERM ("Operation not
//! permitted") to the calls of [`deny_list`]; the second answers ENOSYS to `clone3`, whose flags
//! sit behind a pointer a filter cannot read, so that libc falls back to `clone`, whose flags the
//! first program checks (container runtimes do the same). Every other call is allowed. A refused
//! call is an error inside the machine, never a killed process and never anything the node sees.
//!
//! The machine's init gets the programs from bubblewrap (`--add-seccomp-fd`, read from a memfd
//! per program, see [`MachineFilter::bubblewrap_files`]); every process that enters a running
//! machine installs them between its birth and its exec
//! ([`MachineFilter::install_in_this_process`]), last, once it has entered the machine and
//! dropped its privileges: commands and terminal attaches alike.
//!
//! What is allowed on purpose:
//! - `chroot`, `setuid`, `setgroups` and the like: without capabilities, which no machine
//!   process holds in any namespace (bubblewrap and the entry drop them, `no_new_privs` keeps
//!   them away, and the filter refuses the nested user namespace that would grant a fresh set),
//!   they fail by themselves, and programs of an agent's work call them to drop privileges.
//! - `ptrace`, `process_vm_readv`/`writev`, `kcmp`: a machine's PID namespace shows only its own
//!   processes, the kernel's ptrace checks (same user, no capabilities the tracer lacks, Yama)
//!   still apply, and debuggers and `strace` are part of an agent's work. Since Linux 4.8 a
//!   tracer cannot use ptrace to skip the filter (Docker's default profile allows it too).
//! - `personality` except the flags that make memory executable or map page zero.
//!
//! The filter checks the architecture first: a 32-bit (`int 0x80`) system call on x86_64 kills
//! the calling process, because the 32-bit table has other numbers and is not listed. On
//! x86_64 each entry is also listed with the x32 bit, so a kernel built with the x32 ABI cannot
//! be used to go around the list.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// The architecture the node runs on, which is the one its machines' processes use.
#[cfg(target_arch = "x86_64")]
const TARGET_ARCH: Option<TargetArch> = Some(TargetArch::x86_64);
#[cfg(target_arch = "aarch64")]
const TARGET_ARCH: Option<TargetArch> = Some(TargetArch::aarch64);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const TARGET_ARCH: Option<TargetArch> = None;

/// x86_64 system calls made through the x32 ABI carry this bit in their number.
const X32_SYSCALL_BIT: i64 = 0x4000_0000;
/// `open_tree_attr` (Linux 6.15); numbers from 424 on are the same on every architecture, and
/// the libc crate does not name this one yet.
const SYS_OPEN_TREE_ATTR: i64 = 467;
/// `personality` flags (linux/personality.h): readable memory becomes executable; page zero is
/// mapped, which turns kernel NULL dereferences into exploits.
const READ_IMPLIES_EXEC: u64 = 0x040_0000;
const MMAP_PAGE_ZERO: u64 = 0x010_0000;
/// `personality(0xffffffff)` only asks for the current persona.
const PERSONALITY_QUERY: u64 = 0xffff_ffff;

#[derive(Debug, Clone, thiserror::Error)]
pub enum SeccompError {
    #[error("the machines' system-call filter does not compile: {detail}")]
    Compile { detail: String },

    #[error("machines need a system-call filter, and none is written for the {arch} architecture")]
    UnsupportedArchitecture { arch: &'static str },

    #[error("could not hand the system-call filter to bubblewrap: could not {action} a memfd: {detail}")]
    Handover { action: &'static str, detail: String },
}

/// When a listed call is refused.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// Whatever its arguments.
    Always,
    /// When its first argument (flags, an `int` or the low word of a `long`) has this bit set.
    FlagSet(u64),
    /// When it asks for one of these `personality` flags (and is not the query).
    PersonalityFlags(&'static [u64]),
}

/// One refused system call; the list in [`deny_list`] says why, group by group.
#[derive(Debug, Clone, Copy)]
struct Denied {
    name: &'static str,
    number: i64,
    refusal: Refusal,
}

const fn always(name: &'static str, number: i64) -> Denied {
    Denied {
        name,
        number,
        refusal: Refusal::Always,
    }
}

/// The calls refused with EPERM, in the spirit of Docker's default profile.
fn deny_list() -> Vec<Denied> {
    let new_user_namespace = Refusal::FlagSet(libc::CLONE_NEWUSER as u64);
    let mut list = vec![
        // Kernel keyrings are not namespaced: a machine could read or fill keys of the host's
        // users.
        always("keyctl", libc::SYS_keyctl),
        always("add_key", libc::SYS_add_key),
        always("request_key", libc::SYS_request_key),
        // Loading programs into the kernel and reading its performance counters: a large,
        // often-exploited surface that also observes other processes of the host.
        always("bpf", libc::SYS_bpf),
        always("perf_event_open", libc::SYS_perf_event_open),
        always("userfaultfd", libc::SYS_userfaultfd),
        // io_uring bypasses most of this filter (its operations are not system calls) and has a
        // long history of kernel bugs; programs fall back to ordinary calls when it fails.
        always("io_uring_setup", libc::SYS_io_uring_setup),
        always("io_uring_enter", libc::SYS_io_uring_enter),
        always("io_uring_register", libc::SYS_io_uring_register),
        // Replacing or changing the running kernel.
        always("kexec_load", libc::SYS_kexec_load),
        always("init_module", libc::SYS_init_module),
        always("finit_module", libc::SYS_finit_module),
        always("delete_module", libc::SYS_delete_module),
        always("reboot", libc::SYS_reboot),
        // File handles open any file of a filesystem by number, past the machine's root.
        always("open_by_handle_at", libc::SYS_open_by_handle_at),
        always("name_to_handle_at", libc::SYS_name_to_handle_at),
        // The machine's mounts are made by the node before it starts; nothing inside mounts,
        // unmounts or moves its root (old and new mount API alike).
        always("mount", libc::SYS_mount),
        always("umount2", libc::SYS_umount2),
        always("pivot_root", libc::SYS_pivot_root),
        always("open_tree", libc::SYS_open_tree),
        always("open_tree_attr", SYS_OPEN_TREE_ATTR),
        always("move_mount", libc::SYS_move_mount),
        always("fsopen", libc::SYS_fsopen),
        always("fsconfig", libc::SYS_fsconfig),
        always("fsmount", libc::SYS_fsmount),
        always("fspick", libc::SYS_fspick),
        always("mount_setattr", libc::SYS_mount_setattr),
        // A nested user namespace would give its creator every capability inside it, and with
        // them the kernel code behind namespaced privileges (mounting filesystems, netfilter,
        // ...). Other new namespaces need a capability the machine does not hold.
        Denied {
            name: "unshare",
            number: libc::SYS_unshare,
            refusal: new_user_namespace,
        },
        Denied {
            name: "clone",
            number: libc::SYS_clone,
            refusal: new_user_namespace,
        },
        // Joining another namespace takes a capability over it, which no machine process
        // holds; refused outright, as in Docker's default profile, so that a kernel bug in
        // that check is out of reach too.
        always("setns", libc::SYS_setns),
        // Host-wide state: swap, process accounting, quotas, the kernel log, the clock.
        always("swapon", libc::SYS_swapon),
        always("swapoff", libc::SYS_swapoff),
        always("acct", libc::SYS_acct),
        always("quotactl", libc::SYS_quotactl),
        always("quotactl_fd", libc::SYS_quotactl_fd),
        always("syslog", libc::SYS_syslog),
        always("settimeofday", libc::SYS_settimeofday),
        always("clock_settime", libc::SYS_clock_settime),
        always("clock_adjtime", libc::SYS_clock_adjtime),
        // Obsolete, and only ever useful to old exploits.
        always("lookup_dcookie", libc::SYS_lookup_dcookie),
        always("kexec_file_load", libc::SYS_kexec_file_load),
        // Executable data and a mapped page zero weaken the defences against memory bugs;
        // the other persona flags (e.g. no address randomisation, which debuggers ask for) stay.
        Denied {
            name: "personality",
            number: libc::SYS_personality,
            refusal: Refusal::PersonalityFlags(&[READ_IMPLIES_EXEC, MMAP_PAGE_ZERO]),
        },
    ];
    #[cfg(target_arch = "x86_64")]
    list.extend([
        // Direct access to I/O ports, and a.out libraries.
        always("iopl", libc::SYS_iopl),
        always("ioperm", libc::SYS_ioperm),
        always("uselib", libc::SYS_uselib),
    ]);
    list
}

impl Refusal {
    /// The rules under which a call is refused; none means always.
    fn rules(self) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        let first_argument = |operator, value| SeccompCondition::new(0, SeccompCmpArgLen::Dword, operator, value);
        match self {
            Refusal::Always => Ok(Vec::new()),
            Refusal::FlagSet(flag) => Ok(vec![SeccompRule::new(vec![first_argument(
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )?])?]),
            Refusal::PersonalityFlags(flags) => flags
                .iter()
                .map(|&flag| {
                    SeccompRule::new(vec![
                        first_argument(SeccompCmpOp::MaskedEq(flag), flag)?,
                        first_argument(SeccompCmpOp::Ne, PERSONALITY_QUERY)?,
                    ])
                })
                .collect(),
        }
    }
}

/// The numbers a call is reached by on `arch`: on x86_64 also through the x32 ABI.
fn numbers(number: i64, arch: TargetArch) -> Vec<i64> {
    match arch {
        TargetArch::x86_64 => vec![number, number | X32_SYSCALL_BIT],
        _ => vec![number],
    }
}

/// A program that answers `errno` to the listed calls (under their rules) and allows the rest.
fn compile(entries: &[Denied], errno: i32, arch: TargetArch) -> Result<BpfProgram, SeccompError> {
    let failed = |error: &dyn std::fmt::Display| SeccompError::Compile {
        detail: error.to_string(),
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for entry in entries {
        let chain = entry.refusal.rules().map_err(|error| failed(&error))?;
        for number in numbers(entry.number, arch) {
            if rules.insert(number, chain.clone()).is_some() {
                return Err(SeccompError::Compile {
                    detail: format!("{} (number {number}) is listed twice", entry.name),
                });
            }
        }
    }
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno as u32), arch)
        .map_err(|error| failed(&error))?;
    BpfProgram::try_from(filter).map_err(|error| failed(&error))
}

/// The compiled programs, made once per node: the deny list (EPERM), then `clone3` (ENOSYS).
pub(crate) struct MachineFilter {
    programs: [BpfProgram; 2],
}

/// The node's machine filter, compiled on first use.
pub(crate) fn machine_filter() -> Result<&'static MachineFilter, SeccompError> {
    static FILTER: OnceLock<Result<MachineFilter, SeccompError>> = OnceLock::new();
    FILTER
        .get_or_init(MachineFilter::compile)
        .as_ref()
        .map_err(Clone::clone)
}

impl MachineFilter {
    fn compile() -> Result<Self, SeccompError> {
        let arch = TARGET_ARCH.ok_or(SeccompError::UnsupportedArchitecture {
            arch: std::env::consts::ARCH,
        })?;
        let denied = compile(&deny_list(), libc::EPERM, arch)?;
        let clone3 = compile(&[always("clone3", libc::SYS_clone3)], libc::ENOSYS, arch)?;
        Ok(MachineFilter {
            programs: [denied, clone3],
        })
    }

    /// Each program as the `sock_filter` array bubblewrap reads from a descriptor.
    fn program_bytes(&self) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.programs.iter().map(|program| {
            program
                .iter()
                .flat_map(|instruction| {
                    let mut bytes = [0u8; 8];
                    bytes[..2].copy_from_slice(&instruction.code.to_ne_bytes());
                    bytes[2] = instruction.jt;
                    bytes[3] = instruction.jf;
                    bytes[4..].copy_from_slice(&instruction.k.to_ne_bytes());
                    bytes
                })
                .collect()
        })
    }

    /// One memfd per program, written and rewound, for bubblewrap's `--add-seccomp-fd`. They are
    /// close-on-exec: [`inherit_in_child`] clears that in the one child that needs them, so
    /// processes the node starts at the same moment do not inherit them. (A memfd rather than
    /// a pipe: a pipe's buffer can shrink to one page when the node holds many pipes, and then
    /// writing a program before bubblewrap runs would block.)
    // Unsafe: memfd_create has no wrapper in std.
    #[allow(unsafe_code)]
    pub(crate) fn bubblewrap_files(&self) -> Result<Vec<OwnedFd>, SeccompError> {
        let handover = |action: &'static str| {
            move |error: io::Error| SeccompError::Handover {
                action,
                detail: error.to_string(),
            }
        };
        self.program_bytes()
            .map(|bytes| {
                // SAFETY: the name is a NUL-terminated literal; the result is checked below.
                let raw = unsafe { libc::memfd_create(c"flotilla-seccomp".as_ptr(), libc::MFD_CLOEXEC) };
                if raw < 0 {
                    return Err(handover("create")(io::Error::last_os_error()));
                }
                // SAFETY: memfd_create returned a new descriptor that nothing else owns.
                let mut file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
                file.write_all(&bytes).map_err(handover("write"))?;
                file.rewind().map_err(handover("rewind"))?;
                Ok(OwnedFd::from(file))
            })
            .collect()
    }

    /// Installs both programs on the calling process. Meant for `pre_exec`, between fork and
    /// exec: it makes only the `prctl(PR_SET_NO_NEW_PRIVS)` and `seccomp` system calls, on
    /// programs compiled before the fork, and allocates nothing, so it is async-signal-safe.
    pub(crate) fn install_in_this_process(&self) -> io::Result<()> {
        for program in &self.programs {
            seccompiler::apply_filter(program).map_err(|error| match error {
                seccompiler::Error::Prctl(error) | seccompiler::Error::Seccomp(error) => error,
                _ => io::Error::from_raw_os_error(libc::EINVAL),
            })?;
        }
        Ok(())
    }
}

/// Clears close-on-exec on `files` in a child between fork and exec, so that exactly that
/// child inherits them. Async-signal-safe (only `fcntl`).
// Unsafe: fcntl has no wrapper in std.
#[allow(unsafe_code)]
pub(crate) fn inherit_in_child(files: &[OwnedFd]) -> io::Result<()> {
    for file in files {
        // SAFETY: the descriptor is open (the caller owns it); F_SETFD only changes its flags.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_for_the_node_and_lists_each_call_once() {
        let filter = machine_filter().expect("the machine filter compiles");
        for program in &filter.programs {
            assert!(!program.is_empty());
            // The kernel refuses programs longer than BPF_MAXINSNS (4096).
            assert!(program.len() < 4096, "{} instructions", program.len());
        }
        let list = deny_list();
        let mut names: Vec<&str> = list.iter().map(|entry| entry.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), list.len(), "a call is listed twice");
        for expected in [
            "keyctl",
            "bpf",
            "mount",
            "unshare",
            "clone",
            "kexec_load",
            "open_by_handle_at",
        ] {
            assert!(names.contains(&expected), "{expected} is not on the deny list");
        }
        assert!(names.contains(&"setns"), "setns is not on the deny list");
        assert!(!names.contains(&"ptrace"), "ptrace inside a machine stays allowed");
    }

    #[test]
    fn bubblewrap_gets_whole_instructions_from_the_start() {
        use std::io::Read;
        let filter = machine_filter().expect("the machine filter compiles");
        let files = filter.bubblewrap_files().expect("memfds");
        assert_eq!(files.len(), 2);
        for (file, program) in files.into_iter().zip(&filter.programs) {
            let mut bytes = Vec::new();
            File::from(file).read_to_end(&mut bytes).expect("read the memfd");
            assert_eq!(bytes.len(), program.len() * 8);
            assert_eq!(u16::from_ne_bytes([bytes[0], bytes[1]]), program[0].code);
        }
    }
}
