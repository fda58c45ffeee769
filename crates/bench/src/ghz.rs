//! Runs ghz (grpc-go's load generator, a client fluxo did not write) against a
//! target, so the figures do not depend on fluxo-bench's own tonic client.

use std::{path::Path, process::Command, time::Duration};

use anyhow::Context;

/// What one ghz run measured.
#[derive(Debug, Clone)]
pub(crate) struct GhzStats {
    pub(crate) rps: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) ok: u64,
    /// Calls that failed, by status (ghz cancels the calls still in flight at
    /// its deadline: those count as `Canceled`).
    pub(crate) failed: String,
}

/// The ghz binary (installed by scripts/test.sh), if there is one.
pub(crate) fn binary() -> Option<std::path::PathBuf> {
    std::env::var_os("FLUXO_TEST_GHZ").map(Into::into).filter(|p: &std::path::PathBuf| p.is_file())
}

/// `concurrency` callers over `connections` connections calling `call` with
/// `data` (a ghz template: `{{newUUID}}` makes each request unique) for `duration`.
pub(crate) fn run(
    ghz: &Path,
    addr: &str,
    call: &str,
    data: &str,
    concurrency: usize,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<GhzStats> {
    // The schema from fluxo's own descriptors: the bare tonic server has no reflection.
    let dir = tempfile::tempdir()?;
    let protoset = dir.path().join("fluxo.protoset");
    std::fs::write(&protoset, fluxo_proto::FILE_DESCRIPTOR_SET)?;
    let out = Command::new(ghz)
        .args(["--insecure", "--call", call, "-d", data, "--format", "json", "--protoset"])
        .arg(&protoset)
        .args(["-c", &concurrency.to_string(), "--connections", &connections.to_string()])
        .args(["-z", &format!("{}ms", duration.as_millis())])
        // ghz's default of 200 requests would end the run before the duration.
        .args(["-n", "100000000"])
        .arg(addr)
        .output()
        .context("running ghz")?;
    anyhow::ensure!(out.status.success(), "ghz failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("ghz's JSON report")?;
    let quantile = |q: u64| {
        report["latencyDistribution"]
            .as_array()
            .and_then(|d| d.iter().find(|p| p["percentage"].as_u64() == Some(q)))
            .and_then(|p| p["latency"].as_f64())
            .map_or(0.0, |ns| ns / 1e6)
    };
    let codes = report["statusCodeDistribution"].as_object().cloned().unwrap_or_default();
    let count = |pred: &dyn Fn(&str) -> bool| {
        codes.iter().filter(|(k, _)| pred(k)).map(|(_, v)| v.as_u64().unwrap_or(0)).sum::<u64>()
    };
    Ok(GhzStats {
        rps: report["rps"].as_f64().unwrap_or(0.0),
        p50_ms: quantile(50),
        p99_ms: quantile(99),
        ok: count(&|k| k == "OK"),
        failed: codes
            .iter()
            .filter(|(k, _)| *k != "OK")
            .map(|(k, v)| format!("{k} {}", v.as_u64().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", "),
    })
}
