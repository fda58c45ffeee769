//! The ledger's SQL: entries, idempotency keys and the outbox, on PostgreSQL or
//! SQLite through sea-orm. Every write is one transaction that either books the
//! entry, claims its key and queues its event together, or does nothing.

mod group;
mod migrations;
mod schema;

use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use fluxo_db::Db;
use prost::Message;
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, Condition, ConnectionTrait, DatabaseTransaction, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, SqlErr, TransactionTrait,
    sea_query::OnConflict,
};
use sea_orm_migration::MigratorTrait;
use tokio::sync::Notify;

pub use group::GroupCommit;
pub use migrations::Migrator;
use schema::{entry, idempotency_key, outbox};

use crate::{
    domain::{
        BookingDate, Currency, DateRange, Description, Entry, EntryId, EntryKind, Fingerprint, MerchantId,
        Money, NewEntry, PageCursor, PageRequest, RequestId,
    },
    error::LedgerError,
    wire,
};

/// Why the store failed, in terms a caller can act on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached right now; the call may be retried.
    #[error("database unavailable: {0}")]
    Unavailable(DbErr),
    /// Anything else the database refused.
    #[error("database error: {0}")]
    Failed(DbErr),
    /// Booking would take the merchant's all-time credits or debits in a
    /// currency past 64-bit minor units: more than the daily balances can hold.
    #[error("the total {kind} of merchant {merchant_id} in {currency} would pass {max} minor units", max = i64::MAX)]
    LimitExceeded {
        /// The merchant.
        merchant_id: String,
        /// The currency.
        currency: String,
        /// `credits` or `debits`.
        kind: &'static str,
    },
    /// A stored row that no longer parses: a bug or a hand edit, never caller input.
    #[error("stored entry {id} is unreadable: {reason}")]
    Corrupt {
        /// The entry id.
        id: String,
        /// What did not parse.
        reason: String,
    },
}

impl From<DbErr> for StoreError {
    fn from(error: DbErr) -> Self {
        match error {
            DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => Self::Unavailable(error),
            other => Self::Failed(other),
        }
    }
}

/// What booking a request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Booked {
    /// A new entry was committed.
    New(Entry),
    /// The key had booked this entry already, for the same request.
    Replayed(Entry),
}

impl Booked {
    /// The entry, new or original.
    pub fn entry(&self) -> &Entry {
        match self {
            Self::New(e) | Self::Replayed(e) => e,
        }
    }
}

/// The ledger's tables.
#[derive(Debug, Clone)]
pub struct LedgerStore {
    db: Db,
    // Woken after every commit so the outbox relay publishes at once.
    committed: Arc<Notify>,
    writers: Arc<group::Writers>,
}

impl LedgerStore {
    /// Wraps an open database; the schema must be current (see [`Migrator`]).
    pub fn new(db: Db) -> Self {
        Self::with_group_commit(db, GroupCommit::default())
    }

    /// Like [`LedgerStore::new`], with the batching of concurrent bookings set.
    pub fn with_group_commit(db: Db, config: GroupCommit) -> Self {
        let committed = Arc::new(Notify::new());
        let writers = Arc::new(group::Writers::new(db.clone(), committed.clone(), config));
        Self { db, committed, writers }
    }

    /// Notified after every commit that adds outbox events (for the relay).
    pub fn commits(&self) -> Arc<Notify> {
        self.committed.clone()
    }

    /// Creates or upgrades the ledger's tables.
    pub async fn migrate(db: &Db) -> Result<(), DbErr> {
        Migrator::up(db.conn(), None).await
    }

    /// True when every migration this build knows has been applied.
    pub async fn schema_is_current(db: &Db) -> Result<bool, DbErr> {
        Ok(Migrator::get_pending_migrations(db.conn()).await?.is_empty())
    }

    /// Books `new` under its idempotency key: the entry, the key and the outbox
    /// event commit together. A key already used returns the original entry
    /// when `fingerprint` matches, and [`LedgerError::KeyReused`] otherwise.
    pub async fn record(&self, new: NewEntry, fingerprint: &Fingerprint) -> Result<Booked, LedgerError> {
        let Some(key) = new.request_id.clone() else {
            return Err(LedgerError::Internal("record without an idempotency key".into()));
        };
        let merchant = new.merchant_id.clone();
        match self.writers.book(new, fingerprint).await? {
            group::Outcome::Booked(entry) => Ok(Booked::New(entry)),
            // Boxed: a database read is a future of kilobytes, and in place it would
            // make every booking's future (copied on each move) as large.
            group::Outcome::KeyTaken => Box::pin(self.replay(&merchant, &key, fingerprint)).await,
        }
    }

