//! The books end to end, through the real binary on SQLite and PostgreSQL:
//! `fluxo entries import` of a CSV file with bad lines, interrupted and run
//! again; backdated entries restating later balances; `fluxo ledger close`
//! refusing a backdated entry; `fluxo ledger verify` passing, then naming
//! the day of a row changed behind fluxo's back.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use sea_orm::{ConnectionTrait, Database};
use serde_json::json;

use crate::support::{Fluxo, fluxo_command};

const MERCHANT: &str = "m-imp";

fn run(data: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    fluxo_command(data, env).args(args).output().expect("run fluxo")
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A CSV of `n` good lines over June 2026 (1..=n minor units), with three bad
/// lines replacing lines 5, 10 and 15 of the file.
fn csv(n: usize) -> (String, i64) {
    let mut out = String::from("request_id,type,currency,amount,booking_date,description,metadata.batch\n");
    let mut sum = 0;
    for i in 1..=n {
        let line = i + 1;
        match line {
            5 => out.push_str("bad-5,REFUND,BRL,1.00,2026-06-01,,b1\n"),
            10 => out.push_str("bad-10,CREDIT,BRL,1.005,2026-06-01,,b1\n"),
            15 => out.push_str("bad-15,CREDIT,BRL,1.00,2026-02-30,,b1\n"),
            _ => {
                let day = 1 + i % 9;
                writeln!(
                    out,
                    "imp-{i},credit,BRL,{}.{:02},2026-06-{day:02},\"line, {line}\",b1",
                    i / 100,
                    i % 100
                )
                .unwrap();
                sum += i as i64;
            }
        }
    }
    (out, sum)
}

/// What the first line of the import summary says.
fn summary(stdout: &str) -> String {
    stdout.lines().next().unwrap_or_default().to_owned()
}

pub(crate) fn import_close_and_verify(fluxo: &Fluxo, data: &Path, env: &[(&str, &str)], db_url: &str) {
    let addr = format!("http://{}", fluxo.addr);
    let client: Vec<&str> = vec!["--addr", &addr];
    // A later day is booked first: the import's backdated entries must restate it.
    fluxo
        .call(
            "fluxo.ledger.v1.LedgerService/RecordEntry",
            &json!({"merchantId":MERCHANT,"type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":"1"},
                    "bookingDate":"2026-06-20","requestId":"later"}),
        )
        .unwrap();

    let n = 3000;
    let (file, sum) = csv(n);
    let path = data.join("entries.csv");
    std::fs::write(&path, &file).unwrap();
    let path_text = path.to_str().unwrap();
    let import = |extra: &[&str]| {
        let mut args = vec!["entries", "import", path_text, "--merchant", MERCHANT];
        args.extend_from_slice(&client);
        args.extend_from_slice(extra);
        run(data, env, &args)
    };

    // The first run books the good lines and names the bad ones; exit status 1.
    let first = import(&["--batch-size", "200"]);
    let (stdout, stderr) = text(&first);
    assert_eq!(first.status.code(), Some(1), "{stdout}\n{stderr}");
    assert_eq!(
        summary(&stdout),
        format!("{} entries: {} booked, 0 replayed (booked by an earlier run), 3 refused", n, n - 3)
    );
    assert!(stdout.contains("line 5: type:"), "{stdout}");
    assert!(stdout.contains("line 10: amount: \"1.005\" has more than 2 decimal places"), "{stdout}");
    assert!(stdout.contains("line 15: booking_date:"), "{stdout}");
    assert!(stderr.contains("3 line(s) refused"), "{stderr}");

    // Run again: nothing is booked twice.
    let again = import(&["--restart"]);
    let (stdout, _) = text(&again);
    assert_eq!(
        summary(&stdout),
        format!("{} entries: 0 booked, {} replayed (booked by an earlier run), 3 refused", n, n - 3)
    );

    // Interrupted mid-file (killed, not asked), then resumed from its saved position.
    let big = 30_000;
    let (file, _) = csv(big);
    std::fs::write(&path, &file).unwrap();
    let state = data.join("entries.csv.import-state");
    let mut child = fluxo_command(data, env)
        .args([
            "entries",
            "import",
            path_text,
            "--merchant",
            "m-big",
            "--batch-size",
            "100",
            "--concurrency",
            "1",
        ])
        .args(&client)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !state.exists() {
        assert!(Instant::now() < deadline, "no progress recorded");
        assert!(child.try_wait().unwrap().is_none(), "the import ended before it could be interrupted");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let resumed =
        run(data, env, &[&["entries", "import", path_text, "--merchant", "m-big"][..], &client[..]].concat());
    let (stdout, stderr) = text(&resumed);
    assert!(stderr.contains("resuming after line"), "{stderr}");
    assert!(!state.exists(), "a finished import forgets its position");
    let words: Vec<u64> = summary(&stdout)
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().unwrap())
        .collect();
    // "<sent> entries: <booked> booked, <replayed> replayed …, 3 refused, <skipped> lines … skipped"
    let (sent, booked, replayed, refused, skipped) = (words[0], words[1], words[2], words[3], words[4]);
    // The bad lines were in the part done before the interruption.
    assert!(resumed.status.success(), "{stdout}\n{stderr}");
    assert_eq!(refused, 0, "{stdout}");
    assert_eq!(sent, booked + replayed + refused);
    assert_eq!(sent + skipped, big as u64, "{stdout}");
    assert!(skipped > 0 && booked > 0, "{stdout}");
    // Every good line booked exactly once: the close counts them.
    let close = |merchant: &str, through: &str| {
        run(
            data,
            env,
            &[&["ledger", "close", "--merchant", merchant, "--through", through][..], &client[..]].concat(),
        )
    };
    let closed = close("m-big", "2026-06-30");
    let (stdout, stderr) = text(&closed);
    assert!(closed.status.success(), "{stderr}");
    assert!(stdout.contains(&format!("{} entries", big - 3)), "{stdout}");

    // The backdated June entries restate the later day's opening balance.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let balance = fluxo
            .call(
                "fluxo.balance.v1.BalanceService/GetDailyBalance",
                &json!({"merchantId":MERCHANT,"date":"2026-06-20"}),
            )
            .unwrap();
        if balance["openingBalanceMinor"] == json!(sum.to_string()) {
            assert_eq!(balance["closingBalanceMinor"], json!((sum + 1).to_string()));
            break;
        }
        assert!(Instant::now() < deadline, "2026-06-20 not restated: {balance}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Close June for the merchant: a backdated entry is refused, naming the date.
    let closed = close(MERCHANT, "2026-06-30");
    assert!(closed.status.success(), "{:?}", text(&closed));
    let refused = fluxo
        .call(
            "fluxo.ledger.v1.LedgerService/RecordEntry",
            &json!({"merchantId":MERCHANT,"type":"DEBIT","amount":{"currencyCode":"BRL","minorUnits":"5"},
                    "bookingDate":"2026-06-15","requestId":"late"}),
        )
        .unwrap_err();
    assert!(
        refused.contains("FailedPrecondition") && refused.contains("closed through 2026-06-30"),
        "{refused}"
    );

    // Verify agrees with the close (once the balances have caught up), then finds the tampered day.
    let verify = || run(data, env, &["ledger", "verify", "--merchant", MERCHANT]);
    let ok = verify();
    assert!(ok.status.success(), "{:?}", text(&ok));
    assert!(text(&ok).0.contains("verified"), "{:?}", text(&ok));
    tamper(db_url);
    let bad = verify();
    let (stdout, stderr) = text(&bad);
    assert_eq!(bad.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("2026-06-02 BRL: closed with"), "{stdout}");
    assert!(stdout.contains("the ledger now has"), "{stdout}");
    assert!(stderr.contains("the books differ from what was closed"), "{stderr}");
}

/// Changes one closed entry's amount the way only someone with the database's
/// keys could: around the immutability trigger.
fn tamper(url: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let db = Database::connect(url).await.unwrap();
        let statements: &[&str] = if url.starts_with("postgres") {
            &[
                "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_immutable",
                "UPDATE ledger_entries SET amount_minor = amount_minor + 1 WHERE merchant_id = 'm-imp' AND request_id = 'imp-1'",
                "ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_immutable",
            ]
        } else {
            &[
                "DROP TRIGGER ledger_entries_no_update",
                "UPDATE ledger_entries SET amount_minor = amount_minor + 1 WHERE merchant_id = 'm-imp' AND request_id = 'imp-1'",
            ]
        };
        for sql in statements {
            db.execute_unprepared(sql).await.unwrap();
        }
        db.close().await.unwrap();
    });
}
