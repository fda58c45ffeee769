//! Period close: the rule that a closed period's books no longer change, the
//! requests that close and reopen them, and the digest that proves later what
//! a close covered.
//!
//! The digest is computed the same way when closing and when verifying, from
//! the entries alone: per (business date, currency), a SHA-256 over that day's
//! entries in id order (every stored field, length-prefixed) and the day's
//! figures (count, credits, debits, closing balance); the close's digest is a
//! SHA-256 over those days in (date, currency) order. A day's own digest lets
//! a verification name the day whose rows changed.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use sha2::{Digest, Sha256};

use super::{BookingDate, Description, Entry, EntryKind, MerchantId, Violations};

/// An entry dated in a closed period: refused where it is booked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the books of this merchant are closed through {closed_through}: an entry dated {date} cannot be booked \
     (book a correction in the open period, after {closed_through})"
)]
pub struct PeriodClosed {
    /// The last closed business date.
    pub closed_through: NaiveDate,
    /// The refused entry's booking date.
    pub date: NaiveDate,
}

/// Refuses `date` when the books are closed on it.
pub fn check_open(date: NaiveDate, closed_through: Option<NaiveDate>) -> Result<(), PeriodClosed> {
    match closed_through {
        Some(through) if date <= through => Err(PeriodClosed { closed_through: through, date }),
        _ => Ok(()),
    }
}

/// The fields of a ClosePeriod request, as sent.
#[derive(Debug, Clone, Copy)]
pub struct CloseCommand<'a> {
    /// `merchant_id`.
    pub merchant_id: &'a str,
    /// `closed_through`.
    pub closed_through: &'a str,
    /// `note`.
    pub note: &'a str,
}

/// A validated close request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedClose {
    /// Whose books.
    pub merchant_id: MerchantId,
    /// The last business date closed.
    pub closed_through: NaiveDate,
    /// The caller's note.
    pub note: Description,
}

impl CloseCommand<'_> {
    /// Validates every field: the date is required and not after `today`.
    pub fn parse(&self, today: NaiveDate) -> Result<ParsedClose, Violations> {
        let mut v = Violations::default();
        let merchant_id = v.check("merchant_id", MerchantId::parse(self.merchant_id));
        let closed_through = if self.closed_through.is_empty() {
            v.add("closed_through", "is required: the last business date to close, YYYY-MM-DD");
            None
        } else {
            v.check("closed_through", BookingDate::parse_date(self.closed_through)).and_then(|date| {
                if date > today {
                    v.add(
                        "closed_through",
                        format!("{date} is in the future (today is {today}): only past days can close"),
                    );
                    None
                } else {
                    Some(date)
                }
            })
        };
        let note = v.check("note", Description::parse(self.note));
        v.finish(|| {
            Some(ParsedClose { merchant_id: merchant_id?, closed_through: closed_through?, note: note? })
        })
    }
}

/// The fields of a ReopenPeriod request, as sent.
#[derive(Debug, Clone, Copy)]
pub struct ReopenCommand<'a> {
    /// `merchant_id`.
    pub merchant_id: &'a str,
    /// `reason`.
    pub reason: &'a str,
}

impl ReopenCommand<'_> {
    /// Validates every field: the reason is required.
    pub fn parse(&self) -> Result<(MerchantId, Description), Violations> {
        let mut v = Violations::default();
        let merchant_id = v.check("merchant_id", MerchantId::parse(self.merchant_id));
        let reason = if self.reason.trim().is_empty() {
            v.add("reason", "is required: say why the period is reopened");
            None
        } else {
            v.check("reason", Description::parse(self.reason))
        };
        v.finish(|| Some((merchant_id?, reason?)))
    }
}

/// A close of a merchant's books, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodClose {
    /// Its id (a ULID).
    pub id: String,
    /// Whose books.
    pub merchant_id: String,
    /// The last business date closed.
    pub closed_through: NaiveDate,
    /// The close in force when it was made, if any.
    pub previous_closed_through: Option<NaiveDate>,
    /// The caller's note.
    pub note: String,
    /// Who closed (a token's subject; empty when the install has no authentication).
    pub closed_by: String,
    /// When.
    pub closed_at: chrono::DateTime<chrono::Utc>,
    /// Entries dated on or before `closed_through`.
    pub entry_count: i64,
    /// SHA-256 (hex) over the closed days (see the module documentation).
    pub digest: String,
    /// The closing balance per currency on `closed_through`.
    pub closing_balances: Vec<(String, i64)>,
    /// When reopened: when, by whom, why.
    pub reopened: Option<Reopened>,
}

