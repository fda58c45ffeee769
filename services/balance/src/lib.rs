//! fluxo's read side: daily consolidated balances projected from the ledger.
//!
//! - [`domain`]: balance arithmetic, pure and checked;
//! - [`store`]: the read model (daily totals plus the applied-event record);
//! - [`consolidator`]: applying ledger events exactly once in effect;
//! - [`query`] and [`grpc`]: the `fluxo.balance.v1.BalanceService`.

pub mod cache;
pub mod consolidator;
pub mod consumer;
pub mod domain;
pub mod grpc;
pub mod query;
pub mod store;

use fluxo_db::Db;

pub use consolidator::{ApplyError, Consolidator, InProcessSink, OnApplied};
pub use query::Balances;
pub use store::{BalanceStore, Migrator};

/// Readiness of a balance-side target: the database answers and the read
/// model's schema is current.
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
        fluxo_db::readiness(&self.db, "balance", BalanceStore::schema_is_current(&self.db)).await
    }
}
