//! fluxo's ledger: the write side. An immutable record of merchant credits and
//! debits, idempotent on the caller's key, that commits every entry together
//! with the `EntryRecorded` event the read side consumes.
//!
//! - [`domain`]: pure rules and validated types;
//! - [`store`]: SQL on PostgreSQL or SQLite;
//! - [`grpc`]: the `fluxo.ledger.v1.LedgerService` handlers.

pub mod domain;
mod error;
pub mod grpc;
pub mod relay;
mod service;
pub mod store;
mod wire;

use fluxo_db::Db;

pub use error::LedgerError;
pub use fluxo_server::stream::WatchPace;
pub use service::{Booked, EntryPage, Ledger, MAX_BATCH, WatchBatch, WatchFrom};
pub use store::{GroupCommit, LedgerStore, Migrator};

/// A period close as the API answers it (the body of a `period.closed` webhook too).
pub fn period_close_message(close: &domain::PeriodClose) -> fluxo_proto::ledger_v1::PeriodClose {
    wire::period_close(close)
}

/// Readiness of a ledger target: the database answers and the ledger schema is current.
pub fn readiness(db: Db) -> fluxo_server::SchemaReadiness<Migrator> {
    fluxo_server::SchemaReadiness::new(db, "ledger")
}
