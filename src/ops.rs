//! Operator commands: the consumer group, the dead-letter stream, and
//! rebuilding or reconciling balances from the ledger.
//!
//! Reports go to stdout (they are the command's output); progress to stderr.

#![allow(clippy::print_stdout)]

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use anyhow::{Context, bail};
use chrono::NaiveDate;
use fluxo_balance::{
    BalanceStore, Consolidator,
    consumer::{DeadLetters, ensure_group},
    domain::{DayKey, DayTotals, Direction, Posting, fold},
};
use fluxo_ledger::{
    LedgerStore,
    domain::{DateRange, Entry, EntryKind, MerchantId},
};

use crate::{config::Config, serve::connect_waiting};

fn redis(config: &Config) -> anyhow::Result<fred::prelude::Client> {
    let settings = config
        .redis_config()
        .context("this command works on the Redis stream: set redis.url (FLUXO_REDIS__URL)")?;
    Ok(fluxo_queue::client(&settings)?)
}

/// `fluxo openapi`: the REST API's OpenAPI document, as committed in `docs/openapi.json`.
pub fn openapi() -> anyhow::Result<()> {
    crate::out!("{}", fluxo_gateway::openapi_json()?);
    Ok(())
}

/// `fluxo queue init`: creates the stream and its consumer group.
pub async fn queue_init(config: &Config, notifiers: bool) -> anyhow::Result<()> {
    use fred::prelude::ClientLike;
    let client = redis(config)?;
    // The client reconnects forever; a one-shot command must say why it cannot connect (a
    // refused TLS certificate, say) instead of timing out on its first command.
    let connect_wait = Duration::from_secs(15);
    match tokio::time::timeout(connect_wait, client.wait_for_connect()).await {
        Ok(connected) => connected.context("cannot connect to Redis (redis.url)")?,
        Err(_) => bail!("Redis did not answer within {connect_wait:?} (redis.url)"),
    }
    let names = config.stream_names();
    ensure_group(&client, &names).await.context("creating the consumer group")?;
    eprintln!("fluxo: stream {} has consumer group {}", names.stream, names.group);
    if notifiers {
        let names = config.notifier_stream_names();
        ensure_group(&client, &names).await.context("creating the notifiers' consumer group")?;
        eprintln!("fluxo: stream {} has consumer group {}", names.stream, names.group);
    }
    Ok(())
}

/// `fluxo queue status`: where events are waiting, end to end.
pub async fn queue_status(config: &Config) -> anyhow::Result<()> {
    let db = connect_waiting(config, 10).await?;
    let backlog = fluxo_ledger::relay::backlog(&db).await?;
    crate::outln!(
        "outbox      {} unpublished event(s), oldest {:.1}s old",
        backlog.events,
        backlog.oldest_age.as_secs_f64()
    );
    let parked = BalanceStore::new(db.clone()).parked_count().await?;
    crate::outln!("parked      {parked} event(s) refused by the read model (see `fluxo dlq list`)");
    let Some(settings) = config.redis_config() else {
        crate::outln!("stream      none: no Redis configured, events are delivered in process");
        return Ok(());
    };
    let client = fluxo_queue::client(&settings)?;
    let names = config.stream_names();
    let status = fluxo_queue::stream_status(&client, &names).await?;
    crate::outln!("stream      {} holds {} message(s)", names.stream, status.length);
    match status.group(&names.group) {
        Some(group) => crate::outln!(
            "group       {}: lag {}, pending {}, consumers {}",
            names.group,
            group.lag.map_or_else(|| "?".to_owned(), |lag| lag.to_string()),
            group.pending,
            group.consumers
        ),
        None => crate::outln!("group       {} does not exist: run `fluxo queue init`", names.group),
    }
    crate::outln!("dead letter {} holds {} message(s)", names.dead_letters, status.dead_letters);
    Ok(())
}

