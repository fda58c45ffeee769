use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, NaiveDate, Utc};
use sha2::{Digest, Sha256};

use super::{BookingDate, DateRange, EntryId, EntryKind, KindError, MerchantId, Metadata, Violations};

/// Which of a merchant's entries a list selects.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntryFilter {
    /// Booking dates, inclusive.
    pub dates: DateRange,
    /// Only this type, when set.
    pub kind: Option<EntryKind>,
    /// Only entries carrying every one of these labels.
    pub metadata: Metadata,
    /// Only entries committed at or after this instant.
    pub created_after: Option<DateTime<Utc>>,
    /// Only entries committed before this instant.
    pub created_before: Option<DateTime<Utc>>,
}

/// The filter fields of a ListEntries request, as sent.
#[derive(Debug, Clone, Default)]
pub struct FilterFields<'a> {
    /// `start_date`; empty for unbounded.
    pub start_date: &'a str,
    /// `end_date`; empty for unbounded.
    pub end_date: &'a str,
    /// `type`: `Err(KindError::Missing)` (unspecified) lists both.
    pub kind: Option<Result<EntryKind, KindError>>,
    /// `metadata`.
    pub metadata: Vec<(&'a str, &'a str)>,
    /// `created_after` as (seconds, nanos) since the epoch.
    pub created_after: Option<(i64, i32)>,
    /// `created_before` as (seconds, nanos) since the epoch.
    pub created_before: Option<(i64, i32)>,
}

impl EntryFilter {
    /// Most labels one list may filter on.
    pub const MAX_METADATA: usize = 4;

    /// Parses the filter fields, recording problems under their names.
    pub fn parse(fields: &FilterFields<'_>, v: &mut Violations) -> Self {
        let dates = DateRange::parse(fields.start_date, fields.end_date, v);
        let kind = match fields.kind {
            None | Some(Err(KindError::Missing)) => None,
            Some(Ok(kind)) => Some(kind),
            Some(Err(e)) => {
                v.add("type", e.to_string());
                None
            }
        };
        let metadata = Metadata::parse("metadata", fields.metadata.iter().copied(), Self::MAX_METADATA, v)
            .unwrap_or_default();
        let instant = |field: &str, at: Option<(i64, i32)>, v: &mut Violations| {
            let (secs, nanos) = at?;
            let parsed = u32::try_from(nanos).ok().and_then(|n| DateTime::from_timestamp(secs, n));
            if parsed.is_none() {
                v.add(field, format!("is not a valid timestamp ({secs} s, {nanos} ns)"));
            }
            parsed
        };
        let created_after = instant("created_after", fields.created_after, v);
        let created_before = instant("created_before", fields.created_before, v);
        if let (Some(a), Some(b)) = (created_after, created_before)
            && b <= a
        {
            v.add("created_before", format!("must be after created_after ({})", a.to_rfc3339()));
        }
        Self { dates, kind, metadata, created_after, created_before }
    }
}

/// Where the previous page ended: the last (booking date, id) it returned.
/// Listing resumes strictly after it, so concurrent writes never shift a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCursor {
    /// Booking date of the last entry returned.
    pub booking_date: NaiveDate,
    /// Id of the last entry returned.
    pub id: EntryId,
}

/// One page to read: how many entries and after which cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// Entries to return, in `1..=MAX_SIZE`.
    pub size: u64,
    /// Resume after this entry; `None` for the first page.
    pub after: Option<PageCursor>,
}

impl PageRequest {
    /// Page size when the caller leaves it at zero.
    pub const DEFAULT_SIZE: u64 = 100;
    /// Largest page served.
    pub const MAX_SIZE: u64 = 1000;

    /// Parses `page_size` and `page_token`; a token only fits the query it was issued for.
    pub fn parse(
        page_size: i32,
        page_token: &str,
        merchant: Option<&MerchantId>,
        filter: &EntryFilter,
        v: &mut Violations,
    ) -> Self {
        let size = match page_size {
            0 => Self::DEFAULT_SIZE,
            n if n < 0 => {
                v.add("page_size", format!("must not be negative, got {n}"));
                Self::DEFAULT_SIZE
            }
            n if i64::from(n) > Self::MAX_SIZE as i64 => {
                v.add("page_size", format!("must be at most {}, got {n}", Self::MAX_SIZE));
                Self::DEFAULT_SIZE
            }
            n => u64::from(n.unsigned_abs()),
        };
        let after = if page_token.is_empty() {
            None
        } else {
            let decoded = merchant.and_then(|m| PageCursor::decode(page_token, &query_tag(m, filter)));
            if decoded.is_none() {
                v.add("page_token", "is not a token this list issued for the same merchant_id and filters");
            }
            decoded
        };
        Self { size, after }
    }
}

