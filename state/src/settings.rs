//! Team settings: the defaults a team's new agents get, which models they may use, whether
//! summaries and diffs are shown to members and viewers, how long ended agents are kept, and
//! privacy mode. Each setting is written on its own (`SetTeamSetting`), parsed here so that a
//! refused value is refused the same on every node.

use serde::{Deserialize, Serialize};

/// Ended agents are kept this long unless the team says otherwise: seven days.
pub const DEFAULT_RETENTION_SECONDS: u64 = 7 * 24 * 3600;
/// Longest retention a team may ask for while privacy mode is on: one year.
pub const MAX_RETENTION_SECONDS: u64 = 365 * 24 * 3600;
/// Most models a team's allow-list names.
pub const MAX_ALLOWED_MODELS: usize = 64;
/// Longest text value of a setting (a model name, a repository URL, a branch).
pub const MAX_SETTING_VALUE_BYTES: usize = 2048;
/// Most agents one purge entry removes, so that one entry stays small and quick to apply.
pub const MAX_PURGE_BATCH: usize = 64;

/// The names `flotilla settings set` takes, in the order `settings get` prints them.
pub const SETTING_NAMES: &[&str] = &[
    "default_model",
    "default_repository",
    "default_base_branch",
    "display_summary",
    "allowed_models",
    "retention",
    "privacy_mode",
];

/// One team's settings. A team without a record has [`TeamSettings::default`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TeamSettings {
    /// The model of an agent whose request names none; empty: the node's `[agents] default_model`.
    pub default_model: String,
    /// The repository of an agent whose request names none; empty: the request must name one.
    pub default_repository: String,
    /// The base branch of an agent whose request names none; empty: the repository's default
    /// branch, read from the origin's `HEAD`.
    pub default_base_branch: String,
    /// Off: summaries and diffs are hidden from the team's members and viewers.
    pub display_summary: bool,
    /// The models the team's agents may use; empty: every model the node offers.
    pub allowed_models: Vec<String>,
    /// How long an ended agent is kept (from its last change) before it is purged; `None`:
    /// until deleted, which only a team with privacy mode off may choose.
    pub retention_seconds: Option<u64>,
    /// Prompts, transcripts and tool output are kept only while the agent runs and for its
    /// retention window, and are never written to node logs.
    pub privacy_mode: bool,
}

impl Default for TeamSettings {
    fn default() -> TeamSettings {
        TeamSettings {
            default_model: String::new(),
            default_repository: String::new(),
            default_base_branch: String::new(),
            display_summary: true,
            allowed_models: Vec::new(),
            retention_seconds: Some(DEFAULT_RETENTION_SECONDS),
            privacy_mode: true,
        }
    }
}

impl TeamSettings {
    /// Whether the team's agents may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models.is_empty() || self.allowed_models.iter().any(|allowed| allowed == model)
    }

    /// Whether an agent that ended (last changed) at `ended_at_ms` is due for purging at `now_ms`.
    pub fn purge_due(&self, ended_at_ms: u64, now_ms: u64) -> bool {
        self.retention_seconds
            .is_some_and(|seconds| now_ms >= ended_at_ms.saturating_add(seconds.saturating_mul(1000)))
    }

    /// The value of setting `name` as `settings get` prints it (and `settings set` takes it).
    pub fn get(&self, name: &str) -> Option<String> {
        Some(match name {
            "default_model" => self.default_model.clone(),
            "default_repository" => self.default_repository.clone(),
            "default_base_branch" => self.default_base_branch.clone(),
            "display_summary" => on_off(self.display_summary),
            "allowed_models" => self.allowed_models.join(","),
            "retention" => match self.retention_seconds {
                Some(seconds) => format!("{seconds}s"),
                None => "never".to_string(),
            },
            "privacy_mode" => on_off(self.privacy_mode),
            _ => return None,
        })
    }

    /// The settings with `name` set to `value`, or why not. Text values are checked for size
    /// here; the node checks their shape (a branch, a repository URL, a declared model) before
    /// it writes them.
    pub fn with(&self, name: &str, value: &str) -> Result<TeamSettings, String> {
        let mut next = self.clone();
        if value.len() > MAX_SETTING_VALUE_BYTES {
            return Err(format!(
                "setting {name}: at most {MAX_SETTING_VALUE_BYTES} bytes, found {}",
                value.len()
            ));
        }
        match name {
            "default_model" => next.default_model = value.trim().to_string(),
            "default_repository" => next.default_repository = value.trim().to_string(),
            "default_base_branch" => next.default_base_branch = value.trim().to_string(),
            "display_summary" => next.display_summary = parse_on_off(name, value)?,
            "allowed_models" => next.allowed_models = parse_models(value)?,
            "retention" => next.retention_seconds = parse_retention(value)?,
            "privacy_mode" => next.privacy_mode = parse_on_off(name, value)?,
            _ => {
                return Err(format!(
                    "unknown setting {name:?}; settings: {}",
                    SETTING_NAMES.join(", ")
                ))
            }
        }
        if next.privacy_mode && next.retention_seconds.is_none() {
            return Err(
                "retention never: privacy mode keeps ended agents only for a retention window; turn privacy_mode off first, or give a retention such as 7d"
                    .to_string(),
            );
        }
        Ok(next)
    }
}

