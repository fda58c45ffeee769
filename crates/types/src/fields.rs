use std::fmt;

use chrono::{Days, NaiveDate};

use crate::money::truncate;

/// A merchant identifier: 1 to 64 characters from `A-Z a-z 0-9 . _ -`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MerchantId(String);

/// Why a text field was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// Nothing was sent.
    #[error("is required")]
    Missing,
    /// Longer than allowed.
    #[error("must be at most {max} characters, got {got}")]
    TooLong {
        /// The limit.
        max: usize,
        /// What was sent.
        got: usize,
    },
    /// A character outside the allowed set.
    #[error("must contain only {allowed}; found {found:?}")]
    BadCharacter {
        /// The allowed characters, in words.
        allowed: &'static str,
        /// The first offending character.
        found: char,
    },
}

pub(crate) fn check_text(
    input: &str,
    max: usize,
    allowed: &'static str,
    ok: impl Fn(char) -> bool,
) -> Result<(), TextError> {
    if input.is_empty() {
        return Err(TextError::Missing);
    }
    let len = input.chars().count();
    if len > max {
        return Err(TextError::TooLong { max, got: len });
    }
    match input.chars().find(|c| !ok(*c)) {
        Some(found) => Err(TextError::BadCharacter { allowed, found }),
        None => Ok(()),
    }
}

impl MerchantId {
    /// The longest merchant id accepted.
    pub const MAX_LEN: usize = 64;

