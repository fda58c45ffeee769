//! The stream gauges every consumer keeps current, from XINFO GROUPS and
//! XLEN: `fluxo.stream.lag` and `fluxo.stream.pending` per consumer group, and
//! `fluxo.stream.dead_letters`.

use std::sync::{Arc, LazyLock, Mutex};

use fluxo_telemetry::opentelemetry::{KeyValue, metrics::ObservableGauge};

use super::{ConsumerError, Handler, StreamConsumer};

/// The stream as last measured.
#[derive(Debug, Clone, Default)]
struct StreamState {
    /// (stream, group, lag, pending) for every group of the stream.
    groups: Vec<(String, String, i64, i64)>,
    /// (dead-letter stream, length).
    dead_letters: Option<(String, i64)>,
}

struct StreamGauges {
    state: Arc<Mutex<StreamState>>,
    _instruments: [ObservableGauge<i64>; 3],
}

fn group_attributes(stream: &str, group: &str) -> [KeyValue; 2] {
    [
        KeyValue::new("messaging.destination.name", stream.to_owned()),
        KeyValue::new("messaging.consumer.group.name", group.to_owned()),
    ]
}

static GAUGES: LazyLock<StreamGauges> = LazyLock::new(|| {
    let meter = fluxo_telemetry::meter();
    let state = Arc::new(Mutex::new(StreamState::default()));
    let read = |state: &Arc<Mutex<StreamState>>| {
        state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    };
    let (s1, s2, s3) = (state.clone(), state.clone(), state.clone());
    let lag = meter
        .i64_observable_gauge("fluxo.stream.lag")
        .with_unit("{message}")
        .with_description("Stream entries not yet delivered to the consumer group (XINFO GROUPS lag)")
        .with_callback(move |o| {
            for (stream, group, lag, _) in read(&s1).groups {
                o.observe(lag, &group_attributes(&stream, &group));
            }
        })
        .build();
    let pending = meter
        .i64_observable_gauge("fluxo.stream.pending")
        .with_unit("{message}")
        .with_description("Messages delivered to the consumer group but not yet acknowledged")
        .with_callback(move |o| {
            for (stream, group, _, pending) in read(&s2).groups {
                o.observe(pending, &group_attributes(&stream, &group));
            }
        })
        .build();
    let dead = meter
        .i64_observable_gauge("fluxo.stream.dead_letters")
        .with_unit("{message}")
        .with_description("Messages parked in the dead-letter stream")
        .with_callback(move |o| {
            if let Some((stream, len)) = read(&s3).dead_letters {
                o.observe(len, &[KeyValue::new("messaging.destination.name", stream)]);
            }
        })
        .build();
    StreamGauges { state, _instruments: [lag, pending, dead] }
});

impl<H: Handler> StreamConsumer<H> {
    /// Updates the stream gauges from XINFO GROUPS and XLEN.
    pub async fn measure(&self) -> Result<(), ConsumerError> {
        let names = &self.config.names;
        let status = crate::stream_status(&self.client, names).await?;
        let groups = status
            .groups
            .into_iter()
            // An unknown lag is reported as 0 rather than dropping the series.
            .map(|g| (names.stream.clone(), g.name, g.lag.unwrap_or(0), g.pending))
            .collect();
        let mut state = GAUGES.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.groups = groups;
        state.dead_letters =
            Some((names.dead_letters.clone(), i64::try_from(status.dead_letters).unwrap_or(i64::MAX)));
        Ok(())
    }
}
