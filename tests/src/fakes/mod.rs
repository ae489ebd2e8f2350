//! Local stand-ins for the services an agent talks to outside the cluster, for the
//! integration tests: a model server speaking the OpenAI and Anthropic streaming APIs
//! ([`model`]) and a git forge serving repositories over authenticated smart HTTP
//! ([`git_http`]). Both listen on `127.0.0.1` on a port the kernel picks, live in the test
//! process, and stop when dropped. They speak the real wire formats, so the node's own
//! clients (the model providers, `git`) are exercised unchanged.

pub mod git_http;
pub mod model;

pub use git_http::{basic_authorization, create_bare_repository, git_extra_header_env, GitHttpServer};
pub use model::{FakeModelServer, FakeTurn, Fault, Gate, RecordedRequest, WireProtocol};