/// What to do with the dead-letter stream.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DlqCommand {
    /// List parked messages, oldest first.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        count: u64,
    },
    /// Show one parked message.
    Show {
        /// Its id in the dead-letter stream.
        id: String,
    },
    /// Apply parked messages again once their cause is fixed; applied ones are removed.
    Replay {
        /// Ids to replay; none with --all.
        ids: Vec<String>,
        /// Replay every parked message.
        #[arg(long)]
        all: bool,
    },
    /// Delete parked messages without applying them.
    Drop {
        /// Ids to delete.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// `fluxo dlq …`: the dead-letter stream with Redis; without it (events
/// delivered in process), the events the read model parked in its database.
pub async fn dlq(config: &Config, command: DlqCommand) -> anyhow::Result<()> {
    if config.redis_config().is_none() {
        return parked(config, command).await;
    }
    let letters = DeadLetters::new(redis(config)?, config.stream_names());
    match command {
        DlqCommand::List { count } => {
            let list = letters.list(count).await?;
            crate::outln!(
                "{} parked message(s) in {}",
                letters.count().await?,
                config.stream_names().dead_letters
            );
            for l in list {
                let event = l.event.as_ref().map_or("<malformed>".to_owned(), |e| e.event_id.clone());
                crate::outln!("{}  event {event}  deliveries {}  reason: {}", l.id, l.deliveries, l.reason);
            }
        }
        DlqCommand::Show { id } => print_letter(&letters.show(&id).await?),
        DlqCommand::Replay { ids, all } => replay_letters(config, &letters, ids, all).await?,
        DlqCommand::Drop { ids } => {
            let store = BalanceStore::new(connect_waiting(config, 10).await?);
            for id in ids {
                // The read model forgets it too: its merchant no longer reads as
                // possibly stale (a repair from the ledger is the operator's call).
                if let Ok(letter) = letters.show(&id).await
                    && let Some(event) = letter.event
                {
                    store.unpark(&event.event_id).await?;
                }
                let removed = letters.drop_message(&id).await?;
                crate::outln!("{id}: {}", if removed { "dropped" } else { "not found" });
            }
        }
    }
    Ok(())
}

fn print_letter(l: &fluxo_balance::consumer::DeadLetter) {
    crate::outln!("id:           {}", l.id);
    crate::outln!("original id:  {}", l.original_id);
    crate::outln!("deliveries:   {}", l.deliveries);
    crate::outln!("reason:       {}", l.reason);
    let Some(e) = &l.event else {
        crate::outln!("event:        malformed message");
        return;
    };
    crate::outln!("event id:     {}", e.event_id);
    crate::outln!("position:     {}", e.position);
    // The trace of the call that booked the entry: search it in the tracing backend.
    if let Some(tp) = &e.traceparent {
        crate::outln!("traceparent:  {tp}");
    }
    match fluxo_balance::consolidator::decode(e) {
        Ok(p) => crate::outln!(
            "entry:        {} {} {:?} {} {} on {}",
            p.entry_id,
            p.merchant_id,
            p.direction,
            p.amount,
            p.currency,
            p.date
        ),
        Err(err) => crate::outln!("entry:        unreadable ({err})"),
    }
}

/// Replays `ids` (or every parked message) from the dead-letter stream.
async fn replay_letters(
    config: &Config,
    letters: &DeadLetters,
    ids: Vec<String>,
    all: bool,
) -> anyhow::Result<()> {
    let db = connect_waiting(config, 10).await?;
    let consolidator = consolidator(config, BalanceStore::new(db))?;
    let ids = if all {
        letters.list(1_000_000).await?.into_iter().map(|l| l.id).collect()
    } else if ids.is_empty() {
        bail!("name the messages to replay, or pass --all");
    } else {
        ids
    };
    let (mut ok, mut failed) = (0, 0);
    for (i, id) in ids.iter().enumerate() {
        match letters.replay(id, &consolidator).await {
            Ok(()) => ok += 1,
            Err(error) => {
                failed += 1;
                eprintln!("fluxo: {id}: {error}");
            }
        }
        progress("replayed", i + 1, ids.len());
    }
    replayed(ok, failed, "message(s)")
}

/// Says how a replay went; an error when some `what` still fail.
fn replayed(ok: usize, failed: usize, what: &str) -> anyhow::Result<()> {
    crate::outln!("replayed {ok}, still failing {failed}");
    if failed > 0 {
        bail!("{failed} {what} still fail; fix their cause and replay again");
    }
    Ok(())
}

/// `fluxo dlq …` without Redis: events parked by the in-process delivery.
async fn parked(config: &Config, command: DlqCommand) -> anyhow::Result<()> {
    let store = BalanceStore::new(connect_waiting(config, 10).await?);
    let all = |store: BalanceStore| async move { store.parked(u64::MAX >> 1).await };
    match command {
        DlqCommand::List { count } => {
            crate::outln!(
                "{} parked event(s) (no Redis: refused by the read model in process)",
                store.parked_count().await?
            );
            for p in store.parked(count).await? {
                let day = p.date.map_or("?".to_owned(), |d| d.to_string());
                let merchant = p.merchant_id.as_deref().unwrap_or("?");
                crate::outln!("{}  merchant {merchant}  day {day}  reason: {}", p.event_id, p.reason);
            }
        }
        DlqCommand::Show { id } => {
            let p = all(store)
                .await?
                .into_iter()
                .find(|p| p.event_id == id)
                .with_context(|| format!("no parked event {id}"))?;
            crate::outln!("event id:     {}", p.event_id);
            crate::outln!("merchant:     {}", p.merchant_id.as_deref().unwrap_or("unknown (unreadable)"));
            crate::outln!("day:          {}", p.date.map_or("unknown".to_owned(), |d| d.to_string()));
            crate::outln!("reason:       {}", p.reason);
        }
        DlqCommand::Replay { ids, all: every } => {
            let consolidator = Consolidator::new(store.clone());
            let parked = all(store.clone()).await?;
            let chosen: Vec<_> = if every {
                parked
            } else if ids.is_empty() {
                bail!("name the events to replay, or pass --all");
            } else {
                parked.into_iter().filter(|p| ids.contains(&p.event_id)).collect()
            };
            let (mut ok, mut failed) = (0, 0);
            for p in &chosen {
                let event = fluxo_queue::StreamEvent {
                    event_id: p.event_id.clone(),
                    position: 0,
                    payload: p.payload.clone().into(),
                    traceparent: None,
                    tracestate: None,
                };
                match consolidator.apply(std::slice::from_ref(&event)).await.pop() {
                    Some(Ok(())) => {
                        store.unpark(&p.event_id).await?;
                        ok += 1;
                    }
                    Some(Err(reason)) => {
                        failed += 1;
                        eprintln!("fluxo: {}: {reason}", p.event_id);
                    }
                    None => {}
                }
            }
            replayed(ok, failed, "event(s)")?;
        }
        DlqCommand::Drop { ids } => {
            for id in ids {
                let removed = store.unpark(&id).await?;
                crate::outln!("{id}: {}", if removed { "dropped" } else { "not found" });
            }
        }
    }
    Ok(())
}

/// A consolidator that drops the cached answers it changes, as the running
/// ones do, so a replay shows at once.
fn consolidator(config: &Config, store: BalanceStore) -> anyhow::Result<Consolidator> {
    let consolidator = Consolidator::new(store);
    let Some(settings) = config.redis_config() else { return Ok(consolidator) };
    let cache = fluxo_balance::cache::BalanceCache::new(
        fluxo_queue::client(&settings)?,
        config.balance.cache_ttl_ms,
        config.balance.stale_ttl_ms,
    )
    .with_prefix(&config.balance.cache_prefix);
    Ok(consolidator.with_listener(std::sync::Arc::new(fluxo_balance::cache::Invalidator(cache))))
}

fn progress(what: &str, done: usize, total: usize) {
    if total >= 20 && (done.is_multiple_of((total / 20).max(1)) || done == total) {
        eprintln!("fluxo: {what} {done}/{total}");
    }
}

fn posting(entry: &Entry) -> Posting {
    let b = &entry.booked;
    Posting {
        // Rebuilt from the ledger rather than delivered: the entry stands for its event.
        event_id: b.id.to_string(),
        entry_id: b.id.to_string(),
        merchant_id: b.merchant_id.as_str().to_owned(),
        currency: b.amount.currency().code().to_owned(),
        date: b.booking_date.date(),
        direction: match b.kind {
            EntryKind::Credit => Direction::Credit,
            EntryKind::Debit => Direction::Debit,
        },
        amount: b.amount.minor_units(),
        committed_at_micros: entry.created_at.timestamp_micros(),
    }
}

/// Which balances a command covers.
#[derive(Debug, Clone, clap::Args)]
pub struct Scope {
    /// Only this merchant (default: every merchant).
    #[arg(long)]
    merchant: Option<String>,
    /// First booking date (YYYY-MM-DD) of a rebuild.
    #[arg(long)]
    from: Option<String>,
    /// Last booking date (YYYY-MM-DD) of a rebuild.
    #[arg(long)]
    to: Option<String>,
}

fn parse_date(field: &str, value: Option<&String>) -> anyhow::Result<Option<NaiveDate>> {
    value
        .map(|v| {
            fluxo_ledger::domain::BookingDate::parse_date(v).map_err(|e| anyhow::anyhow!("--{field}: {e}"))
        })
        .transpose()
}

impl Scope {
    fn merchant(&self) -> anyhow::Result<Option<MerchantId>> {
        self.merchant
            .as_deref()
            .map(|m| MerchantId::parse(m).map_err(|e| anyhow::anyhow!("--merchant: {e}")))
            .transpose()
    }

    fn range(&self) -> anyhow::Result<DateRange> {
        Ok(DateRange {
            start: parse_date("from", self.from.as_ref())?,
            end: parse_date("to", self.to.as_ref())?,
        })
    }
}

/// `fluxo balances rebuild`: recomputes balances from the ledger while the system serves.
pub async fn rebuild(config: &Config, scope: &Scope) -> anyhow::Result<()> {
    let db = connect_waiting(config, 10).await?;
    let ledger = LedgerStore::new(db.clone());
    let store = BalanceStore::new(db);
    let range = scope.range()?;
    let entries = ledger.entries(scope.merchant()?.as_ref(), &range).await?;
    let mut by_merchant: BTreeMap<String, Vec<Posting>> = BTreeMap::new();
    for e in &entries {
        by_merchant.entry(e.booked.merchant_id.as_str().to_owned()).or_default().push(posting(e));
    }
    if let Some(m) = &scope.merchant {
        by_merchant.entry(m.clone()).or_default();
    }
    // Bounds every database stores as a date (PostgreSQL refuses chrono's MIN/MAX).
    let start = range.start.unwrap_or(fluxo_ledger::domain::BookingDate::EARLIEST);
    let end = range.end.or_else(|| NaiveDate::from_ymd_opt(9999, 12, 31)).unwrap_or(start);
    let total = by_merchant.len();
    for (i, (merchant, postings)) in by_merchant.iter().enumerate() {
        store.rebuild(merchant, start, end, postings).await?;
        progress("rebuilt merchants", i + 1, total);
    }
    crate::outln!("rebuilt {total} merchant(s) from {} ledger entries", entries.len());
    Ok(())
}

/// `fluxo balances reconcile`: compares the ledger's sums with the read
/// model, reports each difference, and with `--repair` applies the ledger
/// entries the read model misses.
pub async fn reconcile(config: &Config, scope: &Scope, repair: bool) -> anyhow::Result<()> {
    let db = connect_waiting(config, 10).await?;
    let ledger = LedgerStore::new(db.clone());
    let store = BalanceStore::new(db);
    let merchant = scope.merchant()?;
    let diffs = differences(&ledger, &store, merchant.as_ref()).await?;
    for (key, (expected, actual)) in &diffs {
        crate::outln!(
            "{} {} {}: ledger credits {} debits {} entries {}; read model credits {} debits {} entries {}; missing net {}",
            key.merchant_id,
            key.currency,
            key.date,
            expected.credits,
            expected.debits,
            expected.count,
            actual.credits,
            actual.debits,
            actual.count,
            (expected.credits - expected.debits) - (actual.credits - actual.debits),
        );
    }
    crate::outln!("{} day(s) differ", diffs.len());
    if diffs.is_empty() || !repair {
        if !diffs.is_empty() {
            bail!("balances differ from the ledger; run again with --repair");
        }
        return Ok(());
    }
    let merchants: BTreeSet<String> = diffs.keys().map(|k| k.merchant_id.clone()).collect();
    let total = merchants.len();
    let mut repaired = 0;
    for (i, m) in merchants.iter().enumerate() {
        let id = MerchantId::parse(m).map_err(|e| anyhow::anyhow!("{e}"))?;
        let applied = store.applied_entries(m).await?;
        let missing: Vec<Posting> = ledger
            .entries(Some(&id), &DateRange::default())
            .await?
            .iter()
            .filter(|e| !applied.contains(&e.booked.id.to_string()))
            .map(posting)
            .collect();
        for chunk in missing.chunks(500) {
            repaired += store.apply(chunk).await?.applied;
        }
        progress("repaired merchants", i + 1, total);
    }
    let left = differences(&ledger, &store, merchant.as_ref()).await?;
    crate::outln!("applied {repaired} missing entries; {} day(s) still differ", left.len());
    if !left.is_empty() {
        bail!(
            "some days still differ (the read model holds amounts the ledger does not): run `fluxo balances rebuild`"
        );
    }
    Ok(())
}

type Diffs = BTreeMap<DayKey, (DayTotals, DayTotals)>;

async fn differences(
    ledger: &LedgerStore,
    store: &BalanceStore,
    merchant: Option<&MerchantId>,
) -> anyhow::Result<Diffs> {
    let entries = ledger.entries(merchant, &DateRange::default()).await?;
    let postings: Vec<Posting> = entries.iter().map(posting).collect();
    let expected: BTreeMap<DayKey, DayTotals> = fold(&postings)?
        .into_iter()
        .map(|(k, d)| (k, DayTotals { credits: d.credits, debits: d.debits, count: d.count }))
        .collect();
    let actual = store.all_days(merchant.map(MerchantId::as_str)).await?;
    let keys: BTreeSet<&DayKey> = expected.keys().chain(actual.keys()).collect();
    Ok(keys
        .into_iter()
        .filter_map(|k| {
            let e = expected.get(k).copied().unwrap_or_default();
            let a = actual.get(k).copied().unwrap_or_default();
            (e != a).then(|| (k.clone(), (e, a)))
        })
        .collect())
}
