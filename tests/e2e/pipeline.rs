//! The asynchronous pipeline as it runs in production: a ledger process with
//! its outbox relay, consolidator processes in a consumer group, and a balance
//! process, over a real PostgreSQL and a real Redis — killed, stopped and
//! restarted while entries pour in. Every test ends by checking that each
//! daily balance equals the ledger's sums exactly.

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fluxo_proto::{
    balance_v1::{self as bpb, balance_service_client::BalanceServiceClient},
    ledger_v1::{self as lpb, ledger_service_client::LedgerServiceClient},
};
use fluxo_testing::{Backend, TestDb};
use tonic::transport::Channel;

use crate::support::{Fluxo, fluxo_command};

/// A Redis server of the test's own, so it can be stopped and wiped.
pub(crate) struct OwnRedis {
    child: Option<Child>,
    pub(crate) port: u16,
    dir: tempfile::TempDir,
}

impl OwnRedis {
    pub(crate) fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut redis = Self { child: None, port, dir: tempfile::tempdir().unwrap() };
        redis.restart(true);
        redis
    }

    /// (Re)starts on the same port; `keep_data` keeps what the last run persisted.
    pub(crate) fn restart(&mut self, keep_data: bool) {
        if !keep_data {
            for f in std::fs::read_dir(self.dir.path()).unwrap() {
                let f = f.unwrap().path();
                if f.is_dir() {
                    std::fs::remove_dir_all(f).unwrap()
                } else {
                    std::fs::remove_file(f).unwrap()
                }
            }
        }
        let bin = std::env::var("FLUXO_TEST_REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(bin)
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "yes",
            ])
            .arg("--appendfsync")
            .arg("always")
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (run the suite with ./scripts/test.sh)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            child.wait().ok();
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// Environment shared by every process of one test installation.
pub(crate) struct Install {
    pub(crate) db: TestDb,
    pub(crate) redis_url: String,
    pub(crate) stream: String,
    pub(crate) dir: tempfile::TempDir,
}

impl Install {
    pub(crate) async fn new(redis_url: String) -> Self {
        let db = TestDb::new(Backend::Postgres).await;
        let stream = format!("fluxo:test:{}", ulid_like());
        let install = Self { db, redis_url, stream, dir: tempfile::tempdir().unwrap() };
        let migrate = install.run(&["migrate"]);
        assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));
        install
    }

    pub(crate) fn env(&self) -> Vec<(String, String)> {
        vec![
            ("FLUXO_DATABASE__URL".into(), self.db.url.clone()),
            ("FLUXO_REDIS__URL".into(), self.redis_url.clone()),
            ("FLUXO_CONSOLIDATOR__STREAM".into(), self.stream.clone()),
            // Tests share one Redis: each installation keeps its cache apart.
            ("FLUXO_BALANCE__CACHE_PREFIX".into(), format!("{}:balance", self.stream)),
            ("FLUXO_CONSOLIDATOR__CLAIM_IDLE_MS".into(), "1500".into()),
            ("FLUXO_CONSOLIDATOR__MAX_DELIVERIES".into(), "3".into()),
            ("FLUXO_CONSOLIDATOR__TRIM_INTERVAL_MS".into(), "1000".into()),
            ("FLUXO_CONSOLIDATOR__BLOCK_MS".into(), "200".into()),
            ("FLUXO_GRPC__SHUTDOWN_TIMEOUT_MS".into(), "5000".into()),
            ("FLUXO_LOG__LEVEL".into(), "warn".into()),
        ]
    }

    pub(crate) fn start(&self, target: &str, extra: &[(&str, &str)]) -> Fluxo {
        let env = self.env();
        let mut refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        refs.extend_from_slice(extra);
        Fluxo::start_target(self.dir.path(), target, &refs)
    }

    /// Runs a fluxo command (dlq, balances …) to completion.
    pub(crate) fn run(&self, args: &[&str]) -> std::process::Output {
        let env = self.env();
        let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        fluxo_command(self.dir.path(), &refs).args(args).output().unwrap()
    }
}

fn ulid_like() -> String {
    ulid::Ulid::new().to_string()
}

pub(crate) async fn ledger_client(addr: &str) -> LedgerServiceClient<Channel> {
    LedgerServiceClient::connect(format!("http://{addr}")).await.unwrap()
}

/// Expected totals per (merchant, currency, date): what the ledger accepted.
pub(crate) type Expected = BTreeMap<(String, String), (i64, i64, i64)>;

