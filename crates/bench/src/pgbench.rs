//! PostgreSQL's own yardstick: pgbench, PostgreSQL's load generator, running
//! scripts of fluxo's write shapes against the benchmark's database, so the
//! ceiling is the database's, not that of fluxo-bench's client.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::Context;

/// Tables the scripts write, shaped like fluxo's (keys, entries, outbox, totals).
pub(crate) const SETUP: &str = "
CREATE TABLE pgb_one (request_id TEXT PRIMARY KEY, merchant_id TEXT NOT NULL, amount BIGINT NOT NULL,
                      created_at TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE TABLE pgb_keys (LIKE ledger_idempotency_keys INCLUDING ALL);
CREATE TABLE pgb_entries (LIKE ledger_entries INCLUDING ALL);
CREATE TABLE pgb_outbox (LIKE ledger_outbox INCLUDING ALL);
CREATE TABLE pgb_totals (LIKE ledger_totals INCLUDING ALL);
";

/// One row per transaction: a unique text key, as in the single-row INSERT ceiling.
pub(crate) const ONE_ROW: &str = "\
\\set m random(1, 1000)
INSERT INTO pgb_one (request_id, merchant_id, amount) VALUES (gen_random_uuid()::text, 'm-' || :m, 100);
";

/// One entry booked the way fluxo books it, a transaction per entry: its
/// idempotency key, the entry, its outbox event (a payload of fluxo's size)
/// and its merchant's totals.
pub(crate) const ENTRY: &str = "\
\\set m random(1, 1000)
BEGIN;
INSERT INTO pgb_keys (merchant_id, request_id, fingerprint, entry_id, created_at)
  VALUES ('m-' || :m, gen_random_uuid()::text, repeat('f', 64), substr(md5(random()::text), 1, 26), now());
INSERT INTO pgb_entries (id, merchant_id, kind, currency_code, amount_minor, booking_date, description, request_id, created_at)
  VALUES (substr(md5(random()::text), 1, 26), 'm-' || :m, 'CREDIT', 'BRL', 100, '2026-11-02', '', gen_random_uuid()::text, now());
INSERT INTO pgb_outbox (event_id, entry_id, merchant_id, payload, created_at)
  VALUES (substr(md5(random()::text), 1, 26), substr(md5(random()::text), 1, 26), 'm-' || :m, decode(repeat('ab', 110), 'hex'), now());
INSERT INTO pgb_totals (merchant_id, currency_code, credits_minor, debits_minor) VALUES ('m-' || :m, 'BRL', 100, 0)
  ON CONFLICT (merchant_id, currency_code) DO UPDATE SET credits_minor = pgb_totals.credits_minor + excluded.credits_minor;
COMMIT;
";

/// What one pgbench run measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PgbenchStats {
    pub(crate) tps: f64,
    pub(crate) latency_ms: f64,
}

/// pgbench from the PostgreSQL the tests run (FLUXO_TEST_PG_BINDIR), if any.
pub(crate) fn binary() -> Option<PathBuf> {
    let dir = std::env::var_os("FLUXO_TEST_PG_BINDIR")?;
    Some(PathBuf::from(dir).join("pgbench")).filter(|p| p.is_file())
}

/// Runs `script` with `clients` connections (prepared statements, no vacuum)
/// for `duration`, rounded up to whole seconds.
pub(crate) fn run(
    bin: &std::path::Path,
    db_url: &str,
    script: &str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<PgbenchStats> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("script.sql");
    std::fs::write(&file, script)?;
    let secs = duration.as_secs().max(1) + u64::from(duration.subsec_nanos() > 0);
    let out = Command::new(bin)
        .args(["-n", "-M", "prepared", "-c", &clients.to_string(), "-j", &clients.min(2).to_string()])
        .args(["-T", &secs.to_string(), "-f"])
        .arg(&file)
        .arg(db_url)
        .output()
        .context("running pgbench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "pgbench failed: {}{text}", String::from_utf8_lossy(&out.stderr));
    let number = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
    };
    Ok(PgbenchStats {
        tps: number("tps = ").context("pgbench printed no tps")?,
        latency_ms: number("latency average = ").context("pgbench printed no latency")?,
    })
}
