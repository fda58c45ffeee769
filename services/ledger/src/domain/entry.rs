use std::fmt;

use chrono::{DateTime, NaiveDate, Utc};
use sha2::{Digest, Sha256};

use super::{
    BookingDate, Currency, Description, EntryId, MerchantId, Metadata, Money, RequestId, Violations,
};

/// Whether an entry brings money in or takes it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Money in.
    Credit,
    /// Money out.
    Debit,
}

/// Why an entry type was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KindError {
    /// Left at its zero value.
    #[error("is required: CREDIT or DEBIT")]
    Missing,
    /// A number no version of the API defines.
    #[error("{0} is not a known entry type: use CREDIT or DEBIT")]
    Unknown(i32),
}

impl EntryKind {
    /// The opposite direction: what a reversal books.
    pub fn opposite(self) -> Self {
        match self {
            Self::Credit => Self::Debit,
            Self::Debit => Self::Credit,
        }
    }

    /// The stored and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Credit => "CREDIT",
            Self::Debit => "DEBIT",
        }
    }

    /// Reads a stored name back.
    pub fn from_stored(name: &str) -> Option<Self> {
        match name {
            "CREDIT" => Some(Self::Credit),
            "DEBIT" => Some(Self::Debit),
            _ => None,
        }
    }
}

/// A SHA-256 digest of what a request asked for, stored with its idempotency
/// key: a replay must ask for exactly the same thing to get the original back.
#[derive(Clone, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    fn of(parts: &[&str]) -> Self {
        let mut hash = Sha256::new();
        for part in parts {
            // Length-prefixed, so no two different field lists hash alike.
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        Self(hash.finalize().into())
    }

    /// Lower-case hex, as stored.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

/// An entry about to be booked: every field valid, id already assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// The new entry's id.
    pub id: EntryId,
    /// Owner.
    pub merchant_id: MerchantId,
    /// Direction.
    pub kind: EntryKind,
    /// Positive amount.
    pub amount: Money,
    /// Business date.
    pub booking_date: BookingDate,
    /// Caller's text.
    pub description: Description,
    /// Idempotency key, when the caller sent one (always for RecordEntry).
    pub request_id: Option<RequestId>,
    /// For a reversal: the entry it cancels.
    pub reverses: Option<EntryId>,
    /// The caller's labels.
    pub metadata: Metadata,
}

/// A committed entry as read from the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The fields it was booked with.
    pub booked: NewEntry,
    /// When it was committed.
    pub created_at: DateTime<Utc>,
    /// The reversal that cancels it, if any.
    pub reversed_by: Option<EntryId>,
}

/// The fields of a RecordEntry request, as sent.
#[derive(Debug, Clone)]
pub struct RecordCommand<'a> {
    /// `merchant_id`.
    pub merchant_id: &'a str,
    /// `type`, already mapped from the wire enum.
    pub kind: Result<EntryKind, KindError>,
    /// `amount` as (`currency_code`, `minor_units`); `None` when the message was absent.
    pub amount: Option<(&'a str, i64)>,
    /// `booking_date`; empty for today.
    pub booking_date: &'a str,
    /// `description`.
    pub description: &'a str,
    /// `request_id`.
    pub request_id: &'a str,
    /// `metadata`, in any order.
    pub metadata: Vec<(&'a str, &'a str)>,
}

impl RecordCommand<'_> {
    /// Validates every field, reporting all problems at once, and fingerprints the request.
    pub fn parse(&self, today: NaiveDate) -> Result<(NewEntry, Fingerprint), Violations> {
        let mut v = Violations::default();
        let merchant_id = v.check("merchant_id", MerchantId::parse(self.merchant_id));
        let kind = v.check("type", self.kind);
        let amount = match self.amount {
            None => {
                v.add("amount", "is required");
                None
            }
            Some((code, units)) => {
                let currency = v.check("amount.currency_code", Currency::parse(code));
                let money = currency.and_then(|c| v.check("amount.minor_units", Money::positive(c, units)));
                if currency.is_none() {
                    // Still report a bad amount when the currency is also wrong.
                    if let Some(reason) = positive_reason(units) {
                        v.add("amount.minor_units", reason);
                    }
                }
                money
            }
        };
        let booking_date = v.check("booking_date", BookingDate::parse_or_today(self.booking_date, today));
        let description = v.check("description", Description::parse(self.description));
        let request_id = v.check("request_id", RequestId::parse(self.request_id));
        let metadata = Metadata::parse("metadata", self.metadata.iter().copied(), Metadata::MAX_KEYS, &mut v);
        v.finish(|| {
            let (kind, amount, metadata) = (kind?, amount?, metadata?);
            let fingerprint = Fingerprint::of(&[
                "record",
                kind.as_str(),
                amount.currency().code(),
                &amount.minor_units().to_string(),
                self.booking_date,
                self.description,
                &metadata.canonical(),
            ]);
            Some((
                NewEntry {
                    id: EntryId::generate(),
                    merchant_id: merchant_id?,
                    kind,
                    amount,
                    booking_date: booking_date?,
                    description: description?,
                    request_id: Some(request_id?),
                    reverses: None,
                    metadata,
                },
                fingerprint,
            ))
        })
    }
}