impl PageCursor {
    /// The opaque token for the page after this cursor.
    pub fn encode(&self, merchant: &MerchantId, filter: &EntryFilter) -> String {
        let text = format!(
            "{}|{}|{}",
            query_tag(merchant, filter),
            BookingDate::from_stored(self.booking_date),
            self.id
        );
        URL_SAFE_NO_PAD.encode(text)
    }

    fn decode(token: &str, expected_tag: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        let text = std::str::from_utf8(&bytes).ok()?;
        let mut parts = text.split('|');
        let (tag, date, id) = (parts.next()?, parts.next()?, parts.next()?);
        if tag != expected_tag || parts.next().is_some() {
            return None;
        }
        Some(Self { booking_date: BookingDate::parse_date(date).ok()?, id: EntryId::parse(id).ok()? })
    }
}

/// A short digest of the query a token belongs to. A list by dates alone
/// digests what it did before the other filters existed, so tokens issued
/// before an upgrade still page on after it.
fn query_tag(merchant: &MerchantId, filter: &EntryFilter) -> String {
    let range = &filter.dates;
    let mut text = format!("{}|{:?}|{:?}", merchant.as_str(), range.start, range.end);
    let EntryFilter { kind, metadata, created_after, created_before, .. } = filter;
    if kind.is_some() || !metadata.is_empty() || created_after.is_some() || created_before.is_some() {
        let at = |t: &Option<DateTime<Utc>>| t.map(|t| t.timestamp_nanos_opt().unwrap_or(i64::MAX));
        text.push_str(&format!(
            "|{}|{}|{:?}|{:?}",
            kind.map_or("", |k| k.as_str()),
            metadata.canonical(),
            at(created_after),
            at(created_before)
        ));
    }
    Sha256::digest(text.as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_for_its_own_query_only() {
        let m = MerchantId::parse("m-1").unwrap();
        let other = MerchantId::parse("m-2").unwrap();
        let range = EntryFilter::default();
        let cursor = PageCursor {
            booking_date: NaiveDate::from_ymd_opt(2026, 11, 21).unwrap(),
            id: EntryId::generate(),
        };
        let token = cursor.encode(&m, &range);

        let mut v = Violations::default();
        assert_eq!(PageRequest::parse(10, &token, Some(&m), &range, &mut v).after, Some(cursor));
        assert!(v.is_empty());

        let mut v = Violations::default();
        PageRequest::parse(10, &token, Some(&other), &range, &mut v);
        assert_eq!(v.list()[0].field, "page_token");

        let mut v = Violations::default();
        PageRequest::parse(10, "garbage!", Some(&m), &range, &mut v);
        assert_eq!(v.list()[0].field, "page_token");

        // A token is bound to every filter, not only the dates.
        let mut v = Violations::default();
        let credits = EntryFilter { kind: Some(EntryKind::Credit), ..EntryFilter::default() };
        PageRequest::parse(10, &token, Some(&m), &credits, &mut v);
        assert_eq!(v.list()[0].field, "page_token");
        let token = cursor.encode(&m, &credits);
        let mut v = Violations::default();
        assert_eq!(PageRequest::parse(10, &token, Some(&m), &credits, &mut v).after, Some(cursor));
    }

    #[test]
    fn filters_name_their_bad_fields() {
        let fields = FilterFields {
            kind: Some(Err(KindError::Unknown(9))),
            metadata: vec![("bad key", "x")],
            created_after: Some((100, 0)),
            created_before: Some((100, 0)),
            ..FilterFields::default()
        };
        let mut v = Violations::default();
        EntryFilter::parse(&fields, &mut v);
        let named: Vec<_> = v.list().iter().map(|x| x.field.as_str()).collect();
        assert_eq!(named, ["type", "metadata", "created_before"]);
        let unspecified = FilterFields { kind: Some(Err(KindError::Missing)), ..FilterFields::default() };
        let mut v = Violations::default();
        assert_eq!(EntryFilter::parse(&unspecified, &mut v).kind, None);
        assert!(v.is_empty());
    }

    #[test]
    fn page_sizes_default_and_are_bounded() {
        let m = MerchantId::parse("m").unwrap();
        let mut v = Violations::default();
        assert_eq!(PageRequest::parse(0, "", Some(&m), &EntryFilter::default(), &mut v).size, 100);
        assert_eq!(PageRequest::parse(1000, "", Some(&m), &EntryFilter::default(), &mut v).size, 1000);
        assert!(v.is_empty());
        PageRequest::parse(1001, "", Some(&m), &EntryFilter::default(), &mut v);
        PageRequest::parse(-1, "", Some(&m), &EntryFilter::default(), &mut v);
        assert_eq!(v.list().len(), 2);
    }
}