/// How a close was reopened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reopened {
    /// When.
    pub at: chrono::DateTime<chrono::Utc>,
    /// Who.
    pub by: String,
    /// Why.
    pub reason: String,
}

/// Why a close or reopen was refused by the rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseRefused {
    /// The books are closed through that date or later already.
    #[error("the books are already closed through {current}: close a later date, or reopen first")]
    AlreadyClosed {
        /// The closed-through date in force.
        current: NaiveDate,
    },
    /// Nothing to reopen.
    #[error("the books of merchant {merchant} are not closed: there is nothing to reopen")]
    NotClosed {
        /// The merchant.
        merchant: String,
    },
}

/// One (business date, currency) of a merchant's books, as closed or as recomputed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayFigures {
    /// The business date.
    pub date: NaiveDate,
    /// ISO 4217 code.
    pub currency: String,
    /// Entries booked for it.
    pub entry_count: i64,
    /// Sum of its credits.
    pub credits: i64,
    /// Sum of its debits.
    pub debits: i64,
    /// The running balance at the end of the day, in this currency.
    pub closing: i64,
    /// SHA-256 (hex) over the day's entries and figures.
    pub digest: String,
}

/// What a close covers: every (day, currency) with entries, and the digest over them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BooksDigest {
    /// By (date, currency).
    pub days: Vec<DayFigures>,
    /// Entries covered.
    pub entry_count: i64,
    /// SHA-256 (hex) over `days`.
    pub digest: String,
}

impl BooksDigest {
    /// The closing balance per currency at the end of the covered days.
    pub fn closing_balances(&self) -> BTreeMap<&str, i64> {
        self.days.iter().map(|d| (d.currency.as_str(), d.closing)).collect()
    }

    /// The digest over recorded `days`, as a close computes it: tells whether
    /// the recorded figures themselves were changed after the close.
    pub fn digest_of(days: &[DayFigures]) -> String {
        digest_of_days(days)
    }

    /// The digest over the days on or before `through` only: what a close
    /// through that date recorded (the days of one pass serve every close).
    pub fn through(&self, through: NaiveDate) -> BooksDigest {
        let days: Vec<DayFigures> = self.days.iter().filter(|d| d.date <= through).cloned().collect();
        let entry_count = days.iter().map(|d| d.entry_count).sum();
        BooksDigest { digest: digest_of_days(&days), entry_count, days }
    }
}

fn digest_of_days(days: &[DayFigures]) -> String {
    let mut hash = Sha256::new();
    for d in days {
        put(&mut hash, &d.date.format("%Y-%m-%d").to_string());
        put(&mut hash, &d.currency);
        put(&mut hash, &d.digest);
    }
    hex(&hash.finalize())
}

/// Why entries could not be folded into a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// Fed out of (date, id) order.
    #[error("entries out of (booking date, id) order at entry {0}")]
    OutOfOrder(String),
    /// A sum passed 64 bits (the ledger refuses such entries; the rows were changed).
    #[error("the sums of {0} pass 64 bits")]
    Overflow(String),
}

#[derive(Debug, Default)]
struct OpenDay {
    hash: Sha256,
    count: i64,
    credits: i64,
    debits: i64,
}

/// Folds entries, fed in (booking date, id) order, into a [`BooksDigest`].
#[derive(Debug, Default)]
pub struct DigestBuilder {
    day: Option<NaiveDate>,
    last: Option<(NaiveDate, String)>,
    open: BTreeMap<String, OpenDay>,
    running: BTreeMap<String, i64>,
    out: BooksDigest,
}

