//! The ledger's schema, versioned, as SQL per backend (see
//! [`fluxo_db::migration`]). Its bookkeeping table is its own
//! (`ledger_schema_migrations`), so services owning other tables in the same
//! database migrate independently.

use fluxo_db::migration::{Sql, SqlMigration, boxed};
use sea_orm_migration::prelude::*;

/// Runs the ledger's migrations.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        boxed(&[CREATE_LEDGER, DROP_REDUNDANT_FOREIGN_KEYS, CREATE_TOTALS, CREATE_METADATA])
    }

    fn migration_table_name() -> DynIden {
        "ledger_schema_migrations".into_iden()
    }
}

/// Entries (immutable: triggers refuse UPDATE and DELETE), idempotency keys
/// and the outbox.
const CREATE_LEDGER: SqlMigration = SqlMigration {
    name: "m20261121_000001_create_ledger",
    up: Sql { postgres: POSTGRES_UP, sqlite: SQLITE_UP },
    down: Sql {
        postgres: "DROP TABLE ledger_outbox; DROP TABLE ledger_idempotency_keys; DROP TABLE ledger_entries; \
                   DROP FUNCTION ledger_entries_are_immutable();",
        sqlite: "DROP TABLE ledger_outbox; DROP TABLE ledger_idempotency_keys; DROP TABLE ledger_entries;",
    },
};

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

/// Drops, on PostgreSQL, the foreign keys from an idempotency key and an
/// outbox event to their entry. Both rows are only ever inserted in the
/// transaction that inserts their entry, and entries are never deleted (a
/// trigger refuses it), so the constraints could not fail; yet each was
/// checked per row by a query that also locks the entry, a large share of
/// PostgreSQL's work per booking. The reference from a reversal to the entry
/// it reverses is caller input and keeps its foreign key. SQLite keeps both:
/// there they cost little, and dropping one rebuilds the table.
const DROP_REDUNDANT_FOREIGN_KEYS: SqlMigration = SqlMigration {
    name: "m20261121_000002_drop_redundant_foreign_keys",
    up: Sql::postgres_only(
        "ALTER TABLE ledger_idempotency_keys DROP CONSTRAINT ledger_idempotency_keys_entry_id_fkey; \
         ALTER TABLE ledger_outbox DROP CONSTRAINT ledger_outbox_entry_id_fkey;",
    ),
    down: Sql::postgres_only(
        "ALTER TABLE ledger_idempotency_keys ADD CONSTRAINT ledger_idempotency_keys_entry_id_fkey \
           FOREIGN KEY (entry_id) REFERENCES ledger_entries (id) DEFERRABLE INITIALLY DEFERRED; \
         ALTER TABLE ledger_outbox ADD CONSTRAINT ledger_outbox_entry_id_fkey \
           FOREIGN KEY (entry_id) REFERENCES ledger_entries (id);",
    ),
};

/// Every booking adds its amount to its merchant's all-time credits or debits
/// in `ledger_totals`, in the booking's transaction. Every number the daily
/// balances hold — a day's credits, debits, net and count, every opening and
/// closing balance — is bounded by those two totals, so refusing an entry that
/// would take either past 64 bits (PostgreSQL's BIGINT arithmetic raises
/// 22003; SQLite turns an overflowing sum into a REAL, which the CHECK
/// refuses) guarantees that whatever the ledger accepts, the read model can
/// hold. Existing entries are summed in.
const CREATE_TOTALS: SqlMigration = SqlMigration {
    name: "m20261201_000003_create_totals",
    up: Sql { postgres: TOTALS_POSTGRES, sqlite: TOTALS_SQLITE },
    down: Sql::both("DROP TABLE ledger_totals;"),
};

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

/// Entries' labels, one row per (entry, key), immutable like the entries, with
/// the entry's merchant and booking date copied in so the metadata filter of
/// ListEntries reads one index range in keyset order, then the entries by
/// primary key. Also an index for the insertion-time filter. On PostgreSQL the
/// rows have no foreign key, for the reason of
/// [`DROP_REDUNDANT_FOREIGN_KEYS`]: they are inserted only by the statement
/// that inserts their entry.
const CREATE_METADATA: SqlMigration = SqlMigration {
    name: "m20261202_000004_entry_metadata",
    up: Sql { postgres: METADATA_POSTGRES, sqlite: METADATA_SQLITE },
    down: Sql::both("DROP TABLE ledger_entry_metadata; DROP INDEX ledger_entries_by_merchant_created;"),
};

const METADATA_POSTGRES: &str = r#"
CREATE TABLE ledger_entry_metadata (
    entry_id     VARCHAR(26)  NOT NULL,
    key          VARCHAR(40)  NOT NULL,
    value        VARCHAR(256) NOT NULL,
    merchant_id  VARCHAR(64)  NOT NULL,
    booking_date DATE         NOT NULL,
    PRIMARY KEY (entry_id, key)
);
CREATE INDEX ledger_entry_metadata_lookup
    ON ledger_entry_metadata (merchant_id, key, value, booking_date, entry_id);
CREATE TRIGGER ledger_entry_metadata_immutable BEFORE UPDATE OR DELETE ON ledger_entry_metadata
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_are_immutable();
CREATE INDEX ledger_entries_by_merchant_created ON ledger_entries (merchant_id, created_at);
"#;

const METADATA_SQLITE: &str = r#"
CREATE TABLE ledger_entry_metadata (
    entry_id     TEXT NOT NULL REFERENCES ledger_entries (id),
    key          TEXT NOT NULL CHECK (length(key) BETWEEN 1 AND 40),
    value        TEXT NOT NULL CHECK (length(value) BETWEEN 1 AND 256),
    merchant_id  TEXT NOT NULL,
    booking_date TEXT NOT NULL,
    PRIMARY KEY (entry_id, key)
);
CREATE INDEX ledger_entry_metadata_lookup
    ON ledger_entry_metadata (merchant_id, key, value, booking_date, entry_id);
CREATE TRIGGER ledger_entry_metadata_no_update BEFORE UPDATE ON ledger_entry_metadata
BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable: book a reversal instead'); END;
CREATE TRIGGER ledger_entry_metadata_no_delete BEFORE DELETE ON ledger_entry_metadata
BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable: book a reversal instead'); END;
CREATE INDEX ledger_entries_by_merchant_created ON ledger_entries (merchant_id, created_at);
"#;
