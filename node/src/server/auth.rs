//! Bearer-token authentication for every public RPC (the internal service is for nodes, which
//! prove themselves with their certificates: see `transport`). Tokens are stored as SHA-256 digests in the replicated state; the
//! authenticated principal travels in the request's extensions for the services to use (roles
//! and teams plug in here). A token this node does not hold is looked for again after a read
//! barrier, so a token is accepted through any node as soon as the cluster acknowledged it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use flotilla_raft::{Replica, Role, TokenRecord};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::{Request, Status};

pub fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random API token.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("flt_{}", hex::encode(bytes))
}

/// Who is calling, attached to each authenticated request.
#[derive(Clone, Debug)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    pub team: String,
}

/// Longest an unknown token waits for the cluster's confirmation (a read barrier) before the
/// call is answered: a token the cluster does not know costs at most this.
pub const TOKEN_LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// Unknown tokens looked up at once on one node; further ones wait for a turn within
/// [`TOKEN_LOOKUP_TIMEOUT`]. Each lookup asks the leader for a read index.
pub const MAX_TOKEN_LOOKUPS: usize = 64;

/// Finds the principal of a bearer token: in the local replica first, then, for a token it
/// does not hold, again after a read barrier. A token created through another node moments
/// ago may not have reached this one; the barrier brings this node up to every write the
/// cluster acknowledged, so only a token the cluster does not know is refused.
#[derive(Clone)]
pub struct TokenCheck {
    replica: Replica,
    lookups: Arc<Semaphore>,
}

impl TokenCheck {
    pub fn new(replica: Replica) -> TokenCheck {
        TokenCheck {
            replica,
            lookups: Arc::new(Semaphore::new(MAX_TOKEN_LOOKUPS)),
        }
    }

    fn local(&self, digest: &str) -> Option<Principal> {
        self.replica.reader().read(|state| {
            state.tokens.get(digest).map(|record: &TokenRecord| Principal {
                name: record.name.clone(),
                role: record.role,
                team: record.team.clone(),
            })
        })
    }

    /// The caller named by `headers`, or the status to answer with.
    pub async fn principal(&self, headers: &http::HeaderMap) -> Result<Principal, Status> {
        let digest = token_digest(bearer_token(headers)?);
        if let Some(principal) = self.local(&digest) {
            return Ok(principal);
        }
        let confirmed = tokio::time::timeout(TOKEN_LOOKUP_TIMEOUT, async {
            let _turn = self
                .lookups
                .acquire()
                .await
                .map_err(|_| "the token lookups are closed".to_string())?;
            self.replica
                .read_barrier_within(TOKEN_LOOKUP_TIMEOUT)
                .await
                .map_err(|error| error.to_string())
        })
        .await;
        match confirmed {
            Ok(Ok(_)) => self
                .local(&digest)
                .ok_or_else(|| Status::unauthenticated("unknown or revoked token")),
            Ok(Err(reason)) => Err(Status::unavailable(format!(
                "the token is not known on this node and the cluster could not confirm it: {reason}"
            ))),
            Err(_) => Err(Status::unavailable(format!(
                "the token is not known on this node and the cluster did not confirm it within {} ms",
                TOKEN_LOOKUP_TIMEOUT.as_millis()
            ))),
        }
    }
}

/// The token of an `authorization: Bearer <token>` header.
fn bearer_token(headers: &http::HeaderMap) -> Result<&str, Status> {
    let header = headers
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing bearer token: send `authorization: Bearer <token>`"))?;
    let header = header
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization header is not valid text"))?;
    Ok(header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or_else(|| Status::unauthenticated("authorization header must be `Bearer <token>`"))?
        .trim())
}

/// A public gRPC service behind the bearer-token check. An interceptor cannot wait, and an
/// unknown token waits for a read barrier; so the check wraps the service instead and puts the
/// [`Principal`] in the request's extensions, where [`principal`] finds it.
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    tokens: TokenCheck,
}

impl<S> Authenticated<S> {
    pub fn new(inner: S, tokens: TokenCheck) -> Authenticated<S> {
        Authenticated { inner, tokens }
    }
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Authenticated<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, context: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was made ready is the one that serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let tokens = self.tokens.clone();
        Box::pin(async move {
            match tokens.principal(request.headers()).await {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

pub fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("request was not authenticated"))
}

pub fn require_admin<T>(request: &Request<T>) -> Result<Principal, Status> {
    let principal = principal(request)?;
    if principal.role != Role::Admin {
        return Err(Status::permission_denied(format!(
            "token {:?} is not an admin token",
            principal.name
        )));
    }
    Ok(principal)
}
