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
        boxed(&[CREATE_SUBSCRIPTIONS])
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
