//! A webhook receiver for tests: `receiver.py` (HTTPS with the suite's
//! certificate, every delivery checked by the Standard Webhooks reference
//! library), started as a process, its reports read line by line.
//!
//! `scripts/test.sh` installs the library and makes the certificates; it
//! sets `FLUXO_TEST_STANDARDWEBHOOKS_PYTHON`, `FLUXO_TEST_TLS_CERT` and
//! `FLUXO_TEST_TLS_KEY`.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

/// The variable's value, or a panic saying how to get it.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the suite with ./scripts/test.sh"))
}

/// A receiver process, its port and the deliveries it reports.
#[derive(Debug)]
pub struct Receiver {
    child: Child,
    /// Where it listens (127.0.0.1).
    pub port: u16,
    seen: mpsc::Receiver<serde_json::Value>,
}

impl Receiver {
    /// Starts a receiver verifying with `secret` (or `@FILE`, read at each
    /// delivery) and answering by `script` (or `@FILE`); see `receiver.py`.
    pub fn start(secret: &str, script: &str) -> Self {
        Self::spawn(secret, script, None)
    }

    /// Like [`Receiver::start`], closing a connection idle for `idle` and
    /// reporting it as `{"closed": conn}`.
    pub fn start_closing_idle(secret: &str, script: &str, idle: Duration) -> Self {
        Self::spawn(secret, script, Some(idle))
    }

    fn spawn(secret: &str, script: &str, idle: Option<Duration>) -> Self {
        let mut command = Command::new(env("FLUXO_TEST_STANDARDWEBHOOKS_PYTHON"));
        if let Some(idle) = idle {
            command.env("FLUXO_TEST_RECEIVER_IDLE_SECS", idle.as_secs_f64().to_string());
        }
        let mut child = command
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/receiver.py"))
            .args([
                secret.to_owned(),
                env("FLUXO_TEST_TLS_CERT"),
                env("FLUXO_TEST_TLS_KEY"),
                script.to_owned(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the receiver");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let first = lines.next().expect("the receiver's port").expect("a line");
        let port = first.strip_prefix("port ").expect("`port N` first").parse().expect("a port");
        let (tx, seen) = mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let _ = tx.send(serde_json::from_str(&line).expect("a JSON line"));
            }
        });
        Self { child, port, seen }
    }

    /// Its URL at `host` with `path_and_query`.
    pub fn url(&self, host: &str, path_and_query: &str) -> String {
        format!("https://{host}:{}{path_and_query}", self.port)
    }

    /// The next delivery it received, within 30 s.
    pub fn next(&self) -> serde_json::Value {
        self.next_within(Duration::from_secs(30)).expect("a delivery reached the receiver")
    }

    /// The next delivery it received within `wait`, if one did.
    pub fn next_within(&self, wait: Duration) -> Option<serde_json::Value> {
        self.seen.recv_timeout(wait).ok()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
