//! Balance arithmetic as pure functions: folding ledger postings into daily
//! deltas, and turning daily totals into a report with running balances.
//! Every sum is checked; an overflow is an error, never a wrapped number.

use std::collections::BTreeMap;

use chrono::{Days, NaiveDate};

/// Direction of a posting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Money in.
    Credit,
    /// Money out.
    Debit,
}

/// One ledger entry as the read model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posting {
    /// The event that carried it (deduplication key).
    pub event_id: String,
    /// The ledger entry.
    pub entry_id: String,
    /// Owner.
    pub merchant_id: String,
    /// ISO 4217 code.
    pub currency: String,
    /// Business date.
    pub date: NaiveDate,
    /// Credit or debit.
    pub direction: Direction,
    /// Positive amount in minor units.
    pub amount: i64,
    /// When the ledger committed it, in microseconds since the epoch.
    pub committed_at_micros: i64,
}

/// The read model's row key: one merchant, currency and business date.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DayKey {
    /// Owner.
    pub merchant_id: String,
    /// ISO 4217 code.
    pub currency: String,
    /// Business date.
    pub date: NaiveDate,
}

/// What a batch of postings adds to one day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delta {
    /// Credits added.
    pub credits: i64,
    /// Debits added.
    pub debits: i64,
    /// Entries added.
    pub count: i64,
    /// Newest commit time among them.
    pub as_of_micros: i64,
}

/// A sum left the range of exact 64-bit minor units.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("balance of merchant {merchant_id} in {currency} would overflow 64-bit minor units")]
pub struct Overflow {
    /// Owner.
    pub merchant_id: String,
    /// Currency.
    pub currency: String,
}

/// Adds postings up per day.
pub fn fold(postings: &[Posting]) -> Result<BTreeMap<DayKey, Delta>, Overflow> {
    let mut days: BTreeMap<DayKey, Delta> = BTreeMap::new();
    for p in postings {
        let key = DayKey { merchant_id: p.merchant_id.clone(), currency: p.currency.clone(), date: p.date };
        let delta = days.entry(key).or_default();
        let overflow = || Overflow { merchant_id: p.merchant_id.clone(), currency: p.currency.clone() };
        match p.direction {
            Direction::Credit => delta.credits = delta.credits.checked_add(p.amount).ok_or_else(overflow)?,
            Direction::Debit => delta.debits = delta.debits.checked_add(p.amount).ok_or_else(overflow)?,
        }
        delta.count += 1;
        delta.as_of_micros = delta.as_of_micros.max(p.committed_at_micros);
    }
    Ok(days)
}

/// One day's stored totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DayTotals {
    /// Sum of credits.
    pub credits: i64,
    /// Sum of debits.
    pub debits: i64,
    /// Number of entries.
    pub count: i64,
}

/// A day's consolidated position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyBalance {
    /// Business date.
    pub date: NaiveDate,
    /// Sum of credits that day.
    pub credits: i64,
    /// Sum of debits that day.
    pub debits: i64,
    /// Credits minus debits.
    pub net: i64,
    /// Running balance before the day.
    pub opening: i64,
    /// Running balance after the day.
    pub closing: i64,
    /// Entries that day.
    pub count: i64,
}

/// Every day from `start` to `end` inclusive, days without entries carrying
/// the balance, starting from `opening` (the closing balance of the day before `start`).
pub fn report(
    opening: i64,
    days: &BTreeMap<NaiveDate, DayTotals>,
    start: NaiveDate,
    end: NaiveDate,
) -> Option<Vec<DailyBalance>> {
    let mut out = Vec::new();
    let mut balance = opening;
    let mut date = start;
    while date <= end {
        let totals = days.get(&date).copied().unwrap_or_default();
        let net = totals.credits.checked_sub(totals.debits)?;
        let closing = balance.checked_add(net)?;
        out.push(DailyBalance {
            date,
            credits: totals.credits,
            debits: totals.debits,
            net,
            opening: balance,
            closing,
            count: totals.count,
        });
        balance = closing;
        date = date.checked_add_days(Days::new(1))?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn day(d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, d).unwrap()
    }

    fn posting(id: &str, d: u32, direction: Direction, amount: i64) -> Posting {
        Posting {
            event_id: id.into(),
            entry_id: id.into(),
            merchant_id: "m".into(),
            currency: "BRL".into(),
            date: day(d),
            direction,
            amount,
            committed_at_micros: i64::from(d),
        }
    }

    #[test]
    fn given_postings_when_folded_then_days_hold_their_sums() {
        let days = fold(&[
            posting("a", 1, Direction::Credit, 100),
            posting("b", 1, Direction::Debit, 30),
            posting("c", 3, Direction::Credit, 5),
        ])
        .unwrap();
        let first = days.values().next().unwrap();
        assert_eq!((first.credits, first.debits, first.count), (100, 30, 2));
        assert_eq!(days.len(), 2);
    }

    #[test]
    fn given_a_gap_when_reported_then_empty_days_carry_the_balance() {
        let days = BTreeMap::from([
            (day(2), DayTotals { credits: 100, debits: 0, count: 1 }),
            (day(4), DayTotals { credits: 0, debits: 30, count: 1 }),
        ]);
        let r = report(10, &days, day(1), day(5)).unwrap();
        let closings: Vec<i64> = r.iter().map(|d| d.closing).collect();
        assert_eq!(closings, [10, 110, 110, 80, 80]);
        assert_eq!(r[3].opening, 110);
        assert_eq!(r[3].net, -30);
        assert_eq!(r[2].count, 0);
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        let big = [posting("a", 1, Direction::Credit, i64::MAX), posting("b", 1, Direction::Credit, 1)];
        assert!(fold(&big).is_err());
        let days = BTreeMap::from([(day(1), DayTotals { credits: 1, debits: 0, count: 1 })]);
        assert_eq!(report(i64::MAX, &days, day(1), day(1)), None);
    }

    proptest! {
        #[test]
        fn order_of_arrival_never_changes_the_result(
            amounts in proptest::collection::vec((1_u32..28, any::<bool>(), 1_i64..1_000_000), 1..60),
            seed in any::<u64>(),
        ) {
            let postings: Vec<Posting> = amounts
                .iter()
                .enumerate()
                .map(|(i, (d, credit, a))| {
                    posting(&i.to_string(), *d, if *credit { Direction::Credit } else { Direction::Debit }, *a)
                })
                .collect();
            let mut shuffled = postings.clone();
            // A deterministic shuffle from the seed: rotate and reverse.
            let len = shuffled.len();
            shuffled.rotate_left(usize::try_from(seed % len as u64).unwrap());
            if seed % 2 == 0 { shuffled.reverse(); }
            prop_assert_eq!(fold(&postings).unwrap(), fold(&shuffled).unwrap());

            // The last closing balance equals the plain sum of signed amounts.
            let totals: BTreeMap<NaiveDate, DayTotals> = fold(&postings)
                .unwrap()
                .into_iter()
                .map(|(k, d)| (k.date, DayTotals { credits: d.credits, debits: d.debits, count: d.count }))
                .collect();
            let r = report(0, &totals, day(1), day(28)).unwrap();
            let expected: i64 = postings.iter().map(|p| if p.direction == Direction::Credit { p.amount } else { -p.amount }).sum();
            prop_assert_eq!(r.last().unwrap().closing, expected);
        }
    }
}
