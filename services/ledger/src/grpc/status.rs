//! Where the ledger's own errors become gRPC statuses: the code a client or
//! the mesh acts on (retry or not) and google.rpc details it can act on.
//! Invalid fields and store failures are mapped by `fluxo_server::status`,
//! the same for every service.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    LedgerError,
    domain::{CloseRefused, ReversalRefused},
};

const DOMAIN: &str = "ledger.fluxo";

impl From<LedgerError> for Status {
    fn from(error: LedgerError) -> Self {
        let message = error.to_string();
        match error {
            LedgerError::Invalid(violations) => fluxo_server::status::invalid(message, &violations),
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
            LedgerError::PeriodClosed(closed) => Status::with_error_details(
                Code::FailedPrecondition,
                message,
                ErrorDetails::with_precondition_failure_violation(
                    "PERIOD_CLOSED",
                    format!("periods/{}", closed.closed_through),
                    format!("the books are closed through {}", closed.closed_through),
                ),
            ),
            LedgerError::CloseRefused(refused) => {
                let kind = match refused {
                    CloseRefused::AlreadyClosed { .. } => "ALREADY_CLOSED",
                    CloseRefused::NotClosed { .. } => "NOT_CLOSED",
                };
                Status::with_error_details(
                    Code::FailedPrecondition,
                    message,
                    ErrorDetails::with_precondition_failure_violation(kind, "periods", refused.to_string()),
                )
            }
            // Retryable: a new attempt will not meet the same concurrent writer.
            LedgerError::Contention(_) => Status::aborted(message),
            LedgerError::Store(error) => fluxo_server::status::store("ledger", &error),
        }
    }
}
