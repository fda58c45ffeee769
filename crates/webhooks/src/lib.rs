//! The parts of fluxo's outbound webhooks that do not depend on a service:
//! how a delivery is signed ([`signature`], the Standard Webhooks scheme),
//! where one may go ([`destination`], the SSRF policy), and how one attempt
//! is made and the next one scheduled ([`delivery`]), and what a
//! subscription may hold and how it changes ([`subscription`]).
//!
//! Both the subscription API (which refuses a bad endpoint when it is
//! registered, naming the field) and the notifier (which signs every attempt
//! and checks every resolution before it connects) use them, so each rule is
//! written once.

pub mod delivery;
pub mod destination;
pub mod signature;
pub mod subscription;

pub use delivery::{Attempt, Failure, Limits, Outcome, Retries, Sender};
pub use destination::{DestinationError, DestinationPolicy};
pub use signature::{Secret, SignatureError, SignedHeaders, sign, verify};
