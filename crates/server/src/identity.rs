//! The caller identity the REST gateway forwards with each gRPC call, and the
//! per-merchant check every service applies when one is present.
//!
//! Inside the mesh, callers are authenticated by mTLS and authorised by
//! AuthorizationPolicies; a call carrying these headers was authenticated by
//! the gateway (only the gateway's principal may set them, see the chart's
//! policies), and is kept to the merchants its token names.

use tonic::{Status, metadata::MetadataMap};

/// The token's subject.
pub const SUBJECT: &str = "x-fluxo-subject";
/// Comma-separated merchants the caller may act for.
pub const MERCHANTS: &str = "x-fluxo-merchants";
/// `true` when the caller may act for every merchant.
pub const ADMIN: &str = "x-fluxo-admin";

/// PERMISSION_DENIED when a forwarded identity may not act for `merchant_id`.
pub fn authorize(metadata: &MetadataMap, merchant_id: &str) -> Result<(), Status> {
    if metadata.get(SUBJECT).is_none() {
        return Ok(());
    }
    if metadata.get(ADMIN).and_then(|v| v.to_str().ok()) == Some("true") {
        return Ok(());
    }
    let allowed = metadata
        .get(MERCHANTS)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|list| list.split(',').any(|m| m == merchant_id));
    if allowed {
        Ok(())
    } else {
        Err(Status::permission_denied(format!("the caller may not act for merchant {merchant_id}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_identity_is_kept_to_its_merchants() {
        let mut m = MetadataMap::new();
        assert!(authorize(&m, "m-1").is_ok(), "mesh callers without a forwarded identity");
        m.insert(SUBJECT, "shop".parse().unwrap());
        assert!(authorize(&m, "m-1").is_err());
        m.insert(MERCHANTS, "m-1,m-2".parse().unwrap());
        assert!(authorize(&m, "m-2").is_ok());
        assert_eq!(authorize(&m, "m-3").unwrap_err().code(), tonic::Code::PermissionDenied);
        m.insert(ADMIN, "true".parse().unwrap());
        assert!(authorize(&m, "m-3").is_ok());
    }
}
