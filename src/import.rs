//! `fluxo entries import FILE`: books a CSV file of entries through
//! BatchRecordEntries, a batch at a time, with a progress bar, and ends with a
//! summary naming every refused line.
//!
//! The file has a header row. Columns, in any order:
//!
//! | column          | required | meaning                                                     |
//! |-----------------|----------|-------------------------------------------------------------|
//! | `request_id`    | yes      | the entry's idempotency key (unique per merchant)           |
//! | `type`          | yes      | `CREDIT` or `DEBIT` (any case)                              |
//! | `currency`      | yes      | ISO 4217 code                                               |
//! | `amount_minor`  | one of   | integer minor units (`1050` is 10.50 BRL)                   |
//! | `amount`        | the two  | decimal major units with a `.` (`10.50`), exact             |
//! | `booking_date`  | no       | YYYY-MM-DD, kept as is (backdated entries stay backdated)   |
//! | `description`   | no       | free text                                                   |
//! | `metadata.KEY`  | no       | the label KEY; an empty cell sets no label                  |
//!
//! Every entry carries its own key, so running the same import again books
//! nothing twice: what was booked is answered as replayed. After each batch
//! the command records the last line it knows to be done in `FILE.import-state`,
//! and a new run with the same file and merchant continues after it (Ctrl-C
//! stops cleanly between batches; `--restart` starts from the top).

#![allow(clippy::print_stdout)]

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use fluxo_ledger::domain::Currency;
use fluxo_proto::ledger_v1::{
    self as pb, batch_record_result::Outcome, ledger_service_client::LedgerServiceClient,
};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use tonic::Code;

use crate::client::{ClientArgs, describe};

/// `fluxo entries import` arguments.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The CSV file (header row; columns as in `fluxo entries import --help`'s long text).
    pub file: PathBuf,
    /// The merchant every entry is booked for.
    #[arg(long, short = 'm')]
    pub merchant: String,
    /// Entries per BatchRecordEntries call (1 to 1000).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub batch_size: u16,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: u16,
    /// Ignore the saved position and read the file from the top (nothing is booked twice either way).
    #[arg(long)]
    pub restart: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// One line of the file, ready to send, or why it cannot be.
struct Line {
    number: u64,
    request: Result<pb::RecordEntryRequest, String>,
}

/// Where an earlier run stopped.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct State {
    merchant: String,
    file_len: u64,
    /// Every line up to this one is booked, replayed or refused.
    done_through_line: u64,
}

#[derive(Debug, Default)]
struct Summary {
    booked: u64,
    replayed: u64,
    skipped: u64,
    refused: Vec<(u64, String)>,
}

/// Column positions of the header.
struct Columns {
    request_id: usize,
    kind: usize,
    currency: usize,
    amount_minor: Option<usize>,
    amount: Option<usize>,
    booking_date: Option<usize>,
    description: Option<usize>,
    metadata: Vec<(String, usize)>,
}

impl Columns {
    fn from_header(header: &csv::StringRecord) -> anyhow::Result<Self> {
        let mut known = std::collections::HashMap::new();
        let mut metadata = Vec::new();
        for (i, name) in header.iter().enumerate() {
            let name = name.trim();
            if let Some(key) = name.strip_prefix("metadata.") {
                metadata.push((key.to_owned(), i));
            } else if [
                "request_id",
                "type",
                "currency",
                "amount_minor",
                "amount",
                "booking_date",
                "description",
            ]
            .contains(&name)
            {
                if known.insert(name.to_owned(), i).is_some() {
                    bail!("the header names column {name:?} twice");
                }
            } else {
                bail!(
                    "the header names an unknown column {name:?}: use request_id, type, currency, amount_minor \
                     or amount, booking_date, description, metadata.KEY"
                );
            }
        }
        let required = |name: &str| {
            known.get(name).copied().with_context(|| format!("the header has no {name:?} column (required)"))
        };
        let columns = Self {
            request_id: required("request_id")?,
            kind: required("type")?,
            currency: required("currency")?,
            amount_minor: known.get("amount_minor").copied(),
            amount: known.get("amount").copied(),
            booking_date: known.get("booking_date").copied(),
            description: known.get("description").copied(),
            metadata,
        };
        match (columns.amount_minor, columns.amount) {
            (None, None) => bail!("the header has neither an \"amount_minor\" nor an \"amount\" column"),
            (Some(_), Some(_)) => bail!("the header has both \"amount_minor\" and \"amount\": give one"),
            _ => Ok(columns),
        }
    }

