//! ExportDailyBalances: ListDailyBalances' report over a range of any
//! length, computed and handed out a chunk of days at a time.

use chrono::{Days, NaiveDate};
use fluxo_types::{BookingDate, Violations};
use futures::Stream;

use super::{BalanceView, Balances, Context, QueryError};

/// Days per chunk of an export.
pub(crate) const EXPORT_DAYS: u64 = 1_000;

/// The rest of an export: the next day to report and the balance carried into it.
struct Remaining {
    balances: Balances,
    context: Context,
    next: Option<NaiveDate>,
    end: NaiveDate,
    opening: i64,
}

impl Balances {
    /// Every day from `start` to `end` (both required, no limit on the
    /// length), in date order, [`EXPORT_DAYS`] at a time: the figures
    /// ListDailyBalances answers for the same days, days without entries
    /// carrying the balance. The currency rule is GetDailyBalance's. Bad
    /// fields, and a merchant with no balances and no currency given, are
    /// refused here, before any day is read.
    ///
    /// The balance carried into each chunk is the previous chunk's closing
    /// balance, so the export adds up from its first day to its last even
    /// while entries are being applied; `as_of` is read once, at the start.
    pub async fn export(
        &self,
        merchant_id: &str,
        start: &str,
        end: &str,
        currency_code: &str,
    ) -> Result<impl Stream<Item = Result<Vec<BalanceView>, QueryError>> + Send + 'static, QueryError> {
        let mut v = Violations::default();
        let target = Self::target(merchant_id, currency_code, &mut v);
        let start = v.check("start_date", BookingDate::parse_date(start));
        let end = v.check("end_date", BookingDate::parse_date(end));
        if let (Some(s), Some(e)) = (start, end)
            && e < s
        {
            v.add("end_date", format!("must not be before start_date ({s})"));
        }
        let (target, start, end) = v.finish(|| Some((target?, start?, end?))).map_err(QueryError::Invalid)?;
        let (context, opening) = self.context(&target, start).await?;
        let remaining = Remaining { balances: self.clone(), context, next: Some(start), end, opening };
        Ok(futures::stream::try_unfold(remaining, |mut r| async move {
            let Some(first) = r.next else { return Ok(None) };
            let last = first.checked_add_days(Days::new(EXPORT_DAYS - 1)).map_or(r.end, |d| d.min(r.end));
            let views = r.balances.days(&r.context, r.opening, first, last).await?;
            r.opening = views.last().map_or(r.opening, |v| v.day.closing);
            r.next = if last < r.end { last.checked_add_days(Days::new(1)) } else { None };
            Ok(Some((views, r)))
        }))
    }
}
