//! A pod started while its database is down (an RDS failover, a maintenance window) must not
//! crash-loop: it serves gRPC health at once, NOT_SERVING, and turns SERVING when PostgreSQL
//! answers. The test runs a PostgreSQL of its own from `FLUXO_TEST_PG_BINDIR`, on a port where
//! nothing listens when fluxo starts.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use serde_json::json;

use crate::{
    support::{Fluxo, fluxo_command},
    tls::wait_for_health,
};

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A PostgreSQL server of the test's own (initdb'd, not started until asked).
struct OwnPostgres {
    bindir: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl OwnPostgres {
    fn init() -> Self {
        let bindir = PathBuf::from(std::env::var("FLUXO_TEST_PG_BINDIR").unwrap_or_else(|_| {
            panic!("FLUXO_TEST_PG_BINDIR is not set: run the suite with ./scripts/test.sh")
        }));
        // Under /tmp so that the postgres user (PostgreSQL refuses to run as root) can reach it.
        let dir = tempfile::Builder::new().prefix("fluxo-outage-").tempdir_in("/tmp").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let pg = Self { bindir, dir, port };
        if is_root() {
            let chown = Command::new("chown").arg("-R").arg("postgres:").arg(pg.dir.path()).status().unwrap();
            assert!(chown.success(), "chown the PostgreSQL directory to postgres");
        }
        let initdb = pg
            .tool("initdb")
            .arg("-D")
            .arg(pg.data())
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .output()
            .unwrap();
        assert!(initdb.status.success(), "initdb: {}", String::from_utf8_lossy(&initdb.stderr));
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nfsync = off\n",
            pg.port,
            pg.dir.path().display()
        );
        let mut file =
            std::fs::OpenOptions::new().append(true).open(pg.data().join("postgresql.conf")).unwrap();
        std::io::Write::write_all(&mut file, conf.as_bytes()).unwrap();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn tool(&self, name: &str) -> Command {
        let bin = self.bindir.join(name);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        };
        command.current_dir(self.dir.path());
        command
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn start(&self) {
        let log = self.dir.path().join("postgres.log");
        let started: Output = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "30", "start"])
            .output()
            .unwrap();
        assert!(started.status.success(), "pg_ctl start: {}", read(&log));
    }
}

impl OwnPostgres {
    fn stop(&self) {
        let stopped = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "-s", "stop"])
            .output()
            .unwrap();
        assert!(stopped.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&stopped.stderr));
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ =
            self.tool("pg_ctl").arg("-D").arg(self.data()).args(["-m", "immediate", "-s", "stop"]).output();
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn a_server_started_during_a_database_outage_turns_ready_when_postgres_answers() {
    let pg = OwnPostgres::init();
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let env = [("FLUXO_DATABASE__URL", url.as_str()), ("FLUXO_GRPC__READINESS_INTERVAL_MS", "500")];

    // An installed database (the Helm hook migrated it) ...
    pg.start();
    let migrate = fluxo_command(dir.path(), &env).args(["migrate", "--wait-secs", "30"]).output().unwrap();
    assert!(migrate.status.success(), "migrate: {}", String::from_utf8_lossy(&migrate.stderr));
    // ... goes down (a failover, a maintenance window) ...
    pg.stop();

    // ... and a pod starts meanwhile: nothing listens on the port, yet fluxo binds and answers
    // health (start_target waits for the banner, printed once gRPC is bound; a process that
    // exits fails right there).
    let fluxo = Fluxo::start_target(dir.path(), "ledger", &env);
    assert_eq!(fluxo.health(""), "NOT_SERVING");
    assert_eq!(fluxo.health("liveness"), "SERVING", "the outage must not fail liveness (no restarts)");

    // The database comes back: the same process turns ready and books entries.
    pg.start();
    wait_for_health(&fluxo, "SERVING", Duration::from_secs(60));
    let entry = fluxo
        .call(
            "fluxo.ledger.v1.LedgerService/RecordEntry",
            &json!({"merchantId":"m-outage","type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":"250"},
                    "bookingDate":"2026-11-21","description":"after the outage","requestId":"k-outage-1"}),
        )
        .unwrap();
    assert_eq!(entry["amount"]["minorUnits"], "250");
    let output = fluxo.stop();
    assert!(output.status.success(), "exit status {:?}", output.status);
}
