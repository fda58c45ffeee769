//! The read model's schema, owned by the balance side, as SQL per backend
//! (see [`fluxo_db::migration`]) so the constraints that keep sums exact are
//! stated exactly: on SQLite an integer overflow silently turns into a float,
//! so every amount column also checks it is still an integer.

use fluxo_db::migration::{Sql, SqlMigration, boxed};
use sea_orm_migration::prelude::*;

/// Runs the balance side's migrations, tracked in `balance_schema_migrations`.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        boxed(&[CREATE_READ_MODEL, CREATE_PARKED_EVENTS, CREATE_CHANGE_ORDER])
    }

    fn migration_table_name() -> DynIden {
        "balance_schema_migrations".into_iden()
    }
}

/// Daily totals, and the record of which entries were applied.
const CREATE_READ_MODEL: SqlMigration = SqlMigration {
    name: "m20261121_000001_create_read_model",
    up: Sql { postgres: POSTGRES_UP, sqlite: SQLITE_UP },
    down: Sql::both("DROP TABLE balance_applied_events; DROP TABLE balance_daily;"),
};

const POSTGRES_UP: &str = r#"
CREATE TABLE balance_daily (
    merchant_id   VARCHAR(64) NOT NULL,
    currency_code CHAR(3)     NOT NULL,
    booking_date  DATE        NOT NULL,
    credits_minor BIGINT      NOT NULL CHECK (credits_minor >= 0),
    debits_minor  BIGINT      NOT NULL CHECK (debits_minor >= 0),
    entry_count   BIGINT      NOT NULL CHECK (entry_count >= 0),
    -- Newest ledger commit reflected in this row, microseconds since the epoch.
    as_of_micros  BIGINT      NOT NULL,
    PRIMARY KEY (merchant_id, currency_code, booking_date)
);
-- One row per ledger entry applied: applying an entry and recording it here
-- commit together, so a redelivered event is recognised and skipped. Keyed by
-- entry (each entry has exactly one EntryRecorded event) so a repair from the
-- ledger, which knows entries but not events, shares the same guard.
CREATE TABLE balance_applied_events (
    entry_id          VARCHAR(26) PRIMARY KEY,
    event_id          VARCHAR(26) NOT NULL,
    merchant_id       VARCHAR(64) NOT NULL,
    applied_at_micros BIGINT      NOT NULL
);
"#;

const SQLITE_UP: &str = r#"
CREATE TABLE balance_daily (
    merchant_id   TEXT    NOT NULL,
    currency_code TEXT    NOT NULL,
    booking_date  TEXT    NOT NULL,
    credits_minor INTEGER NOT NULL CHECK (typeof(credits_minor) = 'integer' AND credits_minor >= 0),
    debits_minor  INTEGER NOT NULL CHECK (typeof(debits_minor) = 'integer' AND debits_minor >= 0),
    entry_count   INTEGER NOT NULL CHECK (typeof(entry_count) = 'integer' AND entry_count >= 0),
    as_of_micros  INTEGER NOT NULL,
    PRIMARY KEY (merchant_id, currency_code, booking_date)
);
CREATE TABLE balance_applied_events (
    entry_id          TEXT    NOT NULL PRIMARY KEY,
    event_id          TEXT    NOT NULL,
    merchant_id       TEXT    NOT NULL,
    applied_at_micros INTEGER NOT NULL
);
"#;

/// Events the read model refused (unreadable, or a sum it cannot hold), parked
/// so they never hold back the events behind them. A merchant with parked
/// events reads its balances from the earliest parked day on as possibly
/// stale, until an operator replays or drops them (`fluxo dlq`).
const CREATE_PARKED_EVENTS: SqlMigration = SqlMigration {
    name: "m20261201_000002_create_parked_events",
    up: Sql { postgres: PARKED_POSTGRES, sqlite: PARKED_SQLITE },
    down: Sql::both("DROP TABLE balance_parked_events;"),
};

const PARKED_POSTGRES: &str = r#"
CREATE TABLE balance_parked_events (
    event_id         VARCHAR(128) PRIMARY KEY,
    -- NULL when the event is unreadable: then no merchant is known to be affected.
    merchant_id      VARCHAR(64),
    booking_date     DATE,
    reason           TEXT         NOT NULL,
    payload          BYTEA        NOT NULL,
    parked_at_micros BIGINT       NOT NULL
);
CREATE INDEX balance_parked_by_merchant ON balance_parked_events (merchant_id, booking_date);
"#;

const PARKED_SQLITE: &str = r#"
CREATE TABLE balance_parked_events (
    event_id         TEXT    NOT NULL PRIMARY KEY,
    merchant_id      TEXT,
    booking_date     TEXT,
    reason           TEXT    NOT NULL,
    payload          BLOB    NOT NULL,
    parked_at_micros INTEGER NOT NULL
);
CREATE INDEX balance_parked_by_merchant ON balance_parked_events (merchant_id, booking_date);
"#;

/// The order in which days change, for WatchDailyBalances. PostgreSQL: the
/// transaction that last changed the day (`xid8`; a watch reads only below
/// the oldest transaction still running, so a later commit can never land
/// behind its cursor); days stored before this migration read as
/// transaction 0. SQLite: a number one past the largest yet, set by every
/// write (its single writer commits in that order).
const CREATE_CHANGE_ORDER: SqlMigration = SqlMigration {
    name: "m20261204_000003_change_order",
    up: Sql { postgres: CHANGE_ORDER_POSTGRES, sqlite: CHANGE_ORDER_SQLITE },
    down: Sql {
        postgres: "DROP INDEX balance_daily_by_merchant_change; ALTER TABLE balance_daily DROP COLUMN change_xid;",
        sqlite: "DROP INDEX balance_daily_by_merchant_change; DROP INDEX balance_daily_by_change; \
                 ALTER TABLE balance_daily DROP COLUMN change_seq;",
    },
};

const CHANGE_ORDER_POSTGRES: &str = r#"
ALTER TABLE balance_daily ADD COLUMN change_xid xid8 NOT NULL DEFAULT '0';
ALTER TABLE balance_daily ALTER COLUMN change_xid SET DEFAULT pg_current_xact_id();
CREATE INDEX balance_daily_by_merchant_change
    ON balance_daily (merchant_id, change_xid, currency_code, booking_date);
"#;

const CHANGE_ORDER_SQLITE: &str = r#"
ALTER TABLE balance_daily ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
CREATE INDEX balance_daily_by_change ON balance_daily (change_seq);
CREATE INDEX balance_daily_by_merchant_change
    ON balance_daily (merchant_id, change_seq, currency_code, booking_date);
"#;
