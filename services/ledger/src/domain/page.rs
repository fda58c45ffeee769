use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::NaiveDate;
use sha2::{Digest, Sha256};

use super::{BookingDate, DateRange, EntryId, MerchantId, Violations};

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
        range: &DateRange,
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
            let decoded = merchant.and_then(|m| PageCursor::decode(page_token, &query_tag(m, range)));
            if decoded.is_none() {
                v.add(
                    "page_token",
                    "is not a token this list issued for the same merchant_id, start_date and end_date",
                );
            }
            decoded
        };
        Self { size, after }
    }
}

impl PageCursor {
    /// The opaque token for the page after this cursor.
    pub fn encode(&self, merchant: &MerchantId, range: &DateRange) -> String {
        let text = format!(
            "{}|{}|{}",
            query_tag(merchant, range),
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

/// A short digest of the query a token belongs to.
fn query_tag(merchant: &MerchantId, range: &DateRange) -> String {
    let text = format!("{}|{:?}|{:?}", merchant.as_str(), range.start, range.end);
    Sha256::digest(text.as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_for_its_own_query_only() {
        let m = MerchantId::parse("m-1").unwrap();
        let other = MerchantId::parse("m-2").unwrap();
        let range = DateRange::default();
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
    }

    #[test]
    fn page_sizes_default_and_are_bounded() {
        let m = MerchantId::parse("m").unwrap();
        let mut v = Violations::default();
        assert_eq!(PageRequest::parse(0, "", Some(&m), &DateRange::default(), &mut v).size, 100);
        assert_eq!(PageRequest::parse(1000, "", Some(&m), &DateRange::default(), &mut v).size, 1000);
        assert!(v.is_empty());
        PageRequest::parse(1001, "", Some(&m), &DateRange::default(), &mut v);
        PageRequest::parse(-1, "", Some(&m), &DateRange::default(), &mut v);
        assert_eq!(v.list().len(), 2);
    }
}
