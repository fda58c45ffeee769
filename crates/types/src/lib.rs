//! Value types shared by fluxo's services, each parsed once at the edge and
//! valid for as long as it is held ("parse, don't validate"). Pure: no I/O.

mod fields;
mod metadata;
mod money;
mod violations;

pub use fields::{
    BookingDate, DateError, DateRange, Description, EntryId, EntryIdError, MerchantId, RequestId, TextError,
};
pub use metadata::Metadata;
pub use money::{AmountError, Currency, CurrencyError, MAX_AMOUNT_MINOR, Money, truncate};
pub use violations::{FieldViolation, Violations};
