//! `fluxo doctor`: checks a live installation of the chart and says what is
//! wrong and how to fix it.
//!
//! It reads the release's objects from the Kubernetes API (a kubeconfig, or
//! the pod's ServiceAccount), and — when it is given fluxo's own settings
//! (`FLUXO_DATABASE__URL`, `FLUXO_REDIS__URL`, as the pods have them) — the
//! schema and the consumer group too, so that KEDA's view of the lag can be
//! held against fluxo's. Each check passes, fails (with the fix) or is skipped
//! (with why); any failure makes the exit status non-zero.
//!
//! The report goes to stdout (text, or JSON with `--output json`); the
//! progress line to stderr.

#![allow(clippy::print_stdout)]

mod checks;
mod cluster;

use std::{io::IsTerminal, path::PathBuf, time::Duration};

use serde::Serialize;

use crate::config::Config;

/// What `fluxo doctor` checks, and where.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Namespace of the installation.
    #[arg(long, short = 'n', default_value = "default", env = "FLUXO_DOCTOR_NAMESPACE")]
    pub namespace: String,
    /// Helm release name of the installation.
    #[arg(long, short = 'r', default_value = "fluxo", env = "FLUXO_DOCTOR_RELEASE")]
    pub release: String,
    /// Kubeconfig file. Unset: $KUBECONFIG, ~/.kube/config, then the pod's ServiceAccount.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context. Unset: the current one.
    #[arg(long)]
    pub context: Option<String>,
    /// Report format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// How long each read may take, in seconds.
    #[arg(long, default_value_t = 15)]
    pub timeout_secs: u64,
}

/// Report formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A line per check, with the details and the fix of what failed.
    Text,
    /// One JSON document: `{"release", "namespace", "healthy", "checks": [...]}`.
    Json,
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Healthy.
    Passed,
    /// Broken: see the fix.
    Failed,
    /// Not applicable here, or not checkable with what doctor was given.
    Skipped,
}

/// One check's report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable identifier (`deployments`, `scaledobject`, …).
    pub id: &'static str,
    /// Outcome.
    pub status: Status,
    /// One line: what was found.
    pub summary: String,
    /// What was looked at, one finding per line.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
    /// What to do about a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn passed(id: &'static str, summary: impl Into<String>) -> Self {
        Self { id, status: Status::Passed, summary: summary.into(), details: Vec::new(), fix: None }
    }

    fn failed(id: &'static str, summary: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            id,
            status: Status::Failed,
            summary: summary.into(),
            details: Vec::new(),
            fix: Some(fix.into()),
        }
    }

    fn skipped(id: &'static str, why: impl Into<String>) -> Self {
        Self { id, status: Status::Skipped, summary: why.into(), details: Vec::new(), fix: None }
    }

    fn details(mut self, details: Vec<String>) -> Self {
        self.details = details;
        self
    }
}

/// The whole report.
#[derive(Debug, Serialize)]
struct Report<'a> {
    release: &'a str,
    namespace: &'a str,
    healthy: bool,
    checks: &'a [Check],
}

/// A line on stderr saying what is being read, rewritten in place on a terminal.
#[derive(Debug)]
pub(crate) struct Progress {
    tty: bool,
    width: usize,
}

impl Progress {
    fn new() -> Self {
        Self { tty: std::io::stderr().is_terminal(), width: 0 }
    }

    pub(crate) fn step(&mut self, step: usize, steps: usize, what: &str) {
        let line = format!("doctor: reading {what} ({step}/{steps})");
        if self.tty {
            eprint!("\r{line:<width$}", width = self.width);
            self.width = line.len();
        } else {
            eprintln!("{line}");
        }
    }

    fn done(&mut self) {
        if self.tty && self.width > 0 {
            eprint!("\r{:width$}\r", "", width = self.width);
        }
    }
}

/// `fluxo doctor`: prints the report; an error when a check failed.
pub async fn doctor(config: &Config, args: &DoctorArgs) -> anyhow::Result<()> {
    let client = fluxo_kube::client(args.kubeconfig.as_deref(), args.context.as_deref()).await?;
    let mut progress = Progress::new();
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    let state = cluster::gather(client, config, &args.namespace, &args.release, timeout, &mut progress).await;
    progress.done();
    let state = state?;
    let checks = checks::run(&state);
    let healthy = checks.iter().all(|c| c.status != Status::Failed);
    match args.output {
        Output::Json => {
            let report =
                Report { release: &args.release, namespace: &args.namespace, healthy, checks: &checks };
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Output::Text => print_text(&args.release, &args.namespace, &checks),
    }
    let failed = checks.iter().filter(|c| c.status == Status::Failed).count();
    anyhow::ensure!(failed == 0, "doctor: {failed} check(s) failed");
    Ok(())
}

fn print_text(release: &str, namespace: &str, checks: &[Check]) {
    println!("fluxo doctor: release {release} in namespace {namespace}");
    for check in checks {
        let mark = match check.status {
            Status::Passed => "PASS",
            Status::Failed => "FAIL",
            Status::Skipped => "SKIP",
        };
        println!("{mark}  {:<16} {}", check.id, check.summary);
        if check.status == Status::Failed {
            for detail in &check.details {
                println!("        {detail}");
            }
        }
        if let Some(fix) = &check.fix {
            println!("        fix: {fix}");
        }
    }
    let failed = checks.iter().filter(|c| c.status == Status::Failed).count();
    let passed = checks.iter().filter(|c| c.status == Status::Passed).count();
    let skipped = checks.len() - failed - passed;
    println!("{passed} passed, {failed} failed, {skipped} skipped");
}
