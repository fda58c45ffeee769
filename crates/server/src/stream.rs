//! Server-streaming answers (the export and watch RPCs): messages sized for
//! the wire, read ahead on a task of their own, stopped when the caller goes
//! away; a watch's reader that stops reading is cut off.

use std::{
    fmt::Display,
    pin::Pin,
    sync::{
        LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use fluxo_telemetry::opentelemetry::metrics::Counter;

use futures::{Stream, StreamExt};
use tonic::Status;
use tracing::Instrument;

/// A server-streaming answer as tonic takes it.
pub type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How many messages wait, made, for the transport to take them.
const AHEAD: usize = 2;

/// Drives `messages` on a task of its own, a bounded channel ahead of what
/// the transport has taken: the next chunk is read while the previous one is
/// on the wire, and memory stays at a few messages whatever the stream's
/// length (a caller that reads slowly or not at all holds the task at the
/// channel, where it costs no database connection). The task stops at the
/// first error, which ends the stream as its status, and as soon as the
/// caller goes away (tonic drops the stream, which closes the channel), even
/// while a read is under way.
pub fn pump<T, E>(messages: impl Stream<Item = Result<T, E>> + Send + 'static) -> Streamed<T>
where
    T: Send + 'static,
    E: Into<Status> + Display + Send + 'static,
{
    pump_within(messages, None)
}

/// What ends a stream without end (a watch) besides its caller.
#[derive(Debug, Clone)]
pub struct Live {
    /// A caller that has not taken the next message within this long of its
    /// being ready is cut off with `RESOURCE_EXHAUSTED`.
    pub slow_reader: Duration,
    /// Turns true when the server drains ([`crate::GrpcServer::draining`]):
    /// the stream ends with `UNAVAILABLE`, and its reader resumes elsewhere.
    pub drain: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Default for Live {
    fn default() -> Self {
        Self { slow_reader: Duration::from_secs(30), drain: None }
    }
}

/// How a service's watches behave.
#[derive(Debug, Clone, Default)]
pub struct WatchSettings {
    /// Heartbeats and polling.
    pub pace: WatchPace,
    /// What ends a watch: a reader too slow, the server draining.
    pub live: Live,
}

/// Like [`pump`], for a stream without end (a watch), ended by `live`'s
/// rules: what was queued for a reader cut off is dropped, so a stalled
/// reader holds neither a task nor buffers for ever. Either way the reader
/// resumes from the last cursor it received.
pub fn pump_live<T, E>(messages: impl Stream<Item = Result<T, E>> + Send + 'static, live: Live) -> Streamed<T>
where
    T: Send + 'static,
    E: Into<Status> + Display + Send + 'static,
{
    pump_within(messages, Some(live))
}

/// Readers cut off by [`pump_live`] since the process started.
pub fn slow_readers_cut() -> u64 {
    CUT.load(Ordering::Relaxed)
}

static CUT: AtomicU64 = AtomicU64::new(0);

static CUT_COUNTER: LazyLock<Counter<u64>> = LazyLock::new(|| {
    fluxo_telemetry::meter()
        .u64_counter("fluxo.watch.slow_readers")
        .with_unit("{stream}")
        .with_description("Watch streams cut off because their reader stopped taking messages")
        .build()
});

fn pump_within<T, E>(
    messages: impl Stream<Item = Result<T, E>> + Send + 'static,
    live: Option<Live>,
) -> Streamed<T>
where
    T: Send + 'static,
    E: Into<Status> + Display + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(AHEAD);
    let (cut_tx, cut_rx) = tokio::sync::oneshot::channel::<Status>();
    let slow_reader = live.as_ref().map(|l| l.slow_reader);
    let mut drain = live.and_then(|l| l.drain);
    let task = async move {
        let mut messages = std::pin::pin!(messages);
        let mut sent = 0u64;
        let draining = async {
            let drained = match &mut drain {
                Some(drain) => drain.wait_for(|d| *d).await.is_ok(),
                None => false,
            };
            if !drained {
                std::future::pending::<()>().await;
            }
        };
        let mut draining = std::pin::pin!(draining);
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                () = tx.closed() => break tracing::debug!(messages = sent, "the caller went away: stream stopped"),
                () = &mut draining => {
                    let _ = cut_tx.send(Status::unavailable(
                        "the server is shutting down: resume from the last cursor received",
                    ));
                    break tracing::debug!(messages = sent, "draining: stream closed");
                }
            };
            let message = match next {
                None => break tracing::debug!(messages = sent, "stream finished"),
                Some(Ok(message)) => Ok(message),
                Some(Err(error)) => {
                    tracing::warn!(%error, messages = sent, "stream failed");
                    Err(error.into())
                }
            };
            let failed = message.is_err();
            let delivered = match slow_reader {
                None => tx.send(message).await.is_ok(),
                Some(limit) => match tokio::time::timeout(limit, tx.send(message)).await {
                    Ok(result) => result.is_ok(),
                    Err(_) => {
                        CUT.fetch_add(1, Ordering::Relaxed);
                        CUT_COUNTER.add(1, &[]);
                        tracing::warn!(
                            messages = sent,
                            ?limit,
                            "the reader stopped taking messages: stream cut off"
                        );
                        let _ = cut_tx.send(Status::resource_exhausted(format!(
                            "cut off: the next message waited more than {}s for this reader to take it; \
                             resume from the last cursor received",
                            limit.as_secs_f64()
                        )));
                        break;
                    }
                },
            };
            if !delivered {
                break tracing::debug!(messages = sent, "the caller went away: stream stopped");
            }
            if failed {
                break;
            }
            sent += 1;
        }
    };
    tokio::spawn(task.instrument(tracing::Span::current()));
    // A cut-off ends the stream at once, ahead of what was queued.
    let state = (rx, Cut::Armed(cut_rx));
    Box::pin(futures::stream::unfold(state, |(mut rx, cut)| async move {
        match cut {
            Cut::Done => None,
            Cut::Disarmed => rx.recv().await.map(|m| (m, (rx, Cut::Disarmed))),
            Cut::Armed(mut cut) => tokio::select! {
                biased;
                status = &mut cut => match status {
                    Ok(status) => Some((Err(status), (rx, Cut::Done))),
                    // The task ended without cutting: what it queued still goes.
                    Err(_) => rx.recv().await.map(|m| (m, (rx, Cut::Disarmed))),
                },
                message = rx.recv() => match message {
                    Some(message) => Some((message, (rx, Cut::Armed(cut)))),
                    None => cut.await.ok().map(|status| (Err(status), (rx, Cut::Done))),
                },
            },
        }
    }))
}

/// Whether a stream can still be cut off.
enum Cut {
    /// The task may cut it off.
    Armed(tokio::sync::oneshot::Receiver<Status>),
    /// The task ended without cutting it off.
    Disarmed,
    /// Cut off: the stream is over.
    Done,
}

/// How a watch paces itself.
#[derive(Debug, Clone, Copy)]
pub struct WatchPace {
    /// With nothing new, a heartbeat (nothing, the same cursor) this often.
    pub heartbeat: Duration,
    /// With nothing new, the source is read again at least this often
    /// (changes made by another process wake no watch here).
    pub poll: Duration,
}

impl Default for WatchPace {
    fn default() -> Self {
        Self { heartbeat: Duration::from_secs(15), poll: Duration::from_secs(1) }
    }
}

/// Wake-ups for watches, by key (a merchant): [`Signals::notify`] changes
/// the receivers of the keys it names, and only those, so a commit of one
/// merchant's entries wakes no watch of another. Keys nobody watches any
/// more are forgotten as commits come.
#[derive(Debug, Default)]
pub struct Signals(std::sync::Mutex<std::collections::HashMap<String, tokio::sync::watch::Sender<u64>>>);

impl Signals {
    /// Something of each of `keys` changed.
    pub fn notify<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        let mut map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.is_empty() {
            return;
        }
        for key in keys {
            if let Some(tx) = map.get(key) {
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
        map.retain(|_, tx| tx.receiver_count() > 0);
    }

    /// Changes after every [`Signals::notify`] naming `key`.
    pub fn subscribe(&self, key: &str) -> tokio::sync::watch::Receiver<u64> {
        let mut map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(key.to_owned()).or_insert_with(|| tokio::sync::watch::Sender::new(0)).subscribe()
    }

    /// Keys someone watches.
    pub fn watched(&self) -> usize {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }
}

/// After a wake-up that a read did not see yet (on PostgreSQL, while an
/// older transaction is still open), the first re-read waits this long,
/// doubling up to [`WatchPace::poll`].
const FIRST_RETRY: Duration = Duration::from_millis(5);

/// A live read from `cursor` on: `read(c)` answers what follows `c` and the
/// cursor after it. The stream yields what a read finds as soon as it finds
/// something, else a heartbeat (no items, the same cursor) every
/// `pace.heartbeat`; its first answer goes at once, heartbeat or not. Between
/// reads it waits for `wake` to change (something may be new: read at once)
/// or for `pace.poll`. It ends only with an error.
pub fn follow<C, T, E, F, Fut>(
    cursor: C,
    pace: WatchPace,
    wake: Option<tokio::sync::watch::Receiver<u64>>,
    read: F,
) -> impl Stream<Item = Result<(Vec<T>, C), E>> + Send + 'static
where
    C: Clone + Send + Sync + 'static,
    T: Send + 'static,
    E: Send + 'static,
    F: FnMut(C) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(Vec<T>, C), E>> + Send,
{
    let state = Following { cursor, pace, wake, read, sent: None };
    futures::stream::try_unfold(state, |mut f| async move {
        let next = f.next().await?;
        Ok(Some((next, f)))
    })
}

/// A [`follow`] between two answers.
struct Following<C, F> {
    cursor: C,
    pace: WatchPace,
    wake: Option<tokio::sync::watch::Receiver<u64>>,
    read: F,
    /// When the last answer went out.
    sent: Option<tokio::time::Instant>,
}

impl<C: Clone, F> Following<C, F> {
    async fn next<T, E, Fut>(&mut self) -> Result<(Vec<T>, C), E>
    where
        F: FnMut(C) -> Fut,
        Fut: Future<Output = Result<(Vec<T>, C), E>>,
    {
        let mut retry = self.pace.poll;
        loop {
            // Marked seen before reading: a change from here on ends the wait below.
            if let Some(wake) = &mut self.wake {
                wake.borrow_and_update();
            }
            let (items, next) = (self.read)(self.cursor.clone()).await?;
            self.cursor = next;
            let now = tokio::time::Instant::now();
            let heartbeat_at = self.sent.map_or(now, |at| at + self.pace.heartbeat);
            if !items.is_empty() || now >= heartbeat_at {
                self.sent = Some(now);
                return Ok((items, self.cursor.clone()));
            }
            let wake_at = (now + retry).min(heartbeat_at);
            let woken = async {
                let changed = match &mut self.wake {
                    Some(wake) => wake.changed().await.is_ok(),
                    None => false,
                };
                if !changed {
                    // No wake-ups (or their source is gone): the timer alone.
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = woken => retry = FIRST_RETRY,
                () = tokio::time::sleep_until(wake_at) => retry = (retry * 2).min(self.pace.poll),
            }
        }
    }
}

/// `items` cut, in order, into runs whose encoding as a repeated field takes
/// at most `budget` bytes (a run holds at least one item, however large), so
/// every message of a stream stays within the transport's message limit.
pub fn sized<T: prost::Message>(items: Vec<T>, budget: usize) -> Vec<Vec<T>> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    let mut used = 0usize;
    for item in items {
        // Tag and length prefix of a repeated message field: at most 1 + 10 bytes.
        let len = item.encoded_len() + 11;
        if !run.is_empty() && used + len > budget {
            runs.push(std::mem::take(&mut run));
            used = 0;
        }
        used += len;
        run.push(item);
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

/// A watch's answer as messages: `items` (each with the cursor after it) cut
/// like [`sized`], each run with the cursor after its last item; no items is
/// one run, a heartbeat, with `cursor`, where the watch stands.
pub fn sized_with_cursors<T: prost::Message, C>(
    items: Vec<(T, C)>,
    cursor: C,
    budget: usize,
) -> Vec<(Vec<T>, C)> {
    if items.is_empty() {
        return vec![(Vec::new(), cursor)];
    }
    let (items, cursors): (Vec<T>, Vec<C>) = items.into_iter().unzip();
    let mut cursors = cursors.into_iter();
    sized(items, budget)
        .into_iter()
        .filter_map(|run| {
            let last = cursors.by_ref().take(run.len()).last()?;
            Some((run, last))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::sized;

    #[test]
    fn runs_keep_the_order_and_stay_within_the_budget() {
        let items: Vec<String> = (0..100).map(|i| "x".repeat(i % 7 + 1)).collect();
        let runs = sized(items.clone(), 40);
        assert!(runs.len() > 10);
        for run in &runs {
            let bytes: usize = run.iter().map(|s| prost::Message::encoded_len(s) + 11).sum();
            assert!(bytes <= 40 || run.len() == 1, "{bytes}");
        }
        assert_eq!(runs.concat(), items);
        // One item over the budget still travels, alone.
        assert_eq!(sized(vec!["y".repeat(100)], 10).len(), 1);
        assert!(sized(Vec::<String>::new(), 10).is_empty());
    }

    #[test]
    fn a_signal_wakes_the_watches_of_its_keys_only() {
        let signals = super::Signals::default();
        let (mut w1, w2) = (signals.subscribe("m-1"), signals.subscribe("m-2"));
        signals.notify(["m-1"]);
        assert!(w1.has_changed().unwrap());
        assert!(!w2.has_changed().unwrap());
        w1.borrow_and_update();
        signals.notify(["m-2", "m-1"]);
        assert!(w1.has_changed().unwrap() && w2.has_changed().unwrap());
        // A key nobody watches any more is forgotten at the next notice.
        drop((w1, w2));
        signals.notify(["m-1"]);
        assert_eq!(signals.watched(), 0);
    }

    #[test]
    fn every_run_of_a_watch_carries_the_cursor_after_its_last_item() {
        let items: Vec<(String, usize)> = (0..50).map(|i| ("x".repeat(i % 5 + 1), i)).collect();
        let runs = super::sized_with_cursors(items, 99, 30);
        assert!(runs.len() > 5);
        let mut seen = 0;
        for (run, cursor) in &runs {
            seen += run.len();
            assert_eq!(*cursor, seen - 1);
        }
        assert_eq!(seen, 50);
        // Nothing: a heartbeat with where the watch stands.
        assert_eq!(super::sized_with_cursors(Vec::<(String, usize)>::new(), 7, 30), vec![(vec![], 7)]);
    }
}
