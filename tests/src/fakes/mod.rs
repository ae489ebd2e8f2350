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

/// A listener on a free loopback port for the fake called `what`, and its address.
pub(crate) async fn bind_loopback(what: &str) -> (tokio::net::TcpListener, std::net::SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|error| panic!("could not bind the {what} to a loopback port: {error}"));
    let address = listener
        .local_addr()
        .unwrap_or_else(|error| panic!("the {what}'s address: {error}"));
    (listener, address)
}

/// Serves `app` on `listener` until the returned task is aborted.
pub(crate) fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    what: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            eprintln!("the {what} stopped: {error}");
        }
    })
}
