//! Where the CPU went during a phase: this process, each fluxo process,
//! PostgreSQL and Redis, from /proc/<pid>/stat — the evidence of which
//! resource saturated.

use std::{collections::BTreeMap, time::Instant};

/// Clock ticks per second of /proc times (`getconf CLK_TCK`, 100 on Linux).
fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// (comm, utime + stime) of a process.
fn stat(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_owned();
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    // After the comm: state is field 3 of the line; utime and stime are 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// CPU time by group at one instant.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    at: Instant,
    ticks: BTreeMap<String, u64>,
}

/// Takes a snapshot; `named` maps a pid to its group name (fluxo targets).
pub(crate) fn snapshot(named: &[(String, u32)]) -> Snapshot {
    let mut ticks = BTreeMap::new();
    let me = std::process::id();
    if let Some((_, t)) = stat(me) {
        ticks.insert("fluxo-bench".to_owned(), t);
    }
    for (name, pid) in named {
        if let Some((_, t)) = stat(*pid) {
            *ticks.entry(name.clone()).or_insert(0) += t;
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some((comm, t)) = stat(pid) {
                let group = if comm.starts_with("postgres") {
                    "postgres"
                } else if comm.starts_with("redis-server") {
                    "redis"
                } else {
                    continue;
                };
                *ticks.entry(group.to_owned()).or_insert(0) += t;
            }
        }
    }
    Snapshot { at: Instant::now(), ticks }
}

/// Cores used by each group between two snapshots, busiest first.
#[derive(Debug, Clone)]
pub(crate) struct Usage {
    pub(crate) by_group: Vec<(String, f64)>,
}

impl std::fmt::Display for Usage {
    /// e.g. `1.93 cores: postgres 1.21, ledger 0.52, fluxo-bench 0.20`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: f64 = self.by_group.iter().map(|u| u.1).sum();
        let parts: Vec<String> = self.by_group.iter().map(|(k, c)| format!("{k} {c:.2}")).collect();
        write!(f, "{total:.2} cores: {}", parts.join(", "))
    }
}

pub(crate) fn between(before: &Snapshot, after: &Snapshot) -> Usage {
    let secs = after.at.duration_since(before.at).as_secs_f64().max(1e-3);
    let tck = clk_tck();
    let mut used: Vec<(String, f64)> = after
        .ticks
        .iter()
        .map(|(k, t)| {
            let d = t.saturating_sub(before.ticks.get(k).copied().unwrap_or(0));
            (k.clone(), d as f64 / tck / secs)
        })
        .filter(|(_, c)| *c >= 0.01)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    Usage { by_group: used }
}
