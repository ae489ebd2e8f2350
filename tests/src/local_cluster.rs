//! A multi-region cluster on one machine for operators and developers (`deploy/local/cluster`,
//! the `flotilla-lab` binary): real nodes, each in a network namespace of its own
//! ([`crate::netlab`]), with a user-space delay on every link between two regions and none
//! inside a region.
//!
//! `up` starts a keeper process that owns the cluster and the lab (the relays that make the
//! delay live in it) and records them in `STATE_DIR/state.json`; `status` reads that record and
//! asks the nodes; `down` stops the keeper, which stops the nodes and removes the lab. When the
//! keeper was killed, `down` removes what it left: the processes in the lab's namespaces, the
//! namespaces (their names carry the keeper's pid) and the bridge.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The record `up` leaves for `status` and `down`.
pub const STATE_FILE: &str = "state.json";
/// Shell exports of the endpoint, CA and admin token of the first node.
pub const ENV_FILE: &str = "env";
/// The keeper's own log (the nodes log to `cluster/node-N.log`).
pub const KEEPER_LOG: &str = "keeper.log";

/// One node of a local cluster as recorded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LocalNode {
    pub id: u64,
    pub region: String,
    pub endpoint: String,
    pub namespace: String,
    pub pid: Option<u32>,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

/// What `up` made.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LocalState {
    /// The process that owns the nodes and the relays; the lab's namespaces carry its pid.
    pub keeper_pid: u32,
    pub bridge: String,
    pub nodes: Vec<LocalNode>,
    pub ca_cert: PathBuf,
    pub admin_token_file: PathBuf,
    /// The directory of the nodes' data and logs.
    pub cluster_dir: PathBuf,
    pub wan_latency_ms: u64,
    pub jitter_ms: u64,
}

impl LocalState {
    pub fn read(state_dir: &Path) -> Result<Option<LocalState>, String> {
        let path = state_dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(format!("could not read {}: {error}", path.display())),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|error| format!("{} is not a local cluster record: {error}", path.display()))
    }

    /// Written to a temporary name and renamed, so a reader never sees half a record.
    pub fn write(&self, state_dir: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).map_err(|error| error.to_string())?;
        let partial = state_dir.join(format!("{STATE_FILE}.partial"));
        std::fs::write(&partial, text)
            .and_then(|()| std::fs::rename(&partial, state_dir.join(STATE_FILE)))
            .map_err(|error| format!("could not write {}: {error}", state_dir.join(STATE_FILE).display()))
    }

    /// The first node's endpoint in each region, by region.
    pub fn endpoints_by_region(&self) -> BTreeMap<String, Vec<String>> {
        let mut by_region: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for node in &self.nodes {
            by_region
                .entry(node.region.clone())
                .or_default()
                .push(node.endpoint.clone());
        }
        by_region
    }
}

/// `eu=3,us=2` as one region name per node, in order: `[eu, eu, eu, us, us]`.
pub fn parse_regions(text: &str) -> Result<Vec<String>, String> {
    let mut regions = Vec::new();
    for part in text.split(',').map(str::trim).filter(|part| !part.is_empty()) {
        let (name, count) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected REGION=COUNT, such as eu=3"))?;
        let name = name.trim();
        let valid_name = !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|character| character.is_ascii_lowercase() || character.is_ascii_digit() || character == '-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !valid_name {
            return Err(format!(
                "region {name:?}: use 1 to 63 lowercase letters, digits and inner dashes"
            ));
        }
        let count: usize = count
            .trim()
            .parse()
            .map_err(|_| format!("{part:?}: the node count must be a whole number"))?;
        if count == 0 {
            return Err(format!("{part:?}: a region needs at least one node"));
        }
        if regions.iter().any(|region: &String| region == name) {
            return Err(format!("region {name:?} is listed twice"));
        }
        regions.extend(std::iter::repeat_n(name.to_string(), count));
    }
    if regions.is_empty() {
        return Err("no regions: pass --regions like eu=3,us=2".to_string());
    }
    if regions.len() > crate::netlab::MAX_NODES {
        return Err(format!(
            "{} nodes asked for; a local cluster has at most {}",
            regions.len(),
            crate::netlab::MAX_NODES
        ));
    }
    Ok(regions)
}

/// `40ms`, `1s`, `0` and the like.
pub fn parse_latency(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text.trim()).map_err(|error| format!("{text:?}: {error} (use a duration such as 40ms)"))
}

pub use crate::netlab::process_alive;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_expand_in_order() {
        assert_eq!(
            parse_regions("eu=3, us=2").expect("valid"),
            vec!["eu", "eu", "eu", "us", "us"]
        );
        for bad in ["", "eu", "eu=0", "eu=x", "EU=1", "eu=1,eu=2", "-a=1"] {
            assert!(parse_regions(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn latencies_parse() {
        assert_eq!(parse_latency("40ms").expect("valid"), Duration::from_millis(40));
        assert_eq!(parse_latency("0").expect("valid"), Duration::ZERO);
        assert!(parse_latency("fast").is_err());
    }
}
