//! fluxo's API contracts as Rust types: the `fluxo.ledger.v1`,
//! `fluxo.balance.v1` and `fluxo.webhooks.v1` packages generated from `proto/`, plus the encoded
//! descriptor set used by gRPC reflection and the REST gateway.

pub mod export;
pub mod json;

/// Encoded `google.protobuf.FileDescriptorSet` of every fluxo proto and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fluxo_descriptor.bin"));

/// `google.api` annotations (HTTP routes).
#[allow(unreachable_pub, missing_docs, unused_qualifications, clippy::all, clippy::pedantic)]
pub mod google {
    /// `google.api.HttpRule` and friends.
    pub mod api {
        include!(concat!(env!("OUT_DIR"), "/google.api.rs"));
    }
    /// `google.rpc.Status` and the error details fluxo sends.
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
}

/// fluxo packages.
#[allow(unreachable_pub, missing_docs, unused_qualifications, clippy::all, clippy::pedantic)]
pub mod fluxo {
    /// Ledger (write side).
    pub mod ledger {
        /// Version 1 of the ledger API and its events.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/fluxo.ledger.v1.rs"));
        }
    }
    /// Balance (read side).
    pub mod balance {
        /// Version 1 of the balance API.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/fluxo.balance.v1.rs"));
        }
    }
    /// Webhook subscriptions.
    pub mod webhooks {
        /// Version 1 of the subscription API.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/fluxo.webhooks.v1.rs"));
        }
    }
}

pub use fluxo::balance::v1 as balance_v1;
pub use fluxo::ledger::v1 as ledger_v1;
pub use fluxo::webhooks::v1 as webhooks_v1;

/// `google.protobuf.Timestamp` to and from microseconds since the Unix epoch,
/// the precision fluxo stores instants at.
pub mod time {
    use prost_types::Timestamp;

    /// The timestamp of `micros` µs since the epoch (before it when negative).
    pub fn from_micros(micros: i64) -> Timestamp {
        Timestamp {
            seconds: micros.div_euclid(1_000_000),
            nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
        }
    }

    /// Microseconds since the epoch of `at`, saturating at the ends of `i64`;
    /// nanoseconds below a microsecond are dropped.
    pub fn to_micros(at: &Timestamp) -> i64 {
        at.seconds.saturating_mul(1_000_000).saturating_add(i64::from(at.nanos / 1_000))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn microseconds_survive_the_round_trip_on_both_sides_of_the_epoch() {
            for us in [0, 1, 999_999, 1_000_000, 1_790_000_000_123_456, -1, -1_000_001] {
                assert_eq!(to_micros(&from_micros(us)), us, "{us}");
            }
            assert_eq!(from_micros(-1), Timestamp { seconds: -1, nanos: 999_999_000 });
        }
    }
}
