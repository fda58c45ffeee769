//! fluxo's API contracts as Rust types: the `fluxo.ledger.v1` and
//! `fluxo.balance.v1` packages generated from `proto/`, plus the encoded
//! descriptor set used by gRPC reflection and the REST gateway.

#![allow(unreachable_pub, missing_docs, unused_qualifications, clippy::all, clippy::pedantic)]

/// Encoded `google.protobuf.FileDescriptorSet` of every fluxo proto and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fluxo_descriptor.bin"));

/// `google.api` annotations (HTTP routes).
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
}

pub use fluxo::balance::v1 as balance_v1;
pub use fluxo::ledger::v1 as ledger_v1;
