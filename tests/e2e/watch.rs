//! WatchEntries through the real binary, read by grpcurl as it streams: new
//! entries arrive while the call is open, and a second watch resumed from a
//! cursor grpcurl printed sends exactly what followed it.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::{Value, json};

use crate::{RECORD, support::Fluxo};

const WATCH: &str = "fluxo.ledger.v1.LedgerService/WatchEntries";
const BALANCE_WATCH: &str = "fluxo.balance.v1.BalanceService/WatchDailyBalances";

/// A grpcurl process holding a watch open, its messages parsed as they come.
struct Watcher {
    child: Child,
    messages: mpsc::Receiver<Value>,
}

impl Watcher {
    fn start(addr: &str, request: &Value) -> Self {
        Self::start_on(addr, WATCH, request)
    }

    fn start_on(addr: &str, method: &str, request: &Value) -> Self {
        let bin = std::env::var("FLUXO_TEST_GRPCURL").expect("FLUXO_TEST_GRPCURL (run ./scripts/test.sh)");
        let mut child = Command::new(bin)
            .args(["-plaintext", "-d", &request.to_string(), addr, method])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run grpcurl");
        let stdout = child.stdout.take().unwrap();
        let (tx, messages) = mpsc::channel();
        // grpcurl prints each message as indented JSON, closed by a `}` alone on its line.
        std::thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                text.push_str(&line);
                text.push('\n');
                if line == "}" {
                    let message = serde_json::from_str(&text).expect("grpcurl printed JSON");
                    text.clear();
                    if tx.send(message).is_err() {
                        return;
                    }
                }
            }
        });
        Self { child, messages }
    }

    /// The next message, within 60 s.
    fn next(&self) -> Value {
        self.messages.recv_timeout(Duration::from_secs(60)).expect("a watch message within 60 s")
    }

    /// Messages until one carries an entry: (its entry ids, its cursor), within
    /// 60 s (heartbeats do not extend it).
    fn next_entries(&self) -> (Vec<String>, String) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let message = self.messages.recv_timeout(left).expect("an entry within 60 s");
            let cursor = message["cursor"].as_str().expect("every message has a cursor").to_owned();
            if let Some(entries) = message["entries"].as_array() {
                let ids = entries.iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
                return (ids, cursor);
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn credit(key: &str) -> Value {
    json!({"merchantId":"m-w","type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":"100"},
           "bookingDate":"2026-11-21","requestId":key})
}

#[test]
fn grpcurl_follows_a_watch_and_resumes_it_from_a_printed_cursor() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(data.path(), &[]);

    let watcher = Watcher::start(&fluxo.addr, &json!({"merchantId":"m-w","startAtEnd":true}));
    // The first message comes at once: the stream is open before anything is booked.
    let first = watcher.next();
    assert!(first["cursor"].is_string(), "{first}");

    let one = fluxo.call(RECORD, &credit("w-1")).unwrap()["id"].as_str().unwrap().to_owned();
    let (ids, cursor) = watcher.next_entries();
    assert_eq!(ids, [one]);

    let two = fluxo.call(RECORD, &credit("w-2")).unwrap()["id"].as_str().unwrap().to_owned();
    let (ids, _) = watcher.next_entries();
    assert_eq!(ids, std::slice::from_ref(&two));
    drop(watcher);

    // A new watch from the cursor after the first entry starts with the second.
    let resumed = Watcher::start(&fluxo.addr, &json!({"merchantId":"m-w","cursor":cursor}));
    let (ids, _) = resumed.next_entries();
    assert_eq!(ids, [two]);

    // A cursor fluxo did not issue is refused, naming the field.
    let refused = crate::support::grpcurl(
        &fluxo.addr,
        &[WATCH],
        Some(&json!({"merchantId":"m-w","cursor":"nope"}).to_string()),
    )
    .unwrap_err();
    assert!(refused.contains("InvalidArgument"), "{refused}");
    assert!(refused.contains("cursor"), "{refused}");
}

