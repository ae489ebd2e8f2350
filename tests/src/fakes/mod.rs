//! Local stand-ins for the services an agent talks to outside the cluster, for the
//! integration tests: a model server speaking the OpenAI and Anthropic streaming APIs
//! ([`model`]), a git forge serving repositories over authenticated smart HTTP
//! ([`git_http`]), the pull request APIs of GitHub, GitLab, Bitbucket and Gitea
//! ([`forges`]), and that of Skiff, a made-up forge whose provider no node knows
//! ([`SkiffForge`]). All listen on `127.0.0.1` on a port the kernel picks, live in the test
//! process, and stop when dropped. They speak the real wire formats, so the node's own
//! clients (the model providers, `git`, the provider plugins) are exercised unchanged.

pub mod forges;
pub mod git_http;
pub mod model;
mod skiff;

pub use forges::{FakeForge, FakePullRequest, ForgeKind, RecordedForgeRequest};
pub use git_http::{basic_authorization, create_bare_repository, git_extra_header_env, GitHttpServer};
pub use model::{FakeModelServer, FakeTurn, Fault, Gate, RecordedRequest, WireProtocol};
pub use skiff::{SkiffForge, SkiffPullRequest};
