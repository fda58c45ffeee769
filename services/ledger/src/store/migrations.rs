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
        boxed(&[
            CREATE_LEDGER,
            DROP_REDUNDANT_FOREIGN_KEYS,
            CREATE_TOTALS,
            CREATE_METADATA,
            CREATE_PERIOD_CLOSES,
            CREATE_COMMIT_ORDER,
        ])
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

/// Period closes: one row per close of a merchant's books, and the figures it
/// closed, one row per (business date, currency) with entries on or before
/// `closed_through`. A close is never deleted and its figures never change;
/// the only change a close row takes is being reopened, once (who, when,
/// why). The books of a merchant are closed through the latest close not
/// reopened (the partial index finds it).
const CREATE_PERIOD_CLOSES: SqlMigration = SqlMigration {
    name: "m20261203_000005_period_closes",
    up: Sql { postgres: CLOSES_POSTGRES, sqlite: CLOSES_SQLITE },
    down: Sql {
        postgres: "DROP TABLE ledger_period_close_days; DROP TABLE ledger_period_closes; \
                   DROP FUNCTION ledger_period_closes_only_reopen();",
        sqlite: "DROP TABLE ledger_period_close_days; DROP TABLE ledger_period_closes;",
    },
};

const CLOSES_POSTGRES: &str = r#"
CREATE TABLE ledger_period_closes (
    id                      VARCHAR(26)  PRIMARY KEY,
    merchant_id             VARCHAR(64)  NOT NULL,
    closed_through          DATE         NOT NULL,
    previous_closed_through DATE,
    note                    VARCHAR(500) NOT NULL,
    closed_by               TEXT         NOT NULL,
    closed_at               TIMESTAMPTZ  NOT NULL,
    entry_count             BIGINT       NOT NULL CHECK (entry_count >= 0),
    digest                  CHAR(64)     NOT NULL,
    reopened_at             TIMESTAMPTZ,
    reopened_by             TEXT,
    reopen_reason           VARCHAR(500),
    CHECK ((reopened_at IS NULL) = (reopen_reason IS NULL))
);
CREATE INDEX ledger_period_closes_in_force ON ledger_period_closes (merchant_id, closed_through)
    WHERE reopened_at IS NULL;
CREATE INDEX ledger_period_closes_by_merchant ON ledger_period_closes (merchant_id, closed_at);
CREATE TABLE ledger_period_close_days (
    close_id      VARCHAR(26) NOT NULL,
    booking_date  DATE        NOT NULL,
    currency_code CHAR(3)     NOT NULL,
    entry_count   BIGINT      NOT NULL,
    credits_minor BIGINT      NOT NULL,
    debits_minor  BIGINT      NOT NULL,
    closing_minor BIGINT      NOT NULL,
    digest        CHAR(64)    NOT NULL,
    PRIMARY KEY (close_id, booking_date, currency_code)
);
CREATE FUNCTION ledger_period_closes_only_reopen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'period closes are kept: reopen instead' USING ERRCODE = 'restrict_violation';
    END IF;
    IF OLD.reopened_at IS NOT NULL
       OR (NEW.id, NEW.merchant_id, NEW.closed_through, NEW.previous_closed_through, NEW.note, NEW.closed_by,
           NEW.closed_at, NEW.entry_count, NEW.digest)
          IS DISTINCT FROM
          (OLD.id, OLD.merchant_id, OLD.closed_through, OLD.previous_closed_through, OLD.note, OLD.closed_by,
           OLD.closed_at, OLD.entry_count, OLD.digest) THEN
        RAISE EXCEPTION 'a period close only changes by being reopened, once' USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER ledger_period_closes_only_reopen BEFORE UPDATE OR DELETE ON ledger_period_closes
    FOR EACH ROW EXECUTE FUNCTION ledger_period_closes_only_reopen();
CREATE TRIGGER ledger_period_close_days_immutable BEFORE UPDATE OR DELETE ON ledger_period_close_days
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_are_immutable();
"#;

const CLOSES_SQLITE: &str = r#"
CREATE TABLE ledger_period_closes (
    id                      TEXT    PRIMARY KEY,
    merchant_id             TEXT    NOT NULL,
    closed_through          TEXT    NOT NULL,
    previous_closed_through TEXT,
    note                    TEXT    NOT NULL CHECK (length(note) <= 500),
    closed_by               TEXT    NOT NULL,
    closed_at               TEXT    NOT NULL,
    entry_count             INTEGER NOT NULL CHECK (entry_count >= 0),
    digest                  TEXT    NOT NULL CHECK (length(digest) = 64),
    reopened_at             TEXT,
    reopened_by             TEXT,
    reopen_reason           TEXT CHECK (length(reopen_reason) <= 500),
    CHECK ((reopened_at IS NULL) = (reopen_reason IS NULL))
);
CREATE INDEX ledger_period_closes_in_force ON ledger_period_closes (merchant_id, closed_through)
    WHERE reopened_at IS NULL;
