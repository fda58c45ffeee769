//! sea-orm entities for the ledger's tables. The tables themselves are created
//! by [`super::migrations`]; these only describe rows to the query builder.

#![allow(unreachable_pub, missing_docs)]

/// `ledger_entries`: one row per booked entry; never updated or deleted.
pub mod entry {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "ledger_entries")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub merchant_id: String,
        pub kind: String,
        pub currency_code: String,
        pub amount_minor: i64,
        pub booking_date: Date,
        pub description: String,
        pub request_id: Option<String>,
        pub reverses_entry_id: Option<String>,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `ledger_idempotency_keys`: which entry a (merchant, key) booked, and a
/// fingerprint of the request that booked it.
pub mod idempotency_key {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "ledger_idempotency_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub merchant_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub request_id: String,
        pub fingerprint: String,
        pub entry_id: String,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `ledger_outbox`: the `EntryRecorded` event of every entry, committed with
/// it, waiting for the relay to publish it.
pub mod outbox {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "ledger_outbox")]
    pub struct Model {
        /// Ledger position: assigned by the database, increasing.
        #[sea_orm(primary_key)]
        pub position: i64,
        pub event_id: String,
        pub entry_id: String,
        pub merchant_id: String,
        /// Protobuf-encoded `fluxo.ledger.v1.EntryRecorded`.
        pub payload: Vec<u8>,
        /// W3C trace context of the request that booked the entry.
        pub traceparent: Option<String>,
        pub tracestate: Option<String>,
        pub created_at: DateTimeUtc,
        pub published_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `ledger_entry_metadata`: an entry's labels, one row per key; never updated
/// or deleted. Merchant and booking date are the entry's, for the filter index.
pub mod entry_metadata {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "ledger_entry_metadata")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub entry_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        pub value: String,
        pub merchant_id: String,
        pub booking_date: Date,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