impl DigestBuilder {
    /// Adds the next entry.
    pub fn push(&mut self, entry: &Entry) -> Result<(), DigestError> {
        let e = &entry.booked;
        let date = e.booking_date.date();
        let id = e.id.to_string();
        if self.last.as_ref().is_some_and(|(d, i)| (*d, i.as_str()) >= (date, id.as_str())) {
            return Err(DigestError::OutOfOrder(id));
        }
        if self.day != Some(date) {
            self.flush();
            self.day = Some(date);
        }
        let currency = e.amount.currency().code().to_owned();
        let day = self.open.entry(currency).or_default();
        let overflow = || DigestError::Overflow(id.clone());
        let amount = e.amount.minor_units();
        match e.kind {
            EntryKind::Credit => day.credits = day.credits.checked_add(amount).ok_or_else(overflow)?,
            EntryKind::Debit => day.debits = day.debits.checked_add(amount).ok_or_else(overflow)?,
        }
        day.count += 1;
        for field in [
            id.as_str(),
            e.merchant_id.as_str(),
            e.kind.as_str(),
            e.amount.currency().code(),
            &amount.to_string(),
            &e.booking_date.to_string(),
            e.description.as_str(),
            e.request_id.as_ref().map_or("", |k| k.as_str()),
            &e.reverses.map(|r| r.to_string()).unwrap_or_default(),
            &entry.created_at.timestamp_micros().to_string(),
            &e.metadata.canonical(),
        ] {
            put(&mut day.hash, field);
        }
        self.last = Some((date, id));
        Ok(())
    }

    /// The digest of everything pushed.
    pub fn finish(mut self) -> Result<BooksDigest, DigestError> {
        self.flush();
        let mut out = self.out;
        out.digest = digest_of_days(&out.days);
        Ok(out)
    }

    fn flush(&mut self) {
        let Some(date) = self.day else { return };
        for (currency, day) in std::mem::take(&mut self.open) {
            let running = self.running.entry(currency.clone()).or_default();
            // Bounded by the all-time totals the ledger keeps within 64 bits.
            *running = running.saturating_add(day.credits).saturating_sub(day.debits);
            let mut hash = day.hash;
            for figure in [day.count, day.credits, day.debits, *running] {
                put(&mut hash, &figure.to_string());
            }
            self.out.entry_count += day.count;
            self.out.days.push(DayFigures {
                date,
                currency,
                entry_count: day.count,
                credits: day.credits,
                debits: day.debits,
                closing: *running,
                digest: hex(&hash.finalize()),
            });
        }
    }
}

fn put(hash: &mut Sha256, field: &str) {
    // Length-prefixed, so no two different field lists hash alike.
    hash.update((field.len() as u64).to_be_bytes());
    hash.update(field.as_bytes());
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One way the books now differ from what a close recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// A day the close recorded has no entries now.
    Missing(DayFigures),
    /// A day with entries now that the close did not cover.
    Added(DayFigures),
    /// A day whose entries or figures changed: as recorded, and now.
    Changed {
        /// As the close recorded it.
        recorded: DayFigures,
        /// As recomputed from the entries.
        now: DayFigures,
    },
}