CREATE INDEX ledger_period_closes_by_merchant ON ledger_period_closes (merchant_id, closed_at);
CREATE TABLE ledger_period_close_days (
    close_id      TEXT    NOT NULL REFERENCES ledger_period_closes (id),
    booking_date  TEXT    NOT NULL,
    currency_code TEXT    NOT NULL,
    entry_count   INTEGER NOT NULL,
    credits_minor INTEGER NOT NULL,
    debits_minor  INTEGER NOT NULL,
    closing_minor INTEGER NOT NULL,
    digest        TEXT    NOT NULL,
    PRIMARY KEY (close_id, booking_date, currency_code)
);
CREATE TRIGGER ledger_period_closes_no_delete BEFORE DELETE ON ledger_period_closes
BEGIN SELECT RAISE(ABORT, 'period closes are kept: reopen instead'); END;
CREATE TRIGGER ledger_period_closes_only_reopen BEFORE UPDATE ON ledger_period_closes
WHEN OLD.reopened_at IS NOT NULL
  OR NEW.id IS NOT OLD.id OR NEW.merchant_id IS NOT OLD.merchant_id
  OR NEW.closed_through IS NOT OLD.closed_through
  OR NEW.previous_closed_through IS NOT OLD.previous_closed_through OR NEW.note IS NOT OLD.note
  OR NEW.closed_by IS NOT OLD.closed_by OR NEW.closed_at IS NOT OLD.closed_at
  OR NEW.entry_count IS NOT OLD.entry_count OR NEW.digest IS NOT OLD.digest
BEGIN SELECT RAISE(ABORT, 'a period close only changes by being reopened, once'); END;
CREATE TRIGGER ledger_period_close_days_no_update BEFORE UPDATE ON ledger_period_close_days
BEGIN SELECT RAISE(ABORT, 'the figures of a period close never change'); END;
CREATE TRIGGER ledger_period_close_days_no_delete BEFORE DELETE ON ledger_period_close_days
BEGIN SELECT RAISE(ABORT, 'the figures of a period close never change'); END;
"#;

/// Commit order, for WatchEntries (see [`crate::domain::WatchCursor`]).
/// PostgreSQL: each entry records the transaction that booked it (`xid8`,
/// which never wraps); entries booked before this migration read as
/// transaction 0, before all others. SQLite: a position per entry, assigned
/// by a trigger in insert order (an INTEGER PRIMARY KEY, so VACUUM keeps it),
/// existing entries numbered in the order they were inserted.
const CREATE_COMMIT_ORDER: SqlMigration = SqlMigration {
    name: "m20261204_000006_commit_order",
    up: Sql { postgres: COMMIT_ORDER_POSTGRES, sqlite: COMMIT_ORDER_SQLITE },
    down: Sql {
        postgres: "DROP INDEX ledger_entries_by_merchant_commit; ALTER TABLE ledger_entries DROP COLUMN commit_xid;",
        sqlite: "DROP TRIGGER ledger_entries_positioned; DROP TABLE ledger_entry_positions;",
    },
};

// The constant default fills existing rows without rewriting the table; the
// second default applies to every entry booked from now on.
const COMMIT_ORDER_POSTGRES: &str = r#"
ALTER TABLE ledger_entries ADD COLUMN commit_xid xid8 NOT NULL DEFAULT '0';
ALTER TABLE ledger_entries ALTER COLUMN commit_xid SET DEFAULT pg_current_xact_id();
CREATE INDEX ledger_entries_by_merchant_commit ON ledger_entries (merchant_id, commit_xid, id);
"#;

const COMMIT_ORDER_SQLITE: &str = r#"
CREATE TABLE ledger_entry_positions (
    position    INTEGER PRIMARY KEY AUTOINCREMENT,
    entry_id    TEXT    NOT NULL,
    merchant_id TEXT    NOT NULL
);
INSERT INTO ledger_entry_positions (entry_id, merchant_id)
    SELECT id, merchant_id FROM ledger_entries ORDER BY rowid;
CREATE INDEX ledger_entry_positions_by_merchant ON ledger_entry_positions (merchant_id, position);
CREATE TRIGGER ledger_entries_positioned AFTER INSERT ON ledger_entries
BEGIN INSERT INTO ledger_entry_positions (entry_id, merchant_id) VALUES (NEW.id, NEW.merchant_id); END;
CREATE TRIGGER ledger_entry_positions_no_update BEFORE UPDATE ON ledger_entry_positions
BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable: book a reversal instead'); END;
CREATE TRIGGER ledger_entry_positions_no_delete BEFORE DELETE ON ledger_entry_positions
BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable: book a reversal instead'); END;
"#;
