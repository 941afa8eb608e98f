//! CPU use of the processes under test while a phase runs, from
//! `/proc/<pid>/stat` and `/proc/stat`: what tells whether a figure is bound
//! by a saturated core or by something else.

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Clock ticks per second of `/proc` times (USER_HZ; 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// CPU time of a process (user + system), ticks.
fn proc_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// (busy, total) ticks of the whole machine.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// One process's share of a phase.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ProcCpu {
    pub name: String,
    /// Percent of one core (200 = two cores busy).
    pub pct_of_core: f64,
    /// Each process's share when the group has several (the nodes of a
    /// cluster, the workers), in the group's order; their sum is `pct_of_core`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub each: Vec<f64>,
}

/// CPU use during a phase.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct CpuReport {
    pub secs: f64,
    pub processes: Vec<ProcCpu>,
    /// Whole machine, percent of all cores (other tenants included).
    pub machine_busy_pct: f64,
}

/// Samples taken at the start of a phase.
pub struct CpuSampler {
    procs: Vec<(String, Vec<(u32, u64)>)>,
    machine: Option<(u64, u64)>,
    t0: Instant,
}

impl CpuSampler {
    /// Starts measuring named groups of processes (e.g. `workers` = several pids).
    pub fn start(groups: Vec<(String, Vec<u32>)>) -> Self {
        let procs = groups
            .into_iter()
            .map(|(name, pids)| (name, pids.into_iter().map(|p| (p, proc_ticks(p).unwrap_or(0))).collect()))
            .collect();
        Self { procs, machine: machine_ticks(), t0: Instant::now() }
    }

    pub fn stop(&self) -> CpuReport {
        let secs = self.t0.elapsed().as_secs_f64().max(1e-3);
        let processes = self
            .procs
            .iter()
            .map(|(name, pids)| {
                // A process gone since the start counts nothing (not minus its start).
                let pct = |(p, t0): &(u32, u64)| {
                    let t = proc_ticks(*p).unwrap_or(*t0);
                    t.saturating_sub(*t0) as f64 / TICKS_PER_SEC / secs * 100.0
                };
                let each: Vec<f64> = pids.iter().map(pct).collect();
                let round = |v: f64| (v * 10.0).round() / 10.0;
                ProcCpu {
                    name: name.clone(),
                    pct_of_core: round(each.iter().sum()),
                    each: if each.len() > 1 { each.into_iter().map(round).collect() } else { Vec::new() },
                }
            })
            .collect();
        let machine_busy_pct = match (self.machine, machine_ticks()) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                ((b1 - b0) as f64 / (t1 - t0) as f64 * 1000.0).round() / 10.0
            }
            _ => 0.0,
        };
        CpuReport { secs, processes, machine_busy_pct }
    }
}

impl std::fmt::Display for CpuReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for p in &self.processes {
            write!(f, "{} {:.0}%", p.name, p.pct_of_core)?;
            if !p.each.is_empty() {
                let each: Vec<String> = p.each.iter().map(|v| format!("{v:.0}")).collect();
                write!(f, " ({})", each.join("+"))?;
            }
            write!(f, ", ")?;
        }
        write!(f, "machine {:.0}% busy ({:.1} s)", self.machine_busy_pct, self.secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_is_measured() {
        let me = std::process::id();
        let s = CpuSampler::start(vec![("me".into(), vec![me])]);
        let start = proc_ticks(me).unwrap();
        // Burn CPU until the kernel has counted some (bounded), whatever else runs.
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let mut x = 0u64;
        while proc_ticks(me).unwrap() < start + 3 && Instant::now() < deadline {
            for _ in 0..100_000 {
                x = x.wrapping_add(std::hint::black_box(1));
            }
        }
        let r = s.stop();
        assert!(x > 0);
        assert_eq!(r.processes.len(), 1);
        assert!(r.processes[0].pct_of_core > 0.0, "{r}");
        assert!(r.processes[0].each.is_empty(), "one process, no breakdown");
        assert!(r.to_string().contains("me "), "{r}");
    }

    #[test]
    fn a_group_sums_its_processes_and_keeps_each_share() {
        let me = std::process::id();
        // An idle child: its share is zero, the group's is this process's.
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let s = CpuSampler::start(vec![("group".into(), vec![me, child.id()])]);
        let start = proc_ticks(me).unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let mut x = 0u64;
        while proc_ticks(me).unwrap() < start + 3 && Instant::now() < deadline {
            for _ in 0..100_000 {
                x = x.wrapping_add(std::hint::black_box(1));
            }
        }
        let r = s.stop();
        let _ = child.kill();
        let _ = child.wait();
        assert!(x > 0);
        let g = &r.processes[0];
        assert_eq!(g.each.len(), 2, "{r}");
        assert!(g.each[0] > 0.0 && g.each[1] == 0.0, "{r}");
        assert!((g.pct_of_core - (g.each[0] + g.each[1])).abs() < 0.2, "{r}");
        assert!(r.to_string().contains("group "), "{r}");
    }
}