    fn request(&self, record: &csv::StringRecord) -> Result<pb::RecordEntryRequest, String> {
        let cell = |i: usize| record.get(i).unwrap_or("").trim();
        let kind = match cell(self.kind).to_ascii_uppercase().as_str() {
            "CREDIT" => pb::EntryType::Credit,
            "DEBIT" => pb::EntryType::Debit,
            other => return Err(format!("type: {other:?} is not CREDIT or DEBIT")),
        };
        let currency = cell(self.currency).to_ascii_uppercase();
        let minor_units = match (self.amount_minor, self.amount) {
            (Some(i), _) => cell(i)
                .parse::<i64>()
                .map_err(|_| format!("amount_minor: {:?} is not an integer", cell(i)))?,
            (None, Some(i)) => decimal_to_minor(cell(i), &currency).map_err(|e| format!("amount: {e}"))?,
            (None, None) => unreachable!("the header has an amount column"),
        };
        let mut metadata = std::collections::HashMap::new();
        for (key, i) in &self.metadata {
            if !cell(*i).is_empty() {
                metadata.insert(key.clone(), cell(*i).to_owned());
            }
        }
        Ok(pb::RecordEntryRequest {
            merchant_id: String::new(),
            r#type: kind.into(),
            amount: Some(pb::Money { currency_code: currency, minor_units }),
            booking_date: self.booking_date.map(cell).unwrap_or_default().to_owned(),
            // Free text keeps its spaces.
            description: self.description.and_then(|i| record.get(i)).unwrap_or_default().to_owned(),
            request_id: cell(self.request_id).to_owned(),
            metadata,
        })
    }
}

/// `"10.50"` in a currency of exponent 2 is 1050 minor units: exact, no
/// floating point; more decimals than the currency has is an error.
fn decimal_to_minor(text: &str, currency: &str) -> Result<i64, String> {
    let currency =
        Currency::parse(currency).map_err(|e| format!("cannot read it without a currency ({e})"))?;
    let exponent = usize::from(currency.exponent());
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty()
        || !all_digits(whole)
        || !all_digits(fraction)
        || (digits.contains('.') && fraction.is_empty())
    {
        return Err(format!("{text:?} is not a decimal number like 10.50"));
    }
    if fraction.len() > exponent {
        return Err(format!(
            "{text:?} has more than {exponent} decimal places, the most {} has",
            currency.code()
        ));
    }
    let scaled = format!("{whole}{fraction:0<exponent$}");
    let units: i64 = scaled.parse().map_err(|_| format!("{text:?} is too large"))?;
    Ok(if negative { -units } else { units })
}

fn state_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".import-state");
    PathBuf::from(name)
}

fn read_state(path: &Path) -> Option<State> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn write_state(path: &Path, state: &State) -> anyhow::Result<()> {
    // Written aside and renamed, so an interrupted write never leaves half a state.
    let partial = path.with_extension("import-state.partial");
    std::fs::write(&partial, serde_json::to_vec(state)?)?;
    std::fs::rename(&partial, path)?;
    Ok(())
}

