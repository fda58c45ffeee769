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
pub use service::{EntryPage, Ledger};
pub use store::{GroupCommit, LedgerStore, Migrator};

/// The ledger's readiness: the database answers and its schema is current.
#[derive(Debug, Clone)]
pub struct Readiness {
    db: Db,
}

impl Readiness {
    /// Checks `db`.
    pub fn new(db: Db) -> Self {
        Self { db }
    }
}

#[async_trait::async_trait]
impl fluxo_server::Readiness for Readiness {
    async fn check(&self) -> Result<(), String> {
        fluxo_db::readiness(&self.db, "ledger", LedgerStore::schema_is_current(&self.db)).await
    }
}
