//! Bearer-token authentication for every public RPC, and the cluster-secret check for the
//! internal service. Tokens are stored as SHA-256 digests in the replicated state; the
//! authenticated principal travels in the request's extensions for the services to use (roles
//! and teams plug in here).

use flotilla_raft::network::CLUSTER_PROOF_HEADER;
use flotilla_raft::store::StateReader;
use flotilla_raft::{Role, TokenRecord};
use sha2::{Digest, Sha256};
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

#[derive(Clone)]
pub struct BearerAuth {
    pub state: StateReader,
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing bearer token: send `authorization: Bearer <token>`"))?;
        let header = header
            .to_str()
            .map_err(|_| Status::unauthenticated("authorization header is not valid text"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization header must be `Bearer <token>`"))?
            .trim();
        let digest = token_digest(token);
        let record: Option<TokenRecord> = self.state.read(|state| state.tokens.get(&digest).cloned());
        let record = record.ok_or_else(|| Status::unauthenticated("unknown or revoked token"))?;
        request.extensions_mut().insert(Principal {
            name: record.name,
            role: record.role,
            team: record.team,
        });
        Ok(request)
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

/// Checks that an internal call comes from a node that knows the cluster secret.
#[derive(Clone)]
pub struct ClusterAuth {
    pub proof: String,
}

impl tonic::service::Interceptor for ClusterAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get(CLUSTER_PROOF_HEADER)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        if !constant_time_eq(presented.as_bytes(), self.proof.as_bytes()) {
            return Err(Status::unauthenticated(
                "cluster secret does not match: this node was started with a different FLOTILLA_CLUSTER_SECRET",
            ));
        }
        Ok(request)
    }
}

fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    left.len() == right.len() && left.iter().zip(right).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}
