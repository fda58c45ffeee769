use std::fmt;

/// The largest amount one entry may carry: 10^15 minor units (ten trillion
/// BRL). It keeps any realistic sum of entries far inside `i64`, and a
/// mistyped amount with a dozen extra digits is refused instead of booked.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000_000;

/// An ISO 4217 currency that has minor units (so not XAU, XXX or the like).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency(iso_currency::Currency);

/// Why a currency code was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CurrencyError {
    /// Nothing was sent.
    #[error("is required (an ISO 4217 code such as \"BRL\")")]
    Missing,
    /// Not an ISO 4217 alphabetic code.
    #[error("\"{0}\" is not an ISO 4217 currency code (three upper-case letters such as \"BRL\")")]
    Unknown(String),
    /// A code for something that is not money with minor units (gold, testing codes).
    #[error("\"{0}\" has no minor units and cannot be booked")]
    NoMinorUnits(String),
}

impl Currency {
    /// Parses an upper-case ISO 4217 alphabetic code.
    pub fn parse(code: &str) -> Result<Self, CurrencyError> {
        if code.is_empty() {
            return Err(CurrencyError::Missing);
        }
        // Upper case only: the code is part of the idempotency fingerprint, and
        // one spelling per currency keeps "brl" and "BRL" from diverging there.
        let currency = (code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()))
            .then(|| iso_currency::Currency::from_code(code))
            .flatten()
            .ok_or_else(|| CurrencyError::Unknown(truncate(code)))?;
        if currency.exponent().is_none() {
            return Err(CurrencyError::NoMinorUnits(code.to_owned()));
        }
        Ok(Self(currency))
    }

    /// The ISO 4217 alphabetic code.
    pub fn code(&self) -> &'static str {
        self.0.code()
    }

    /// How many decimal places separate minor from major units (2 for BRL, 0 for JPY).
    pub fn exponent(&self) -> u16 {
        self.0.exponent().unwrap_or(0)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A positive amount of money in exact minor units, never above [`MAX_AMOUNT_MINOR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Money {
    currency: Currency,
    minor_units: i64,
}

/// Why an amount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// Zero or negative: the direction of an entry comes from its type.
    #[error("must be greater than zero (the entry type says whether money comes in or goes out), got {0}")]
    NotPositive(i64),
    /// Larger than one entry may carry.
    #[error("must be at most {MAX_AMOUNT_MINOR} minor units, got {0}")]
    TooLarge(i64),
}

impl Money {
    /// A positive amount of `currency`.
    pub fn positive(currency: Currency, minor_units: i64) -> Result<Self, AmountError> {
        if minor_units <= 0 {
            Err(AmountError::NotPositive(minor_units))
        } else if minor_units > MAX_AMOUNT_MINOR {
            Err(AmountError::TooLarge(minor_units))
        } else {
            Ok(Self { currency, minor_units })
        }
    }

    /// The currency.
    pub fn currency(&self) -> Currency {
        self.currency
    }

    /// The amount in minor units, always in `1..=MAX_AMOUNT_MINOR`.
    pub fn minor_units(&self) -> i64 {
        self.minor_units
    }
}

impl fmt::Display for Money {
    /// Renders the exact decimal amount ("10.50 BRL") with integer arithmetic only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exponent = u32::from(self.currency.exponent());
        let scale = 10_i64.pow(exponent);
        let (major, minor) = (self.minor_units / scale, self.minor_units % scale);
        if exponent == 0 {
            write!(f, "{major} {}", self.currency)
        } else {
            let width = exponent as usize;
            write!(f, "{major}.{minor:0width$} {}", self.currency)
        }
    }
}

/// Caller input echoed in an error, cut short so errors (and logs) stay bounded.
pub fn truncate(input: &str) -> String {
    const KEEP: usize = 16;
    match input.char_indices().nth(KEEP) {
        Some((cut, _)) => format!("{}…", &input[..cut]),
        None => input.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn currencies_parse_with_their_iso_exponent() {
        assert_eq!(Currency::parse("BRL").map(|c| c.exponent()), Ok(2));
        assert_eq!(Currency::parse("JPY").map(|c| c.exponent()), Ok(0));
        assert_eq!(Currency::parse("KWD").map(|c| c.exponent()), Ok(3));
    }

    #[test]
    fn unknown_lower_case_and_unitless_codes_are_refused() {
        assert_eq!(Currency::parse(""), Err(CurrencyError::Missing));
        assert!(matches!(Currency::parse("brl"), Err(CurrencyError::Unknown(_))));
        assert!(matches!(Currency::parse("ABC"), Err(CurrencyError::Unknown(_))));
        assert!(matches!(Currency::parse("BRLX"), Err(CurrencyError::Unknown(_))));
        assert!(matches!(Currency::parse("XAU"), Err(CurrencyError::NoMinorUnits(_))));
    }

    #[test]
    fn zero_negative_and_oversized_amounts_are_refused() {
        let brl = Currency::parse("BRL").unwrap();
        assert_eq!(Money::positive(brl, 0), Err(AmountError::NotPositive(0)));
        assert_eq!(Money::positive(brl, -5), Err(AmountError::NotPositive(-5)));
        assert_eq!(
            Money::positive(brl, MAX_AMOUNT_MINOR + 1),
            Err(AmountError::TooLarge(MAX_AMOUNT_MINOR + 1))
        );
        assert!(Money::positive(brl, MAX_AMOUNT_MINOR).is_ok());
    }

    #[test]
    fn display_is_exact_decimal() {
        let brl = Currency::parse("BRL").unwrap();
        let jpy = Currency::parse("JPY").unwrap();
        assert_eq!(Money::positive(brl, 1050).unwrap().to_string(), "10.50 BRL");
        assert_eq!(Money::positive(brl, 7).unwrap().to_string(), "0.07 BRL");
        assert_eq!(Money::positive(jpy, 1050).unwrap().to_string(), "1050 JPY");
    }

    proptest! {
        #[test]
        fn every_amount_in_range_round_trips(units in 1..=MAX_AMOUNT_MINOR) {
            let brl = Currency::parse("BRL").unwrap();
            let money = Money::positive(brl, units).unwrap();
            prop_assert_eq!(money.minor_units(), units);
            // The rendered decimal, read back without floats, is the same number.
            let text = money.to_string();
            let digits: String = text.trim_end_matches(" BRL").chars().filter(|c| *c != '.').collect();
            prop_assert_eq!(digits.parse::<i64>().unwrap(), units);
        }

    }
}
