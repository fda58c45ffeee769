//! The machine's ceilings, measured first with the same client and callers
//! as the scenarios: a bare tonic server, single-row INSERTs, pgbench's
//! runs of fluxo's write shapes, XADD and XREADGROUP+XACK.

use fred::prelude::{KeysInterface, StreamsInterface};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DbBackend, Statement};
use tokio::time::Instant;

use super::{
    MERCHANTS, WARM_DATE,
    bench::Bench,
    calls::{self, BalanceClients, balance_op},
};
use crate::{
    ghz::GhzStats,
    load::{self, Stats},
    pgbench::PgbenchStats,
    procs::Proc,
};

/// Messages a consumer reads with one XREADGROUP: a consolidator's default batch.
const BATCH: u64 = 500;

/// The bare tonic server, kept running until the balance phases have been
/// compared with it.
#[derive(Debug)]
pub(super) struct BareTonic {
    pub(super) proc: Proc,
    pub(super) clients: BalanceClients,
    /// GetDailyBalance at the run's concurrency.
    pub(super) max: Stats,
    /// The same through ghz, when ghz is installed.
    pub(super) ghz: Option<GhzStats>,
}

/// GetDailyBalance against a server that answers at once: what a tonic
/// server and this client can do here.
pub(super) async fn bare_tonic(b: &mut Bench) -> anyhow::Result<BareTonic> {
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command.arg("bare-server");
    let proc = Proc::start("bare-tonic", command).await?;
    b.track(&proc);
    let clients = calls::balance(&proc.grpc, b.args.connections).await?;
    let max = b.measure("ceiling: bare tonic", b.closed(), balance_op(clients.clone())).await;
    let ghz = ghz_reads(b, &proc.grpc, "ceiling: bare tonic")?;
    Ok(BareTonic { proc, clients, max, ghz })
}

/// Single-row INSERT transactions with the same callers, on a pool as large as fluxo's.
pub(super) async fn single_row_insert(b: &mut Bench) -> anyhow::Result<Stats> {
    b.db.execute_unprepared(
        "CREATE TABLE bench_insert (id BIGSERIAL PRIMARY KEY, merchant_id VARCHAR(64) NOT NULL, \
         request_id VARCHAR(128) NOT NULL UNIQUE, amount BIGINT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await?;
    let mut opts = ConnectOptions::new(b.db_url.clone());
    opts.max_connections(16).min_connections(16).sqlx_logging(false);
    let pool = Database::connect(opts).await?;
    let insert = {
        let pool = pool.clone();
        move |i: u64| {
            let pool = pool.clone();
            async move {
                let st = Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "INSERT INTO bench_insert (merchant_id, request_id, amount) VALUES ($1, $2, $3)",
                    [format!("m-{}", i % MERCHANTS).into(), format!("k-{i}").into(), (i as i64).into()],
                );
                load::outcome(pool.execute_raw(st).await)
            }
        }
    };
    let stats = b.measure("ceiling: single-row INSERT", b.closed(), insert).await;
    pool.close().await.ok();
    Ok(stats)
}

/// pgbench's figures on the benchmark's database.
#[derive(Debug, Clone, Copy)]
pub(super) struct PgYardstick {
    /// One-row INSERT transactions, 16 clients.
    pub(super) one_row: PgbenchStats,
    /// fluxo's rows for one entry, a transaction each, 16 clients.
    pub(super) entry: PgbenchStats,
    /// One-row INSERT, one client: a durable round trip.
    pub(super) round_trip: PgbenchStats,
}

/// PostgreSQL's own ceilings for fluxo's write shapes (pgbench, 16 clients as
/// many as fluxo's pool; and one client for the round trip). `None` without pgbench.
pub(super) async fn pgbench(b: &mut Bench) -> anyhow::Result<Option<PgYardstick>> {
    let Some(bin) = crate::pgbench::binary() else {
        eprintln!(
            "fluxo-bench: warning: no pgbench (FLUXO_TEST_PG_BINDIR); skipping PostgreSQL's own ceilings"
        );
        return Ok(None);
    };
    b.db.execute_unprepared(crate::pgbench::SETUP).await?;
    let mut run = |label: &str, script: &str, clients: usize| -> anyhow::Result<PgbenchStats> {
        eprintln!("==> pgbench: {label}");
        let s = crate::pgbench::run(&bin, &b.db_url, script, clients, b.duration)?;
        b.report
            .fact(&format!("pgbench: {label}"), format!("{:.0} tx/s, latency {:.2} ms", s.tps, s.latency_ms));
        Ok(s)
    };
    let one_row = run("one-row INSERT, 16 clients", crate::pgbench::ONE_ROW, 16)?;
    let entry = run(
        "fluxo's entry (key + entry + outbox + totals), a transaction each, 16 clients",
        crate::pgbench::ENTRY,
        16,
    )?;
    let round_trip = run("one-row INSERT, 1 client", crate::pgbench::ONE_ROW, 1)?;
    Ok(Some(PgYardstick { one_row, entry, round_trip }))
}