fn on_off(value: bool) -> String {
    if value { "on" } else { "off" }.to_string()
}

fn parse_on_off(name: &str, value: &str) -> Result<bool, String> {
    match value.trim() {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        other => Err(format!("setting {name}: {other:?} is not on or off")),
    }
}

fn parse_models(value: &str) -> Result<Vec<String>, String> {
    let mut models: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|model| !model.is_empty())
        .map(str::to_string)
        .collect();
    models.sort();
    models.dedup();
    if models.len() > MAX_ALLOWED_MODELS {
        return Err(format!(
            "setting allowed_models: at most {MAX_ALLOWED_MODELS} models, found {}",
            models.len()
        ));
    }
    Ok(models)
}

/// A retention such as `7d`, `12h`, `30m`, `45s` (a bare number is seconds), or `never`.
pub fn parse_retention(value: &str) -> Result<Option<u64>, String> {
    let value = value.trim();
    if value == "never" {
        return Ok(None);
    }
    let (digits, unit_seconds) = match value.char_indices().last() {
        Some((at, 'd')) => (&value[..at], 24 * 3600),
        Some((at, 'h')) => (&value[..at], 3600),
        Some((at, 'm')) => (&value[..at], 60),
        Some((at, 's')) => (&value[..at], 1),
        _ => (value, 1),
    };
    let count: u64 = digits
        .parse()
        .map_err(|_| format!("setting retention: {value:?} is not a duration (use 7d, 12h, 30m, 45s or never)"))?;
    let seconds = count.saturating_mul(unit_seconds);
    if seconds == 0 || seconds > MAX_RETENTION_SECONDS {
        return Err(format!(
            "setting retention: between 1s and {MAX_RETENTION_SECONDS}s (365d), found {value}"
        ));
    }
    Ok(Some(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_keep_seven_days_in_privacy_mode() {
        let settings = TeamSettings::default();
        assert_eq!(settings.get("retention").as_deref(), Some("604800s"));
        assert_eq!(settings.get("privacy_mode").as_deref(), Some("on"));
        assert!(settings.allows_model("anything"));
        assert!(!settings.purge_due(1_000, 1_000 + 604_799_999));
        assert!(settings.purge_due(1_000, 1_000 + 604_800_000));
    }

    #[test]
    fn values_are_parsed_and_refused_with_the_reason() {
        let settings = TeamSettings::default();
        let set = settings.with("allowed_models", "b, a,,a").expect("models");
        assert_eq!(set.allowed_models, vec!["a".to_string(), "b".to_string()]);
        assert!(!set.allows_model("c"));
        assert_eq!(settings.with("retention", "3s").expect("3s").retention_seconds, Some(3));
        assert_eq!(
            settings.with("retention", "2d").expect("2d").retention_seconds,
            Some(172_800)
        );
        assert!(settings.with("retention", "0s").unwrap_err().contains("between"));
        assert!(settings
            .with("retention", "soon")
            .unwrap_err()
            .contains("not a duration"));
        assert!(settings.with("retention", "never").unwrap_err().contains("privacy"));
        let open = settings.with("privacy_mode", "off").expect("off");
        let forever = open.with("retention", "never").expect("never");
        assert_eq!(forever.get("retention").as_deref(), Some("never"));
        assert!(!forever.purge_due(0, u64::MAX));
        assert!(forever.with("privacy_mode", "on").is_err());
        assert!(settings.with("colour", "red").unwrap_err().contains("unknown setting"));
        assert!(settings.with("display_summary", "maybe").is_err());
    }
}
