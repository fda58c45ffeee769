//! The notifier's schema, versioned, as SQL per backend (see
//! [`fluxo_db::migration`]), with its own bookkeeping table
//! (`notifier_schema_migrations`).

use fluxo_db::migration::{Sql, SqlMigration, boxed};
use sea_orm_migration::prelude::*;

/// Runs the notifier's migrations.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        boxed(&[
            CREATE_SUBSCRIPTIONS,
            CREATE_DELIVERIES,
            CREATE_BALANCE_CURSORS,
            CREATE_NOTIFIED_CLOSES,
            HELD_DELIVERIES,
        ])
    }

    fn migration_table_name() -> DynIden {
        "notifier_schema_migrations".into_iden()
    }
}

/// Subscriptions. A deleted one keeps its row (`deleted_at`) so its
/// idempotency key still answers, and so deliveries made to it stay explained.
const CREATE_SUBSCRIPTIONS: SqlMigration = SqlMigration {
    name: "m20261204_000001_create_webhook_subscriptions",
    up: Sql { postgres: POSTGRES_UP, sqlite: SQLITE_UP },
    down: Sql { postgres: "DROP TABLE webhook_subscriptions;", sqlite: "DROP TABLE webhook_subscriptions;" },
};

const POSTGRES_UP: &str = r#"
CREATE TABLE webhook_subscriptions (
    id                         VARCHAR(26)   PRIMARY KEY,
    merchant_id                VARCHAR(64)   NOT NULL,
    endpoint_url               VARCHAR(2048) NOT NULL,
    -- Comma-separated event type names, in the API's order.
    event_types                VARCHAR(200)  NOT NULL,
    description                VARCHAR(200)  NOT NULL DEFAULT '',
    state                      VARCHAR(8)    NOT NULL CHECK (state IN ('ACTIVE', 'PAUSED', 'DISABLED')),
    disabled_reason            VARCHAR(500)  NOT NULL DEFAULT '',
    -- AES-256-GCM under webhooks.secret_key, bound to the row's id.
    secret_sealed              BYTEA         NOT NULL,
    secret_rotated_at          TIMESTAMPTZ   NOT NULL,
    previous_secret_sealed     BYTEA,
    previous_secret_expires_at TIMESTAMPTZ,
    request_id                 VARCHAR(128)  NOT NULL,
    fingerprint                CHAR(64)      NOT NULL,
    created_at                 TIMESTAMPTZ   NOT NULL,
    updated_at                 TIMESTAMPTZ   NOT NULL,
    deleted_at                 TIMESTAMPTZ,
    UNIQUE (merchant_id, request_id)
);
CREATE INDEX webhook_subscriptions_by_merchant ON webhook_subscriptions (merchant_id, id);
"#;

const SQLITE_UP: &str = r#"
CREATE TABLE webhook_subscriptions (
    id                         TEXT    PRIMARY KEY,
    merchant_id                TEXT    NOT NULL,
    endpoint_url               TEXT    NOT NULL,
    event_types                TEXT    NOT NULL,
    description                TEXT    NOT NULL DEFAULT '',
    state                      TEXT    NOT NULL CHECK (state IN ('ACTIVE', 'PAUSED', 'DISABLED')),
    disabled_reason            TEXT    NOT NULL DEFAULT '',
    secret_sealed              BLOB    NOT NULL,
    secret_rotated_at          TEXT    NOT NULL,
    previous_secret_sealed     BLOB,
    previous_secret_expires_at TEXT,
    request_id                 TEXT    NOT NULL,
    fingerprint                TEXT    NOT NULL,
    created_at                 TEXT    NOT NULL,
    updated_at                 TEXT    NOT NULL,
    deleted_at                 TEXT,
    UNIQUE (merchant_id, request_id)
);
CREATE INDEX webhook_subscriptions_by_merchant ON webhook_subscriptions (merchant_id, id);
"#;

/// Deliveries: one row per (event, subscription), made when the notifier
/// reads the event and kept after it is delivered or dead-lettered; each
/// attempt on record. A subscription numbers its events (`next_sequence`) and
/// remembers since when its endpoint has been failing.
const CREATE_DELIVERIES: SqlMigration = SqlMigration {
    name: "m20261204_000002_create_webhook_deliveries",
    up: Sql { postgres: DELIVERIES_POSTGRES_UP, sqlite: DELIVERIES_SQLITE_UP },
    down: Sql {
        postgres: "DROP TABLE webhook_delivery_attempts; DROP TABLE webhook_deliveries; \
                   ALTER TABLE webhook_subscriptions DROP COLUMN next_sequence, DROP COLUMN failing_since;",
        sqlite: "DROP TABLE webhook_delivery_attempts; DROP TABLE webhook_deliveries; \
                 ALTER TABLE webhook_subscriptions DROP COLUMN next_sequence; \
                 ALTER TABLE webhook_subscriptions DROP COLUMN failing_since;",
    },
};

const DELIVERIES_POSTGRES_UP: &str = r#"
ALTER TABLE webhook_subscriptions ADD COLUMN next_sequence BIGINT NOT NULL DEFAULT 1;
ALTER TABLE webhook_subscriptions ADD COLUMN failing_since TIMESTAMPTZ;

