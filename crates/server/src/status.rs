//! The one place where what every service can fail with becomes a gRPC
//! status: invalid fields, and the stores' errors. The code tells a client or
//! the mesh whether to retry (UNAVAILABLE yes; OUT_OF_RANGE, INVALID_ARGUMENT,
//! INTERNAL no), the google.rpc details name what to fix, and nothing internal
//! (SQL, driver messages) reaches the caller: it goes to the log instead.
//! Each service maps its own domain errors (not found, refused, …) next to its
//! handlers and hands these two cases here.

use fluxo_db::StoreError;
use fluxo_types::Violations;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// INVALID_ARGUMENT with one `BadRequest` field violation per invalid field.
pub fn invalid(message: impl Into<String>, violations: &Violations) -> Status {
    let mut details = ErrorDetails::new();
    for v in violations.list() {
        details.add_bad_request_violation(v.field.clone(), v.description.clone());
    }
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// The status of a store failure in the service named `service` (`ledger`,
/// `balance`: it names the database in the UNAVAILABLE message).
pub fn store(service: &str, error: &StoreError) -> Status {
    match error {
        // Retryable: the database may answer the next attempt.
        StoreError::Unavailable(cause) => {
            tracing::warn!(error = %cause, "{service} database unavailable");
            Status::unavailable(format!("the {service} database is unavailable; retry later"))
        }
        // Not retryable: the same request would pass the same limit again.
        StoreError::OutOfRange { message, field } => {
            let mut details = ErrorDetails::new();
            if let Some(field) = field {
                details.add_bad_request_violation(*field, message.clone());
            }
            Status::with_error_details(Code::OutOfRange, message.clone(), details)
        }
        // A sum the database could not hold (a read model written before the
        // ledger's limit): a number fluxo cannot express, not a server fault.
        StoreError::Failed(cause) if fluxo_db::is_out_of_range(cause) => {
            Status::out_of_range("a balance of this merchant passes 64-bit minor units")
        }
        StoreError::Failed(_) | StoreError::Corrupt { .. } | StoreError::Internal(_) => {
            tracing::error!(error = %error, "{service} store failure");
            Status::internal("internal error")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::DbErr;

    #[test]
    fn a_database_outage_is_retryable_and_leaks_nothing() {
        let error = StoreError::Unavailable(DbErr::Conn(sea_orm::RuntimeErr::Internal(
            "connection to 10.0.0.7:5432 refused".into(),
        )));
        let status = store("ledger", &error);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "the ledger database is unavailable; retry later");
    }

    #[test]
    fn a_sum_past_the_limit_names_the_field() {
        let error = StoreError::OutOfRange { message: "too much".into(), field: Some("amount.minor_units") };
        let status = store("ledger", &error);
        assert_eq!(status.code(), Code::OutOfRange);
        let violations = status.get_details_bad_request().expect("a BadRequest").field_violations;
        assert_eq!(violations[0].field, "amount.minor_units");
    }

    #[test]
    fn anything_else_is_internal_without_its_text() {
        let error = StoreError::Failed(DbErr::Custom("relation \"ledger_entries\" does not exist".into()));
        let status = store("balance", &error);
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn every_invalid_field_is_listed() {
        let mut v = Violations::default();
        v.add("merchant_id", "must not be empty");
        v.add("date", "must be YYYY-MM-DD");
        let status = invalid("invalid request", &v);
        assert_eq!(status.code(), Code::InvalidArgument);
        let fields: Vec<_> = status
            .get_details_bad_request()
            .expect("a BadRequest")
            .field_violations
            .into_iter()
            .map(|f| f.field)
            .collect();
        assert_eq!(fields, ["merchant_id", "date"]);
    }
}
