//! WatchDailyBalances: a merchant's days in the order their stored figures
//! change, caught up from a cursor and then followed.

use chrono::NaiveDate;
use fluxo_server::stream::WatchPace;
use fluxo_types::{Currency, MerchantId, Violations};
use futures::Stream;

use super::{BalanceView, Balances, QueryError, Target};

/// Days per read of a watch.
const WATCH_DAYS: u64 = 200;

/// A position in the order days change (see the `change_order` migration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeCursor {
    /// Before every day.
    Start,
    /// PostgreSQL: after the days changed by transactions before `xid`, and
    /// by `xid` itself up to `day` (all of them without one).
    Transaction {
        /// The `xid8` of the transaction.
        xid: u64,
        /// The last day of that transaction handed out.
        day: Option<(String, NaiveDate)>,
    },
    /// SQLite: the same, over the write sequence number.
    Sequence {
        /// The sequence number.
        seq: i64,
        /// The last day of that number handed out.
        day: Option<(String, NaiveDate)>,
    },
}

/// A cursor fluxo did not issue, or one of the other backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a watch cursor issued by this service (send the cursor of a WatchDailyBalancesResponse unchanged)"
)]
pub struct ChangeCursorError;

impl ChangeCursor {
    /// The wire form: `0`, or `t<xid>` / `s<seq>`, then `.<currency><date>` when a day is set.
    pub fn encode(&self) -> String {
        let (tag, order, day) = match self {
            Self::Start => return "0".to_owned(),
            Self::Transaction { xid, day } => ('t', xid.to_string(), day),
            Self::Sequence { seq, day } => ('s', seq.to_string(), day),
        };
        match day {
            Some((currency, date)) => format!("{tag}{order}.{currency}{date}"),
            None => format!("{tag}{order}"),
        }
    }

    /// The cursor `s` encodes.
    pub fn parse(s: &str) -> Result<Self, ChangeCursorError> {
        if s == "0" {
            return Ok(Self::Start);
        }
        let mut chars = s.chars();
        let tag = chars.next().ok_or(ChangeCursorError)?;
        let rest = chars.as_str();
        let (order, day) = match rest.split_once('.') {
            Some((order, day)) => (order, Some(parse_day(day)?)),
            None => (rest, None),
        };
        let canonical = !order.is_empty()
            && order.bytes().all(|b| b.is_ascii_digit())
            && (order == "0" || !order.starts_with('0'));
        if !canonical {
            return Err(ChangeCursorError);
        }
        match tag {
            't' => Ok(Self::Transaction { xid: order.parse().map_err(|_| ChangeCursorError)?, day }),
            's' => Ok(Self::Sequence { seq: order.parse().map_err(|_| ChangeCursorError)?, day }),
            _ => Err(ChangeCursorError),
        }
    }
}

/// `BRL2026-11-21`.
fn parse_day(s: &str) -> Result<(String, NaiveDate), ChangeCursorError> {
    let (currency, date) = s.split_at_checked(3).ok_or(ChangeCursorError)?;
    let currency = Currency::parse(currency).map_err(|_| ChangeCursorError)?;
    let date = NaiveDate::parse_from_str(date, "%Y-%m-%d").map_err(|_| ChangeCursorError)?;
    if date.format("%Y-%m-%d").to_string() != s[3..] {
        return Err(ChangeCursorError);
    }
    Ok((currency.code().to_owned(), date))
}

impl Balances {
    /// Up to `limit` days of `merchant` changed after `after`, in the order
    /// their figures changed, as they stand now, each with the cursor just
    /// after it, and the cursor after them all. What a watch sends, and what
    /// the notifier turns into `balance.changed` events.
    pub async fn changed_days(
        &self,
        merchant: &MerchantId,
        after: ChangeCursor,
        limit: u64,
    ) -> Result<(Vec<(BalanceView, ChangeCursor)>, ChangeCursor), QueryError> {
        let changed = self.store.changes_after(merchant, &after, limit).await?;
        let next = changed.last().map_or(after, |(_, _, c)| c.clone());
        let mut views = Vec::with_capacity(changed.len());
        for (currency, date, cursor) in changed {
            let target = Target { merchant: merchant.clone(), currency: Some(currency) };
            views.extend(self.range(&target, date, date).await?.into_iter().map(|v| (v, cursor.clone())));
        }
        Ok((views, next))
    }

    /// The cursor that skips every change stored now.
    pub async fn changes_end(&self) -> Result<ChangeCursor, QueryError> {
        Ok(self.store.changes_end().await?)
    }

    /// Watches `merchant_id`'s days: each answer the days changed since the
    /// cursor, as they stand, each with the cursor after it, and the cursor
    /// after them all; a heartbeat when
    /// nothing changed (the first message goes at once). Ends only with an
    /// error. Bad fields are refused here, each named.
    pub async fn watch(
        &self,
        merchant_id: &str,
        cursor: &str,
        start_at_end: bool,
        pace: WatchPace,
    ) -> Result<
        impl Stream<Item = Result<(Vec<(BalanceView, ChangeCursor)>, ChangeCursor), QueryError>> + Send + 'static,
        QueryError,
    > {
        let mut v = Violations::default();
        let merchant = v.check("merchant_id", MerchantId::parse(merchant_id));
        let cursor = if cursor.is_empty() {
            None
        } else {
            let parsed = ChangeCursor::parse(cursor)
                .ok()
                .filter(|c| self.store.change_cursor_fits(c))
                .ok_or(ChangeCursorError);
            if start_at_end {
                v.add("start_at_end", "must not be set with a cursor: the cursor says where to start");
            }
            v.check("cursor", parsed)
        };
        let merchant = v.finish(|| merchant).map_err(QueryError::Invalid)?;
        let cursor = match cursor {
            Some(c) => c,
            None if start_at_end => self.store.changes_end().await?,
            None => ChangeCursor::Start,
        };
        let balances = self.clone();
        let read = move |after: ChangeCursor| {
            let (balances, merchant) = (balances.clone(), merchant.clone());
            async move { balances.changed_days(&merchant, after, WATCH_DAYS).await }
        };
        // Woken by the consolidator when it runs in this process; else (its own
        // target) the poll alone.
        let wake = self.changes.as_ref().map(|signals| signals.subscribe(merchant_id));
        Ok(fluxo_server::stream::follow(cursor, pace, wake, read))
    }
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDate;

    use super::ChangeCursor;

    #[test]
    fn cursors_survive_the_wire() {
        let day = Some(("BRL".to_owned(), NaiveDate::from_ymd_opt(2026, 11, 21).unwrap()));
        for cursor in [
            ChangeCursor::Start,
            ChangeCursor::Transaction { xid: 0, day: None },
            ChangeCursor::Transaction { xid: u64::MAX, day: day.clone() },
            ChangeCursor::Sequence { seq: 7, day },
            ChangeCursor::Sequence { seq: i64::MAX, day: None },
        ] {
            assert_eq!(ChangeCursor::parse(&cursor.encode()), Ok(cursor));
        }
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "",
            "00",
            "t",
            "t01",
            "t1.",
            "t1.BRL",
            "t1.brl2026-11-21",
            "t1.BRL2026-02-30",
            "t1.BRL2026-1-21",
            "s-1",
            "x1",
            "s1 ",
        ] {
            assert!(ChangeCursor::parse(bad).is_err(), "{bad:?}");
        }
    }
}
