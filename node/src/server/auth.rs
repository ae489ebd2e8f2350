//! Bearer-key authentication and authorization for every public RPC (the internal service is for
//! nodes, which prove themselves with their certificates: see `transport`). Keys are stored as
//! SHA-256 digests in the replicated state; the authenticated [`Principal`] travels in the
//! request's extensions for the services to use. A key this node does not hold is looked for
//! again after a read barrier, so a key is accepted through any node as soon as the cluster
//! acknowledged it. A key's expiry is judged here, at call time, against this node's clock (see
//! `docs/architecture.md`, "Teams, users and keys").

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use flotilla_raft::{Replica, TokenRecord};
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

use super::audit::{mutates, response_code, AuditNote, AuditRecorder};
pub use super::authz::Principal;
use super::authz::{authorize, owning_team};

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
    audit: Option<AuditRecorder>,
}

impl TokenCheck {
    pub fn new(replica: Replica) -> TokenCheck {
        TokenCheck {
            replica,
            lookups: Arc::new(Semaphore::new(MAX_TOKEN_LOOKUPS)),
            audit: None,
        }
    }

    /// Records the mutating calls the check lets through (and those it refuses to a known key)
    /// with `recorder`.
    pub fn with_audit(mut self, recorder: AuditRecorder) -> TokenCheck {
        self.audit = Some(recorder);
        self
    }

    /// Who a key this node holds belongs to, expired or not: for the audit entry of a refusal.
    fn holder(&self, headers: &http::HeaderMap) -> Option<Principal> {
        let digest = token_digest(bearer_token(headers).ok()?);
        let mut record = self.replica.reader().read(|state| state.tokens.get(&digest).cloned())?;
        record.expires_at_ms = None;
        principal_of(&record, 0).ok()
    }

    /// The key's principal from this node's replica: `None` when this node does not hold it, an
    /// UNAUTHENTICATED status when it holds it expired.
    fn local(&self, digest: &str) -> Option<Result<Principal, Status>> {
        let record = self.replica.reader().read(|state| state.tokens.get(digest).cloned())?;
        Some(principal_of(&record, now_ms()))
    }

    /// The caller named by `headers`, or the status to answer with.
    pub async fn principal(&self, headers: &http::HeaderMap) -> Result<Principal, Status> {
        let digest = token_digest(bearer_token(headers)?);
        if let Some(principal) = self.local(&digest) {
            return principal;
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
                .unwrap_or_else(|| Err(Status::unauthenticated("unknown or revoked key"))),
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

/// The principal of a stored key at `now_ms`, or UNAUTHENTICATED for an expired one. Keys
/// written before users existed carry the user in `name`, and no key id: it is derived.
pub fn principal_of(record: &TokenRecord, now_ms: u64) -> Result<Principal, Status> {
    let key_id = if record.key_id.is_empty() {
        flotilla_raft::key_id_of(&record.sha256_hex)
    } else {
        record.key_id.clone()
    };
    if record.expired_at(now_ms) {
        return Err(Status::unauthenticated(format!(
            "key {key_id} expired at {} ms since the epoch",
            record.expires_at_ms.unwrap_or_default()
        )));
    }
    Ok(Principal {
        key_id,
        team: owning_team(&record.team).to_string(),
        user: record.name.clone(),
        role: record.role,
        expires_at_ms: record.expires_at_ms,
    })
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

/// A public gRPC service behind the bearer-key check and the method table of
/// [`super::authz`]. An interceptor cannot wait, and an unknown key waits for a read barrier; so
/// the check wraps the service instead and puts the [`Principal`] in the request's extensions,
/// where [`principal`] finds it.
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
            let path = request.uri().path().to_string();
            let audit = tokens.audit.clone().filter(|_| mutates(&path));
            let principal = match tokens.principal(request.headers()).await {
                Ok(principal) => principal,
                Err(status) => {
                    // A refused key this node holds (expired) is recorded; an unknown one is
                    // not: it names nobody, and anyone could fill the log with them.
                    if let (Some(audit), Some(holder)) = (&audit, tokens.holder(request.headers())) {
                        audit
                            .record(&holder, &path, &AuditNote::default(), status.code() as i32)
                            .await;
                    }
                    return Ok(status.into_http());
                }
            };
            if let Err(status) = authorize(&principal, &path) {
                if let Some(audit) = &audit {
                    audit
                        .record(&principal, &path, &AuditNote::default(), status.code() as i32)
                        .await;
                }
                return Ok(status.into_http());
            }
            let note = AuditNote::default();
            request.extensions_mut().insert(note.clone());
            request.extensions_mut().insert(principal.clone());
            let response = inner.call(request).await?;
            if let Some(audit) = &audit {
                audit.record(&principal, &path, &note, response_code(&response)).await;
            }
            Ok(response)
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
