//! Starting the real binary and calling it with grpcurl.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// `fluxo` with a clean environment rooted in `data_dir`.
pub(crate) fn fluxo_command(data_dir: &Path, env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fluxo"));
    command
        .current_dir(data_dir)
        .env_remove("RUST_LOG")
        .env("FLUXO_DATA_DIR", data_dir.join("data"))
        .env("FLUXO_GRPC__LISTEN", "127.0.0.1:0")
        .env("FLUXO_GATEWAY__LISTEN", "127.0.0.1:0")
        .env("FLUXO_LOG__FORMAT", "json")
        .stdin(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

/// Polls for the JSON `fluxo serve --ready-file` writes once it serves,
/// failing with what the process printed if it exits or `within` passes first.
/// Lines read from `stderr` while waiting are kept in the failure message only.
pub(crate) fn wait_for_ready_file(
    path: &Path,
    child: &mut Child,
    stderr: &mpsc::Receiver<String>,
    within: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return serde_json::from_str(&text).unwrap_or_else(|e| panic!("ready file {text:?}: {e}"));
        }
        seen.extend(stderr.try_iter());
        if let Some(status) = child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(100));
            seen.extend(stderr.try_iter());
            panic!("fluxo exited ({status}) before it was ready; stderr:\n{}", seen.join("\n"));
        }
        assert!(Instant::now() < deadline, "fluxo not ready within {within:?}; stderr:\n{}", seen.join("\n"));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `fluxo serve`.
pub(crate) struct Fluxo {
    child: Option<Child>,
    pub(crate) addr: String,
    /// `host:port` of the REST gateway, when this process runs one.
    pub(crate) rest: Option<String>,
    /// The development token the banner printed, if any.
    pub(crate) token: Option<String>,
    stderr: mpsc::Receiver<String>,
}

impl Fluxo {
    /// Starts `fluxo serve` and waits for its ready file.
    pub(crate) fn start(data_dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_target(data_dir, "all", env)
    }

    /// Starts `fluxo serve --target <target>` and waits until it has written
    /// its ready file (`--ready-file`), which says where it answers.
    pub(crate) fn start_target(data_dir: &Path, target: &str, env: &[(&str, &str)]) -> Self {
        let ready_file = data_dir.join(format!("ready-{target}-{}.json", ulid::Ulid::new()));
        let mut child = fluxo_command(data_dir, env)
            .args(["serve", "--target", target, "--ready-file"])
            .arg(&ready_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fluxo");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let ready = wait_for_ready_file(&ready_file, &mut child, &rx, Duration::from_secs(20));
        let text = |key: &str| ready[key].as_str().map(str::to_owned);
        let addr = text("grpc").expect("a gRPC address in the ready file");
        Self { child: Some(child), addr, rest: text("rest"), token: text("token"), stderr: rx }
    }

    /// Calls `method` with a JSON request: the JSON response, or grpcurl's error text.
    pub(crate) fn call(
        &self,
        method: &str,
        request: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let out = grpcurl(&self.addr, &[method], Some(&request.to_string()))?;
        Ok(serde_json::from_str(&out).unwrap_or_else(|e| panic!("grpcurl printed non-JSON ({e}): {out}")))
    }

    /// `SERVING` or `NOT_SERVING` for `service` ("" for the whole server).
    pub(crate) fn health(&self, service: &str) -> String {
        let request = serde_json::json!({ "service": service }).to_string();
        match grpcurl(&self.addr, &["grpc.health.v1.Health/Check"], Some(&request)) {
            Ok(out) => serde_json::from_str::<serde_json::Value>(&out).unwrap()["status"]
                .as_str()
                .unwrap()
                .to_owned(),
            Err(error) => format!("unreachable: {error}"),
        }
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    pub(crate) fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let status = Command::new("kill").args([&format!("-{signal}"), &pid]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit on its own.
    pub(crate) fn wait(mut self, within: Duration) -> Output {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + within;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                child.kill().ok();
                panic!("fluxo did not exit within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut output = child.wait_with_output().unwrap();
        output.stderr = self.stderr.try_iter().collect::<Vec<_>>().join("\n").into_bytes();
        output
    }

    /// SIGTERM, then waits for a clean exit.
    pub(crate) fn stop(self) -> Output {
        self.signal("TERM");
        self.wait(Duration::from_secs(15))
    }
}

impl Drop for Fluxo {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// Runs grpcurl (installed by scripts/test.sh) with reflection only.
pub(crate) fn grpcurl(addr: &str, args: &[&str], data: Option<&str>) -> Result<String, String> {
    let mut all = vec![addr];
    all.extend_from_slice(args);
    grpcurl_args(&all, data)
}

/// Runs grpcurl with `args` as given (flags such as `-H` first, then the
/// address and the method).
pub(crate) fn grpcurl_args(args: &[&str], data: Option<&str>) -> Result<String, String> {
    let bin = std::env::var("FLUXO_TEST_GRPCURL").unwrap_or_else(|_| {
        panic!("FLUXO_TEST_GRPCURL is not set: run the suite with ./scripts/test.sh, which installs grpcurl")
    });
    let mut command = Command::new(bin);
    command.args(["-plaintext", "-max-time", "10"]);
    if let Some(data) = data {
        command.args(["-d", data]);
    }
    command.args(args);
    let output = command.output().expect("run grpcurl");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}
