//! `fluxo ledger close|reopen|closes` (over gRPC, like any client) and
//! `fluxo ledger verify` (on the databases, like `fluxo balances reconcile`):
//! recomputes every close in force from the rows as they are now and reports
//! each difference — in the ledger's entries or in the daily balances.

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use chrono::NaiveDate;
use fluxo_balance::BalanceStore;
use fluxo_ledger::{
    LedgerStore,
    domain::{BooksDigest, DayFigures, Difference, MerchantId, compare},
};
use fluxo_proto::ledger_v1::{self as pb, ledger_service_client::LedgerServiceClient};

use crate::{
    client::{ClientArgs, describe},
    config::Config,
    serve::connect_waiting,
};

/// `fluxo ledger close` arguments.
#[derive(Debug, clap::Args)]
pub struct CloseArgs {
    /// The merchant whose books close.
    #[arg(long, short = 'm')]
    pub merchant: String,
    /// The last business date to close (YYYY-MM-DD).
    #[arg(long)]
    pub through: String,
    /// A note kept with the close, e.g. "October 2026".
    #[arg(long, default_value = "")]
    pub note: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `fluxo ledger reopen` arguments.
#[derive(Debug, clap::Args)]
pub struct ReopenArgs {
    /// The merchant whose latest close is reopened.
    #[arg(long, short = 'm')]
    pub merchant: String,
    /// Why (required; kept with the close).
    #[arg(long)]
    pub reason: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `fluxo ledger closes` arguments.
#[derive(Debug, clap::Args)]
pub struct ClosesArgs {
    /// The merchant.
    #[arg(long, short = 'm')]
    pub merchant: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

fn print_close(close: &pb::PeriodClose) {
    let balances: Vec<String> =
        close.closing_balances.iter().map(|m| format!("{} {}", m.minor_units, m.currency_code)).collect();
    crate::outln!(
        "{}  closed through {}  {} entries  digest {}  closing {}",
        close.id,
        close.closed_through,
        close.entry_count,
        close.digest,
        if balances.is_empty() { "-".to_owned() } else { balances.join(", ") }
    );
    let by = |who: &str| if who.is_empty() { "(no identity)".to_owned() } else { who.to_owned() };
    let at = |t: &Option<prost_types::Timestamp>| t.as_ref().map(ToString::to_string).unwrap_or_default();
    crate::outln!(
        "    closed {} by {}{}",
        at(&close.closed_at),
        by(&close.closed_by),
        if close.note.is_empty() { String::new() } else { format!(": {}", close.note) }
    );
    if close.reopened_at.is_some() {
        crate::outln!(
            "    reopened {} by {}: {}",
            at(&close.reopened_at),
            by(&close.reopened_by),
            close.reopen_reason
        );
    }
}

fn client(args: &ClientArgs) -> anyhow::Result<LedgerServiceClient<tonic::transport::Channel>> {
    Ok(LedgerServiceClient::new(args.channel()?))
}

/// `fluxo ledger close`.
pub async fn close(args: &CloseArgs) -> anyhow::Result<()> {
    let request = pb::ClosePeriodRequest {
        merchant_id: args.merchant.clone(),
        closed_through: args.through.clone(),
        note: args.note.clone(),
    };
    let close = client(&args.client)?
        .close_period(args.client.request(request)?)
        .await
        .map_err(|s| anyhow::anyhow!("ClosePeriod failed: {}", describe(&s)))?
        .into_inner();
    print_close(&close);
    Ok(())
}

/// `fluxo ledger reopen`.
pub async fn reopen(args: &ReopenArgs) -> anyhow::Result<()> {
    let request = pb::ReopenPeriodRequest { merchant_id: args.merchant.clone(), reason: args.reason.clone() };
    let close = client(&args.client)?
        .reopen_period(args.client.request(request)?)
        .await
        .map_err(|s| anyhow::anyhow!("ReopenPeriod failed: {}", describe(&s)))?
        .into_inner();
    print_close(&close);
    Ok(())
}

/// `fluxo ledger closes`.
pub async fn closes(args: &ClosesArgs) -> anyhow::Result<()> {
    let request = pb::ListPeriodClosesRequest { merchant_id: args.merchant.clone() };
    let closes = client(&args.client)?
        .list_period_closes(args.client.request(request)?)
        .await
        .map_err(|s| anyhow::anyhow!("ListPeriodCloses failed: {}", describe(&s)))?
        .into_inner()
        .closes;
    if closes.is_empty() {
        crate::outln!("merchant {} has never closed its books", args.merchant);
    }
    for close in &closes {
        print_close(close);
    }
    Ok(())
}

fn figures(d: &DayFigures) -> String {
    format!("{} entries, credits {}, debits {}, closing {}", d.entry_count, d.credits, d.debits, d.closing)
}

/// `fluxo ledger verify --merchant M`: every close in force against the
/// entries and the daily balances as they are now. Exit status 1 on any difference.
pub async fn verify(config: &Config, merchant: &str) -> anyhow::Result<()> {
    let merchant = MerchantId::parse(merchant).map_err(|e| anyhow::anyhow!("--merchant: {e}"))?;
    let db = connect_waiting(config, 10).await?;
    let ledger = LedgerStore::new(db.clone());
    let balances = BalanceStore::new(db);
    let closes: Vec<_> =
        ledger.period_closes(&merchant).await?.into_iter().filter(|c| c.reopened.is_none()).collect();
    let Some(latest) = closes.iter().map(|c| c.closed_through).max() else {
        crate::outln!("merchant {} has no close in force: nothing to verify", merchant.as_str());
        return Ok(());
    };
    eprintln!("fluxo: recomputing the books of {} through {latest}", merchant.as_str());
    // One pass over the entries serves every close (each covers a prefix).
    let now = ledger.books_digest(&merchant, latest).await.context("reading the ledger's entries")?;
    let read_model = balance_figures(&balances, &merchant).await?;
    let mut problems = 0usize;
    for close in &closes {
        let recorded = ledger.close_days(&close.id).await?;
        let current = now.through(close.closed_through);
        let mut report = Vec::new();
        if BooksDigest::digest_of(&recorded) != close.digest {
            report.push("the figures recorded with this close were changed after it was made".to_owned());
        }
        for difference in compare(&recorded, &current.days) {
            report.push(match difference {
                Difference::Missing(d) => {
                    format!(
                        "{} {}: closed with {}; the ledger has no entries for it now",
                        d.date,
                        d.currency,
                        figures(&d)
                    )
                }
                Difference::Added(d) => format!(
                    "{} {}: the ledger has {} that the close did not cover",
                    d.date,
                    d.currency,
                    figures(&d)
                ),
                Difference::Changed { recorded, now }
                    if recorded.digest != now.digest && figures(&recorded) == figures(&now) =>
                {
                    format!(
                        "{} {}: an entry's fields changed (same sums: {}); day digest {} is now {}",
                        recorded.date,
                        recorded.currency,
                        figures(&recorded),
                        recorded.digest,
                        now.digest
                    )
                }
                Difference::Changed { recorded, now } => format!(
                    "{} {}: closed with {}; the ledger now has {}",
                    recorded.date,
                    recorded.currency,
                    figures(&recorded),
                    figures(&now)
                ),
            });
        }
        for d in &recorded {
            match read_model.get(&(d.date, d.currency.clone())) {
                Some(b)
                    if (b.entry_count, b.credits, b.debits, b.closing)
                        == (d.entry_count, d.credits, d.debits, d.closing) => {}
                Some(b) => report.push(format!(
                    "{} {}: closed with {}; the daily balance now says {}",
                    d.date,
                    d.currency,
                    figures(d),
                    figures(b)
                )),
                None => report.push(format!(
                    "{} {}: closed with {}; the daily balances have no such day",
                    d.date,
                    d.currency,
                    figures(d)
                )),
            }
        }
        for ((date, currency), b) in read_model.range(..=(close.closed_through, "~~~".to_owned())) {
            if !recorded.iter().any(|d| d.date == *date && &d.currency == currency) {
                report.push(format!(
                    "{date} {currency}: the daily balances have {} that the close did not cover",
                    figures(b)
                ));
            }
        }
        if report.is_empty() {
            crate::outln!(
                "close {} through {}: verified ({} entries, {} days, digest {})",
                close.id,
                close.closed_through,
                close.entry_count,
                recorded.len(),
                close.digest
            );
        } else {
            crate::outln!(
                "close {} through {}: {} difference(s)",
                close.id,
                close.closed_through,
                report.len()
            );
            for line in &report {
                crate::outln!("  {line}");
            }
            problems += report.len();
        }
    }
    if problems > 0 {
        bail!("the books differ from what was closed ({problems} difference(s))");
    }
    Ok(())
}

/// The read model's days of `merchant` as figures (closing = running balance), by (date, currency).
async fn balance_figures(
    balances: &BalanceStore,
    merchant: &MerchantId,
) -> anyhow::Result<BTreeMap<(NaiveDate, String), DayFigures>> {
    let days = balances.all_days(Some(merchant.as_str())).await.context("reading the daily balances")?;
    let mut ordered: Vec<_> = days.into_iter().collect();
    ordered.sort_by(|(a, _), (b, _)| (a.date, &a.currency).cmp(&(b.date, &b.currency)));
    let mut running: BTreeMap<String, i64> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (key, totals) in ordered {
        if totals.count == 0 && totals.credits == 0 && totals.debits == 0 {
            continue;
        }
        let closing = running.entry(key.currency.clone()).or_default();
        *closing = closing.saturating_add(totals.credits).saturating_sub(totals.debits);
        out.insert(
            (key.date, key.currency.clone()),
            DayFigures {
                date: key.date,
                currency: key.currency,
                entry_count: totals.count,
                credits: totals.credits,
                debits: totals.debits,
                closing: *closing,
                digest: String::new(),
            },
        );
    }
    Ok(out)
}