/// XADD with the run's callers (the relay's shape), then one consumer
/// draining what it wrote with XREADGROUP+XACK in batches (the
/// consolidator's). Returns the drain rate, messages/s: the backlog drain's
/// yardstick.
pub(super) async fn redis(b: &mut Bench) -> anyhow::Result<f64> {
    let stream = format!("fluxo:bench-ceiling:{}", b.run_id);
    let xadd = {
        let (redis, s, payload) = (b.redis.clone(), stream.clone(), "x".repeat(220));
        move |i: u64| {
            let (redis, s, payload) = (redis.clone(), s.clone(), payload.clone());
            async move {
                let r: Result<String, _> =
                    redis.xadd(&s, false, None, "*", vec![("event", payload), ("i", i.to_string())]).await;
                load::outcome(r)
            }
        }
    };
    let xadd_max = b.measure("ceiling: Redis XADD", b.closed(), xadd).await;
    let _: () = b.redis.xgroup_create(&stream, "g", "0", true).await?;
    eprintln!("==> ceiling: XREADGROUP+XACK (one consumer, batches of {BATCH})");
    let before = b.cpu_snapshot();
    let read_start = Instant::now();
    let read_n = read_all(b, &stream).await?;
    let read_secs = read_start.elapsed().as_secs_f64();
    let read_msgs = read_n as f64 / read_secs.max(1e-6);
    let read_cpu = b.cpu_since(&before);
    b.report.fact(
        "Redis ceilings",
        format!(
            "XADD {:.0}/s ({} callers, one multiplexed connection); XREADGROUP+XACK {read_msgs:.0} messages/s ({read_n} messages in {read_secs:.2} s, one consumer, batches of {BATCH}; CPU {read_cpu})",
            xadd_max.throughput(),
            b.args.concurrency
        ),
    );
    let _: () = b.redis.del(&stream).await?;
    Ok(read_msgs)
}

/// Reads and acknowledges `stream` as consumer `c` of group `g` until nothing
/// new is left; how many messages it read.
async fn read_all(b: &Bench, stream: &str) -> anyhow::Result<u64> {
    let mut read_n = 0u64;
    loop {
        // Nil once the stream has nothing new.
        let reply: fred::types::Value =
            b.redis.xreadgroup("g", "c", Some(BATCH), None, false, stream, ">").await?;
        let ids = message_ids(reply);
        if ids.is_empty() {
            return Ok(read_n);
        }
        read_n += ids.len() as u64;
        let _: i64 = b.redis.xack(stream, "g", ids).await?;
    }
}

/// The message ids of an XREADGROUP reply (RESP2 arrays or RESP3 maps).
fn message_ids(reply: fred::types::Value) -> Vec<String> {
    use fred::types::Value;
    let streams: Vec<Value> = match reply {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(map) => map.inner().into_values().collect(),
        _ => Vec::new(),
    };
    let mut ids = Vec::new();
    for messages in streams {
        if let Value::Array(messages) = messages {
            for m in messages {
                if let Value::Array(m) = m
                    && let Some(id) = m.first().and_then(Value::as_string)
                {
                    ids.push(id);
                }
            }
        }
    }
    ids
}

/// GetDailyBalance through ghz with the run's callers and connections, on
/// the bare server or on fluxo's balance target. `None` without ghz.
pub(super) fn ghz_reads(b: &mut Bench, addr: &str, what: &str) -> anyhow::Result<Option<GhzStats>> {
    let Some(ghz) = crate::ghz::binary() else { return Ok(None) };
    eprintln!("==> {what} through ghz");
    let data = format!(r#"{{"merchantId":"w-1","date":"{WARM_DATE}","currencyCode":"BRL"}}"#);
    let call = "fluxo.balance.v1.BalanceService/GetDailyBalance";
    let s = crate::ghz::run(&ghz, addr, call, &data, b.args.concurrency, b.args.connections, b.duration)?;
    b.report.fact(
        &format!("{what}, GetDailyBalance through ghz ({} callers)", b.args.concurrency),
        format!("{:.0}/s, p50 {:.2} ms, p99 {:.2} ms", s.rps, s.p50_ms, s.p99_ms),
    );
    Ok(Some(s))
}
