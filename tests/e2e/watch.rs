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

/// A grpcurl process holding a watch open, its messages parsed as they come.
struct Watcher {
    child: Child,
    messages: mpsc::Receiver<Value>,
}

impl Watcher {
    fn start(addr: &str, request: &Value) -> Self {
        let bin = std::env::var("FLUXO_TEST_GRPCURL").expect("FLUXO_TEST_GRPCURL (run ./scripts/test.sh)");
        let mut child = Command::new(bin)
            .args(["-plaintext", "-d", &request.to_string(), addr, WATCH])
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

    /// The next message, within 30 s.
    fn next(&self) -> Value {
        self.messages.recv_timeout(Duration::from_secs(30)).expect("a watch message within 30 s")
    }

    /// Messages until one carries an entry: (its entry ids, its cursor).
    fn next_entries(&self) -> (Vec<String>, String) {
        loop {
            let message = self.next();
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
