//! CPU profiles of a phase with Linux `perf`: where each busy process spent
//! its cycles, as evidence for what bounds a scenario.
//!
//! `perf record -a` samples every CPU for the phase (at 499 Hz, light enough
//! not to move the figures much); afterwards `perf report` lists the hottest
//! symbols of each process that used a meaningful share of a core. fluxo is
//! built without frame pointers, so the profile is flat (self time by symbol),
//! which is what ranks the costs.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// A `perf record` running for one phase.
#[derive(Debug)]
pub(crate) struct Recording {
    child: Child,
    data: PathBuf,
}

/// Top symbols per process of one phase.
#[derive(Debug, Clone)]
pub(crate) struct Profile {
    pub(crate) label: String,
    /// (process, its top symbols as "share symbol" lines)
    pub(crate) processes: Vec<(String, Vec<String>)>,
}

/// Starts sampling every CPU for `duration`; `None` when perf is unavailable.
pub(crate) fn start(dir: &Path, n: usize, duration: Duration) -> Option<Recording> {
    let data = dir.join(format!("phase-{n}.perf"));
    let child = Command::new("perf")
        .args(["record", "-a", "-F", "499", "-q", "-o"])
        .arg(&data)
        .args(["--", "sleep", &format!("{:.1}", duration.as_secs_f64())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    Some(Recording { child, data })
}

/// Waits for the recording and reads the top `top` symbols of each process in
/// `processes` (name, filter) — a filter is `--pid=N` or `--comm=NAME`.
pub(crate) fn finish(
    mut recording: Recording,
    label: &str,
    processes: &[(String, String)],
    top: usize,
) -> Option<Profile> {
    recording.child.wait().ok()?;
    let mut out = Vec::new();
    for (name, filter) in processes {
        let lines = top_of(&recording.data, filter, top);
        if !lines.is_empty() {
            out.push((name.clone(), lines));
        }
    }
    std::fs::remove_file(&recording.data).ok();
    Some(Profile { label: label.to_owned(), processes: out })
}

/// For one process: the share of its samples spent in the kernel (syscalls,
/// loopback TCP, scheduling), then its `top` hottest symbols.
fn top_of(data: &Path, filter: &str, top: usize) -> Vec<String> {
    let Ok(report) = Command::new("perf")
        .args(["report", "--stdio", "--no-children", "--percentage", "relative", "-q", "--sort", "sym"])
        .arg("-i")
        .arg(data)
        .arg(filter)
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    let symbols: Vec<(f64, String)> = String::from_utf8_lossy(&report.stdout)
        .lines()
        .filter_map(|line| {
            let (share, rest) = line.trim().split_once('%')?;
            // "[.] symbol" (user space) or "[k] symbol" (kernel)
            Some((share.trim().parse().ok()?, rest.trim().to_owned()))
        })
        .collect();
    if symbols.is_empty() {
        return Vec::new();
    }
    let kernel: f64 = symbols.iter().filter(|(_, s)| s.starts_with("[k]")).map(|(share, _)| share).sum();
    let mut lines = vec![format!("{kernel:.0}% in the kernel")];
    lines.extend(symbols.iter().take(top).map(|(share, symbol)| format!("{share:.1}% {}", shorten(symbol))));
    lines
}

/// Whether `perf record` works here (installed, and allowed to sample).
pub(crate) fn available(dir: &Path) -> bool {
    let data = dir.join("probe.perf");
    let ok = Command::new("perf")
        .args(["record", "-a", "-q", "-o"])
        .arg(&data)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    std::fs::remove_file(&data).ok();
    ok
}

/// Long generic Rust paths cut to something a table can hold.
fn shorten(symbol: &str) -> String {
    const MAX: usize = 110;
    let symbol = symbol.replace('|', "\\|");
    if symbol.chars().count() <= MAX {
        return symbol;
    }
    let cut: String = symbol.chars().take(MAX).collect();
    format!("{cut}…")
}
