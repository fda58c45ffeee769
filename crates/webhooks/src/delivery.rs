//! One delivery attempt: a signed `POST` to a subscriber's endpoint, over a
//! connection made to an address the destination policy has just approved,
//! with bounded time and a bounded excerpt of the answer; and the retry
//! schedule between attempts.
//!
//! The connection is made here, not by a general HTTP client, so that the
//! address checked is the address connected to: a name cannot resolve to a
//! public address for the check and to an inward one for the connection.
//! TLS verifies the endpoint's certificate for its host name (Mozilla's roots,
//! or the CAs given). A connection whose answer was read to its end is kept
//! for the next attempt to the same host at an address the policy approves
//! at that attempt (a small pool of our own, keyed by the checked address:
//! hyper-util's pool would resolve names itself).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use url::Url;

use crate::{DestinationError, DestinationPolicy, Secret, sign};

/// How long and how much an attempt may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// TCP connect and TLS handshake, per address tried.
    pub connect: Duration,
    /// From the request's first byte to the answer's status line.
    pub response: Duration,
    /// Bytes of the answer's body kept (the rest is not read).
    pub excerpt: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { connect: Duration::from_secs(5), response: Duration::from_secs(15), excerpt: 1024 }
    }
}

/// Sends delivery attempts.
#[derive(Clone)]
pub struct Sender {
    policy: DestinationPolicy,
    tls: tokio_rustls::TlsConnector,
    limits: Limits,
    user_agent: String,
    kept: Arc<Pool>,
}

/// A kept connection lives this long unused: under the shortest idle timeout
/// common servers apply (Node's 5 s), so it is rarely closed under an attempt.
const KEPT_IDLE: Duration = Duration::from_secs(4);
/// Connections kept per (host, address) and in all.
const KEPT_PER_ADDRESS: usize = 64;
const KEPT_AT_MOST: usize = 1024;

/// Where a kept connection goes: TLS or not, the host (the certificate's
/// name), and the address the policy approved.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    https: bool,
    host: String,
    addr: SocketAddr,
}

/// An HTTP/1.1 connection: its request handle and the task driving it,
/// stopped when the connection is let go.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    driver: tokio::task::AbortHandle,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

#[derive(Default)]
struct Pool {
    idle: Mutex<HashMap<Key, Vec<(Conn, Instant)>>>,
}

impl Pool {
    /// A live idle connection to `host` at one of `addrs`, newest first.
    fn take(&self, https: bool, host: &str, addrs: &[SocketAddr]) -> Option<(Key, Conn)> {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for addr in addrs {
            let key = Key { https, host: host.to_owned(), addr: *addr };
            let Some(list) = idle.get_mut(&key) else { continue };
            while let Some((conn, since)) = list.pop() {
                if since.elapsed() < KEPT_IDLE && !conn.sender.is_closed() {
                    return Some((key, conn));
                }
            }
            idle.remove(&key);
        }
        None
    }

    fn put(&self, key: Key, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.values().map(Vec::len).sum::<usize>() >= KEPT_AT_MOST {
            idle.retain(|_, list| {
                list.retain(|(conn, since)| since.elapsed() < KEPT_IDLE && !conn.sender.is_closed());
                !list.is_empty()
            });
        }
        let total: usize = idle.values().map(Vec::len).sum();
        let list = idle.entry(key).or_default();
        if list.len() < KEPT_PER_ADDRESS && total < KEPT_AT_MOST {
            list.push((conn, Instant::now()));
        }
    }
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("policy", &self.policy)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The CA file given could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TrustError {
    path: String,
    reason: String,
}

/// One attempt to deliver an event.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// The endpoint (checked by the policy when it was registered; checked again here).
    pub url: &'a Url,
    /// The event's id: `webhook-id`, the same on every attempt.
    pub event_id: &'a str,
    /// The JSON body, the same on every attempt.
    pub body: &'a Bytes,
    /// Secrets in force (two during a rotation): one signature each.
    pub secrets: &'a [&'a Secret],
    /// Seconds since the epoch: `webhook-timestamp`.
    pub timestamp: i64,
}

/// What an attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer: delivered.
    Delivered {
        /// The status.
        status: u16,
        /// The start of the answer's body, at most [`Limits::excerpt`] bytes.
        excerpt: String,
    },
    /// Not delivered; `retry` says whether a later attempt may succeed.
    Failed {
        /// Why.
        failure: Failure,
        /// False only when the endpoint said it wants no more (410 Gone).
        retry: bool,
    },
}