fn positive_reason(units: i64) -> Option<String> {
    let brl = Currency::parse("BRL").ok()?;
    Money::positive(brl, units).err().map(|e| e.to_string())
}

/// The fields of a ReverseEntry request, as sent.
#[derive(Debug, Clone)]
pub struct ReverseCommand<'a> {
    /// `merchant_id`.
    pub merchant_id: &'a str,
    /// `entry_id`.
    pub entry_id: &'a str,
    /// `request_id`; empty when the caller sent none.
    pub request_id: &'a str,
    /// `booking_date`; empty for today.
    pub booking_date: &'a str,
    /// `description`; empty for the default.
    pub description: &'a str,
    /// `metadata`, in any order.
    pub metadata: Vec<(&'a str, &'a str)>,
}

/// A validated reversal request.
#[derive(Debug, Clone)]
pub struct ParsedReversal {
    /// Owner of the entry.
    pub merchant_id: MerchantId,
    /// The entry to reverse.
    pub entry_id: EntryId,
    /// Idempotency key and request fingerprint, when a key was sent.
    pub idempotency: Option<(RequestId, Fingerprint)>,
    booking_date: BookingDate,
    description: Option<Description>,
    metadata: Metadata,
}

impl ReverseCommand<'_> {
    /// Validates every field, reporting all problems at once.
    pub fn parse(&self, today: NaiveDate) -> Result<ParsedReversal, Violations> {
        let mut v = Violations::default();
        let merchant_id = v.check("merchant_id", MerchantId::parse(self.merchant_id));
        let entry_id = v.check("entry_id", EntryId::parse(self.entry_id));
        let request_id = if self.request_id.is_empty() {
            Some(None)
        } else {
            v.check("request_id", RequestId::parse(self.request_id)).map(Some)
        };
        let booking_date = v.check("booking_date", BookingDate::parse_or_today(self.booking_date, today));
        let description = v.check("description", Description::parse(self.description));
        let metadata = Metadata::parse("metadata", self.metadata.iter().copied(), Metadata::MAX_KEYS, &mut v);
        v.finish(|| {
            let (entry_id, metadata) = (entry_id?, metadata?);
            let idempotency = request_id?.map(|key| {
                let fp = Fingerprint::of(&[
                    "reverse",
                    &entry_id.to_string(),
                    self.booking_date,
                    self.description,
                    &metadata.canonical(),
                ]);
                (key, fp)
            });
            let description = description?;
            Some(ParsedReversal {
                merchant_id: merchant_id?,
                entry_id,
                idempotency,
                booking_date: booking_date?,
                description: (!description.as_str().is_empty()).then_some(description),
                metadata,
            })
        })
    }
}

/// Why a reversal cannot be booked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReversalRefused {
    /// The entry has been reversed already; reversing twice would double count.
    #[error("entry {entry} was already reversed by entry {by}")]
    AlreadyReversed {
        /// The entry the caller asked to reverse.
        entry: EntryId,
        /// The reversal that exists.
        by: EntryId,
    },
    /// The entry is itself a reversal; book a new entry instead.
    #[error("entry {entry} is a reversal (of entry {of}) and cannot be reversed; record a new entry instead")]
    IsAReversal {
        /// The entry the caller asked to reverse.
        entry: EntryId,
        /// What it reverses.
        of: EntryId,
    },
}

