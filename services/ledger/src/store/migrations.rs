//! The ledger's schema, versioned. Written as SQL per backend rather than with
//! the schema builder so that every constraint that protects money (checks,
//! uniqueness, immutability triggers, partial indexes) is stated exactly.

use sea_orm::DbBackend;
use sea_orm_migration::prelude::*;

/// Runs the ledger's migrations. Its bookkeeping table is its own
/// (`ledger_schema_migrations`), so services owning other tables in the same
/// database migrate independently.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateLedger), Box::new(DropRedundantForeignKeys), Box::new(CreateTotals)]
    }

    fn migration_table_name() -> DynIden {
        "ledger_schema_migrations".into_iden()
    }
}

struct CreateLedger;

impl MigrationName for CreateLedger {
    fn name(&self) -> &str {
        "m20261121_000001_create_ledger"
    }
}

const POSTGRES_UP: &str = r#"
CREATE TABLE ledger_entries (
    id                VARCHAR(26)  PRIMARY KEY,
    merchant_id       VARCHAR(64)  NOT NULL,
    kind              VARCHAR(6)   NOT NULL CHECK (kind IN ('CREDIT', 'DEBIT')),
    currency_code     CHAR(3)      NOT NULL,
    amount_minor      BIGINT       NOT NULL CHECK (amount_minor > 0),
    booking_date      DATE         NOT NULL,
    description       VARCHAR(500) NOT NULL DEFAULT '',
    request_id        VARCHAR(128),
    -- UNIQUE: an entry is reversed at most once, even under concurrent reversals.
    reverses_entry_id VARCHAR(26)  UNIQUE REFERENCES ledger_entries (id),
    created_at        TIMESTAMPTZ  NOT NULL
);
-- Serves ListEntries: one merchant, a date range, keyset order (booking_date, id).
CREATE INDEX ledger_entries_by_merchant_date ON ledger_entries (merchant_id, booking_date, id);

CREATE FUNCTION ledger_entries_are_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger entries are immutable: book a reversal instead';
END $$;
CREATE TRIGGER ledger_entries_immutable BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_are_immutable();

CREATE TABLE ledger_idempotency_keys (
    merchant_id VARCHAR(64)  NOT NULL,
    request_id  VARCHAR(128) NOT NULL,
    fingerprint CHAR(64)     NOT NULL,
    -- The key is claimed before its entry is inserted, in the same transaction.
    entry_id    VARCHAR(26)  NOT NULL REFERENCES ledger_entries (id) DEFERRABLE INITIALLY DEFERRED,
    created_at  TIMESTAMPTZ  NOT NULL,
    PRIMARY KEY (merchant_id, request_id)
);

CREATE TABLE ledger_outbox (
    position     BIGSERIAL    PRIMARY KEY,
    event_id     VARCHAR(26)  NOT NULL UNIQUE,
    entry_id     VARCHAR(26)  NOT NULL REFERENCES ledger_entries (id),
    merchant_id  VARCHAR(64)  NOT NULL,
    payload      BYTEA        NOT NULL,
    traceparent  VARCHAR(55),
    tracestate   VARCHAR(512),
    created_at   TIMESTAMPTZ  NOT NULL,
    published_at TIMESTAMPTZ
);
-- The relay only ever looks for what is not yet published.
CREATE INDEX ledger_outbox_unpublished ON ledger_outbox (position) WHERE published_at IS NULL;
"#;

const SQLITE_UP: &str = r#"
CREATE TABLE ledger_entries (
    id                TEXT    NOT NULL PRIMARY KEY CHECK (length(id) = 26),
    merchant_id       TEXT    NOT NULL CHECK (length(merchant_id) BETWEEN 1 AND 64),
    kind              TEXT    NOT NULL CHECK (kind IN ('CREDIT', 'DEBIT')),
    currency_code     TEXT    NOT NULL CHECK (length(currency_code) = 3),
    amount_minor      INTEGER NOT NULL CHECK (amount_minor > 0),
    booking_date      TEXT    NOT NULL,
    description       TEXT    NOT NULL DEFAULT '',
    request_id        TEXT,
    reverses_entry_id TEXT    UNIQUE REFERENCES ledger_entries (id),
    created_at        TEXT    NOT NULL
);
CREATE INDEX ledger_entries_by_merchant_date ON ledger_entries (merchant_id, booking_date, id);
CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries
BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable: book a reversal instead'); END;
CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries
BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable: book a reversal instead'); END;

CREATE TABLE ledger_idempotency_keys (
    merchant_id TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    entry_id    TEXT NOT NULL REFERENCES ledger_entries (id) DEFERRABLE INITIALLY DEFERRED,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (merchant_id, request_id)
);

CREATE TABLE ledger_outbox (
    position     INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT    NOT NULL UNIQUE,
    entry_id     TEXT    NOT NULL REFERENCES ledger_entries (id),
    merchant_id  TEXT    NOT NULL,
    payload      BLOB    NOT NULL,
    traceparent  TEXT,
    tracestate   TEXT,
    created_at   TEXT    NOT NULL,
    published_at TEXT
);
CREATE INDEX ledger_outbox_unpublished ON ledger_outbox (position) WHERE published_at IS NULL;
"#;

const DOWN: &str = r#"
DROP TABLE ledger_outbox;
DROP TABLE ledger_idempotency_keys;
DROP TABLE ledger_entries;
"#;

