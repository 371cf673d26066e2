//! Readers of `/proc/PID/{status,smaps_rollup,stat}`: the resident memory and CPU time of a
//! server on this machine, sampled before and after a phase.

use std::time::Instant;

use serde::Serialize;

impl Sample {
    /// This CPU reading with the memory figures of another.
    pub fn with_memory_of(self, other: &Sample) -> Sample {
        Sample {
            memory: other.memory,
            ..self
        }
    }
}

/// Memory of a process, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Memory {
    /// `VmRSS` of `/proc/PID/status`.
    pub rss_kib: u64,
    /// `Pss` of `/proc/PID/smaps_rollup` (shared pages divided among their users), if readable.
    pub pss_kib: Option<u64>,
    /// `Anonymous` of `/proc/PID/smaps_rollup` (heap and stacks), if readable.
    pub anon_kib: Option<u64>,
}

/// CPU time a process has used (all threads), in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    pub utime: u64,
    pub stime: u64,
}

/// Scheduler figures of a process, summed over its threads (`/proc/PID/task/*/schedstat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sched {
    /// Time spent running on a CPU, ns.
    pub run_ns: u64,
    /// Time spent runnable but waiting for a CPU, ns: other load on the machine.
    pub wait_ns: u64,
}

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    pub memory: Memory,
    pub cpu: CpuTicks,
    pub sched: Option<Sched>,
}

/// A value of a `Key:   123 kB` line of `status` or `smaps_rollup`.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// `VmRSS` from the text of `/proc/PID/status`.
pub fn parse_status_rss(text: &str) -> Option<u64> {
    kib_field(text, "VmRSS")
}

/// `(Pss, Anonymous)` from the text of `/proc/PID/smaps_rollup`.
pub fn parse_smaps_rollup(text: &str) -> (Option<u64>, Option<u64>) {
    (kib_field(text, "Pss"), kib_field(text, "Anonymous"))
}

/// `utime` and `stime` (fields 14 and 15) from the text of `/proc/PID/stat`. The command name
/// (field 2) is in parentheses and may hold spaces and parentheses, so fields are counted
/// from the last `)`.
pub fn parse_stat(text: &str) -> Option<CpuTicks> {
    let after = &text[text.rfind(')')? + 1..];
    // After the name: field 3 (state) is the first; utime is field 14.
    let mut f = after.split_whitespace().skip(14 - 3);
    Some(CpuTicks {
        utime: f.next()?.parse().ok()?,
        stime: f.next()?.parse().ok()?,
    })
}

/// `(run_ns, wait_ns)` from the text of a `schedstat` file (`RUN WAIT SLICES`).
pub fn parse_schedstat(text: &str) -> Option<Sched> {
    let mut f = text.split_whitespace();
    Some(Sched {
        run_ns: f.next()?.parse().ok()?,
        wait_ns: f.next()?.parse().ok()?,
    })
}

/// The scheduler figures of every thread of `pid`, summed.
fn sched(pid: u32) -> Option<Sched> {
    let mut total = Sched::default();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(text) = std::fs::read_to_string(t.path().join("schedstat")) else {
            continue;
        };
        if let Some(s) = parse_schedstat(&text) {
            total.run_ns += s.run_ns;
            total.wait_ns += s.wait_ns;
        }
    }
    Some(total)
}

/// Clock ticks per second of `/proc/PID/stat` times (`getconf CLK_TCK`; 100 on Linux).
pub fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// A local process to measure.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub pid: u32,
    ticks_per_sec: u64,
}

impl Probe {
    pub fn new(pid: u32) -> Probe {
        Probe {
            pid,
            ticks_per_sec: clock_ticks(),
        }
    }

    /// Read the CPU time only (cheap: `/proc/PID/stat`), for frequent sampling during a
    /// phase. The memory figures are left at zero; see [`Sample::with_memory_of`].
    pub fn sample_cpu(&self) -> Option<Sample> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        Some(Sample {
            at: Instant::now(),
            memory: Memory::default(),
            cpu: parse_stat(&stat)?,
            sched: sched(self.pid),
        })
    }

    /// Read the process now; `None` if it is gone or `/proc` is not readable. Reading
    /// `smaps_rollup` walks the target's page tables under its memory map lock: costly, and
    /// it slows the target down, so sample it only between phases.
    pub fn sample(&self) -> Option<Sample> {
        let dir = format!("/proc/{}", self.pid);
        let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
        let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
        let (pss_kib, anon_kib) = std::fs::read_to_string(format!("{dir}/smaps_rollup"))
            .map(|t| parse_smaps_rollup(&t))
            .unwrap_or((None, None));
        Some(Sample {
            at: Instant::now(),
            memory: Memory {
                rss_kib: parse_status_rss(&status)?,
                pss_kib,
                anon_kib,
            },
            cpu: parse_stat(&stat)?,
            sched: sched(self.pid),
        })
    }

    /// CPU seconds (user, system) used between two samples.
    pub fn cpu_between(&self, a: &Sample, b: &Sample) -> (f64, f64) {
        let t = self.ticks_per_sec as f64;
        (
            b.cpu.utime.saturating_sub(a.cpu.utime) as f64 / t,
            b.cpu.stime.saturating_sub(a.cpu.stime) as f64 / t,
        )
    }
}