    /// Parses a merchant id.
    pub fn parse(input: &str) -> Result<Self, TextError> {
        check_text(input, Self::MAX_LEN, "letters, digits, '.', '_' and '-'", |c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
        })?;
        Ok(Self(input.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A caller's idempotency key: 1 to 128 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    /// The longest key accepted.
    pub const MAX_LEN: usize = 128;

    /// Parses an idempotency key.
    pub fn parse(input: &str) -> Result<Self, TextError> {
        check_text(input, Self::MAX_LEN, "printable ASCII characters", |c| c.is_ascii_graphic())?;
        Ok(Self(input.to_owned()))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Free text describing an entry: at most 500 characters, no control characters; may be empty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Description(String);

impl Description {
    /// The longest description accepted, in characters.
    pub const MAX_LEN: usize = 500;

    /// Parses a description; empty is allowed.
    pub fn parse(input: &str) -> Result<Self, TextError> {
        if input.is_empty() {
            return Ok(Self::default());
        }
        check_text(input, Self::MAX_LEN, "text without control characters", |c| !c.is_control())?;
        Ok(Self(input.to_owned()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A server-generated entry id: a ULID, so ids sort in creation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId(ulid::Ulid);

/// Why an entry id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryIdError {
    /// Nothing was sent.
    #[error("is required")]
    Missing,
    /// Not a ULID.
    #[error("\"{0}\" is not an entry id (26 characters, Crockford base32)")]
    Malformed(String),
}

impl EntryId {
    /// A new id for an entry being booked now.
    pub fn generate() -> Self {
        Self(ulid::Ulid::new())
    }

    /// Parses an id sent by a caller.
    pub fn parse(input: &str) -> Result<Self, EntryIdError> {
        if input.is_empty() {
            return Err(EntryIdError::Missing);
        }
        // Canonical upper case only, so an id has exactly one spelling.
        ulid::Ulid::from_string(input)
            .ok()
            .filter(|id| id.to_string() == input)
            .map(Self)
            .ok_or_else(|| EntryIdError::Malformed(truncate(input)))
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The business date an entry counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BookingDate(NaiveDate);

/// Why a date was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DateError {
    /// Not `YYYY-MM-DD`, or not a calendar day.
    #[error("\"{0}\" is not a date in the form YYYY-MM-DD")]
    Malformed(String),
    /// Too far back to be a business date.
    #[error("must be on or after {}", BookingDate::EARLIEST)]
    TooEarly,
    /// Too far ahead of today.
    #[error("must be at most {} days after today ({today})", BookingDate::MAX_DAYS_AHEAD)]
    TooLate {
        /// Today in the ledger's time zone.
        today: NaiveDate,
    },
}

impl BookingDate {
    /// The earliest business date accepted.
    pub const EARLIEST: NaiveDate = match NaiveDate::from_ymd_opt(1970, 1, 1) {
        Some(d) => d,
        None => NaiveDate::MIN,
    };
    /// How far ahead of today an entry may be booked.
    pub const MAX_DAYS_AHEAD: u64 = 366;

    /// Parses a strict `YYYY-MM-DD` date.
    pub fn parse_date(input: &str) -> Result<NaiveDate, DateError> {
        // chrono accepts "2026-1-5"; a contract date has exactly one spelling.
        let well_formed = input.len() == 10
            && input.bytes().enumerate().all(
                |(i, b)| {
                    if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() }
                },
            );
        well_formed
            .then(|| NaiveDate::parse_from_str(input, "%Y-%m-%d").ok())
            .flatten()
            .ok_or_else(|| DateError::Malformed(truncate(input)))
    }

    /// Parses a booking date sent by a caller: empty means `today`.
    pub fn parse_or_today(input: &str, today: NaiveDate) -> Result<Self, DateError> {
        if input.is_empty() {
            return Ok(Self(today));
        }
        let date = Self::parse_date(input)?;
        if date < Self::EARLIEST {
            return Err(DateError::TooEarly);
        }
        let latest = today.checked_add_days(Days::new(Self::MAX_DAYS_AHEAD)).unwrap_or(NaiveDate::MAX);
        if date > latest {
            return Err(DateError::TooLate { today });
        }
        Ok(Self(date))
    }

    /// A date read back from storage, where it was validated on the way in.
    pub fn from_stored(date: NaiveDate) -> Self {
        Self(date)
    }

    /// The calendar date.
    pub fn date(&self) -> NaiveDate {
        self.0
    }
}

impl fmt::Display for BookingDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.format("%Y-%m-%d"))
    }
}

/// An optional, inclusive range of booking dates for listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DateRange {
    /// First date included, if bounded.
    pub start: Option<NaiveDate>,
    /// Last date included, if bounded.
    pub end: Option<NaiveDate>,
}

impl DateRange {
    /// Parses optional `start_date`/`end_date` fields, recording problems under their names.
    pub fn parse(start: &str, end: &str, violations: &mut crate::Violations) -> Self {
        let parse = |field: &str, input: &str, violations: &mut crate::Violations| {
            if input.is_empty() { None } else { violations.check(field, BookingDate::parse_date(input)) }
        };
        let range =
            Self { start: parse("start_date", start, violations), end: parse("end_date", end, violations) };
        if let (Some(s), Some(e)) = (range.start, range.end)
            && e < s
        {
            violations.add("end_date", format!("must not be before start_date ({s})"));
        }
        range
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn merchant_ids_are_bounded_and_restricted() {
        assert!(MerchantId::parse("m-1_a.b").is_ok());
        assert_eq!(MerchantId::parse(""), Err(TextError::Missing));
        assert!(matches!(MerchantId::parse("a b"), Err(TextError::BadCharacter { found: ' ', .. })));
        assert!(MerchantId::parse(&"m".repeat(64)).is_ok());
        assert!(matches!(MerchantId::parse(&"m".repeat(65)), Err(TextError::TooLong { max: 64, got: 65 })));
    }

    #[test]
    fn request_ids_are_printable_ascii() {
        assert!(RequestId::parse("k-1:retry/2").is_ok());
        assert!(RequestId::parse("ключ").is_err());
        assert!(RequestId::parse("a\tb").is_err());
        assert!(RequestId::parse(&"k".repeat(129)).is_err());
    }

    #[test]
    fn descriptions_may_be_empty_but_not_carry_control_characters() {
        assert_eq!(Description::parse("").map(|d| d.as_str().to_owned()), Ok(String::new()));
        assert!(Description::parse("venda à vista").is_ok());
        assert!(Description::parse("line\nbreak").is_err());
        assert!(Description::parse(&"é".repeat(500)).is_ok());
        assert!(Description::parse(&"é".repeat(501)).is_err());
    }

    #[test]
    fn booking_dates_are_strict_and_bounded() {
        let today = day("2026-11-21");
        assert_eq!(BookingDate::parse_or_today("", today).unwrap().date(), today);
        assert_eq!(BookingDate::parse_or_today("2026-02-28", today).unwrap().to_string(), "2026-02-28");
        for bad in ["2026-02-30", "2026-1-05", "21/11/2026", "2026-11-21T00:00:00Z", "tomorrow"] {
            assert!(matches!(BookingDate::parse_or_today(bad, today), Err(DateError::Malformed(_))), "{bad}");
        }
        assert_eq!(BookingDate::parse_or_today("1969-12-31", today), Err(DateError::TooEarly));
        assert!(BookingDate::parse_or_today("2027-11-22", today).is_ok());
        assert_eq!(BookingDate::parse_or_today("2027-11-23", today), Err(DateError::TooLate { today }));
    }

    #[test]
    fn entry_ids_have_one_spelling() {
        let id = EntryId::generate();
        assert_eq!(EntryId::parse(&id.to_string()), Ok(id));
        assert!(EntryId::parse(&id.to_string().to_lowercase()).is_err());
        assert!(EntryId::parse("not-an-id").is_err());
        assert_eq!(EntryId::parse(""), Err(EntryIdError::Missing));
    }

    #[test]
    fn a_range_ending_before_it_starts_is_refused() {
        let mut v = crate::Violations::default();
        DateRange::parse("2026-11-21", "2026-11-20", &mut v);
        assert_eq!(v.list()[0].field, "end_date");
        let mut v = crate::Violations::default();
        let r = DateRange::parse("", "2026-11-20", &mut v);
        assert!(v.is_empty());
        assert_eq!(r.start, None);
    }
}
