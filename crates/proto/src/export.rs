//! The CSV of the exports, written once for the REST download routes and the
//! `fluxo entries export` / `fluxo balances export` commands, so both give
//! byte-for-byte the same file.
//!
//! Money is in exact integer minor units beside its ISO 4217 code (never a
//! decimal or a float); instants are RFC 3339 in UTC; an entry's metadata is
//! one column holding a JSON object (keys sorted). Quoting is the `csv`
//! crate's: a field is quoted when it holds a comma, a quote or a line break.

use std::{collections::BTreeMap, io};

use prost::Message;

use crate::{balance_v1, ledger_v1};

/// The columns of an entries export, in order.
pub const ENTRY_COLUMNS: [&str; 12] = [
    "id",
    "merchant_id",
    "type",
    "currency",
    "amount_minor",
    "booking_date",
    "description",
    "request_id",
    "created_at",
    "reverses_entry_id",
    "reversed_by_entry_id",
    "metadata",
];

/// The columns of a daily balances export, in order.
pub const BALANCE_COLUMNS: [&str; 11] = [
    "merchant_id",
    "date",
    "currency",
    "total_credits_minor",
    "total_debits_minor",
    "net_minor",
    "opening_balance_minor",
    "closing_balance_minor",
    "entry_count",
    "as_of",
    "possibly_stale",
];

/// What an export holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Ledger entries (`ExportEntries`).
    Entries,
    /// Daily balances (`ExportDailyBalances`).
    DailyBalances,
}

