//! Machines for agents. Every agent works in a machine of its own: a process tree in fresh
//! user, mount, PID, IPC, UTS and network namespaces, with no capabilities, whose filesystem is
//! a stack of layers (base image → install layer → the machine's own upper layer) and whose
//! memory, processes, CPU share, disk, command time and output are bounded. This crate sits
//! between the actors and the host: an agent's actor asks a [`MachineDriver`] for a machine
//! built from the repository's environment.json ([`environment`]), reuses the install layer
//! from the [`install_layer`] cache, runs the agent's tools in it with [`MachineDriver::exec`], shows
//! its terminals (tmux) to the agent and, through a PTY, to a user taking over, and destroys it
//! when the agent is done. Model-provider calls never happen here: no key enters a machine.
//!
//! The driver of a node is [`bwrap::BwrapDriver`] (bubblewrap, overlayfs and cgroups v1 or v2).
//! Callers hold it as `Arc<dyn MachineDriver>` and its machines as [`MachineHandle`]s; behind the
//! `fake` feature, `fake::FakeDriver` makes machines of plain directories and host processes for
//! tests that cannot be root.

pub mod bwrap;
mod cgroup;
pub mod driver;
pub mod egress;
pub mod environment;
pub mod error;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod file_lock;
mod image;
pub mod install_layer;
pub mod layer_privilege;
pub mod limits;
pub mod metrics;
mod mount_namespace;
mod mounts;
mod output_capture;
pub mod pty;
pub mod seccomp;
pub mod uid_range;
mod vfork;
pub mod workspace_file;

#[cfg(test)]
mod containment_tests;
#[cfg(test)]
mod kernel_surface_tests;
#[cfg(test)]
mod machine_tests;

pub use bwrap::{BwrapConfig, BwrapDriver, BwrapMachine, DiskBacking};
pub use driver::{
    boot, BaseImage, BaseLayer, BootReport, ExecOutput, ExecRequest, KilledReason, Layer, MachineDriver, MachineHandle,
    MachineSpec, WorkspaceMode, EGRESS_SOCKET_PATH, TERMINAL_SESSION,
};
pub use environment::{EnvironmentConfig, Plan, Terminal};
pub use error::{EnvironmentError, Result, SandboxError};
pub use install_layer::{InstallLayer, InstallLayerCache, InstallRequest};
pub use limits::{display_bytes, parse_bytes, MachineLimits};
pub use mount_namespace::enter_private_mount_namespace;
pub use pty::{PtySession, PtySize};
pub use workspace_file::{copy_workspace_file, read_workspace_file, WorkspaceFileError};