/// Records `n` entries over `merchants` merchants with `concurrency` callers;
/// returns what was acknowledged. Every call must succeed.
pub(crate) async fn record_many(
    addr: &str,
    prefix: &str,
    n: usize,
    merchants: usize,
    concurrency: usize,
) -> Expected {
    let client = ledger_client(addr).await;
    let per = n / concurrency;
    let tasks = (0..concurrency).map(|w| {
        let mut client = client.clone();
        let prefix = prefix.to_owned();
        tokio::spawn(async move {
            let mut expected = Expected::new();
            for i in 0..per {
                let k = w * per + i;
                let merchant = format!("m-{}", k % merchants);
                let day = 1 + (k * 7 + w) % 5;
                let date = format!("2026-11-{day:02}");
                let credit = !k.is_multiple_of(3);
                let amount = i64::try_from(1 + (k * 37) % 10_000).unwrap();
                let request = lpb::RecordEntryRequest {
                    merchant_id: merchant.clone(),
                    r#type: if credit { lpb::EntryType::Credit } else { lpb::EntryType::Debit }.into(),
                    amount: Some(lpb::Money { currency_code: "BRL".into(), minor_units: amount }),
                    booking_date: date.clone(),
                    description: String::new(),
                    request_id: format!("{prefix}-{k}"),
                    ..Default::default()
                };
                // Transient refusals (shedding) are retried with the same key: safe by design.
                let mut attempt = 0;
                loop {
                    match client.record_entry(request.clone()).await {
                        Ok(_) => break,
                        Err(s)
                            if attempt < 5
                                && matches!(
                                    s.code(),
                                    tonic::Code::Unavailable | tonic::Code::ResourceExhausted
                                ) =>
                        {
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(s) => panic!("write {k} failed: {s:?}"),
                    }
                }
                let e = expected.entry((merchant, date)).or_insert((0, 0, 0));
                if credit {
                    e.0 += amount
                } else {
                    e.1 += amount
                }
                e.2 += 1;
            }
            expected
        })
    });
    let mut total = Expected::new();
    for result in futures::future::join_all(tasks).await {
        for (k, (c, d, n)) in result.unwrap() {
            let e = total.entry(k).or_insert((0, 0, 0));
            e.0 += c;
            e.1 += d;
            e.2 += n;
        }
    }
    total
}

/// Waits until the read model holds `entries` entries, then checks every
/// day's balance through the balance service against `expected`.
pub(crate) async fn assert_exact(
    install: &Install,
    balance_addr: &str,
    expected: &Expected,
    within: Duration,
) {
    assert_balances(install, balance_addr, expected, within).await;
    // And the operator's own check agrees.
    let reconcile = install.run(&["balances", "reconcile"]);
    assert!(reconcile.status.success(), "{}", String::from_utf8_lossy(&reconcile.stdout));
}

/// Like [`assert_exact`], for a test that knows some ledger entries are held back on purpose.
pub(crate) async fn assert_balances(
    install: &Install,
    balance_addr: &str,
    expected: &Expected,
    within: Duration,
) {
    let total: i64 = expected.values().map(|v| v.2).sum();
    let deadline = Instant::now() + within;
    let db = install.db.connect().await;
    loop {
        let row = sea_orm::ConnectionTrait::query_one_raw(
            db.conn(),
            sea_orm::Statement::from_string(
                db.backend(),
                "SELECT COUNT(*) FROM balance_applied_events".to_owned(),
            ),
        )
        .await
        .unwrap()
        .unwrap();
        let applied: i64 = row.try_get_by_index(0).unwrap();
        if applied == total {
            break;
        }
        assert!(applied <= total, "more entries applied ({applied}) than booked ({total})");
        assert!(
            Instant::now() < deadline,
            "only {applied} of {total} entries consolidated within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut client = BalanceServiceClient::connect(format!("http://{balance_addr}")).await.unwrap();
    let merchants: std::collections::BTreeSet<&String> = expected.keys().map(|(m, _)| m).collect();
    for merchant in merchants {
        let report = client
            .list_daily_balances(bpb::ListDailyBalancesRequest {
                merchant_id: merchant.clone(),
                start_date: "2026-11-01".into(),
                end_date: "2026-11-05".into(),
                currency_code: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut running = 0;
        for day in report.balances {
            let (c, d, n) = expected.get(&(merchant.clone(), day.date.clone())).copied().unwrap_or_default();
            assert_eq!(
                (day.total_credits_minor, day.total_debits_minor, day.entry_count),
                (c, d, n),
                "{merchant} {}",
                day.date
            );
            assert_eq!(day.opening_balance_minor, running, "{merchant} {} opening", day.date);
            running += c - d;
            assert_eq!(day.closing_balance_minor, running, "{merchant} {} closing", day.date);
        }
    }
}

/// Messages still pending in the group (read but not acknowledged).
pub(crate) async fn pending(redis_url: &str, stream: &str) -> i64 {
    use fred::prelude::{ClientLike, StreamsInterface};
    let client = fluxo_queue::client(&fluxo_queue::RedisConfig {
        url: redis_url.to_owned().into(),
        command_timeout: Duration::from_secs(5),
        tls_ca_file: None,
    })
    .unwrap();
    client.wait_for_connect().await.unwrap();
    let summary: Vec<fred::types::Value> = client.xpending(stream, "consolidators", ()).await.unwrap();
    summary.first().and_then(fred::types::Value::as_i64).unwrap_or(0)
}

pub(crate) fn kill(process: &Fluxo) {
    let _ = Command::new("kill").args(["-KILL", &process.pid().to_string()]).status();
}