/// A chunk that is not what its table's stream sends.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The chunk does not decode as the table's response message.
    #[error("undecodable export chunk: {0}")]
    Decode(#[from] prost::DecodeError),
    /// Writing the CSV failed.
    #[error("writing the CSV: {0}")]
    Csv(#[from] csv::Error),
    /// Writing the output failed.
    #[error("writing the CSV: {0}")]
    Io(#[from] io::Error),
}

impl Table {
    /// The table a server-streaming RPC sends, by the full name of its
    /// response message; `None` for a stream that is not an export.
    pub fn of_response(full_name: &str) -> Option<Self> {
        match full_name {
            "fluxo.ledger.v1.ExportEntriesResponse" => Some(Self::Entries),
            "fluxo.balance.v1.ExportDailyBalancesResponse" => Some(Self::DailyBalances),
            _ => None,
        }
    }

    /// The header row's names.
    pub fn columns(self) -> &'static [&'static str] {
        match self {
            Self::Entries => &ENTRY_COLUMNS,
            Self::DailyBalances => &BALANCE_COLUMNS,
        }
    }

    /// The file name a download suggests, e.g. `entries-m-1.csv`: the
    /// merchant id with anything but `A-Z a-z 0-9 . _ -` replaced by `_`.
    pub fn file_name(self, merchant_id: &str) -> String {
        let stem = match self {
            Self::Entries => "entries",
            Self::DailyBalances => "daily-balances",
        };
        let safe: String = merchant_id
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
            .collect();
        if safe.is_empty() { format!("{stem}.csv") } else { format!("{stem}-{safe}.csv") }
    }

    /// The header row, as CSV bytes.
    pub fn header(self) -> Vec<u8> {
        let mut out = CsvWriter::continuing(self, Vec::new());
        // Writing to memory cannot fail.
        let _ = out.csv.write_record(self.columns());
        out.into_inner().unwrap_or_default()
    }

    /// The rows of one encoded response message of the table's stream, as
    /// CSV bytes, and how many rows they are.
    pub fn rows(self, chunk: &[u8]) -> Result<(Vec<u8>, u64), ExportError> {
        let mut out = CsvWriter::continuing(self, Vec::new());
        out.encoded(chunk)?;
        let rows = out.rows();
        Ok((out.into_inner()?, rows))
    }
}

/// Writes an export as CSV to `W`, a chunk at a time.
#[derive(Debug)]
pub struct CsvWriter<W: io::Write> {
    table: Table,
    csv: csv::Writer<W>,
    rows: u64,
}

impl<W: io::Write> CsvWriter<W> {
    /// A writer of `table` that has written its header row.
    pub fn new(table: Table, out: W) -> Result<Self, ExportError> {
        let mut writer = Self::continuing(table, out);
        writer.csv.write_record(table.columns())?;
        Ok(writer)
    }

    /// A writer of `table` that continues an earlier output: no header row.
    pub fn continuing(table: Table, out: W) -> Self {
        let csv = csv::WriterBuilder::new().has_headers(false).from_writer(out);
        Self { table, csv, rows: 0 }
    }

    /// Rows written so far (the header not counted).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// One row per entry.
    pub fn entries(&mut self, entries: &[ledger_v1::Entry]) -> Result<(), ExportError> {
        for entry in entries {
            self.csv.write_record(entry_row(entry))?;
            self.rows += 1;
        }
        Ok(())
    }

    /// One row per day.
    pub fn balances(&mut self, balances: &[balance_v1::DailyBalance]) -> Result<(), ExportError> {
        for day in balances {
            self.csv.write_record(balance_row(day))?;
            self.rows += 1;
        }
        Ok(())
    }

    /// The rows of one encoded response message of the table's stream.
    pub fn encoded(&mut self, chunk: &[u8]) -> Result<(), ExportError> {
        match self.table {
            Table::Entries => self.entries(&ledger_v1::ExportEntriesResponse::decode(chunk)?.entries),
            Table::DailyBalances => {
                self.balances(&balance_v1::ExportDailyBalancesResponse::decode(chunk)?.balances)
            }
        }
    }

    /// Writes out what is buffered.
    pub fn flush(&mut self) -> Result<(), ExportError> {
        Ok(self.csv.flush()?)
    }

    /// The output, everything written to it.
    pub fn into_inner(self) -> Result<W, ExportError> {
        self.csv.into_inner().map_err(|e| ExportError::Io(io::Error::other(e.to_string())))
    }
}

fn timestamp(at: Option<&prost_types::Timestamp>) -> String {
    at.map(ToString::to_string).unwrap_or_default()
}

fn entry_row(e: &ledger_v1::Entry) -> [String; ENTRY_COLUMNS.len()] {
    let (currency, amount) =
        e.amount.as_ref().map_or((String::new(), 0), |m| (m.currency_code.clone(), m.minor_units));
    let metadata: BTreeMap<&str, &str> = e.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    [
        e.id.clone(),
        e.merchant_id.clone(),
        e.r#type().as_str_name().to_owned(),
        currency,
        amount.to_string(),
        e.booking_date.clone(),
        e.description.clone(),
        e.request_id.clone(),
        timestamp(e.created_at.as_ref()),
        e.reverses_entry_id.clone(),
        e.reversed_by_entry_id.clone(),
        serde_json::to_string(&metadata).unwrap_or_else(|_| "{}".to_owned()),
    ]
}

fn balance_row(d: &balance_v1::DailyBalance) -> [String; BALANCE_COLUMNS.len()] {
    [
        d.merchant_id.clone(),
        d.date.clone(),
        d.currency_code.clone(),
        d.total_credits_minor.to_string(),
        d.total_debits_minor.to_string(),
        d.net_minor.to_string(),
        d.opening_balance_minor.to_string(),
        d.closing_balance_minor.to_string(),
        d.entry_count.to_string(),
        timestamp(d.as_of.as_ref()),
        d.possibly_stale.to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> ledger_v1::Entry {
        ledger_v1::Entry {
            id: "01JD0000000000000000000000".into(),
            merchant_id: "m-1".into(),
            r#type: ledger_v1::EntryType::Debit.into(),
            amount: Some(ledger_v1::Money { currency_code: "BRL".into(), minor_units: 1050 }),
            booking_date: "2026-11-20".into(),
            description: "a, \"quoted\" sale".into(),
            request_id: "k-1".into(),
            created_at: Some(prost_types::Timestamp { seconds: 1_795_000_000, nanos: 123_456_000 }),
            metadata: [("order".to_owned(), "A-1".to_owned()), ("channel".to_owned(), "pos".to_owned())]
                .into(),
            ..Default::default()
        }
    }

    #[test]
    fn rows_read_back_as_written_with_exact_minor_units() {
        let mut out = CsvWriter::new(Table::Entries, Vec::new()).unwrap();
        out.entries(&[entry()]).unwrap();
        let bytes = out.into_inner().unwrap();
        let mut reader = csv::Reader::from_reader(bytes.as_slice());
        assert_eq!(reader.headers().unwrap().iter().collect::<Vec<_>>(), ENTRY_COLUMNS);
        let row = reader.records().next().unwrap().unwrap();
        assert_eq!(row.get(2), Some("DEBIT"));
        assert_eq!(row.get(3), Some("BRL"));
        assert_eq!(row.get(4), Some("1050"));
        assert_eq!(row.get(6), Some("a, \"quoted\" sale"));
        assert_eq!(row.get(8), Some("2026-11-18T11:06:40.123456Z"));
        assert_eq!(row.get(11), Some(r#"{"channel":"pos","order":"A-1"}"#));
    }

    #[test]
    fn header_and_encoded_chunks_make_the_same_file_as_the_writer() {
        let chunk = ledger_v1::ExportEntriesResponse { entries: vec![entry(), entry()] }.encode_to_vec();
        let (rows, count) = Table::Entries.rows(&chunk).unwrap();
        assert_eq!(count, 2);
        let pieced = [Table::Entries.header(), rows].concat();
        let mut out = CsvWriter::new(Table::Entries, Vec::new()).unwrap();
        out.encoded(&chunk).unwrap();
        assert_eq!(pieced, out.into_inner().unwrap());
        assert!(Table::Entries.rows(b"\xff\xff").is_err());
    }

    #[test]
    fn exports_are_found_by_their_response_and_named_for_their_merchant() {
        assert_eq!(Table::of_response("fluxo.ledger.v1.ExportEntriesResponse"), Some(Table::Entries));
        assert_eq!(Table::of_response("fluxo.ledger.v1.Entry"), None);
        assert_eq!(Table::DailyBalances.file_name("m-1"), "daily-balances-m-1.csv");
        assert_eq!(Table::Entries.file_name("a\"b"), "entries-a_b.csv");
    }
}