/// Compares the days a close recorded with the days recomputed now (both in
/// (date, currency) order); empty when the books are as closed.
pub fn compare(recorded: &[DayFigures], now: &[DayFigures]) -> Vec<Difference> {
    let key = |d: &DayFigures| (d.date, d.currency.clone());
    let recorded: BTreeMap<_, _> = recorded.iter().map(|d| (key(d), d)).collect();
    let now: BTreeMap<_, _> = now.iter().map(|d| (key(d), d)).collect();
    let mut keys: Vec<_> = recorded.keys().chain(now.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| match (recorded.get(&k), now.get(&k)) {
            (Some(r), None) => Some(Difference::Missing((*r).clone())),
            (None, Some(n)) => Some(Difference::Added((*n).clone())),
            (Some(r), Some(n)) if r != n => {
                Some(Difference::Changed { recorded: (*r).clone(), now: (*n).clone() })
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::domain::{Currency, EntryId, Metadata, Money, NewEntry, RequestId};

    fn entry(date: &str, kind: EntryKind, currency: &str, amount: i64, id: &str) -> Entry {
        Entry {
            booked: NewEntry {
                id: EntryId::parse(id).unwrap(),
                merchant_id: MerchantId::parse("m").unwrap(),
                kind,
                amount: Money::positive(Currency::parse(currency).unwrap(), amount).unwrap(),
                booking_date: BookingDate::from_stored(BookingDate::parse_date(date).unwrap()),
                description: Description::default(),
                request_id: Some(RequestId::parse(id).unwrap()),
                reverses: None,
                metadata: Metadata::default(),
            },
            created_at: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
            reversed_by: None,
        }
    }

    const A: &str = "01JAAAAAAAAAAAAAAAAAAAAAAA";
    const B: &str = "01JBBBBBBBBBBBBBBBBBBBBBBB";
    const C: &str = "01JCCCCCCCCCCCCCCCCCCCCCCC";

    fn books(entries: &[Entry]) -> BooksDigest {
        let mut b = DigestBuilder::default();
        for e in entries {
            b.push(e).unwrap();
        }
        b.finish().unwrap()
    }

    #[test]
    fn figures_carry_the_running_balance_per_currency() {
        let d = books(&[
            entry("2026-01-01", EntryKind::Credit, "BRL", 1000, A),
            entry("2026-01-01", EntryKind::Credit, "USD", 7, B),
            entry("2026-01-03", EntryKind::Debit, "BRL", 300, C),
        ]);
        let figures: Vec<_> =
            d.days.iter().map(|x| (x.date.to_string(), x.currency.as_str(), x.closing)).collect();
        assert_eq!(
            figures,
            [
                ("2026-01-01".into(), "BRL", 1000),
                ("2026-01-01".into(), "USD", 7),
                ("2026-01-03".into(), "BRL", 700)
            ]
        );
        assert_eq!(d.entry_count, 3);
        assert_eq!(d.closing_balances().get("BRL"), Some(&700));
        // The digest of a prefix is what a close through that day records.
        let first = d.through(BookingDate::parse_date("2026-01-02").unwrap());
        assert_eq!(
            first,
            books(&[
                entry("2026-01-01", EntryKind::Credit, "BRL", 1000, A),
                entry("2026-01-01", EntryKind::Credit, "USD", 7, B),
            ])
        );
    }

    #[test]
    fn any_changed_field_changes_the_day_and_the_digest_and_compare_names_the_day() {
        let before = books(&[
            entry("2026-01-01", EntryKind::Credit, "BRL", 1000, A),
            entry("2026-01-02", EntryKind::Credit, "BRL", 5, B),
        ]);
        let mut tampered = entry("2026-01-02", EntryKind::Credit, "BRL", 5, B);
        tampered.booked.description = Description::parse("changed").unwrap();
        let after = books(&[entry("2026-01-01", EntryKind::Credit, "BRL", 1000, A), tampered]);
        assert_ne!(before.digest, after.digest);
        let diff = compare(&before.days, &after.days);
        assert_eq!(diff.len(), 1, "{diff:?}");
        assert!(matches!(&diff[0], Difference::Changed { recorded, now }
            if recorded.date.to_string() == "2026-01-02" && recorded.credits == now.credits));
        assert!(compare(&before.days, &before.days).is_empty());
        let fewer = books(&[entry("2026-01-01", EntryKind::Credit, "BRL", 1000, A)]);
        assert!(matches!(compare(&before.days, &fewer.days)[..], [Difference::Missing(_)]));
    }

    #[test]
    fn out_of_order_entries_are_refused() {
        let mut b = DigestBuilder::default();
        b.push(&entry("2026-01-02", EntryKind::Credit, "BRL", 1, B)).unwrap();
        assert!(b.push(&entry("2026-01-01", EntryKind::Credit, "BRL", 1, A)).is_err());
    }

    #[test]
    fn closed_periods_refuse_their_dates_only() {
        let through = BookingDate::parse_date("2026-10-31").unwrap();
        let day = |s| BookingDate::parse_date(s).unwrap();
        assert!(check_open(day("2026-10-31"), Some(through)).is_err());
        assert!(check_open(day("2026-11-01"), Some(through)).is_ok());
        assert!(check_open(day("2020-01-01"), None).is_ok());
    }

    #[test]
    fn a_close_needs_a_past_date_and_a_reopen_a_reason() {
        let today = BookingDate::parse_date("2026-12-03").unwrap();
        let fields = |c: CloseCommand<'_>| {
            c.parse(today).unwrap_err().list().iter().map(|v| v.field.clone()).collect::<Vec<_>>()
        };
        let close = CloseCommand { merchant_id: "m", closed_through: "", note: "" };
        assert_eq!(fields(close), ["closed_through"]);
        assert_eq!(fields(CloseCommand { closed_through: "2026-12-04", ..close }), ["closed_through"]);
        assert_eq!(fields(CloseCommand { closed_through: "2026-13-01", ..close }), ["closed_through"]);
        assert!(CloseCommand { closed_through: "2026-12-03", ..close }.parse(today).is_ok());
        let reopen = ReopenCommand { merchant_id: "m", reason: " " };
        assert_eq!(reopen.parse().unwrap_err().list()[0].field, "reason");
    }
}
