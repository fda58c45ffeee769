//! Answering balance questions from the read model.

mod export;
mod watch;

pub use watch::{ChangeCursor, ChangeCursorError};

use chrono::{Days, NaiveDate};
use fluxo_types::{BookingDate, Currency, MerchantId, Violations};

use crate::{
    domain::{DailyBalance, report},
    store::{BalanceStore, StoreError},
};

/// The longest report served, in days.
pub const MAX_RANGE_DAYS: u64 = 366;

/// A day's balance with its context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalanceView {
    /// Owner.
    pub merchant_id: String,
    /// ISO 4217 code of every amount.
    pub currency: String,
    /// The day.
    pub day: DailyBalance,
    /// Newest ledger commit reflected, in microseconds since the epoch.
    pub as_of_micros: Option<i64>,
    /// An event of this merchant on or before this day is parked (the read
    /// model refused it), so this balance may be missing it.
    pub missing_events: bool,
}

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// Bad request fields, each named.
    #[error("invalid request: {0}")]
    Invalid(Violations),
    /// Nothing to report and no currency to report zeros in.
    #[error("merchant {0} has no balances yet; pass currency_code to read zero balances")]
    NoBalances(String),
    /// The read model failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Balance queries.
#[derive(Debug, Clone)]
pub struct Balances {
    store: BalanceStore,
    /// Wakes the watches when the consolidator shares this process.
    changes: Option<std::sync::Arc<fluxo_server::stream::Signals>>,
}

struct Target {
    merchant: MerchantId,
    currency: Option<Currency>,
}

/// What every day of a report shares.
#[derive(Debug, Clone)]
struct Context {
    merchant: MerchantId,
    currency: Currency,
    /// Newest ledger commit reflected (see [`BalanceView::as_of_micros`]).
    as_of: Option<i64>,
    /// The earliest date of a parked event of the merchant.
    parked_since: Option<NaiveDate>,
}

impl Balances {
    /// Queries over `store`.
    pub fn new(store: BalanceStore) -> Self {
        Self { store, changes: None }
    }

    /// Watches are woken by `changes` (a [`crate::consolidator::ChangeNotifier`]
    /// of an in-process consolidator) besides their poll.
    pub fn with_changes(mut self, changes: std::sync::Arc<fluxo_server::stream::Signals>) -> Self {
        self.changes = Some(changes);
        self
    }

    async fn currency(&self, target: &Target) -> Result<Currency, QueryError> {
        if let Some(c) = target.currency {
            return Ok(c);
        }
        let merchant = &target.merchant;
        let mut currencies = self.store.currencies(merchant).await?;
        match currencies.len() {
            0 => Err(QueryError::NoBalances(merchant.as_str().to_owned())),
            1 => Ok(currencies.remove(0)),
            _ => {
                let codes: Vec<&str> = currencies.iter().map(Currency::code).collect();
                let mut v = Violations::default();
                v.add(
                    "currency_code",
                    format!(
                        "is required: merchant {} has balances in {}",
                        merchant.as_str(),
                        codes.join(", ")
                    ),
                );
                Err(QueryError::Invalid(v))
            }
        }
    }

    fn target(merchant_id: &str, currency_code: &str, v: &mut Violations) -> Option<Target> {
        let merchant = v.check("merchant_id", MerchantId::parse(merchant_id));
        let currency = if currency_code.is_empty() {
            Some(None)
        } else {
            v.check("currency_code", Currency::parse(currency_code)).map(Some)
        };
        Some(Target { merchant: merchant?, currency: currency? })
    }

    /// One day's balance.
    pub async fn daily(
        &self,
        merchant_id: &str,
        date: &str,
        currency_code: &str,
    ) -> Result<BalanceView, QueryError> {
        let mut v = Violations::default();
        let target = Self::target(merchant_id, currency_code, &mut v);
        let date = v.check("date", BookingDate::parse_date(date));
        let (target, date) = v.finish(|| Some((target?, date?))).map_err(QueryError::Invalid)?;
        let mut range = self.range(&target, date, date).await?;
        range.pop().ok_or_else(|| QueryError::NoBalances(target.merchant.as_str().to_owned()))
    }

    /// Every day from `start` to `end`.
    pub async fn report(
        &self,
        merchant_id: &str,
        start: &str,
        end: &str,
        currency_code: &str,
    ) -> Result<Vec<BalanceView>, QueryError> {
        let mut v = Violations::default();
        let target = Self::target(merchant_id, currency_code, &mut v);
        let start = v.check("start_date", BookingDate::parse_date(start));
        let end = v.check("end_date", BookingDate::parse_date(end));
        if let (Some(s), Some(e)) = (start, end) {
            if e < s {
                v.add("end_date", format!("must not be before start_date ({s})"));
            } else if s.checked_add_days(Days::new(MAX_RANGE_DAYS)).is_some_and(|limit| e > limit) {
                v.add("end_date", format!("must be at most {MAX_RANGE_DAYS} days after start_date"));
            }
        }
        let (target, start, end) = v.finish(|| Some((target?, start?, end?))).map_err(QueryError::Invalid)?;
        self.range(&target, start, end).await
    }

    async fn range(
        &self,
        target: &Target,
        start: NaiveDate,
        end: NaiveDate,
    ) -> Result<Vec<BalanceView>, QueryError> {
        let (context, opening) = self.context(target, start).await?;
        self.days(&context, opening, start, end).await
    }

    /// What every day of a range starting at `start` shares, and the balance
    /// carried into `start`.
    async fn context(&self, target: &Target, start: NaiveDate) -> Result<(Context, i64), QueryError> {
        let currency = self.currency(target).await?;
        let merchant = target.merchant.clone();
        let (opening, as_of) = self.store.opening(&merchant, &currency, start).await?;
        let parked_since = self.store.parked_since(&merchant).await?;
        Ok((Context { merchant, currency, as_of, parked_since }, opening))
    }

    /// Every day from `start` to `end`, from `opening`, the balance carried into `start`.
    async fn days(
        &self,
        context: &Context,
        opening: i64,
        start: NaiveDate,
        end: NaiveDate,
    ) -> Result<Vec<BalanceView>, QueryError> {
        let Context { merchant, currency, as_of, parked_since } = context;
        let days = self.store.days(merchant, currency, start, end).await?;
        let report = report(opening, &days, start, end).ok_or_else(|| {
            StoreError::from(crate::domain::Overflow {
                merchant_id: merchant.as_str().to_owned(),
                currency: currency.code().to_owned(),
            })
        })?;
        Ok(report
            .into_iter()
            .map(|day| BalanceView {
                merchant_id: merchant.as_str().to_owned(),
                currency: currency.code().to_owned(),
                missing_events: parked_since.is_some_and(|since| day.date >= since),
                day,
                as_of_micros: *as_of,
            })
            .collect())
    }
}