/// Sends one batch, retrying what a retry can fix (the service or the
/// database briefly unavailable); answers each line's outcome.
async fn send(
    client: &ClientArgs,
    ledger: LedgerServiceClient<tonic::transport::Channel>,
    merchant: String,
    lines: Vec<Line>,
) -> anyhow::Result<Vec<(u64, Result<Outcome, String>)>> {
    let mut out: Vec<(u64, Result<Outcome, String>)> = Vec::with_capacity(lines.len());
    let mut pending: Vec<(u64, pb::RecordEntryRequest)> = Vec::new();
    for line in lines {
        match line.request {
            Ok(request) => pending.push((line.number, request)),
            Err(error) => out.push((line.number, Err(error))),
        }
    }
    let mut backoff = Duration::from_millis(200);
    for attempt in 1..=8 {
        if pending.is_empty() {
            break;
        }
        let last_try = attempt == 8;
        let mut again = Vec::new();
        for part in by_size(&pending) {
            let request = pb::BatchRecordEntriesRequest {
                merchant_id: merchant.clone(),
                requests: part.iter().map(|(_, r)| r.clone()).collect(),
            };
            let results = match ledger.clone().batch_record_entries(client.request(request)?).await {
                Ok(response) => response.into_inner().results,
                Err(status) if retryable(status.code()) && !last_try => {
                    again.extend(part.iter().cloned());
                    continue;
                }
                Err(status) => bail!("BatchRecordEntries failed: {}", describe(&status)),
            };
            if results.len() != part.len() {
                bail!("the ledger answered {} results for {} entries", results.len(), part.len());
            }
            for ((number, request), result) in part.iter().zip(results) {
                match Outcome::try_from(result.outcome) {
                    Ok(Outcome::Booked) => out.push((*number, Ok(Outcome::Booked))),
                    Ok(Outcome::Replayed) => out.push((*number, Ok(Outcome::Replayed))),
                    _ => {
                        let error = result.error.unwrap_or_default();
                        if retryable(Code::from(error.code)) && !last_try {
                            again.push((*number, request.clone()));
                        } else {
                            out.push((*number, Err(refusal(&error))));
                        }
                    }
                }
            }
        }
        pending = again;
        if !pending.is_empty() {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
    out.sort_by_key(|(n, _)| *n);
    Ok(out)
}

/// A call stays well under the servers' default message limit (1 MiB): a
/// batch of long descriptions and many labels goes in several calls.
const MAX_CALL_BYTES: usize = 768 * 1024;

fn by_size(pending: &[(u64, pb::RecordEntryRequest)]) -> Vec<&[(u64, pb::RecordEntryRequest)]> {
    use prost::Message;
    let mut parts = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (_, request)) in pending.iter().enumerate() {
        let len = request.encoded_len() + 8;
        if i > start && bytes + len > MAX_CALL_BYTES {
            parts.push(&pending[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += len;
    }
    if start < pending.len() {
        parts.push(&pending[start..]);
    }
    parts
}

fn retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Aborted | Code::ResourceExhausted | Code::DeadlineExceeded)
}

/// The refusal in words: each bad field (without the batch's `requests[i].`), or the message.
fn refusal(status: &fluxo_proto::google::rpc::Status) -> String {
    use prost::Message;
    let mut fields = Vec::new();
    for detail in &status.details {
        if detail.type_url.ends_with("google.rpc.BadRequest")
            && let Ok(bad) = fluxo_proto::google::rpc::BadRequest::decode(detail.value.as_slice())
        {
            for v in bad.field_violations {
                let field = v.field.split_once("].").map_or(v.field.as_str(), |(_, f)| f);
                fields.push(format!("{field}: {}", v.description));
            }
        }
    }
    if fields.is_empty() {
        format!("{:?}: {}", Code::from(status.code), status.message)
    } else {
        fields.join("; ")
    }
}

/// `fluxo entries import`.
pub async fn import(args: &ImportArgs) -> anyhow::Result<()> {
    let file_len =
        std::fs::metadata(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?.len();
    let state_file = state_path(&args.file);
    let resume_after = match read_state(&state_file) {
        Some(state) if !args.restart && state.merchant == args.merchant && state.file_len == file_len => {
            eprintln!(
                "fluxo: resuming after line {} (as {} recorded; --restart reads from the top)",
                state.done_through_line,
                state_file.display()
            );
            state.done_through_line
        }
        _ => 0,
    };
    // One pass to count the entries, for the progress bar's length and ETA.
    let total = {
        let mut reader = csv::ReaderBuilder::new().flexible(true).from_path(&args.file)?;
        reader.records().count() as u64
    };
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let columns = Columns::from_header(reader.headers().context("reading the header row")?)?;

    let bar = ProgressBar::with_draw_target(
        Some(total),
        if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template("{bar:32} {pos}/{len} entries  {per_sec}  ETA {eta}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    // Lines numbered as an editor shows them: the header is line 1.
    let mut summary = Summary { skipped: resume_after.saturating_sub(1), ..Summary::default() };
    bar.set_position(summary.skipped);
    let records = reader.records().enumerate().filter_map(|(i, record)| {
        let number = i as u64 + 2;
        (number > resume_after).then(|| Line {
            number,
            request: record.map_err(|e| format!("not a CSV row: {e}")).and_then(|r| columns.request(&r)),
        })
    });
    let ledger = LedgerServiceClient::new(args.client.channel()?).max_decoding_message_size(64 << 20);
    let batches = futures::stream::iter(records)
        .chunks(usize::from(args.batch_size))
        .map(|lines| send(&args.client, ledger.clone(), args.merchant.clone(), lines))
        .buffered(usize::from(args.concurrency));
    let mut batches = std::pin::pin!(batches);
    let mut interrupted = false;
    let stop = tokio::signal::ctrl_c();
    let mut stop = std::pin::pin!(stop);
    loop {
        let next = tokio::select! {
            next = batches.next() => next,
            _ = &mut stop, if !interrupted => {
                interrupted = true;
                // The calls in flight are abandoned: whatever they booked, the
                // next run is answered as replayed.
                break;
            }
        };
        let Some(results) = next else { break };
        let results = results?;
        let mut last = 0;
        for (number, outcome) in results {
            match outcome {
                Ok(Outcome::Booked) => summary.booked += 1,
                Ok(_) => summary.replayed += 1,
                Err(reason) => summary.refused.push((number, reason)),
            }
            last = number;
            bar.inc(1);
        }
        write_state(
            &state_file,
            &State { merchant: args.merchant.clone(), file_len, done_through_line: last },
        )?;
    }
    bar.finish_and_clear();
    if !interrupted {
        let _ = std::fs::remove_file(&state_file);
    }
    crate::outln!(
        "{} entries: {} booked, {} replayed (booked by an earlier run), {} refused{}",
        summary.booked + summary.replayed + summary.refused.len() as u64,
        summary.booked,
        summary.replayed,
        summary.refused.len(),
        if summary.skipped > 0 {
            format!(", {} lines done by an earlier run skipped", summary.skipped)
        } else {
            String::new()
        },
    );
    for (line, reason) in &summary.refused {
        crate::outln!("line {line}: {reason}");
    }
    if interrupted {
        bail!("interrupted: run the same command again to continue after the last line done");
    }
    if !summary.refused.is_empty() {
        bail!(
            "{} line(s) refused: fix them and run the import again (booked lines are not booked twice)",
            summary.refused.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_become_exact_minor_units_in_the_currency_exponent() {
        assert_eq!(decimal_to_minor("10.50", "BRL"), Ok(1050));
        assert_eq!(decimal_to_minor("10.5", "BRL"), Ok(1050));
        assert_eq!(decimal_to_minor("10", "BRL"), Ok(1000));
        assert_eq!(decimal_to_minor("500", "JPY"), Ok(500));
        assert_eq!(decimal_to_minor("-1.00", "BRL"), Ok(-100));
        assert!(decimal_to_minor("1.005", "BRL").unwrap_err().contains("more than 2 decimal places"));
        assert!(decimal_to_minor("1.5", "JPY").is_err());
        for bad in ["", ".5", "1.", "1,50", "1e3", "0x10", "99999999999999999999"] {
            assert!(decimal_to_minor(bad, "BRL").is_err(), "{bad}");
        }
    }

    #[test]
    fn the_header_must_name_known_columns_once_and_one_amount() {
        let header = |cols: &[&str]| Columns::from_header(&csv::StringRecord::from(cols.to_vec()));
        assert!(header(&["request_id", "type", "currency", "amount_minor"]).is_ok());
        assert!(header(&["request_id", "type", "currency"]).is_err());
        assert!(header(&["request_id", "type", "currency", "amount", "amount_minor"]).is_err());
        assert!(header(&["request_id", "type", "currency", "amount", "colour"]).is_err());
        let c = header(&["type", "currency", "amount", "request_id", "metadata.order"]).unwrap();
        let row = csv::StringRecord::from(vec!["debit", "brl", "2.30", "k-1", "A-1"]);
        let request = c.request(&row).unwrap();
        assert_eq!(request.r#type, pb::EntryType::Debit as i32);
        assert_eq!(request.amount.unwrap().minor_units, 230);
        assert_eq!(request.metadata.get("order").map(String::as_str), Some("A-1"));
        let bad = csv::StringRecord::from(vec!["refund", "BRL", "2.30", "k-2", ""]);
        assert!(c.request(&bad).unwrap_err().starts_with("type:"));
    }
}
