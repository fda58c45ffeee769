//! Domain entries as `fluxo.ledger.v1` messages, shared by the gRPC handlers
//! and the outbox so that an event carries exactly what the API answers.

use chrono::{DateTime, Utc};
use fluxo_proto::ledger_v1 as pb;

use crate::domain::{Entry, EntryKind, PeriodClose};

/// A UTC instant as a protobuf timestamp (instants are stored to the microsecond).
pub(crate) fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    fluxo_proto::time::from_micros(at.timestamp_micros())
}

/// The API view of an entry.
pub(crate) fn entry(entry: &Entry) -> pb::Entry {
    let booked = &entry.booked;
    pb::Entry {
        id: booked.id.to_string(),
        merchant_id: booked.merchant_id.as_str().to_owned(),
        r#type: match booked.kind {
            EntryKind::Credit => pb::EntryType::Credit,
            EntryKind::Debit => pb::EntryType::Debit,
        }
        .into(),
        amount: Some(pb::Money {
            currency_code: booked.amount.currency().code().to_owned(),
            minor_units: booked.amount.minor_units(),
        }),
        booking_date: booked.booking_date.to_string(),
        description: booked.description.as_str().to_owned(),
        request_id: booked.request_id.as_ref().map(|k| k.as_str().to_owned()).unwrap_or_default(),
        created_at: Some(timestamp(entry.created_at)),
        reverses_entry_id: booked.reverses.map(|id| id.to_string()).unwrap_or_default(),
        reversed_by_entry_id: entry.reversed_by.map(|id| id.to_string()).unwrap_or_default(),
        metadata: booked.metadata.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
    }
}

/// The outbox event for a newly committed entry.
pub(crate) fn entry_recorded(committed: &Entry, event_id: String, at: DateTime<Utc>) -> pb::EntryRecorded {
    pb::EntryRecorded { event_id, entry: Some(entry(committed)), occurred_at: Some(timestamp(at)) }
}

/// The API view of a period close.
pub(crate) fn period_close(close: &PeriodClose) -> pb::PeriodClose {
    let day = |d: chrono::NaiveDate| d.format("%Y-%m-%d").to_string();
    pb::PeriodClose {
        id: close.id.clone(),
        merchant_id: close.merchant_id.clone(),
        closed_through: day(close.closed_through),
        previous_closed_through: close.previous_closed_through.map(day).unwrap_or_default(),
        note: close.note.clone(),
        closed_by: close.closed_by.clone(),
        closed_at: Some(timestamp(close.closed_at)),
        entry_count: close.entry_count,
        digest: close.digest.clone(),
        closing_balances: close
            .closing_balances
            .iter()
            .map(|(currency, units)| pb::Money { currency_code: currency.clone(), minor_units: *units })
            .collect(),
        reopened_at: close.reopened.as_ref().map(|r| timestamp(r.at)),
        reopened_by: close.reopened.as_ref().map(|r| r.by.clone()).unwrap_or_default(),
        reopen_reason: close.reopened.as_ref().map(|r| r.reason.clone()).unwrap_or_default(),
    }
}