    /// Books the reversal of `entry_id` as `decide` rules it, atomically with
    /// its key (when given) and its outbox event.
    pub async fn reverse(
        &self,
        merchant: &MerchantId,
        entry_id: EntryId,
        idempotency: Option<(&RequestId, &Fingerprint)>,
        decide: impl FnOnce(&Entry) -> Result<NewEntry, LedgerError>,
    ) -> Result<Booked, LedgerError> {
        if let Some((key, fingerprint)) = idempotency {
            // A repeated reversal with its key replays, before the rules
            // (which would now say "already reversed") are consulted.
            if self.find_key(merchant, key).await?.is_some() {
                return self.replay(merchant, key, fingerprint).await;
            }
        }
        let outcome = {
            let _writer = self.db.write_guard().await;
            let txn = self.db.conn().begin().await.map_err(StoreError::from)?;
            let original =
                load_entry(&txn, merchant, entry_id).await?.ok_or(LedgerError::NotFound { entry_id })?;
            let decided = decide(&original);
            // The key is claimed before the rules' answer counts: a retry racing
            // the request that booked this very reversal waits here for it and
            // then replays it, instead of being told "already reversed" by itself.
            let claimed = match idempotency {
                Some((key, fingerprint)) => {
                    let id = decided.as_ref().map_or_else(|_| EntryId::generate(), |r| r.id);
                    claim_key(&txn, merchant, key, fingerprint, id).await?
                }
                None => true,
            };
            match (claimed, decided) {
                (true, Ok(reversal)) => Some(self.insert_reversal(txn, reversal, entry_id).await),
                (true, Err(refused)) => {
                    txn.rollback().await.map_err(StoreError::from)?;
                    return Err(refused);
                }
                (false, _) => {
                    txn.rollback().await.map_err(StoreError::from)?;
                    None
                }
            }
        };
        match (outcome, idempotency) {
            (Some(result), _) => result,
            // Lost a race for the key to an identical or different request.
            (None, Some((key, fingerprint))) => self.replay(merchant, key, fingerprint).await,
            (None, None) => Err(LedgerError::Internal("reversal neither booked nor replayed".into())),
        }
    }

    async fn insert_reversal(
        &self,
        txn: DatabaseTransaction,
        reversal: NewEntry,
        original: EntryId,
    ) -> Result<Booked, LedgerError> {
        match insert_entry(&txn, reversal).await {
            Ok(entry) => {
                txn.commit().await.map_err(StoreError::from)?;
                self.committed.notify_one();
                Ok(Booked::New(entry))
            }
            Err(LedgerError::Store(StoreError::Failed(error)))
                if matches!(error.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) =>
            {
                // A concurrent reversal of the same entry committed first.
                txn.rollback().await.map_err(StoreError::from)?;
                let by = self
                    .reversal_of(original)
                    .await?
                    .ok_or_else(|| LedgerError::Internal("reversal conflict without a reversal".into()))?;
                Err(LedgerError::Refused(crate::domain::ReversalRefused::AlreadyReversed {
                    entry: original,
                    by,
                }))
            }
            Err(other) => Err(other),
        }
    }

    /// One entry of a merchant, with the reversal that cancels it, if any.
    pub async fn get(&self, merchant: &MerchantId, id: EntryId) -> Result<Option<Entry>, LedgerError> {
        load_entry(self.db.conn(), merchant, id).await
    }

