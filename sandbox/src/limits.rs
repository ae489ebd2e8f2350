//! Per-machine resource limits. Memory, processes and CPU are enforced by the machine's cgroup;
//! the disk limit is the size of the filesystem holding the machine's upper layers; the command
//! and output limits by the driver's exec.

use serde::{Deserialize, Serialize};

use crate::error::{Result, SandboxError};

pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * MIB;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MachineLimits {
    /// Resident memory of every process in the machine together, and its tmpfs pages.
    pub memory_bytes: u64,
    /// Processes and threads in the machine together (cgroup `pids.max`).
    pub max_processes: u64,
    /// Relative CPU share in cgroup-v1 `cpu.shares` units (1024 is one normal share); converted
    /// to `cpu.weight` on cgroup v2.
    pub cpu_weight: u64,
    /// Wall-clock limit of one command, unless the request sets its own.
    pub command_timeout_ms: u64,
    /// Captured bytes of stdout and of stderr each, unless the request sets its own.
    pub max_output_bytes: u64,
    /// Size of the machine's writable layers (root upper and workspace upper together).
    pub disk_bytes: u64,
}

impl Default for MachineLimits {
    fn default() -> Self {
        MachineLimits {
            memory_bytes: 2 * GIB,
            max_processes: 512,
            cpu_weight: 1024,
            command_timeout_ms: 10 * 60 * 1000,
            max_output_bytes: MIB,
            disk_bytes: 4 * GIB,
        }
    }
}

/// A size for people: whole GiB, MiB or KiB when it is one ("10 GiB"), else bytes.
pub fn display_bytes(bytes: u64) -> String {
    const KIB: u64 = 1024;
    for (unit, name) in [(GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{} {name}", bytes / unit);
        }
    }
    format!("{bytes} bytes")
}

/// Parses a size with an optional binary or decimal unit: "10GiB", "512 MiB", "1.5G",
/// "4096". Units: B, K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB (K, M, G, T are binary; KB, MB,
/// GB, TB decimal).
pub fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|character: char| !(character.is_ascii_digit() || character == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let unit = unit.trim();
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1024,
        "kb" => 1000,
        "m" | "mib" => MIB,
        "mb" => 1000 * 1000,
        "g" | "gib" => GIB,
        "gb" => 1000 * 1000 * 1000,
        "t" | "tib" => 1024 * GIB,
        "tb" => 1000 * 1000 * 1000 * 1000,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)"
            ))
        }
    };
    if number.is_empty() {
        return Err(format!(
            "{text:?} is not a size: expected a number and a unit such as \"10GiB\""
        ));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size: {number:?} is not a number"))?;
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes.round() as u64)
}

/// Smallest values a machine can usefully run with; below them a shell and tmux do not start.
pub const MIN_MEMORY_BYTES: u64 = 16 * MIB;
pub const MIN_PROCESSES: u64 = 8;
pub const MIN_DISK_BYTES: u64 = MIB;

impl MachineLimits {
    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &'static str, detail: String| Err(SandboxError::InvalidLimit { field, detail });
        if self.memory_bytes < MIN_MEMORY_BYTES {
            return invalid(
                "memory_bytes",
                format!("{} is below the minimum {MIN_MEMORY_BYTES}", self.memory_bytes),
            );
        }
        if self.max_processes < MIN_PROCESSES {
            return invalid(
                "max_processes",
                format!("{} is below the minimum {MIN_PROCESSES}", self.max_processes),
            );
        }
        if !(2..=262_144).contains(&self.cpu_weight) {
            return invalid("cpu_weight", format!("{} is outside 2..=262144", self.cpu_weight));
        }
        if self.command_timeout_ms == 0 {
            return invalid("command_timeout_ms", "must be above zero".to_string());
        }
        if self.max_output_bytes == 0 {
            return invalid("max_output_bytes", "must be above zero".to_string());
        }
        if self.disk_bytes < MIN_DISK_BYTES {
            return invalid(
                "disk_bytes",
                format!("{} is below the minimum {MIN_DISK_BYTES}", self.disk_bytes),
            );
        }
        Ok(())
    }

    /// cgroup v2 `cpu.weight` (1..=10000) for these v1 shares, the conversion systemd and runc use.
    pub fn cpu_weight_v2(&self) -> u64 {
        1 + (self.cpu_weight.clamp(2, 262_144) - 2) * 9999 / 262_142
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let limits = MachineLimits::default();
        limits.validate().unwrap();
        assert_eq!(limits.memory_bytes, 2 * GIB);
        assert_eq!(limits.command_timeout_ms, 600_000);
    }

    #[test]
    fn too_small_limits_are_refused_by_name() {
        let limits = MachineLimits {
            max_processes: 1,
            ..MachineLimits::default()
        };
        let error = limits.validate().unwrap_err().to_string();
        assert!(error.contains("max_processes"), "{error}");
        let limits = MachineLimits {
            command_timeout_ms: 0,
            ..MachineLimits::default()
        };
        assert!(limits
            .validate()
            .unwrap_err()
            .to_string()
            .contains("command_timeout_ms"));
    }

    #[test]
    fn cpu_weight_converts_to_v2() {
        let mut limits = MachineLimits {
            cpu_weight: 2,
            ..MachineLimits::default()
        };
        assert_eq!(limits.cpu_weight_v2(), 1);
        limits.cpu_weight = 262_144;
        assert_eq!(limits.cpu_weight_v2(), 10_000);
        limits.cpu_weight = 1024;
        assert_eq!(limits.cpu_weight_v2(), 39);
    }

    #[test]
    fn sizes_parse_and_display() {
        assert_eq!(parse_bytes("10GiB").unwrap(), 10 * GIB);
        assert_eq!(parse_bytes("512 MiB").unwrap(), 512 * MIB);
        assert_eq!(parse_bytes("1.5G").unwrap(), 3 * GIB / 2);
        assert_eq!(parse_bytes("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("10 parsecs")
            .unwrap_err()
            .contains("unknown unit \"parsecs\""));
        assert!(parse_bytes("GiB").unwrap_err().contains("not a size"));
        assert!(parse_bytes("1.2.3G").unwrap_err().contains("not a number"));
        assert_eq!(display_bytes(10 * GIB), "10 GiB");
        assert_eq!(display_bytes(64 * MIB), "64 MiB");
        assert_eq!(display_bytes(1000), "1000 bytes");
    }

    #[test]
    fn partial_json_takes_defaults() {
        let limits: MachineLimits = serde_json::from_str(r#"{"memory_bytes": 1073741824}"#).unwrap();
        assert_eq!(limits.memory_bytes, GIB);
        assert_eq!(limits.max_processes, 512);
    }
}