/// Two ledger replicas and a balance replica on one PostgreSQL, the consolidator
/// in a process of its own: a watch on one replica follows what is booked on the
/// other (its only news is its poll), and a balance watch follows what the
/// consolidator applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watches_follow_what_other_processes_commit() {
    let install =
        crate::pipeline::Install::new(std::env::var("FLUXO_TEST_REDIS_URL").expect("FLUXO_TEST_REDIS_URL"))
            .await;
    let reader = install.start("ledger", &[]);
    let writer = install.start("ledger", &[]);
    let balance = install.start("balance", &[]);
    let _consolidator = install.start("consolidator", &[]);

    let entries = Watcher::start(&reader.addr, &json!({"merchantId":"m-w"}));
    let days = Watcher::start_on(&balance.addr, BALANCE_WATCH, &json!({"merchantId":"m-w"}));
    // Both streams are open (their first message, a heartbeat, has come) before anything is booked.
    entries.next();
    days.next();

    // 400 entries over four days, eight callers at once, all through the other replica.
    let client = crate::pipeline::ledger_client(&writer.addr).await;
    let mut booked = std::collections::HashSet::new();
    let calls: Vec<_> = (0..400)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let request = crate::lpb::RecordEntryRequest {
                    merchant_id: "m-w".into(),
                    r#type: crate::lpb::EntryType::Credit.into(),
                    amount: Some(crate::lpb::Money { currency_code: "BRL".into(), minor_units: 1 }),
                    booking_date: format!("2026-11-{:02}", 20 + i % 4),
                    request_id: format!("x-{i}"),
                    ..Default::default()
                };
                client.record_entry(request).await.expect("booked").into_inner().id
            })
        })
        .collect();
    for call in calls {
        booked.insert(call.await.unwrap());
    }

    let mut seen = Vec::new();
    while seen.len() < booked.len() {
        let (ids, _) = entries.next_entries();
        seen.extend(ids);
    }
    let distinct: std::collections::HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(distinct.len(), seen.len(), "an entry came twice");
    assert_eq!(distinct, booked);

    // The balance watch ends with every day at its full count: 100 entries, closing = running total.
    let mut last: std::collections::BTreeMap<String, (String, String)> = Default::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while last.len() < 4 || last.values().any(|(count, _)| count != "100") {
        assert!(std::time::Instant::now() < deadline, "the days never reached their counts: {last:?}");
        let message = days.next();
        for day in message["balances"].as_array().into_iter().flatten() {
            let count = day["entryCount"].as_str().unwrap_or("0").to_owned();
            let closing = day["closingBalanceMinor"].as_str().unwrap_or("0").to_owned();
            last.insert(day["date"].as_str().unwrap().to_owned(), (count, closing));
        }
    }
    let closings: Vec<&str> = last.values().map(|(_, c)| c.as_str()).collect();
    assert_eq!(closings, ["100", "200", "300", "400"]);
}

/// Under load, through a client fluxo did not write: twenty grpcurl watches
/// open at once on the embedded default while 500 entries are booked by
/// sixteen callers; each watch sends every entry exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_grpcurl_watches_each_get_every_entry_once_under_load() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(data.path(), &[]);
    let watchers: Vec<Watcher> =
        (0..20).map(|_| Watcher::start(&fluxo.addr, &json!({"merchantId":"m-load"}))).collect();
    for watcher in &watchers {
        watcher.next();
    }
    let client = crate::pipeline::ledger_client(&fluxo.addr).await;
    let mut booked = std::collections::HashSet::new();
    let callers: Vec<_> = (0..16)
        .map(|c| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for n in (c..500).step_by(16) {
                    let request = crate::lpb::RecordEntryRequest {
                        merchant_id: "m-load".into(),
                        r#type: crate::lpb::EntryType::Debit.into(),
                        amount: Some(crate::lpb::Money { currency_code: "BRL".into(), minor_units: 3 }),
                        booking_date: "2026-11-21".into(),
                        request_id: format!("l-{n}"),
                        ..Default::default()
                    };
                    ids.push(client.record_entry(request).await.expect("booked").into_inner().id);
                }
                ids
            })
        })
        .collect();
    for caller in callers {
        booked.extend(caller.await.unwrap());
    }
    assert_eq!(booked.len(), 500);
    for (w, watcher) in watchers.iter().enumerate() {
        let mut seen = Vec::new();
        while seen.len() < booked.len() {
            seen.extend(watcher.next_entries().0);
        }
        let distinct: std::collections::HashSet<String> = seen.iter().cloned().collect();
        assert_eq!(distinct.len(), seen.len(), "watch {w}: an entry came twice");
        assert_eq!(distinct, booked, "watch {w}");
    }
}

/// `fluxo entries watch` as a process: CSV rows as entries are booked; killed
/// and started again with its cursor file, it goes on after the last row it
/// wrote, without a second header row.
#[test]
fn the_watch_command_writes_rows_as_they_come_and_resumes_from_its_cursor_file() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(data.path(), &[]);
    let cursor_file = data.path().join("m-cli.cursor");
    let follow = || -> (Child, mpsc::Receiver<String>) {
        let mut child = crate::support::fluxo_command(data.path(), &[])
            .args(["entries", "watch", "--merchant", "m-cli", "--cursor-file"])
            .arg(&cursor_file)
            .args(["--addr", &format!("http://{}", fluxo.addr)])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run fluxo entries watch");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        (child, rx)
    };
    let line =
        |rx: &mpsc::Receiver<String>| rx.recv_timeout(Duration::from_secs(60)).expect("a row within 60 s");
    let book = |key: &str| {
        let request = json!({"merchantId":"m-cli","type":"CREDIT","amount":{"currencyCode":"BRL","minorUnits":"250"},
                             "bookingDate":"2026-11-21","requestId":key});
        fluxo.call(RECORD, &request).unwrap()["id"].as_str().unwrap().to_owned()
    };
    // The cursor is saved after each batch is written: waits for a save other than `previous`.
    let saved = |previous: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&cursor_file).unwrap_or_default();
            if !text.is_empty() && text != previous {
                return text;
            }
            assert!(std::time::Instant::now() < deadline, "the cursor file was not written");
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    let first = book("c-1");
    let (mut child, rows) = follow();
    assert!(line(&rows).starts_with("id,"), "a header row first");
    assert!(line(&rows).starts_with(&first));
    let after_first = saved("");
    let second = book("c-2");
    assert!(line(&rows).starts_with(&second));
    saved(&after_first);
    let _ = child.kill();
    let _ = child.wait();

    let third = book("c-3");
    let (mut child, rows) = follow();
    assert!(line(&rows).starts_with(&third), "resumed after the second entry, without a header");
    let _ = child.kill();
    let _ = child.wait();
}