CREATE TABLE webhook_deliveries (
    id               VARCHAR(26)   PRIMARY KEY,
    subscription_id  VARCHAR(26)   NOT NULL REFERENCES webhook_subscriptions (id),
    merchant_id      VARCHAR(64)   NOT NULL,
    -- The event's id: the webhook-id header, the same on every attempt.
    event_id         VARCHAR(26)   NOT NULL,
    event_type       VARCHAR(32)   NOT NULL,
    -- The subscription's number for this event, in the order the notifier read them.
    sequence         BIGINT        NOT NULL,
    payload          TEXT          NOT NULL,
    traceparent      VARCHAR(128),
    tracestate       VARCHAR(512),
    state            VARCHAR(9)    NOT NULL CHECK (state IN ('PENDING', 'DELIVERED', 'DEAD')),
    attempts         INTEGER       NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMPTZ   NOT NULL,
    -- Held by a notifier until then; a crashed one's hold runs out.
    lease_until      TIMESTAMPTZ,
    first_attempt_at TIMESTAMPTZ,
    last_attempt_at  TIMESTAMPTZ,
    last_status      INTEGER,
    last_error       VARCHAR(500)  NOT NULL DEFAULT '',
    created_at       TIMESTAMPTZ   NOT NULL,
    delivered_at     TIMESTAMPTZ,
    UNIQUE (subscription_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'PENDING';
CREATE INDEX webhook_deliveries_by_merchant ON webhook_deliveries (merchant_id, state, id);
CREATE INDEX webhook_deliveries_by_subscription ON webhook_deliveries (subscription_id, state, id);

CREATE TABLE webhook_delivery_attempts (
    delivery_id  VARCHAR(26)   NOT NULL REFERENCES webhook_deliveries (id),
    attempt      INTEGER       NOT NULL,
    at           TIMESTAMPTZ   NOT NULL,
    duration_ms  BIGINT        NOT NULL,
    status       INTEGER,
    error        VARCHAR(500)  NOT NULL DEFAULT '',
    -- At most the sender's excerpt limit of the answer's body.
    response     VARCHAR(1024) NOT NULL DEFAULT '',
    PRIMARY KEY (delivery_id, attempt)
);
"#;

const DELIVERIES_SQLITE_UP: &str = r#"
ALTER TABLE webhook_subscriptions ADD COLUMN next_sequence INTEGER NOT NULL DEFAULT 1;
ALTER TABLE webhook_subscriptions ADD COLUMN failing_since TEXT;

CREATE TABLE webhook_deliveries (
    id               TEXT    PRIMARY KEY,
    subscription_id  TEXT    NOT NULL REFERENCES webhook_subscriptions (id),
    merchant_id      TEXT    NOT NULL,
    event_id         TEXT    NOT NULL,
    event_type       TEXT    NOT NULL,
    sequence         INTEGER NOT NULL,
    payload          TEXT    NOT NULL,
    traceparent      TEXT,
    tracestate       TEXT,
    state            TEXT    NOT NULL CHECK (state IN ('PENDING', 'DELIVERED', 'DEAD')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT    NOT NULL,
    lease_until      TEXT,
    first_attempt_at TEXT,
    last_attempt_at  TEXT,
    last_status      INTEGER,
    last_error       TEXT    NOT NULL DEFAULT '',
    created_at       TEXT    NOT NULL,
    delivered_at     TEXT,
    UNIQUE (subscription_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'PENDING';
CREATE INDEX webhook_deliveries_by_merchant ON webhook_deliveries (merchant_id, state, id);
CREATE INDEX webhook_deliveries_by_subscription ON webhook_deliveries (subscription_id, state, id);

CREATE TABLE webhook_delivery_attempts (
    delivery_id  TEXT    NOT NULL REFERENCES webhook_deliveries (id),
    attempt      INTEGER NOT NULL,
    at           TEXT    NOT NULL,
    duration_ms  INTEGER NOT NULL,
    status       INTEGER,
    error        TEXT    NOT NULL DEFAULT '',
    response     TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (delivery_id, attempt)
);
"#;

/// Where the notifier is in each merchant's feed of changed days (the order
/// WatchDailyBalances follows): `balance.changed` events are made from what
/// changed after it, and it moves only once they are on record.
const CREATE_BALANCE_CURSORS: SqlMigration = SqlMigration {
    name: "m20261204_000003_create_webhook_balance_cursors",
    up: Sql {
        postgres: "CREATE TABLE webhook_balance_cursors (merchant_id VARCHAR(64) PRIMARY KEY, \
                   cursor VARCHAR(128) NOT NULL, updated_at TIMESTAMPTZ NOT NULL);",
        sqlite: "CREATE TABLE webhook_balance_cursors (merchant_id TEXT PRIMARY KEY, cursor TEXT NOT NULL, \
                 updated_at TEXT NOT NULL);",
    },
    down: Sql {
        postgres: "DROP TABLE webhook_balance_cursors;",
        sqlite: "DROP TABLE webhook_balance_cursors;",
    },
};

/// The period closes already turned into `period.closed` events.
const CREATE_NOTIFIED_CLOSES: SqlMigration = SqlMigration {
    name: "m20261204_000004_create_webhook_notified_closes",
    up: Sql {
        postgres: "CREATE TABLE webhook_notified_closes (close_id VARCHAR(26) PRIMARY KEY, \
                   notified_at TIMESTAMPTZ NOT NULL);",
        sqlite: "CREATE TABLE webhook_notified_closes (close_id TEXT PRIMARY KEY, notified_at TEXT NOT NULL);",
    },
    down: Sql {
        postgres: "DROP TABLE webhook_notified_closes;",
        sqlite: "DROP TABLE webhook_notified_closes;",
    },
};

/// `HELD`: a paused subscription's deliveries, out of the due index, so a
/// claim reads one ordered range of it and joins nothing. Those pending of a
/// subscription paused now are held. SQLite cannot change a CHECK in place:
/// the table is rebuilt (its attempts kept aside meanwhile, so no foreign key
/// points at a dropped table), in one transaction.
const HELD_DELIVERIES: SqlMigration = SqlMigration {
    name: "m20261204_000005_webhook_deliveries_held",
    up: Sql { postgres: HELD_POSTGRES_UP, sqlite: HELD_SQLITE_UP },
    down: Sql {
        postgres: "UPDATE webhook_deliveries SET state = 'PENDING' WHERE state = 'HELD'; \
                   ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_state_check, \
                   ADD CONSTRAINT webhook_deliveries_state_check CHECK (state IN ('PENDING', 'DELIVERED', 'DEAD'));",
        // The wider CHECK stays; nothing is held any more.
        sqlite: "UPDATE webhook_deliveries SET state = 'PENDING' WHERE state = 'HELD';",
    },
};

const HELD_POSTGRES_UP: &str = r#"
ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_state_check,
    ADD CONSTRAINT webhook_deliveries_state_check CHECK (state IN ('PENDING', 'HELD', 'DELIVERED', 'DEAD'));
UPDATE webhook_deliveries d SET state = 'HELD' FROM webhook_subscriptions s
    WHERE s.id = d.subscription_id AND s.state = 'PAUSED' AND d.state = 'PENDING';
"#;

const HELD_SQLITE_UP: &str = r#"
BEGIN;
CREATE TEMP TABLE held_attempts_copy AS SELECT * FROM webhook_delivery_attempts;
DROP TABLE webhook_delivery_attempts;
CREATE TABLE webhook_deliveries_held (
    id               TEXT    PRIMARY KEY,
    subscription_id  TEXT    NOT NULL REFERENCES webhook_subscriptions (id),
    merchant_id      TEXT    NOT NULL,
    event_id         TEXT    NOT NULL,
    event_type       TEXT    NOT NULL,
    sequence         INTEGER NOT NULL,
    payload          TEXT    NOT NULL,
    traceparent      TEXT,
    tracestate       TEXT,
    state            TEXT    NOT NULL CHECK (state IN ('PENDING', 'HELD', 'DELIVERED', 'DEAD')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT    NOT NULL,
    lease_until      TEXT,
    first_attempt_at TEXT,
    last_attempt_at  TEXT,
    last_status      INTEGER,
    last_error       TEXT    NOT NULL DEFAULT '',
    created_at       TEXT    NOT NULL,
    delivered_at     TEXT,
    UNIQUE (subscription_id, event_id)
);
INSERT INTO webhook_deliveries_held (id, subscription_id, merchant_id, event_id, event_type, sequence, payload,
    traceparent, tracestate, state, attempts, next_attempt_at, lease_until, first_attempt_at, last_attempt_at,
    last_status, last_error, created_at, delivered_at)
SELECT id, subscription_id, merchant_id, event_id, event_type, sequence, payload, traceparent, tracestate,
    CASE WHEN state = 'PENDING' AND subscription_id IN (SELECT id FROM webhook_subscriptions WHERE state = 'PAUSED')
         THEN 'HELD' ELSE state END,
    attempts, next_attempt_at, lease_until, first_attempt_at, last_attempt_at, last_status, last_error,
    created_at, delivered_at
FROM webhook_deliveries;
DROP TABLE webhook_deliveries;
ALTER TABLE webhook_deliveries_held RENAME TO webhook_deliveries;
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'PENDING';
CREATE INDEX webhook_deliveries_by_merchant ON webhook_deliveries (merchant_id, state, id);
CREATE INDEX webhook_deliveries_by_subscription ON webhook_deliveries (subscription_id, state, id);
CREATE TABLE webhook_delivery_attempts (
    delivery_id  TEXT    NOT NULL REFERENCES webhook_deliveries (id),
    attempt      INTEGER NOT NULL,
    at           TEXT    NOT NULL,
    duration_ms  INTEGER NOT NULL,
    status       INTEGER,
    error        TEXT    NOT NULL DEFAULT '',
    response     TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (delivery_id, attempt)
);
INSERT INTO webhook_delivery_attempts SELECT * FROM held_attempts_copy;
DROP TABLE held_attempts_copy;
COMMIT;
"#;
