//! The consumer's chores beside reading: claiming messages left idle by
//! others (or by its own failures), moving those delivered too often to the
//! dead-letter stream, and trimming what the group has acknowledged.

use std::{collections::HashMap, time::Duration};

use fred::{
    prelude::{HashesInterface, StreamsInterface, TransactionInterface},
    types::{Value, streams::XPendingArgs},
};

use super::{ConsumerError, Handler, Message, StreamConsumer};

impl<H: Handler> StreamConsumer<H> {
    pub(super) fn claim_interval(&self) -> Duration {
        (self.config.claim_idle / 2).max(Duration::from_millis(100))
    }

    /// Claims messages idle past `claim_idle` (from dead consumers, or this
    /// one's own failures), dead-letters those delivered too often, and
    /// processes the rest.
    pub async fn reclaim(&self) -> Result<usize, ConsumerError> {
        let names = &self.config.names;
        let idle = u64::try_from(self.config.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let (_, claimed): (String, Vec<Message>) = self
            .client
            .xautoclaim_values(
                &names.stream,
                &names.group,
                &self.config.consumer,
                idle,
                "0-0",
                Some(self.config.batch_size),
                false,
            )
            .await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        let deliveries = self.deliveries(&claimed).await?;
        let mut retry = Vec::new();
        for (id, fields) in claimed {
            let count = deliveries.get(&id).copied().unwrap_or(1);
            if count > self.config.max_deliveries {
                self.dead_letter(&id, fields, count, None).await?;
            } else {
                retry.push((id, fields));
            }
        }
        let n = retry.len();
        if n > 0 {
            tracing::info!(messages = n, "processing claimed messages");
            self.process(retry).await;
        }
        Ok(n)
    }

    async fn deliveries(&self, claimed: &[Message]) -> Result<HashMap<String, u64>, ConsumerError> {
        let (Some(first), Some(last)) = (claimed.first(), claimed.last()) else {
            return Ok(HashMap::new());
        };
        let args = XPendingArgs {
            idle: None,
            start: Some(first.0.as_str().into()),
            end: Some(last.0.as_str().into()),
            count: Some(self.config.batch_size.max(claimed.len() as u64)),
            consumer: Some(self.config.consumer.as_str().into()),
        };
        let pending: Vec<(String, String, u64, u64)> =
            self.client.xpending(&self.config.names.stream, &self.config.names.group, args).await?;
        Ok(pending.into_iter().map(|(id, _, _, count)| (id, count)).collect())
    }

    pub(super) async fn dead_letter(
        &self,
        id: &str,
        fields: HashMap<String, Value>,
        deliveries: u64,
        reason: Option<String>,
    ) -> Result<(), ConsumerError> {
        let names = &self.config.names;
        let reason = match reason {
            Some(reason) => reason,
            None => {
                let recorded: Option<String> = self.client.hget(self.failures_key(), id).await?;
                recorded.unwrap_or_else(|| "failed repeatedly".to_owned())
            }
        };
        tracing::error!(message_id = %id, deliveries, %reason, dead_letters = %names.dead_letters, "moving a failing message to the dead-letter stream");
        let mut entry: Vec<(String, Value)> = fields.into_iter().collect();
        entry.sort_by(|a, b| a.0.cmp(&b.0));
        entry.extend([
            ("dlq_reason".to_owned(), Value::from(reason)),
            ("dlq_original_id".to_owned(), Value::from(id)),
            ("dlq_deliveries".to_owned(), Value::from(i64::try_from(deliveries).unwrap_or(i64::MAX))),
            ("dlq_consumer".to_owned(), Value::from(self.config.consumer.as_str())),
        ]);
        // Parking and acknowledging happen together, or not at all.
        let tx = self.client.multi();
        let _: () = tx.xadd(&names.dead_letters, false, None, "*", entry).await?;
        let _: () = tx.xack(&names.stream, &names.group, id).await?;
        let _: () = tx.hdel(self.failures_key(), id).await?;
        let _: Value = tx.exec(true).await?;
        Ok(())
    }

    /// Trims the stream below what every group on it has acknowledged: below
    /// each group's oldest pending message, and never past any group's last
    /// delivered one, so nothing one group has not consumed is dropped by
    /// another (the consolidators and the notifiers read the same stream) and
    /// each group's lag stays meaningful.
    pub async fn trim(&self) -> Result<(), ConsumerError> {
        let names = &self.config.names;
        let groups = crate::groups(&self.client, &names.stream).await?;
        let mut floor: Option<String> = None;
        for group in groups {
            let Some(last_delivered) = group.last_delivered else { return Ok(()) };
            let summary: Vec<Value> = self.client.xpending(&names.stream, &group.name, ()).await?;
            let group_floor = match summary.get(1).and_then(Value::as_string) {
                Some(p) if stream_id_lt(&p, &last_delivered) => p,
                _ => last_delivered,
            };
            if floor.as_ref().is_none_or(|f| stream_id_lt(&group_floor, f)) {
                floor = Some(group_floor);
            }
        }
        if let Some(floor) = floor
            && floor != "0-0"
        {
            let _: i64 = self.client.xtrim(&names.stream, ("MINID", "~", floor.as_str())).await?;
        }
        Ok(())
    }
}

fn stream_id_lt(a: &str, b: &str) -> bool {
    let parse = |s: &str| {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        (ms.parse::<u64>().unwrap_or(0), seq.parse::<u64>().unwrap_or(0))
    };
    parse(a) < parse(b)
}
