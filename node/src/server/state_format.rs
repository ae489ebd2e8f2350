//! The state format a node reads and writes, in the `Join` exchange: a cluster refuses a node
//! whose format is older than its own, and a node refuses a cluster whose format is newer than
//! its own, both naming the two versions. (The data dir's own stamp is checked when the store
//! opens: `flotilla_raft::store::format`.)

use anyhow::bail;
use tonic::Status;

/// Test hook: `FLOTILLA_TEST_HOOK_STATE_FORMAT_VERSION` makes the node claim another state format
/// than the one it was built with, as another release would. Tests only.
const TEST_HOOK_STATE_FORMAT_ENV: &str = "FLOTILLA_TEST_HOOK_STATE_FORMAT_VERSION";

/// This node's state format: [`flotilla_raft::STATE_FORMAT_VERSION`], or the test hook's.
pub fn state_format_version() -> anyhow::Result<u32> {
    match std::env::var(TEST_HOOK_STATE_FORMAT_ENV) {
        Ok(value) => match value.trim().parse() {
            Ok(version) => {
                tracing::warn!(version, "test hook: claiming another state format");
                Ok(version)
            }
            Err(error) => bail!("{TEST_HOOK_STATE_FORMAT_ENV}: expected a number, found {value:?}: {error}"),
        },
        Err(std::env::VarError::NotPresent) => Ok(flotilla_raft::STATE_FORMAT_VERSION),
        Err(error) => bail!("{TEST_HOOK_STATE_FORMAT_ENV}: {error}"),
    }
}

/// What a joining node's request says; 0 is a node from before formats were numbered (format 1).
fn claimed(version: u32) -> u32 {
    version.max(1)
}

/// On the leader: a node whose format is older than the cluster's cannot read what it would be
/// sent.
pub fn check_joining_node(node: u64, joining: u32, cluster: u32) -> Result<(), Status> {
    let joining = claimed(joining);
    if joining < cluster {
        return Err(Status::failed_precondition(format!(
            "node {node} reads state format {joining}, older than this cluster's {cluster}: upgrade it before it joins"
        )));
    }
    Ok(())
}

/// Whether a `Join` was refused for its state format (not worth retrying, unlike a membership
/// change that failed for now).
pub fn is_format_refusal(status: &Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition && status.message().contains(" reads state format ")
}

/// On the joining node: the cluster's answer names its format (0: a cluster from before formats
/// were numbered, format 1).
pub fn check_cluster(through: &str, cluster: u32, ours: u32) -> anyhow::Result<()> {
    let cluster = claimed(cluster);
    if cluster > ours {
        bail!(
            "the cluster at {through} writes state format {cluster}, newer than this node's {ours}: upgrade this node's flotilla before it joins"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_name_both_versions() {
        let refused = check_joining_node(4, 1, 2).expect_err("an older node is refused");
        assert!(refused.message().contains("format 1") && refused.message().contains("cluster's 2"));
        assert!(is_format_refusal(&refused));
        assert!(check_joining_node(4, 0, 1).is_ok(), "an unnumbered node reads format 1");
        assert!(
            check_joining_node(4, 3, 2).is_ok(),
            "a newer node may join an older cluster"
        );
        let refused = check_cluster("n1", 2, 1)
            .expect_err("a newer cluster is refused")
            .to_string();
        assert!(
            refused.contains("format 2") && refused.contains("node's 1"),
            "{refused}"
        );
        assert!(check_cluster("n1", 0, 1).is_ok());
    }
}
