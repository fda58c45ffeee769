//! fluxo's outbound events.
//!
//! - [`subscriptions`]: the subscription API's rules (served over gRPC by
//!   [`grpc`] and, through the gateway, as REST), over [`store`];
//! - [`sealing`]: signing secrets sealed at rest under the install's key;
//! - [`notifier`]: events in (its own consumer group on the ledger's stream),
//!   signed deliveries out, retried, dead-lettered.
//!
//! The rules that do not depend on a service (signatures, the destination
//! policy, one delivery attempt and its retries) are in `fluxo-webhooks`.

pub mod grpc;
pub mod notifier;
pub mod sealing;
pub mod store;
pub mod subscriptions;

use fluxo_db::Db;

pub use notifier::{DeliverySettings, Notifier};
pub use sealing::{SealError, Sealer, dev_key};
pub use store::{Migrator, SubscriptionStore};
pub use subscriptions::{Settings, SubscriptionError, Subscriptions};

/// Ready once the database answers and the notifier's schema is current.
pub fn readiness(db: Db) -> fluxo_server::SchemaReadiness<Migrator> {
    fluxo_server::SchemaReadiness::new(db, "notifier")
}
