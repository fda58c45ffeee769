//! Ledger rules as pure functions over validated types: no I/O, no gRPC, no SQL.
//!
//! Every request field is parsed into a type that can only hold a valid value
//! ("parse, don't validate"); the store and the gRPC layer only ever see those.

mod entry;
mod fields;
mod money;
mod page;
mod violations;

pub use entry::{
    Entry, EntryKind, Fingerprint, KindError, NewEntry, ParsedReversal, RecordCommand,
    ReversalRefused, ReverseCommand, decide_reversal,
};
pub use fields::{BookingDate, DateRange, Description, EntryId, MerchantId, RequestId};
pub use money::{Currency, MAX_AMOUNT_MINOR, Money};
pub use page::{PageCursor, PageRequest};
pub use violations::{FieldViolation, Violations};
