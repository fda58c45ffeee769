//! Ledger rules as pure functions over validated types: no I/O, no gRPC, no SQL.
//!
//! Every request field is parsed into a type that can only hold a valid value
//! ("parse, don't validate"); the store and the gRPC layer only ever see those.

mod entry;
mod page;
mod period;
mod watch;

pub use entry::{
    Entry, EntryKind, Fingerprint, KindError, NewEntry, ParsedReversal, RecordCommand, ReversalRefused,
    ReverseCommand, decide_reversal,
};
pub use fluxo_types::{
    BookingDate, Currency, DateRange, Description, EntryId, FieldViolation, MAX_AMOUNT_MINOR, MerchantId,
    Metadata, Money, RequestId, Violations,
};
pub use page::{EntryFilter, FilterFields, PageCursor, PageRequest};
pub use period::{
    BooksDigest, CloseCommand, CloseRefused, DayFigures, Difference, DigestBuilder, DigestError, ParsedClose,
    PeriodClose, PeriodClosed, ReopenCommand, Reopened, check_open, compare,
};
pub use watch::{CursorError, WatchCursor};
