//! Values of the node's config file that are checked while it is parsed, so that an error
//! names the file, line and column of the value at fault.

use std::path::PathBuf;

use serde::Deserialize;

/// A session lifetime STS accepts, checked while the file is parsed.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(try_from = "i64")]
pub struct SessionSeconds(pub i32);

impl TryFrom<i64> for SessionSeconds {
    type Error = String;

    fn try_from(seconds: i64) -> Result<Self, Self::Error> {
        match i32::try_from(seconds) {
            Ok(seconds @ 900..=43_200) => Ok(SessionSeconds(seconds)),
            _ => Err(format!(
                "aws.session_seconds: {seconds} is outside 900..=43200, the lifetimes STS grants"
            )),
        }
    }
}

/// `raft_heartbeat_ms`: how often the leader sends an empty append to each follower when it
/// has nothing else to send, checked while the file is parsed.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(try_from = "i64")]
pub struct RaftHeartbeatMs(pub u64);

impl TryFrom<i64> for RaftHeartbeatMs {
    type Error = String;

    fn try_from(ms: i64) -> Result<Self, Self::Error> {
        millis_within(ms, 10..=30_000, "node.raft_heartbeat_ms").map(RaftHeartbeatMs)
    }
}

/// `ms` when it is within `range`; else an error naming `field` and the range.
fn millis_within(ms: i64, range: std::ops::RangeInclusive<i64>, field: &str) -> Result<u64, String> {
    if range.contains(&ms) {
        Ok(ms as u64)
    } else {
        Err(format!("{field}: {ms} is outside {}..={}", range.start(), range.end()))
    }
}

/// `raft_election_timeout_ms`: how long a follower hears nothing from a leader before it
/// campaigns (a random time between this and twice this), checked while the file is parsed.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(try_from = "i64")]
pub struct RaftElectionTimeoutMs(pub u64);

impl TryFrom<i64> for RaftElectionTimeoutMs {
    type Error = String;

    fn try_from(ms: i64) -> Result<Self, Self::Error> {
        millis_within(ms, 100..=300_000, "node.raft_election_timeout_ms").map(RaftElectionTimeoutMs)
    }
}

/// An `http://` or `https://` URL, checked while the file is parsed (so an error names its line).
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(try_from = "String")]
pub struct StsEndpoint(pub String);

impl TryFrom<String> for StsEndpoint {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        match url::Url::parse(&text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(StsEndpoint(text)),
            Ok(_) => Err(format!(
                "aws.sts_endpoint: {text:?} is not an http:// or https:// URL with a host"
            )),
            Err(error) => Err(format!("aws.sts_endpoint: {text:?} is not a URL: {error}")),
        }
    }
}

/// A directory of `[repos] allow_local`, checked while the file is parsed (so an error names
/// its line): an absolute path.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(try_from = "String")]
pub struct AllowedLocalDirectory(pub PathBuf);

impl TryFrom<String> for AllowedLocalDirectory {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        if text.is_empty() || !text.starts_with('/') || text.contains('\0') {
            return Err(format!(
                "allow_local: {text:?} is not an absolute directory path (like \"/srv/git\")"
            ));
        }
        Ok(AllowedLocalDirectory(PathBuf::from(text)))
    }
}

/// The name of a built-in provider, checked while the file is parsed (so an error names its line).
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(try_from = "String")]
pub struct BuiltinName(pub String);

impl TryFrom<String> for BuiltinName {
    type Error = String;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        if flotilla_builtin_plugins::builtin(&name).is_some() {
            Ok(BuiltinName(name))
        } else {
            let known: Vec<&str> = flotilla_builtin_plugins::BUILTIN
                .iter()
                .map(|plugin| plugin.name)
                .collect();
            Err(format!(
                "{name:?} is not a built-in plugin (built-ins: {})",
                known.join(", ")
            ))
        }
    }
}