/// A process's figures over one phase (the server's, or the bench's own), for reports.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcessUse {
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub pss_before_kib: Option<u64>,
    pub pss_after_kib: Option<u64>,
    pub anon_before_kib: Option<u64>,
    pub anon_after_kib: Option<u64>,
    pub cpu_user_s: f64,
    pub cpu_system_s: f64,
    /// CPU seconds over wall seconds of the phase (1.0 = one core busy).
    pub cpu_cores: f64,
    /// Time its threads were runnable but waited for a CPU, over wall time: when this is
    /// large, other load on the machine held the process back and rates understate it.
    pub cpu_wait_fraction: Option<f64>,
}

impl ProcessUse {
    pub fn between(probe: &Probe, a: &Sample, b: &Sample) -> ProcessUse {
        let (user, system) = probe.cpu_between(a, b);
        let wall = b.at.duration_since(a.at).as_secs_f64();
        ProcessUse {
            rss_before_kib: a.memory.rss_kib,
            rss_after_kib: b.memory.rss_kib,
            pss_before_kib: a.memory.pss_kib,
            pss_after_kib: b.memory.pss_kib,
            anon_before_kib: a.memory.anon_kib,
            anon_after_kib: b.memory.anon_kib,
            cpu_user_s: user,
            cpu_system_s: system,
            cpu_cores: if wall > 0.0 {
                (user + system) / wall
            } else {
                0.0
            },
            cpu_wait_fraction: match (a.sched, b.sched) {
                (Some(x), Some(y)) if wall > 0.0 => {
                    Some(y.wait_ns.saturating_sub(x.wait_ns) as f64 / 1e9 / wall)
                }
                _ => None,
            },
        }
    }

    pub fn cpu_s(&self) -> f64 {
        self.cpu_user_s + self.cpu_system_s
    }

    /// Growth of the resident set in bytes.
    pub fn rss_delta_bytes(&self) -> f64 {
        (self.rss_after_kib as f64 - self.rss_before_kib as f64) * 1024.0
    }

    /// `0.93 cores (waited 4 %)`.
    pub fn cores_cell(&self) -> String {
        match self.cpu_wait_fraction {
            Some(w) => format!(
                "{:.2} cores (waited for a CPU {:.0} %)",
                self.cpu_cores,
                w * 100.0
            ),
            None => format!("{:.2} cores", self.cpu_cores),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tlivepush\nUmask:\t0022\nState:\tS (sleeping)\nVmPeak:\t  123456 kB\nVmRSS:\t   45678 kB\nRssAnon:\t   40000 kB\nThreads:\t3\n";

    const ROLLUP: &str = "55d0c0a00000-7ffd5f1ff000 ---p 00000000 00:00 0                          [rollup]\nRss:               45680 kB\nPss:               44000 kB\nPss_Anon:          40000 kB\nShared_Clean:       1600 kB\nAnonymous:         40100 kB\nSwap:                  0 kB\n";

    #[test]
    fn status_and_rollup() {
        assert_eq!(parse_status_rss(STATUS), Some(45678));
        assert_eq!(parse_status_rss("Name:\tx\n"), None);
        // `Pss_Anon` must not be taken for `Pss`.
        assert_eq!(parse_smaps_rollup(ROLLUP), (Some(44000), Some(40100)));
    }

    #[test]
    fn stat_with_awkward_name() {
        let stat = "4242 (we ird) (name)) S 1 4242 4242 0 -1 4194560 1234 0 0 0 731 205 0 0 20 0 3 0 12345 987654 11111 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Some(CpuTicks {
                utime: 731,
                stime: 205
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn schedstat() {
        assert_eq!(
            parse_schedstat("123456789 2345 67\n"),
            Some(Sched {
                run_ns: 123456789,
                wait_ns: 2345
            })
        );
        assert_eq!(parse_schedstat("12"), None);
    }

    #[test]
    fn reads_this_process() {
        let p = Probe::new(std::process::id());
        let a = p.sample().expect("own /proc entry");
        assert!(a.memory.rss_kib > 0);
        let b = p.sample().expect("own /proc entry");
        let u = ProcessUse::between(&p, &a, &b);
        assert!(u.cpu_s() >= 0.0);
    }
}
