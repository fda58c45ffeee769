//! The one place where ledger errors become gRPC statuses: the code a client
//! or the mesh acts on (retry or not), google.rpc details it can act on, and
//! nothing internal leaked.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{LedgerError, domain::ReversalRefused, store::StoreError};

const DOMAIN: &str = "ledger.fluxo";

impl From<LedgerError> for Status {
    fn from(error: LedgerError) -> Self {
        let message = error.to_string();
        match error {
            LedgerError::Invalid(violations) => {
                let mut details = ErrorDetails::new();
                for v in violations.list() {
                    details.add_bad_request_violation(v.field.clone(), v.description.clone());
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            LedgerError::NotFound { entry_id } => Status::with_error_details(
                Code::NotFound,
                message,
                ErrorDetails::with_resource_info(
                    "fluxo.ledger.v1.Entry",
                    entry_id.to_string(),
                    "",
                    "no such entry for this merchant",
                ),
            ),
            LedgerError::Refused(refused) => {
                let (kind, subject) = match &refused {
                    ReversalRefused::AlreadyReversed { entry, .. } => ("ALREADY_REVERSED", entry),
                    ReversalRefused::IsAReversal { entry, .. } => ("IS_A_REVERSAL", entry),
                };
                Status::with_error_details(
                    Code::FailedPrecondition,
                    message,
                    ErrorDetails::with_precondition_failure_violation(
                        kind,
                        format!("entries/{subject}"),
                        refused.to_string(),
                    ),
                )
            }
            LedgerError::KeyReused { request_id, entry_id } => Status::with_error_details(
                Code::AlreadyExists,
                message,
                ErrorDetails::with_error_info(
                    "IDEMPOTENCY_KEY_REUSED",
                    DOMAIN,
                    HashMap::from([
                        ("request_id".to_owned(), request_id.as_str().to_owned()),
                        ("entry_id".to_owned(), entry_id),
                    ]),
                ),
            ),
            // Retryable: a new attempt will not meet the same concurrent writer.
            LedgerError::Contention(_) => Status::aborted(message),
            // Not retryable: the same entry would pass the same limit again.
            LedgerError::Store(StoreError::LimitExceeded { .. }) => {
                let mut details = ErrorDetails::new();
                details.add_bad_request_violation("amount.minor_units", message.clone());
                Status::with_error_details(Code::OutOfRange, message, details)
            }
            LedgerError::Store(StoreError::Unavailable(cause)) => {
                tracing::warn!(error = %cause, "database unavailable");
                Status::unavailable("the ledger database is unavailable; retry later")
            }
            LedgerError::Store(cause) => {
                tracing::error!(error = %cause, "database failure");
                Status::internal("internal error")
            }
            LedgerError::Internal(cause) => {
                tracing::error!(error = %cause, "internal error");
                Status::internal("internal error")
            }
        }
    }
}
