//! The exports end to end on the embedded default: the REST CSV downloads
//! read back by a CSV reader, and `fluxo entries export` / `fluxo balances
//! export` run as the real binary, writing the very same bytes.

use std::time::{Duration, Instant};

use fluxo_proto::export::{BALANCE_COLUMNS, ENTRY_COLUMNS};
use serde_json::{Value, json};

use crate::{
    rest::Client,
    support::{Fluxo, fluxo_command},
};

fn rows(csv_text: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let header = reader.headers().unwrap().iter().map(str::to_owned).collect();
    let rows = reader.records().map(|r| r.unwrap().iter().map(str::to_owned).collect()).collect();
    (header, rows)
}

fn text(reply: &crate::rest::Reply) -> String {
    match &reply.body {
        Value::String(s) => s.clone(),
        other => panic!("not CSV: {other}"),
    }
}

/// Runs `fluxo ARGS` against `fluxo`'s gRPC address; its stdout.
fn run(fluxo: &Fluxo, dir: &std::path::Path, args: &[&str]) -> String {
    let out = fluxo_command(dir, &[])
        .args(args)
        .args(["--addr", &format!("http://{}", fluxo.addr)])
        .output()
        .expect("run fluxo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fluxo {args:?}: {stderr}");
    assert!(stderr.contains("exported "), "a summary on stderr: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn csv_downloads_and_the_cli_give_the_same_exact_files() {
    let data = tempfile::tempdir().unwrap();
    let fluxo = Fluxo::start(data.path(), &[]);
    let rest = Client::new(fluxo.rest.as_deref().expect("a REST address"));
    let token = fluxo.token.clone().expect("a development token");
    let t = Some(token.as_str());

    let book = |key: &str, kind: &str, minor: &str, date: &str, description: &str, metadata: Value| {
        let body = json!({"type": kind, "amount": {"currencyCode": "BRL", "minorUnits": minor},
                          "bookingDate": date, "description": description, "requestId": key, "metadata": metadata});
        let reply = rest.post("/v1/merchants/m-1/entries", t, &body);
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        reply.body
    };
    let a = book(
        "k-1",
        "CREDIT",
        "1050",
        "2026-11-20",
        "sale, \"big\" one",
        json!({"order": "A-1", "channel": "pos"}),
    );
    book("k-2", "DEBIT", "250", "2026-11-20", "fee", json!({}));
    book("k-3", "CREDIT", "99999999999", "2026-11-22", "wire", json!({"channel": "pos"}));
    let reversal = rest.post(
        &format!("/v1/merchants/m-1/entries/{}:reverse", a["id"].as_str().unwrap()),
        t,
        &json!({"bookingDate": "2026-11-22"}),
    );
    assert_eq!(reversal.status, 200, "{:?}", reversal.body);

    // Entries: the download, read back by a CSV reader, is ListEntries' answer.
    let download = rest.get("/v1/merchants/m-1/entries:export", t);
    assert_eq!(download.status, 200, "{:?}", download.body);
    assert_eq!(download.header("content-type"), Some("text/csv; charset=utf-8"));
    assert_eq!(download.header("content-disposition"), Some("attachment; filename=\"entries-m-1.csv\""));
    let entries_csv = text(&download);
    let (header, got) = rows(&entries_csv);
    assert_eq!(header, ENTRY_COLUMNS);
    let listed = rest.get("/v1/merchants/m-1/entries", t).body;
    let listed = listed["entries"].as_array().unwrap();
    assert_eq!(got.len(), 4);
    for (row, entry) in got.iter().zip(listed) {
        let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        let mut metadata: Vec<(String, String)> =
            entry["metadata"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), s(v))).collect();
        metadata.sort();
        let metadata: serde_json::Map<String, Value> =
            metadata.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
        let expected = [
            s(&entry["id"]),
            "m-1".to_owned(),
            s(&entry["type"]),
            "BRL".to_owned(),
            s(&entry["amount"]["minorUnits"]),
            s(&entry["bookingDate"]),
            s(&entry["description"]),
            s(&entry["requestId"]),
            s(&entry["createdAt"]),
            s(&entry["reversesEntryId"]),
            s(&entry["reversedByEntryId"]),
            Value::Object(metadata).to_string(),
        ];
        assert_eq!(row, &expected);
    }
    assert_eq!(got[0][6], "sale, \"big\" one");
    assert_eq!(got[0][11], r#"{"channel":"pos","order":"A-1"}"#);
    assert_eq!(got.iter().find(|r| r[7] == "k-3").unwrap()[4], "99999999999", "integer minor units");

    // Filters as ListEntries takes them in the query.
    let filtered =
        rest.get("/v1/merchants/m-1/entries:export?type=CREDIT&metadata[channel]=pos&endDate=2026-11-21", t);
    let (_, only) = rows(&text(&filtered));
    assert_eq!(only.len(), 1);
    assert_eq!(only[0][7], "k-1");
    // A bad filter, before any row: a JSON error naming the field, like every REST error.
    let bad = rest.get("/v1/merchants/m-1/entries:export?createdAfter=yesterday", t);
    assert_eq!(bad.status, 400, "{:?}", bad.body);
    assert_eq!(bad.header("content-type"), Some("application/json"));
    assert_eq!(bad.body["details"][0]["fieldViolations"][0]["field"], "createdAfter");
    let bad = rest.get("/v1/merchants/m-1/entries:export?startDate=2026-02-30", t);
    assert_eq!((bad.status, bad.body["code"].clone()), (400, json!(3)));
    assert_eq!(bad.body["details"][0]["fieldViolations"][0]["field"], "start_date");
    // A token for another merchant is refused, as for ListEntries.
    let other = crate::rest::token(&crate::rest::dev_secret(data.path()), &["m-2"], 600, "fluxo-api");
    let refused = rest.get("/v1/merchants/m-1/entries:export", Some(&other));
    assert_eq!((refused.status, refused.header("content-type")), (403, Some("application/json")));

    // Balances: every day of the range, the empty ones carrying the balance.
    let range = "startDate=2026-11-19&endDate=2026-11-23";
    let deadline = Instant::now() + Duration::from_secs(20);
    let balances_csv = loop {
        let download = rest.get(&format!("/v1/merchants/m-1/balances:export?{range}"), t);
        assert_eq!(download.status, 200, "{:?}", download.body);
        let body = text(&download);
        let (_, days) = rows(&body);
        if days.iter().map(|d| d[8].parse::<i64>().unwrap()).sum::<i64>() == 4 {
            assert_eq!(download.header("content-type"), Some("text/csv; charset=utf-8"));
            assert_eq!(
                download.header("content-disposition"),
                Some("attachment; filename=\"daily-balances-m-1.csv\"")
            );
            break body;
        }
        assert!(Instant::now() < deadline, "consolidation did not catch up: {body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let (header, days) = rows(&balances_csv);
    assert_eq!(header, BALANCE_COLUMNS);
    let figures: Vec<Vec<&str>> = days.iter().map(|d| d[1..9].iter().map(String::as_str).collect()).collect();
    assert_eq!(
        figures,
        [
            ["2026-11-19", "BRL", "0", "0", "0", "0", "0", "0"],
            ["2026-11-20", "BRL", "1050", "250", "800", "0", "800", "2"],
            ["2026-11-21", "BRL", "0", "0", "0", "800", "800", "0"],
            ["2026-11-22", "BRL", "99999999999", "1050", "99999998949", "800", "99999999749", "2"],
            ["2026-11-23", "BRL", "0", "0", "0", "99999999749", "99999999749", "0"],
        ]
    );
    assert!(days.iter().all(|d| d[9].ends_with('Z') && d[10] == "false"));
    let bad = rest.get("/v1/merchants/m-1/balances:export?startDate=2026-11-23&endDate=2026-11-19", t);
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body["details"][0]["fieldViolations"][0]["field"], "end_date");

    // The CLI writes the same bytes, to stdout or to a file.
    let cli = run(&fluxo, data.path(), &["entries", "export", "--merchant", "m-1"]);
    assert_eq!(cli, entries_csv);
    let file = data.path().join("entries.csv");
    let quiet =
        run(&fluxo, data.path(), &["entries", "export", "-m", "m-1", "--output", file.to_str().unwrap()]);
    assert!(quiet.is_empty());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), entries_csv);
    assert!(!data.path().join("entries.csv.partial").exists());
    let cli = run(
        &fluxo,
        data.path(),
        &[
            "entries",
            "export",
            "-m",
            "m-1",
            "--type",
            "credit",
            "--label",
            "channel=pos",
            "--to",
            "2026-11-21",
        ],
    );
    assert_eq!(cli, text(&filtered));
    let cli = run(
        &fluxo,
        data.path(),
        &["balances", "export", "-m", "m-1", "--from", "2026-11-19", "--to", "2026-11-23"],
    );
    assert_eq!(cli, balances_csv);

    // A refused export fails the command, naming the field.
    let out = fluxo_command(data.path(), &[])
        .args([
            "entries",
            "export",
            "-m",
            "m-1",
            "--from",
            "nope",
            "--addr",
            &format!("http://{}", fluxo.addr),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("InvalidArgument") && stderr.contains("start_date"), "{stderr}");
    fluxo.stop();
}