/// Why an attempt did not deliver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The destination policy refused where the endpoint now points; nothing was sent.
    #[error("refused destination: {0}")]
    Refused(DestinationError),
    /// No address of the endpoint accepted a connection (or completed TLS) in time.
    #[error("could not connect: {0}")]
    Connect(String),
    /// Connected, but no answer within the response limit.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The exchange broke off.
    #[error("exchange failed: {0}")]
    Exchange(String),
    /// The endpoint answered with a status other than 2xx.
    #[error("answered {status}")]
    Status {
        /// The status.
        status: u16,
        /// The start of the answer's body.
        excerpt: String,
    },
}

impl Sender {
    /// Attempts under `policy`, trusting `ca_file` (PEM) or, without one,
    /// Mozilla's roots.
    pub fn new(
        policy: DestinationPolicy,
        ca_file: Option<&Path>,
        limits: Limits,
    ) -> Result<Self, TrustError> {
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let err = |reason: String| TrustError { path: path.display().to_string(), reason };
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| err(format!("cannot read PEM certificates: {e}")))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(err("no usable CA certificate in it".into()));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TrustError { path: String::new(), reason: e.to_string() })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            policy,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            limits,
            user_agent: format!("fluxo-webhooks/{}", env!("CARGO_PKG_VERSION")),
            kept: Arc::default(),
        })
    }

    /// Makes one attempt. Never panics and never returns an error: every
    /// way it can go is an [`Outcome`].
    pub async fn send(&self, attempt: Attempt<'_>) -> Outcome {
        match self.exchange(attempt).await {
            Ok((status, excerpt)) if status.is_success() => {
                Outcome::Delivered { status: status.as_u16(), excerpt }
            }
            Ok((status, excerpt)) => Outcome::Failed {
                retry: status != StatusCode::GONE,
                failure: Failure::Status { status: status.as_u16(), excerpt },
            },
            Err(failure) => Outcome::Failed { failure, retry: true },
        }
    }

    async fn exchange(&self, attempt: Attempt<'_>) -> Result<(StatusCode, String), Failure> {
        let url = attempt.url;
        // Checked again at every attempt: the policy may have changed since registration.
        self.policy.check_url(url.as_str()).map_err(Failure::Refused)?;
        let addrs = self.policy.resolve(url).await.map_err(Failure::Refused)?;
        let host =
            url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
        let https = url.scheme() == "https";
        let limit = self.limits.response;
        if let Some((key, conn)) = self.kept.take(https, &host, &addrs) {
            let request = self.request(attempt, &host)?;
            match tokio::time::timeout(limit, self.exchange_on(key, conn, request)).await {
                Err(_) => return Err(Failure::Timeout(limit)),
                // Closed by the endpoint while it was kept: once more, on a new one.
                Ok(Err(Failure::Exchange(_))) => {}
                Ok(answer) => return answer,
            }
        }
        let request = self.request(attempt, &host)?;
        let (tcp, addr) = self.connect(&addrs).await?;
        let key = Key { https, host: host.clone(), addr };
        let answer = async {
            if https {
                let name = ServerName::try_from(host.clone()).map_err(|e| Failure::Connect(e.to_string()))?;
                let tls = tokio::time::timeout(self.limits.connect, self.tls.connect(name, tcp))
                    .await
                    .map_err(|_| {
                        Failure::Connect(format!(
                            "TLS handshake with {host} took over {:?}",
                            self.limits.connect
                        ))
                    })?
                    .map_err(|e| Failure::Connect(format!("TLS with {host}: {e}")))?;
                self.post(key, tls, request).await
            } else {
                self.post(key, tcp, request).await
            }
        };
        tokio::time::timeout(limit, answer).await.map_err(|_| Failure::Timeout(limit))?
    }

    fn request(&self, attempt: Attempt<'_>, host: &str) -> Result<Request<Full<Bytes>>, Failure> {
        let url = attempt.url;
        let headers = sign(attempt.secrets, attempt.event_id, attempt.timestamp, attempt.body);
        let path = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        };
        let authority = match url.port() {
            Some(port) if host.contains(':') => format!("[{host}]:{port}"),
            Some(port) => format!("{host}:{port}"),
            None if host.contains(':') => format!("[{host}]"),
            None => host.to_owned(),
        };
        let mut builder = Request::post(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, &self.user_agent);
        for (name, value) in headers.pairs() {
            builder = builder.header(name, value);
        }
        builder.body(Full::new(attempt.body.clone())).map_err(|e| Failure::Exchange(e.to_string()))
    }

    /// A connection to the first of `addrs` that accepts one in time.
    async fn connect(&self, addrs: &[SocketAddr]) -> Result<(TcpStream, SocketAddr), Failure> {
        let mut last = String::from("no address");
        for addr in addrs {
            match tokio::time::timeout(self.limits.connect, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok((stream, *addr));
                }
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: no answer within {:?}", self.limits.connect),
            }
        }
        Err(Failure::Connect(last))
    }

    /// One HTTP/1.1 request on a new connection over `io`.
    async fn post<IO>(
        &self,
        key: Key,
        io: IO,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, String), Failure>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| Failure::Exchange(e.to_string()))?;
        let driver = tokio::spawn(connection).abort_handle();
        self.exchange_on(key, Conn { sender, driver }, request).await
    }

    /// One request on `conn`; the status and the start of the body. The
    /// connection is kept when the whole answer was read and it can take
    /// another request; otherwise it is closed.
    async fn exchange_on(
        &self,
        key: Key,
        mut conn: Conn,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, String), Failure> {
        let broke = |e: hyper::Error| Failure::Exchange(e.to_string());
        conn.sender.ready().await.map_err(broke)?;
        let response = conn.sender.send_request(request).await.map_err(broke)?;
        let status = response.status();
        // Only the excerpt is read; a longer body is left unread and the connection closed.
        let mut body = response.into_body();
        let mut kept = Vec::with_capacity(self.limits.excerpt.min(4096));
        let mut whole = false;
        while kept.len() <= self.limits.excerpt {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        kept.extend_from_slice(data);
                    }
                }
                None => {
                    whole = true;
                    break;
                }
                // A broken body: keep what came.
                Some(Err(_)) => break,
            }
        }
        drop(body);
        kept.truncate(self.limits.excerpt);
        // Not yet ready again (its task is finishing the answer): `ready` waits at the next use.
        if whole && !conn.sender.is_closed() {
            self.kept.put(key, conn);
        }
        Ok((status, String::from_utf8_lossy(&kept).into_owned()))
    }
}

