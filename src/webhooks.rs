//! `fluxo webhooks deliveries list|show|replay`: what the notifier sent, what
//! it gave up on, and sending a dead-lettered delivery again. Works on the
//! database directly (the operators' view, like `fluxo dlq`).

use std::fmt::Write as _;

use anyhow::{Context, bail};
use clap::Subcommand;
use fluxo_notifier::{
    SubscriptionStore,
    store::{Delivery, DeliveryFilter, DeliveryState},
};

use crate::config::Config;

/// What to do with deliveries.
#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List deliveries, newest first.
    List {
        /// Only this merchant's.
        #[arg(long)]
        merchant: Option<String>,
        /// Only this subscription's (the `subscription.id` of the failures metric).
        #[arg(long)]
        subscription: Option<String>,
        /// Only those pending, held (their subscription paused), delivered or dead (given up on).
        #[arg(long, value_parser = ["pending", "held", "delivered", "dead"])]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        count: u32,
    },
    /// One delivery: its body and every attempt.
    Show {
        /// The delivery's id.
        id: String,
    },
    /// Send dead-lettered deliveries again, with a fresh retry window.
    Replay {
        /// Ids to replay; none with --all.
        ids: Vec<String>,
        /// Every dead-lettered delivery (of --merchant, when given).
        #[arg(long)]
        all: bool,
        /// With --all: only this merchant's.
        #[arg(long)]
        merchant: Option<String>,
        /// With --all: only this subscription's.
        #[arg(long)]
        subscription: Option<String>,
    },
}

fn state(name: &str) -> Option<DeliveryState> {
    match name {
        "pending" => Some(DeliveryState::Pending),
        "held" => Some(DeliveryState::Held),
        "delivered" => Some(DeliveryState::Delivered),
        "dead" => Some(DeliveryState::Dead),
        _ => None,
    }
}

fn line(d: &Delivery) -> String {
    let mut out = format!(
        "{}  {:<9}  {}  {:<15}  sub {}  seq {}  attempts {}",
        d.id,
        d.state.name(),
        d.merchant_id,
        d.event_type,
        d.subscription_id,
        d.sequence,
        d.attempts
    );
    if let Some(status) = d.last_status {
        let _ = write!(out, "  last {status}");
    }
    if !d.last_error.is_empty() {
        let _ = write!(out, "  error: {}", d.last_error);
    }
    out
}

/// Runs a deliveries command against the configured database.
#[allow(clippy::print_stdout)]
pub async fn deliveries(config: &Config, command: DeliveriesCommand) -> anyhow::Result<()> {
    let db = crate::serve::connect_waiting(config, 10).await?;
    let store = SubscriptionStore::new(db);
    match command {
        DeliveriesCommand::List { merchant, subscription, state: wanted, count } => {
            let filter = DeliveryFilter { merchant, subscription, state: wanted.as_deref().and_then(state) };
            let list = store.deliveries(&filter, count).await?;
            crate::outln!("{} delivery(ies); {} dead-lettered in all", list.len(), store.dead_count().await?);
            for d in &list {
                crate::outln!("{}", line(d));
            }
        }
        DeliveriesCommand::Show { id } => {
            let (d, attempts) = store.delivery(&id).await?.with_context(|| format!("no delivery {id}"))?;
            crate::outln!("{}", line(&d));
            crate::outln!("event {}  created {}", d.event_id, d.created_at.to_rfc3339());
            if let Some(at) = d.delivered_at {
                crate::outln!("delivered {}", at.to_rfc3339());
            } else if d.state == DeliveryState::Pending {
                crate::outln!("next attempt {}", d.next_attempt_at.to_rfc3339());
            }
            crate::outln!("body {}", d.payload);
            for (i, a) in attempts.iter().enumerate() {
                let status = a.status.map_or_else(|| "-".to_owned(), |s| s.to_string());
                crate::outln!(
                    "attempt {}  {}  {} ms  status {status}  {}{}",
                    i + 1,
                    a.at.to_rfc3339(),
                    a.duration_ms,
                    a.error,
                    if a.response.is_empty() { String::new() } else { format!("  answer: {}", a.response) }
                );
            }
        }
        DeliveriesCommand::Replay { ids, all, merchant, subscription } => {
            let ids = match (all, ids.is_empty()) {
                (true, true) => store
                    .deliveries(
                        &DeliveryFilter { merchant, subscription, state: Some(DeliveryState::Dead) },
                        u32::MAX,
                    )
                    .await?
                    .into_iter()
                    .map(|d| d.id)
                    .collect(),
                (false, false) => ids,
                _ => bail!("name the deliveries to replay, or --all"),
            };
            let mut missing = Vec::new();
            for id in &ids {
                if store.replay(id).await? {
                    crate::outln!("{id}: pending again");
                } else {
                    missing.push(id.as_str());
                }
            }
            if !missing.is_empty() {
                bail!("not dead-lettered (or no such delivery): {}", missing.join(", "));
            }
        }
    }
    Ok(())
}
