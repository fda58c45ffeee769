//! Thin gRPC handlers for `fluxo.webhooks.v1.WebhookService`: check the
//! caller may act for the merchant, call [`Subscriptions`], encode the answer.

use chrono::{DateTime, Utc};
use fluxo_proto::webhooks_v1::{
    self as pb,
    webhook_service_server::{WebhookService, WebhookServiceServer},
};
use fluxo_server::identity::authorize;
use fluxo_webhooks::subscription::{Change, Registration, State};
use tonic::{Request, Response, Status};

use crate::{
    store::Stored,
    subscriptions::{CreateRequest, SubscriptionError, Subscriptions, UpdateRequest, WithSecret},
};

/// `fluxo.webhooks.v1.WebhookService` over [`Subscriptions`].
#[derive(Debug, Clone)]
pub struct WebhookGrpc {
    subscriptions: Subscriptions,
}

/// The tonic service.
pub fn server(subscriptions: Subscriptions) -> WebhookServiceServer<WebhookGrpc> {
    WebhookServiceServer::new(WebhookGrpc { subscriptions }).max_decoding_message_size(64 * 1024)
}

impl From<SubscriptionError> for Status {
    fn from(error: SubscriptionError) -> Self {
        match &error {
            SubscriptionError::Invalid(v) => fluxo_server::status::invalid("invalid subscription request", v),
            SubscriptionError::NotFound(_) => Status::not_found(error.to_string()),
            SubscriptionError::KeyReused(_) => Status::already_exists(error.to_string()),
            SubscriptionError::Full(_) => Status::resource_exhausted(error.to_string()),
            SubscriptionError::NotConfigured => Status::failed_precondition(error.to_string()),
            SubscriptionError::Sealing(cause) => {
                // A key mismatch or a damaged row: the operator's to fix, the caller's to report.
                tracing::error!(error = %cause, "webhook secret could not be sealed or opened");
                Status::internal("internal error")
            }
            SubscriptionError::Store(cause) => fluxo_server::status::store("webhooks", cause),
        }
    }
}

fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    fluxo_proto::time::from_micros(at.timestamp_micros())
}

fn wire(s: &Stored) -> pb::Subscription {
    let (state, reason) = match &s.state {
        State::Active => (pb::SubscriptionState::Active, ""),
        State::Paused => (pb::SubscriptionState::Paused, ""),
        State::Disabled { reason } => (pb::SubscriptionState::Disabled, reason.as_str()),
    };
    pb::Subscription {
        id: s.id.clone(),
        merchant_id: s.merchant_id.clone(),
        endpoint_url: s.endpoint_url.clone(),
        event_types: s.events.iter().map(|e| e.name().to_owned()).collect(),
        description: s.description.clone(),
        state: state.into(),
        disabled_reason: reason.to_owned(),
        created_at: Some(timestamp(s.created_at)),
        updated_at: Some(timestamp(s.updated_at)),
        secret_rotated_at: Some(timestamp(s.secret_rotated_at)),
        previous_secret_expires_at: s.previous_secret_expires_at.map(timestamp),
    }
}

fn shown(answer: WithSecret) -> (Option<pb::Subscription>, String) {
    (Some(wire(&answer.subscription)), answer.secret.map(|s| s.expose_text()).unwrap_or_default())
}

#[tonic::async_trait]
impl WebhookService for WebhookGrpc {
    async fn create_subscription(
        &self,
        request: Request<pb::CreateSubscriptionRequest>,
    ) -> Result<Response<pb::CreateSubscriptionResponse>, Status> {
        authorize(request.metadata(), &request.get_ref().merchant_id)?;
        let r = request.get_ref();
        let answer = self
            .subscriptions
            .create(CreateRequest {
                registration: Registration {
                    merchant_id: &r.merchant_id,
                    endpoint_url: &r.endpoint_url,
                    event_types: &r.event_types,
                    description: &r.description,
                },
                request_id: &r.request_id,
            })
            .await?;
        let (subscription, secret) = shown(answer);
        Ok(Response::new(pb::CreateSubscriptionResponse { subscription, secret }))
    }

    async fn get_subscription(
        &self,
        request: Request<pb::GetSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let r = request.get_ref();
        authorize(request.metadata(), &r.merchant_id)?;
        Ok(Response::new(wire(&self.subscriptions.get(&r.merchant_id, &r.subscription_id).await?)))
    }

    async fn list_subscriptions(
        &self,
        request: Request<pb::ListSubscriptionsRequest>,
    ) -> Result<Response<pb::ListSubscriptionsResponse>, Status> {
        let r = request.get_ref();
        authorize(request.metadata(), &r.merchant_id)?;
        let subscriptions = self.subscriptions.list(&r.merchant_id).await?.iter().map(wire).collect();
        Ok(Response::new(pb::ListSubscriptionsResponse { subscriptions }))
    }

    async fn update_subscription(
        &self,
        request: Request<pb::UpdateSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let r = request.get_ref();
        authorize(request.metadata(), &r.merchant_id)?;
        let updated = self
            .subscriptions
            .update(UpdateRequest {
                merchant_id: &r.merchant_id,
                subscription_id: &r.subscription_id,
                endpoint_url: &r.endpoint_url,
                event_types: &r.event_types,
                description: r.update_description.then_some(r.description.as_str()),
            })
            .await?;
        Ok(Response::new(wire(&updated)))
    }

    async fn pause_subscription(
        &self,
        request: Request<pb::PauseSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let r = request.get_ref();
        authorize(request.metadata(), &r.merchant_id)?;
        let paused = self.subscriptions.change(&r.merchant_id, &r.subscription_id, Change::Pause).await?;
        Ok(Response::new(wire(&paused)))
    }

    async fn resume_subscription(
        &self,
        request: Request<pb::ResumeSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let r = request.get_ref();
        authorize(request.metadata(), &r.merchant_id)?;
        let resumed = self.subscriptions.change(&r.merchant_id, &r.subscription_id, Change::Resume).await?;
        Ok(Response::new(wire(&resumed)))
    }

    async fn rotate_subscription_secret(
        &self,
        request: Request<pb::RotateSubscriptionSecretRequest>,
    ) -> Result<Response<pb::RotateSubscriptionSecretResponse>, Status> {
        let r = request.get_ref();
        authorize(request.metadata(), &r.merchant_id)?;
        let answer =
            self.subscriptions.rotate(&r.merchant_id, &r.subscription_id, r.grace_period_seconds).await?;
        let (subscription, secret) = shown(answer);
        Ok(Response::new(pb::RotateSubscriptionSecretResponse { subscription, secret }))
    }

    async fn delete_subscription(
        &self,
        request: Request<pb::DeleteSubscriptionRequest>,
    ) -> Result<Response<pb::DeleteSubscriptionResponse>, Status> {
        let r = request.get_ref();
        authorize(request.metadata(), &r.merchant_id)?;
        self.subscriptions.delete(&r.merchant_id, &r.subscription_id).await?;
        Ok(Response::new(pb::DeleteSubscriptionResponse {}))
    }
}