/// When to try again after a failed attempt: exponential backoff with
/// jitter, for at least [`Retries::give_up_after`].
#[derive(Debug, Clone, Copy)]
pub struct Retries {
    /// The wait after the first failure (before jitter).
    pub first: Duration,
    /// The longest wait between two attempts.
    pub cap: Duration,
    /// No attempt is scheduled later than this after the first one; then the
    /// delivery is dead-lettered.
    pub give_up_after: Duration,
}

impl Default for Retries {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(5),
            cap: Duration::from_secs(3600),
            give_up_after: Duration::from_secs(26 * 3600),
        }
    }
}

impl Retries {
    /// The wait before attempt `failed + 1`, after `failed` failures the
    /// first of which was `since_first` ago; `None` once that would pass
    /// [`Retries::give_up_after`]. `jitter_permille` (a random 0–999) takes
    /// up to half the wait off, so receivers recovering from an outage are
    /// not hit by every sender at once.
    pub fn next(&self, failed: u32, since_first: Duration, jitter_permille: u16) -> Option<Duration> {
        let exponent = failed.saturating_sub(1).min(30);
        let base = self.first.saturating_mul(1u32 << exponent).min(self.cap);
        let off = base.saturating_mul(u32::from(jitter_permille.min(999))) / 2000;
        let wait = base.saturating_sub(off);
        (since_first.saturating_add(wait) <= self.give_up_after).then_some(wait)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Retries;

    #[test]
    fn retries_back_off_with_jitter_for_at_least_a_day() {
        let r = Retries::default();
        // Without jitter: 5 s, 10 s, 20 s … capped at an hour.
        assert_eq!(r.next(1, Duration::ZERO, 0), Some(Duration::from_secs(5)));
        assert_eq!(r.next(2, Duration::ZERO, 0), Some(Duration::from_secs(10)));
        assert_eq!(r.next(20, Duration::ZERO, 0), Some(Duration::from_secs(3600)));
        // Jitter takes at most half off.
        assert_eq!(r.next(2, Duration::ZERO, 999).unwrap().as_millis(), 5005);
        // The schedule, with the most jitter, still reaches past 24 hours before it gives up.
        let (mut elapsed, mut failed) = (Duration::ZERO, 1);
        while let Some(wait) = r.next(failed, elapsed, 999) {
            elapsed += wait;
            failed += 1;
        }
        assert!(elapsed >= Duration::from_secs(24 * 3600), "gave up after {elapsed:?}");
        assert!(elapsed <= r.give_up_after);
        assert!(failed > 30, "{failed} attempts");
    }
}
