//! CPU time of processes, read from `/proc/PID/stat`: what a bench charges to each system.

/// The unit of /proc's CPU times (`USER_HZ`, fixed at 100 by the kernel's ABI).
const PROC_CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds a process used, itself and its reaped children (user and system time), from the
/// text of its `/proc/PID/stat`.
pub fn cpu_seconds_from_stat(stat: &str) -> Option<f64> {
    // After the command name (which may hold spaces and parentheses) come the fields from the
    // state (field 3) on, counted here from 0: utime, stime, cutime and cstime (fields 14 to 17)
    // are 11..15. Counted by position, not by what parses: tpgid (field 8) is -1 for a process
    // without a terminal.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let times = fields.get(11..15)?;
    let mut sum: u64 = 0;
    for time in times {
        sum += time.parse::<u64>().ok()?;
    }
    Some(sum as f64 / PROC_CLOCK_TICKS_PER_SECOND)
}

/// CPU seconds process `pid` used so far; `None` once it is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_seconds_from_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU seconds used so far by every process of `pids` together, and by this process.
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    servers: Option<f64>,
    generator: Option<f64>,
}

impl CpuSample {
    pub fn take(pids: &[u32]) -> CpuSample {
        let servers = pids.iter().map(|pid| cpu_seconds(*pid)).sum::<Option<f64>>();
        CpuSample {
            servers,
            generator: cpu_seconds(std::process::id()),
        }
    }

    /// Milliseconds of CPU per write since `earlier`, for the servers and for the generator;
    /// `None` where a process went away or nothing was written.
    pub fn per_write_since(&self, earlier: &CpuSample, writes: u64) -> CpuPerWrite {
        let per_write = |now: Option<f64>, then: Option<f64>| match (now, then) {
            (Some(now), Some(then)) if writes > 0 => Some((now - then) * 1000.0 / writes as f64),
            _ => None,
        };
        CpuPerWrite {
            servers_ms: per_write(self.servers, earlier.servers),
            generator_ms: per_write(self.generator, earlier.generator),
        }
    }
}

/// CPU milliseconds per acknowledged write.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuPerWrite {
    pub servers_ms: Option<f64>,
    pub generator_ms: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194304 100 0 0 0 250 50 7 3 20 0 1 0 100 0 0";
        assert_eq!(cpu_seconds_from_stat(stat), Some(3.1));
        // A process with a terminal has a positive tpgid; the times are found all the same.
        let with_terminal = "4242 (sh) S 1 4242 4242 34816 4242 4194304 100 0 0 0 250 50 7 3 20 0 1 0 100 0 0";
        assert_eq!(cpu_seconds_from_stat(with_terminal), Some(3.1));
        assert_eq!(cpu_seconds_from_stat("4242 (cut) S 1 2"), None);
        assert_eq!(cpu_seconds_from_stat("no parenthesis"), None);
    }

    #[test]
    fn this_process_has_a_cpu_time_and_a_missing_one_has_none() {
        assert!(cpu_seconds(std::process::id()).is_some());
        let earlier = CpuSample {
            servers: Some(1.0),
            generator: Some(2.0),
        };
        let later = CpuSample {
            servers: Some(1.5),
            generator: None,
        };
        let per_write = later.per_write_since(&earlier, 1_000);
        assert_eq!(per_write.servers_ms, Some(0.5));
        assert_eq!(per_write.generator_ms, None);
        assert!(later.per_write_since(&earlier, 0).servers_ms.is_none());
    }
}