    /// One page of a merchant's entries in (booking date, id) order, and the
    /// cursor of the next page when there is one.
    pub async fn list(
        &self,
        merchant: &MerchantId,
        range: &DateRange,
        page: &PageRequest,
    ) -> Result<(Vec<Entry>, Option<PageCursor>), LedgerError> {
        let mut query = entry::Entity::find().filter(entry::Column::MerchantId.eq(merchant.as_str()));
        if let Some(start) = range.start {
            query = query.filter(entry::Column::BookingDate.gte(start));
        }
        if let Some(end) = range.end {
            query = query.filter(entry::Column::BookingDate.lte(end));
        }
        if let Some(after) = page.after {
            query = query.filter(
                Condition::any().add(entry::Column::BookingDate.gt(after.booking_date)).add(
                    Condition::all()
                        .add(entry::Column::BookingDate.eq(after.booking_date))
                        .add(entry::Column::Id.gt(after.id.to_string())),
                ),
            );
        }
        // One row beyond the page tells whether another page follows.
        let mut rows = query
            .order_by_asc(entry::Column::BookingDate)
            .order_by_asc(entry::Column::Id)
            .limit(page.size + 1)
            .all(self.db.conn())
            .await
            .map_err(StoreError::from)?;
        let more = rows.len() as u64 > page.size;
        rows.truncate(usize::try_from(page.size).unwrap_or(usize::MAX));
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let reversals: Vec<(String, Option<String>)> = entry::Entity::find()
            .select_only()
            .column(entry::Column::Id)
            .column(entry::Column::ReversesEntryId)
            .filter(entry::Column::ReversesEntryId.is_in(ids))
            .into_tuple()
            .all(self.db.conn())
            .await
            .map_err(StoreError::from)?;
        let entries = rows
            .into_iter()
            .map(|row| {
                let by = reversals
                    .iter()
                    .find(|(_, of)| of.as_deref() == Some(row.id.as_str()))
                    .map(|(id, _)| id.clone());
                to_domain(row, by)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let next = more
            .then(|| entries.last())
            .flatten()
            .map(|last| PageCursor { booking_date: last.booked.booking_date.date(), id: last.booked.id });
        Ok((entries, next))
    }

    /// Every entry, optionally of one merchant and booking-date range, in
    /// (merchant, date, id) order: the ledger side of reconciliation and rebuilds.
    pub async fn entries(
        &self,
        merchant: Option<&MerchantId>,
        range: &DateRange,
    ) -> Result<Vec<Entry>, LedgerError> {
        let mut query = entry::Entity::find();
        if let Some(m) = merchant {
            query = query.filter(entry::Column::MerchantId.eq(m.as_str()));
        }
        if let Some(start) = range.start {
            query = query.filter(entry::Column::BookingDate.gte(start));
        }
        if let Some(end) = range.end {
            query = query.filter(entry::Column::BookingDate.lte(end));
        }
        let rows = query
            .order_by_asc(entry::Column::MerchantId)
            .order_by_asc(entry::Column::BookingDate)
            .order_by_asc(entry::Column::Id)
            .all(self.db.conn())
            .await
            .map_err(StoreError::from)?;
        rows.into_iter().map(|row| Ok(to_domain(row, None)?)).collect()
    }

    async fn find_key(
        &self,
        merchant: &MerchantId,
        key: &RequestId,
    ) -> Result<Option<idempotency_key::Model>, StoreError> {
        Ok(idempotency_key::Entity::find_by_id((merchant.as_str().to_owned(), key.as_str().to_owned()))
            .one(self.db.conn())
            .await?)
    }

    async fn replay(
        &self,
        merchant: &MerchantId,
        key: &RequestId,
        fingerprint: &Fingerprint,
    ) -> Result<Booked, LedgerError> {
        let claimed = self.find_key(merchant, key).await?.ok_or_else(|| {
            // The key's transaction rolled back between our conflict and this read.
            LedgerError::Contention("the idempotency key was released concurrently; retry".into())
        })?;
        if claimed.fingerprint != fingerprint.to_hex() {
            return Err(LedgerError::KeyReused { request_id: key.clone(), entry_id: claimed.entry_id });
        }
        let id = EntryId::parse(&claimed.entry_id)
            .map_err(|e| StoreError::Corrupt { id: claimed.entry_id.clone(), reason: e.to_string() })?;
        let entry = self
            .get(merchant, id)
            .await?
            .ok_or_else(|| LedgerError::Internal(format!("idempotency key points at missing entry {id}")))?;
        Ok(Booked::Replayed(entry))
    }

    async fn reversal_of(&self, id: EntryId) -> Result<Option<EntryId>, StoreError> {
        reversal_of(self.db.conn(), id).await
    }
}

/// Claims (merchant, key) for `entry_id`; false when some request holds it already.
async fn claim_key(
    txn: &DatabaseTransaction,
    merchant: &MerchantId,
    key: &RequestId,
    fingerprint: &Fingerprint,
    entry_id: EntryId,
) -> Result<bool, StoreError> {
    let row = idempotency_key::ActiveModel {
        merchant_id: Set(merchant.as_str().to_owned()),
        request_id: Set(key.as_str().to_owned()),
        fingerprint: Set(fingerprint.to_hex()),
        entry_id: Set(entry_id.to_string()),
        created_at: Set(now()),
    };
    // On PostgreSQL a concurrent claim of the same key waits here until the
    // other transaction ends, then does nothing if it committed.
    let inserted = idempotency_key::Entity::insert(row)
        .on_conflict(
            OnConflict::columns([idempotency_key::Column::MerchantId, idempotency_key::Column::RequestId])
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(txn)
        .await?;
    Ok(inserted == 1)
}

/// Inserts the entry and its `EntryRecorded` event, and adds it to its
/// merchant's totals.
async fn insert_entry(txn: &DatabaseTransaction, new: NewEntry) -> Result<Entry, LedgerError> {
    let (row, event, entry) = entry_rows(new, now(), fluxo_telemetry::current_trace_context());
    entry::Entity::insert(row).exec_without_returning(txn).await.map_err(StoreError::Failed)?;
    outbox::Entity::insert(event).exec_without_returning(txn).await.map_err(StoreError::from)?;
    add_to_totals(txn, [&entry.booked]).await?;
    Ok(entry)
}

/// Adds `entries` to their merchants' all-time totals (see the
/// `ledger_totals` migration), refusing with [`StoreError::LimitExceeded`]
/// what would pass 64 bits. Rows are upserted in (merchant, currency) order,
/// so concurrent bookings lock them in the same order.
async fn add_to_totals<'a>(
    txn: &DatabaseTransaction,
    entries: impl IntoIterator<Item = &'a NewEntry>,
) -> Result<(), StoreError> {
    let mut sums: std::collections::BTreeMap<(&str, &str), (i64, i64)> = Default::default();
    for new in entries {
        let key = (new.merchant_id.as_str(), new.amount.currency().code());
        let (credits, debits) = sums.entry(key).or_default();
        let (sum, kind) = match new.kind {
            EntryKind::Credit => (credits, "credits"),
            EntryKind::Debit => (debits, "debits"),
        };
        *sum = sum.checked_add(new.amount.minor_units()).ok_or_else(|| StoreError::LimitExceeded {
            merchant_id: key.0.to_owned(),
            currency: key.1.to_owned(),
            kind,
        })?;
    }
    if sums.is_empty() {
        return Ok(());
    }
    let rows = vec!["(?, ?, ?, ?)"; sums.len()].join(", ");
    let values = sums
        .iter()
        .flat_map(|((m, c), (credits, debits))| {
            [(*m).into(), (*c).into(), (*credits).into(), (*debits).into()]
        })
        .collect();
    let sql = format!(
        "INSERT INTO ledger_totals (merchant_id, currency_code, credits_minor, debits_minor) VALUES {rows} \
         ON CONFLICT (merchant_id, currency_code) DO UPDATE SET \
           credits_minor = ledger_totals.credits_minor + excluded.credits_minor, \
           debits_minor = ledger_totals.debits_minor + excluded.debits_minor"
    );
    let result = txn.execute_raw(fluxo_db::statement(txn.get_database_backend(), &sql, values)).await;
    match result {
        Ok(_) => Ok(()),
        Err(error) if is_overflow(&error) => {
            // Which one passed the limit is not said by the database; with one
            // entry (how a refused batch is retried) it is that entry's.
            let ((m, c), (credits, _)) = sums.iter().next().map(|(k, v)| (*k, *v)).unwrap_or_default();
            Err(StoreError::LimitExceeded {
                merchant_id: m.to_owned(),
                currency: c.to_owned(),
                kind: if credits > 0 { "credits" } else { "debits" },
            })
        }
        Err(error) => Err(error.into()),
    }
}

/// A total passed 64 bits (see [`fluxo_db::is_out_of_range`]).
pub(crate) fn is_overflow(error: &DbErr) -> bool {
    fluxo_db::is_out_of_range(error)
}

/// The rows that book `new` at `created_at`: the entry, its `EntryRecorded`
/// event carrying `trace` (W3C traceparent and tracestate), and the entry as
/// it now reads.
fn entry_rows(
    new: NewEntry,
    created_at: DateTime<Utc>,
    trace: (Option<String>, Option<String>),
) -> (entry::ActiveModel, outbox::ActiveModel, Entry) {
    let (entry, event) = booked_entry(new, created_at, trace);
    (entry_row(&entry), event, entry)
}

/// The entry as booked at `created_at`, and its outbox event.
fn booked_entry(
    new: NewEntry,
    created_at: DateTime<Utc>,
    (traceparent, tracestate): (Option<String>, Option<String>),
) -> (Entry, outbox::ActiveModel) {
    let entry = Entry { booked: new, created_at, reversed_by: None };
    let event_id = ulid::Ulid::new().to_string();
    let event = outbox::ActiveModel {
        position: NotSet,
        event_id: Set(event_id.clone()),
        entry_id: Set(entry.booked.id.to_string()),
        merchant_id: Set(entry.booked.merchant_id.as_str().to_owned()),
        payload: Set(wire::entry_recorded(&entry, event_id, created_at).encode_to_vec()),
        traceparent: Set(traceparent),
        tracestate: Set(tracestate),
        created_at: Set(created_at),
        published_at: Set(None),
    };
    (entry, event)
}

/// The `ledger_entries` row of `entry`.
fn entry_row(entry: &Entry) -> entry::ActiveModel {
    let new = &entry.booked;
    entry::ActiveModel {
        id: Set(new.id.to_string()),
        merchant_id: Set(new.merchant_id.as_str().to_owned()),
        kind: Set(new.kind.as_str().to_owned()),
        currency_code: Set(new.amount.currency().code().to_owned()),
        amount_minor: Set(new.amount.minor_units()),
        booking_date: Set(new.booking_date.date()),
        description: Set(new.description.as_str().to_owned()),
        request_id: Set(new.request_id.as_ref().map(|k| k.as_str().to_owned())),
        reverses_entry_id: Set(new.reverses.map(|id| id.to_string())),
        created_at: Set(entry.created_at),
    }
}

async fn load_entry(
    conn: &impl ConnectionTrait,
    merchant: &MerchantId,
    id: EntryId,
) -> Result<Option<Entry>, LedgerError> {
    let Some(row) = entry::Entity::find_by_id(id.to_string())
        .filter(entry::Column::MerchantId.eq(merchant.as_str()))
        .one(conn)
        .await
        .map_err(StoreError::from)?
    else {
        return Ok(None);
    };
    let by = reversal_of(conn, id).await?.map(|id| id.to_string());
    Ok(Some(to_domain(row, by)?))
}

async fn reversal_of(conn: &impl ConnectionTrait, id: EntryId) -> Result<Option<EntryId>, StoreError> {
    let found: Option<String> = entry::Entity::find()
        .select_only()
        .column(entry::Column::Id)
        .filter(entry::Column::ReversesEntryId.eq(id.to_string()))
        .into_tuple()
        .one(conn)
        .await?;
    found
        .map(|s| EntryId::parse(&s).map_err(|e| StoreError::Corrupt { id: s.clone(), reason: e.to_string() }))
        .transpose()
}

/// Commit timestamps at the precision both databases store (microseconds), so a
/// replayed entry reads back exactly as the original answer said.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn to_domain(row: entry::Model, reversed_by: Option<String>) -> Result<Entry, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { id: row.id.clone(), reason };
    let parse_id = |s: &str| EntryId::parse(s).map_err(|e| corrupt(e.to_string()));
    let currency = Currency::parse(&row.currency_code).map_err(|e| corrupt(e.to_string()))?;
    let booked = NewEntry {
        id: parse_id(&row.id)?,
        merchant_id: MerchantId::parse(&row.merchant_id).map_err(|e| corrupt(e.to_string()))?,
        kind: EntryKind::from_stored(&row.kind).ok_or_else(|| corrupt(format!("kind {}", row.kind)))?,
        amount: Money::positive(currency, row.amount_minor).map_err(|e| corrupt(e.to_string()))?,
        booking_date: BookingDate::from_stored(row.booking_date),
        description: Description::parse(&row.description).map_err(|e| corrupt(e.to_string()))?,
        request_id: row
            .request_id
            .as_deref()
            .map(RequestId::parse)
            .transpose()
            .map_err(|e| corrupt(e.to_string()))?,
        reverses: row.reverses_entry_id.as_deref().map(parse_id).transpose()?,
    };
    Ok(Entry {
        booked,
        created_at: row.created_at,
        reversed_by: reversed_by.as_deref().map(parse_id).transpose()?,
    })
}
