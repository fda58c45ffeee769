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

pub use consolidator::{ApplyError, ChangeNotifier, Consolidator, InProcessSink, OnApplied};
pub use query::Balances;
pub use store::{BalanceStore, Migrator};

/// Readiness of a balance-side target: the database answers and the balance schema is current.
pub fn readiness(db: Db) -> fluxo_server::SchemaReadiness<Migrator> {
    fluxo_server::SchemaReadiness::new(db, "balance")
}
