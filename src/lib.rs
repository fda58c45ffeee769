//! fluxo's application: its configuration, the wiring of each target
//! ([`serve`]: one `add_*` per target on a process), and the operator
//! commands ([`ops`]). The `fluxo` binary is its command line.
//!
//! Where a behaviour lives, from the target list: `ledger` → `fluxo_ledger`
//! (gRPC handlers in `grpc`, rules in `domain`, SQL in `store`, the outbox
//! relay in `relay`); `balance` and `consolidator` → `fluxo_balance` (queries
//! in `query`, the stream consumer in `consumer`, applying events in
//! `consolidator`); `gateway` → `fluxo_gateway`. Shared: `fluxo_server` (the
//! gRPC stack and the one error → status mapping), `fluxo_db` (connections,
//! the store error, migrations), `fluxo_queue` (the event contract and its
//! Redis adapter), `fluxo_kube` (the Kubernetes API: `fluxo doctor` in
//! [`doctor`], the consolidators' pod-deletion cost).

pub mod client;
pub mod config;
pub mod doctor;
pub mod export;
pub mod import;
pub mod ops;
pub mod periods;
pub mod serve;
pub mod watch;
pub mod webhooks;

use clap::ValueEnum;

/// A part of fluxo that can run as its own process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// Every target in one process.
    All,
    /// The write side: records and reverses entries (gRPC).
    Ledger,
    /// The read side: daily balances (gRPC).
    Balance,
    /// Applies ledger events to the daily balances.
    Consolidator,
    /// REST/JSON front door for external callers.
    Gateway,
    /// Delivers signed webhooks for the ledger's events.
    Notifier,
}
