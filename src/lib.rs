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

/// `println!` for the operator commands' output: when whoever reads it has
/// gone (`fluxo webhooks deliveries list | head`), the command ends quietly
/// with the shell's status for a broken pipe (141) instead of panicking the
/// way `println!` does.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::write_out(::std::format_args!("{}\n", ::std::format_args!($($arg)*)))
    };
}

/// `print!` the same way as [`outln!`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::write_out(::std::format_args!($($arg)*))
    };
}

/// Writes to stdout for [`outln!`] and [`out!`].
#[doc(hidden)]
pub fn write_out(text: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(error) = out.write_fmt(text).and_then(|()| out.flush()) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("fluxo: cannot write to stdout: {error}");
        std::process::exit(1);
    }
}

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