#[async_trait::async_trait]
impl MigrationTrait for CreateLedger {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let sql = match manager.get_database_backend() {
            DbBackend::Postgres => POSTGRES_UP,
            DbBackend::Sqlite => SQLITE_UP,
            other => {
                return Err(DbErr::Migration(format!("unsupported database backend {other:?}")));
            }
        };
        manager.get_connection().execute_unprepared(sql).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let conn = manager.get_connection();
        conn.execute_unprepared(DOWN).await?;
        if manager.get_database_backend() == DbBackend::Postgres {
            conn.execute_unprepared("DROP FUNCTION ledger_entries_are_immutable();").await?;
        }
        Ok(())
    }
}

/// Drops, on PostgreSQL, the foreign keys from an idempotency key and an
/// outbox event to their entry. Both rows are only ever inserted in the
/// transaction that inserts their entry, and entries are never deleted (a
/// trigger refuses it), so the constraints could not fail; but each was
/// checked per row, by a query that also locks the entry — about a fifth of
/// PostgreSQL's work for a batch of bookings (pgbench, batches of 16, fsync
/// on: 3,000 against 2,360 transactions/s). The reference from a reversal to
/// the entry it reverses is caller input and keeps its foreign key. SQLite
/// keeps both: there they cost little and dropping one rebuilds the table.
struct DropRedundantForeignKeys;

impl MigrationName for DropRedundantForeignKeys {
    fn name(&self) -> &str {
        "m20261121_000002_drop_redundant_foreign_keys"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for DropRedundantForeignKeys {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(
                    "ALTER TABLE ledger_idempotency_keys DROP CONSTRAINT ledger_idempotency_keys_entry_id_fkey; \
                     ALTER TABLE ledger_outbox DROP CONSTRAINT ledger_outbox_entry_id_fkey;",
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(
                    "ALTER TABLE ledger_idempotency_keys ADD CONSTRAINT ledger_idempotency_keys_entry_id_fkey \
                       FOREIGN KEY (entry_id) REFERENCES ledger_entries (id) DEFERRABLE INITIALLY DEFERRED; \
                     ALTER TABLE ledger_outbox ADD CONSTRAINT ledger_outbox_entry_id_fkey \
                       FOREIGN KEY (entry_id) REFERENCES ledger_entries (id);",
                )
                .await?;
        }
        Ok(())
    }
}

/// Every booking adds its amount to its merchant's all-time credits or debits
/// in `ledger_totals`, in the booking's transaction. Every number the daily
/// balances hold — a day's credits, debits, net and count, every opening and
/// closing balance — is bounded by those two totals, so refusing an entry that
/// would take either past 64 bits (PostgreSQL's BIGINT arithmetic raises
/// 22003; SQLite turns an overflowing sum into a REAL, which the CHECK
/// refuses) guarantees that whatever the ledger accepts, the read model can
/// hold. Existing entries are summed in.
struct CreateTotals;

impl MigrationName for CreateTotals {
    fn name(&self) -> &str {
        "m20261201_000003_create_totals"
    }
}

const TOTALS_POSTGRES: &str = r#"
CREATE TABLE ledger_totals (
    merchant_id   VARCHAR(64) NOT NULL,
    currency_code CHAR(3)     NOT NULL,
    credits_minor BIGINT      NOT NULL CHECK (credits_minor >= 0),
    debits_minor  BIGINT      NOT NULL CHECK (debits_minor >= 0),
    PRIMARY KEY (merchant_id, currency_code)
);
INSERT INTO ledger_totals (merchant_id, currency_code, credits_minor, debits_minor)
SELECT merchant_id, currency_code,
       COALESCE(SUM(amount_minor) FILTER (WHERE kind = 'CREDIT'), 0),
       COALESCE(SUM(amount_minor) FILTER (WHERE kind = 'DEBIT'), 0)
FROM ledger_entries GROUP BY merchant_id, currency_code;
"#;

const TOTALS_SQLITE: &str = r#"
CREATE TABLE ledger_totals (
    merchant_id   TEXT    NOT NULL,
    currency_code TEXT    NOT NULL,
    credits_minor INTEGER NOT NULL CHECK (typeof(credits_minor) = 'integer' AND credits_minor >= 0),
    debits_minor  INTEGER NOT NULL CHECK (typeof(debits_minor) = 'integer' AND debits_minor >= 0),
    PRIMARY KEY (merchant_id, currency_code)
);
INSERT INTO ledger_totals (merchant_id, currency_code, credits_minor, debits_minor)
SELECT merchant_id, currency_code,
       COALESCE(SUM(CASE WHEN kind = 'CREDIT' THEN amount_minor END), 0),
       COALESCE(SUM(CASE WHEN kind = 'DEBIT' THEN amount_minor END), 0)
FROM ledger_entries GROUP BY merchant_id, currency_code;
"#;

#[async_trait::async_trait]
impl MigrationTrait for CreateTotals {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let sql = match manager.get_database_backend() {
            DbBackend::Postgres => TOTALS_POSTGRES,
            _ => TOTALS_SQLITE,
        };
        manager.get_connection().execute_unprepared(sql).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.get_connection().execute_unprepared("DROP TABLE ledger_totals;").await?;
        Ok(())
    }
}
