use fluxo_db::StoreError;

use crate::domain::{CloseRefused, EntryId, PeriodClosed, RequestId, ReversalRefused, Violations};

/// Everything a ledger operation can answer besides success.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// One or more request fields are invalid; each is named.
    #[error("invalid request: {0}")]
    Invalid(Violations),
    /// The merchant has no entry with that id.
    #[error("entry {entry_id} not found")]
    NotFound {
        /// The id asked for.
        entry_id: EntryId,
    },
    /// The ledger's rules refuse the reversal.
    #[error(transparent)]
    Refused(#[from] ReversalRefused),
    /// The idempotency key booked a different request before.
    #[error("request_id {} was already used for a different request (entry {entry_id})", request_id.as_str())]
    KeyReused {
        /// The key.
        request_id: RequestId,
        /// The entry the key booked.
        entry_id: String,
    },
    /// The entry is dated in the merchant's closed period.
    #[error(transparent)]
    PeriodClosed(#[from] PeriodClosed),
    /// A close or reopen the rules refuse.
    #[error(transparent)]
    CloseRefused(#[from] CloseRefused),
    /// A concurrent transaction got in the way; retrying is safe.
    #[error("{0}")]
    Contention(String),
    /// The store failed (see [`StoreError`]).
    #[error(transparent)]
    Store(#[from] StoreError),
}
