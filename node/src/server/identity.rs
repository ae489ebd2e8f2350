//! Who a node is on the wire, found or made at start: the TLS files its data dir keeps (renewed
//! when they near their end), a new cluster CA for the first node, or a certificate from any
//! member for a join token. Also the first node's hand-over of the CA key to the cluster: once
//! the key is recorded sealed under the key-encryption key, the plaintext `ca.key` goes.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _};
use flotilla_raft::tls::NodeTls;
use flotilla_raft::{Command, NodeId, Replica};

use super::pki::{self, ClusterCa};
use super::{enroll, read_trimmed, stored_id, write_private_file};
use crate::config::NodeConfig;

/// Who this node is on the wire: its id and its certificate.
pub(super) struct NodeIdentity {
    pub node_id: NodeId,
    pub tls: NodeTls,
}

/// Finds or makes the node's identity: the files a data dir keeps (renewed at start when they
/// near their end); else a new cluster CA for the first node; else a certificate from the
/// member at `--join`, for a join token.
pub(super) async fn node_identity(config: &NodeConfig) -> anyhow::Result<NodeIdentity> {
    let stored = stored_id(config)?;
    let host = config.advertise.ip().to_string();
    let data_dir = config.data_dir.clone();
    let (ca_file, kept) = {
        let data_dir = data_dir.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            // `ca.key` exists only on the node that created the CA, until the cluster recorded it.
            let ca_file = ClusterCa::load(&data_dir)?;
            let kept = match stored {
                Some(id) => pki::load_node_tls(&data_dir, id)?,
                None => None,
            };
            Ok((ca_file, kept))
        })
        .await??
    };
    let tls = match (kept, ca_file, &config.join) {
        (Some(tls), ca_file, _) => match pki::renewal_reason(&tls, &host)? {
            None => tls,
            Some(reason) => renew(&data_dir, tls, ca_file, &host, &reason).await?,
        },
        (None, Some(ca), _) => ca.issue(stored.or(config.id).unwrap_or(1), &host)?,
        (None, None, None) => {
            let data_dir = data_dir.clone();
            let node_id = stored.or(config.id).unwrap_or(1);
            tokio::task::spawn_blocking(move || ClusterCa::create(&data_dir)?.issue(node_id, &host)).await??
        }
        (None, None, Some(join)) => {
            let token = config.join_token.as_deref().ok_or_else(|| {
                anyhow!(
                    "joining a cluster needs a join token: run `flotilla cluster join-token` against a member and pass --join-token or FLOTILLA_JOIN_TOKEN (needed once: the node keeps its certificate in {})",
                    data_dir.display()
                )
            })?;
            let wanted = stored.or(config.id).unwrap_or(0);
            let tls = enroll::enroll(join, token, wanted, &config.advertise.to_string())
                .await
                .with_context(|| format!("cannot join through {join}"))?;
            tracing::info!(node = tls.node_id, through = %join, "received this node's certificate");
            tls
        }
    };
    let (saved, path) = (tls.clone(), config.data_dir.join("node.id"));
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        pki::save_node_tls(&data_dir, &saved)?;
        if read_trimmed(&path).is_none() {
            write_private_file(&path, &saved.node_id.to_string())?;
        }
        Ok(())
    })
    .await??;
    Ok(NodeIdentity {
        node_id: tls.node_id,
        tls,
    })
}

/// A new certificate for this node, signed with the cluster CA: the key file if this node
/// still has it, else the key the cluster recorded (this node's own copy of the replicated
/// state, opened with its key-encryption key). Refused for a node the cluster removed.
async fn renew(
    data_dir: &Path,
    current: NodeTls,
    ca_file: Option<ClusterCa>,
    host: &str,
    reason: &str,
) -> anyhow::Result<NodeTls> {
    let node_id = current.node_id;
    tracing::info!(node = node_id, reason, "renewing this node's certificate");
    let (data_dir, host, current_ca) = (data_dir.to_path_buf(), host.to_string(), current.ca_pem.clone());
    let renewed = tokio::task::spawn_blocking(move || -> anyhow::Result<NodeTls> {
        let (record, removed) = flotilla_raft::store::read_stored_pki(&data_dir.join("raft"))?;
        if removed.contains(&node_id) {
            bail!("{}", flotilla_raft::ApplyError::NodeRemoved(node_id));
        }
        let ca = match (ca_file, record) {
            (Some(ca), _) => ca,
            (None, Some(record)) => {
                let kek = flotilla_actors::secrets::Kek::load(&data_dir)?.ok_or_else(|| {
                    anyhow!(
                        "no key-encryption key in {} to open the cluster CA key with",
                        data_dir.display()
                    )
                })?;
                ClusterCa::open_replicated(&record, &kek)?
            }
            (None, None) => bail!("this node's copy of the cluster state holds no CA key yet"),
        };
        if ca.ca_pem.trim() != current_ca.trim() {
            bail!("the cluster CA this node holds differs from the one its certificate chains to");
        }
        Ok(ca.issue(node_id, &host)?)
    })
    .await?;
    match renewed {
        Ok(tls) => {
            tracing::info!(node = node_id, "renewed this node's certificate");
            Ok(tls)
        }
        // A certificate that is still valid serves until the next start; an expired one cannot.
        Err(error) if pki::seconds_left(&current)? <= 0 => Err(error
            .context(format!(
                "node {node_id}'s certificate expired and cannot be renewed; start it with a new join token to enroll again"
            ))),
        Err(error) => {
            tracing::warn!(node = node_id, %error, "could not renew this node's certificate; it serves until it expires");
            Ok(current)
        }
    }
}

/// On the node that created the CA: records the CA key in the cluster, sealed under the
/// key-encryption key (every member can then sign), and removes the plaintext `ca.key` once the
/// record is applied here. Run once the node is a member with a leader.
pub(super) async fn hand_ca_key_to_cluster(
    replica: &Replica,
    data_dir: &Path,
    kek: &super::secrets::NodeKek,
) -> anyhow::Result<()> {
    let dir = data_dir.to_path_buf();
    let Some(ca) = tokio::task::spawn_blocking(move || ClusterCa::load(&dir)).await?? else {
        return Ok(());
    };
    let recorded = replica.reader().read(|state| state.cluster_ca.clone());
    if recorded.as_ref().is_some_and(|record| record.ca_pem != ca.ca_pem) {
        bail!(
            "{} holds another CA than the cluster's; move it away",
            data_dir.join(pki::CA_KEY_FILE).display()
        );
    }
    if recorded.is_none() {
        let kek = kek
            .get()
            .ok_or_else(|| anyhow!("no key-encryption key to seal the cluster CA key with"))?;
        replica
            .write(Command::SetClusterCa { record: ca.seal(kek) })
            .await
            .context("cannot record the cluster CA")?;
        tracing::info!("recorded the cluster CA key, sealed, in the replicated state");
    }
    let dir = data_dir.to_path_buf();
    tokio::task::spawn_blocking(move || ClusterCa::remove_key_file(&dir)).await??;
    tracing::info!(path = %data_dir.join(pki::CA_KEY_FILE).display(), "removed the plaintext CA key");
    Ok(())
}