/// Decides the reversal of `original`: the opposite entry for the same amount,
/// referencing it. Refused when `original` is a reversal or already reversed.
pub fn decide_reversal(original: &Entry, request: &ParsedReversal) -> Result<NewEntry, ReversalRefused> {
    let booked = &original.booked;
    if let Some(of) = booked.reverses {
        return Err(ReversalRefused::IsAReversal { entry: booked.id, of });
    }
    if let Some(by) = original.reversed_by {
        return Err(ReversalRefused::AlreadyReversed { entry: booked.id, by });
    }
    let description = request.description.clone().unwrap_or_else(|| {
        // The generated text is short and control-free, so it always parses.
        Description::parse(&format!("reversal of {}", booked.id)).unwrap_or_default()
    });
    Ok(NewEntry {
        id: EntryId::generate(),
        merchant_id: booked.merchant_id.clone(),
        kind: booked.kind.opposite(),
        amount: booked.amount,
        booking_date: request.booking_date,
        description,
        request_id: request.idempotency.as_ref().map(|(key, _)| key.clone()),
        reverses: Some(booked.id),
        metadata: request.metadata.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, 21).unwrap()
    }

    fn credit<'a>() -> RecordCommand<'a> {
        RecordCommand {
            merchant_id: "m-1",
            kind: Ok(EntryKind::Credit),
            amount: Some(("BRL", 1050)),
            booking_date: "2026-11-20",
            description: "sale 1",
            request_id: "k-1",
            metadata: vec![("order", "A-1")],
        }
    }

    fn committed(entry: NewEntry) -> Entry {
        Entry { booked: entry, created_at: Utc::now(), reversed_by: None }
    }

    #[test]
    fn given_a_valid_request_when_parsed_then_every_field_is_kept() {
        let (entry, _) = credit().parse(today()).unwrap();
        assert_eq!(entry.merchant_id.as_str(), "m-1");
        assert_eq!(entry.kind, EntryKind::Credit);
        assert_eq!(entry.amount.minor_units(), 1050);
        assert_eq!(entry.booking_date.to_string(), "2026-11-20");
        assert_eq!(entry.request_id.unwrap().as_str(), "k-1");
    }

    #[test]
    fn given_many_bad_fields_when_parsed_then_each_is_named() {
        let cmd = RecordCommand {
            merchant_id: "",
            kind: Err(KindError::Unknown(7)),
            amount: Some(("XYZ", -1)),
            booking_date: "2026-13-01",
            description: "a\u{0}b",
            request_id: "",
            metadata: vec![("ok", "")],
        };
        let fields: Vec<_> = cmd.parse(today()).unwrap_err().list().iter().map(|v| v.field.clone()).collect();
        assert_eq!(
            fields,
            [
                "merchant_id",
                "type",
                "amount.currency_code",
                "amount.minor_units",
                "booking_date",
                "description",
                "request_id",
                "metadata[ok]"
            ]
        );
    }

    #[test]
    fn given_no_amount_when_parsed_then_amount_is_required() {
        let cmd = RecordCommand { amount: None, ..credit() };
        assert_eq!(cmd.parse(today()).unwrap_err().list()[0].field, "amount");
    }

    #[test]
    fn fingerprints_match_only_identical_requests() {
        let (_, a) = credit().parse(today()).unwrap();
        let (_, b) = credit().parse(today()).unwrap();
        assert_eq!(a, b);
        let (_, other_amount) =
            RecordCommand { amount: Some(("BRL", 1051)), ..credit() }.parse(today()).unwrap();
        let (_, other_text) = RecordCommand { description: "sale 2", ..credit() }.parse(today()).unwrap();
        let (_, other_kind) =
            RecordCommand { kind: Ok(EntryKind::Debit), ..credit() }.parse(today()).unwrap();
        let (_, other_labels) =
            RecordCommand { metadata: vec![("order", "A-2")], ..credit() }.parse(today()).unwrap();
        let (_, reordered) =
            RecordCommand { metadata: vec![("order", "A-1")], ..credit() }.parse(today()).unwrap();
        assert_ne!(a, other_labels);
        assert_eq!(a, reordered);
        assert_ne!(a, other_amount);
        assert_ne!(a, other_text);
        assert_ne!(a, other_kind);
    }

    fn reversal_of(entry: &Entry) -> ParsedReversal {
        ReverseCommand {
            merchant_id: entry.booked.merchant_id.as_str(),
            entry_id: &entry.booked.id.to_string(),
            request_id: "",
            booking_date: "",
            description: "",
            metadata: vec![],
        }
        .parse(today())
        .unwrap()
    }

    #[test]
    fn given_an_entry_when_reversed_then_the_opposite_amount_references_it() {
        let original = committed(credit().parse(today()).unwrap().0);
        let reversal = decide_reversal(&original, &reversal_of(&original)).unwrap();
        assert_eq!(reversal.kind, EntryKind::Debit);
        assert_eq!(reversal.amount, original.booked.amount);
        assert_eq!(reversal.reverses, Some(original.booked.id));
        assert_eq!(reversal.booking_date.date(), today());
        assert_eq!(reversal.description.as_str(), format!("reversal of {}", original.booked.id));
    }

    #[test]
    fn given_a_reversed_entry_when_reversed_again_then_refused() {
        let mut original = committed(credit().parse(today()).unwrap().0);
        let by = EntryId::generate();
        original.reversed_by = Some(by);
        let refused = decide_reversal(&original, &reversal_of(&original)).unwrap_err();
        assert_eq!(refused, ReversalRefused::AlreadyReversed { entry: original.booked.id, by });
    }

    #[test]
    fn given_a_reversal_when_reversed_then_refused() {
        let original = committed(credit().parse(today()).unwrap().0);
        let reversal = committed(decide_reversal(&original, &reversal_of(&original)).unwrap());
        let refused = decide_reversal(&reversal, &reversal_of(&reversal)).unwrap_err();
        assert!(matches!(refused, ReversalRefused::IsAReversal { .. }));
    }
}
