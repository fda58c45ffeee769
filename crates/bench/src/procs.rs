//! Processes under test: `fluxo serve --target …` (and the bare tonic server,
//! which is this binary again), started on loopback ports, timed from spawn
//! to gRPC health SERVING, measured for RSS, and always stopped.

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStderr, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A running server process.
#[derive(Debug)]
pub(crate) struct Proc {
    pub(crate) name: String,
    child: Option<Child>,
    /// `127.0.0.1:port` of its gRPC server.
    pub(crate) grpc: String,
    /// `127.0.0.1:port` of its REST gateway, if any.
    pub(crate) rest: Option<String>,
    /// From spawn to gRPC health SERVING.
    pub(crate) ready_after: Duration,
}

impl Proc {
    /// Spawns `command`, reads its ready banner and waits for health SERVING.
    ///
    /// Its log (stdout) is dropped, or appended to `<dir>/<name>.log` when
    /// `FLUXO_BENCH_LOGS=<dir>` is set — to look into a run after the fact.
    pub(crate) async fn start(name: &str, mut command: Command) -> anyhow::Result<Self> {
        let log_file = log_file(name)?;
        // stderr (start-up banner, panics) goes to the same file.
        let stderr_copy = log_file.as_ref().map(std::fs::File::try_clone).transpose()?;
        let log = log_file.map_or_else(Stdio::null, Stdio::from);
        let spawned = Instant::now();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stderr = child.stderr.take().context("stderr pipe")?;
        let lines = drain(stderr, stderr_copy);
        let mut proc = Self {
            name: name.to_owned(),
            child: Some(child),
            grpc: String::new(),
            rest: None,
            ready_after: Duration::ZERO,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        proc.read_banner(&lines, deadline)?;
        // Past the banner nobody reads the channel; the thread keeps draining the
        // pipe (into the log file, if any) so the process never blocks on stderr.
        drop(lines);
        proc.wait_serving(deadline).await?;
        proc.ready_after = spawned.elapsed();
        Ok(proc)
    }

    /// Reads stderr's lines up to the `gRPC <addr>` line (and a `REST <url>`
    /// line before it, if any), failing if the process exits or `deadline` passes first.
    fn read_banner(&mut self, lines: &mpsc::Receiver<String>, deadline: Instant) -> anyhow::Result<()> {
        let name = &self.name;
        let mut seen = Vec::new();
        loop {
            let line = match lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if Instant::now() > deadline {
                        bail!("{name}: no ready banner within 30 s; stderr:\n{}", seen.join("\n"));
                    }
                    if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                        bail!("{name} exited ({status}) before it was ready; stderr:\n{}", seen.join("\n"));
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("{name} closed stderr before it was ready; stderr:\n{}", seen.join("\n"))
                }
            };
            let trimmed = line.trim();
            if let Some(url) = trimmed.strip_prefix("REST") {
                self.rest = url.split_whitespace().next().map(|u| u.trim_start_matches("http://").to_owned());
            }
            if let Some(addr) = trimmed.strip_prefix("gRPC") {
                self.grpc = addr.split_whitespace().next().context("gRPC address")?.to_owned();
                return Ok(());
            }
            seen.push(line);
        }
    }

    /// Polls gRPC health on the banner's address until it reports SERVING.
    async fn wait_serving(&self, deadline: Instant) -> anyhow::Result<()> {
        let mut health = None;
        loop {
            if Instant::now() > deadline {
                bail!("{} did not report SERVING within 30 s", self.name);
            }
            if health.is_none() {
                health = tonic::transport::Channel::from_shared(format!("http://{}", self.grpc))?
                    .connect()
                    .await
                    .ok()
                    .map(HealthClient::new);
            }
            if let Some(client) = health.as_mut()
                && let Ok(reply) = client.check(HealthCheckRequest { service: String::new() }).await
                && reply.into_inner().status == ServingStatus::Serving as i32
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// Resident set size in bytes (VmRSS of /proc/<pid>/status).
    pub(crate) fn rss(&self) -> Option<u64> {
        rss_of(self.pid())
    }

    /// SIGTERM, then SIGKILL if it has not exited within `within`.
    pub(crate) fn stop(mut self, within: Duration) {
        self.stop_inner(within);
    }

    fn stop_inner(&mut self, within: Duration) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("fluxo-bench: {} did not stop within {within:?}; killing it", self.name);
        child.kill().ok();
        child.wait().ok();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// `<dir>/<name>.log` opened for appending when `FLUXO_BENCH_LOGS=<dir>` is set.
pub(crate) fn log_file(name: &str) -> anyhow::Result<Option<std::fs::File>> {
    let Some(dir) = std::env::var_os("FLUXO_BENCH_LOGS") else { return Ok(None) };
    let path = PathBuf::from(dir).join(format!("{name}.log"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok(Some(file))
}

/// Keeps draining `stderr` on a thread of its own so the process never
/// blocks on a full pipe, copying each line to `copy` (if any) and sending it
/// to the receiver while there is one.
fn drain(stderr: ChildStderr, mut copy: Option<std::fs::File>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(file) = copy.as_mut() {
                let _ = writeln!(file, "{line}");
            }
            let _ = tx.send(line);
        }
    });
    rx
}

/// Resident set size in bytes of any process (VmRSS of /proc/<pid>/status).
pub(crate) fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// How to start fluxo processes of one installation.
#[derive(Debug, Clone)]
pub(crate) struct Fluxo {
    pub(crate) bin: PathBuf,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) data_dir: PathBuf,
}

impl Fluxo {
    pub(crate) fn command(&self, extra: &[(String, String)]) -> Command {
        let mut command = Command::new(&self.bin);
        command.current_dir(&self.data_dir).env_remove("RUST_LOG");
        for (key, _) in std::env::vars() {
            if key.starts_with("OTEL_") || key.starts_with("FLUXO_") {
                command.env_remove(key);
            }
        }
        command
            .env("FLUXO_DATA_DIR", self.data_dir.join("data"))
            .env("FLUXO_GRPC__LISTEN", "127.0.0.1:0")
            .env("FLUXO_GATEWAY__LISTEN", "127.0.0.1:0")
            .env("FLUXO_LOG__FORMAT", "json")
            .env("FLUXO_LOG__LEVEL", "warn");
        for (var, value) in overrides() {
            command.env(var, value);
        }
        for (k, v) in self.env.iter().chain(extra) {
            command.env(k, v);
        }
        command
    }

    pub(crate) async fn serve(&self, target: &str, extra: &[(String, String)]) -> anyhow::Result<Proc> {
        let mut command = self.command(extra);
        command.args(["serve", "--target", target]);
        Proc::start(target, command).await
    }

    /// Runs a fluxo command to completion.
    pub(crate) fn run(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = self.command(&[]).args(args).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("fluxo {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

/// Machine description for the report.
pub(crate) fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_owned(), |(_, v)| v.trim().to_owned());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    format!("{cores} cores, {:.1} GiB memory, {model}", mem_kb as f64 / 1024.0 / 1024.0)
}

/// The variables set for every fluxo process of the run with
/// `FLUXO_BENCH_SET_<VAR>=<value>` (say FLUXO_BENCH_SET_FLUXO_LEDGER__WRITERS=8
/// to try a setting), sorted by name.
pub(crate) fn overrides() -> Vec<(String, String)> {
    let mut set: Vec<(String, String)> = std::env::vars()
        .filter_map(|(key, value)| key.strip_prefix("FLUXO_BENCH_SET_").map(|var| (var.to_owned(), value)))
        .collect();
    set.sort();
    set
}
