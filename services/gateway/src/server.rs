//! The gateway's HTTP server: HTTP/1.1 and h2c on one listener, with the
//! socket options and timeouts a server facing the internet needs, and a
//! graceful drain.
//!
//! Written on hyper-util rather than with `axum::serve`, which sets no header
//! read timeout (a client sending headers a byte at a time held a connection
//! for minutes), leaves Nagle's algorithm on for accepted sockets, and does not
//! hand the peer's address to the application.

use std::{net::SocketAddr, time::Duration};

use axum::{Router, extract::ConnectInfo};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Connection settings of the REST server.
#[derive(Debug, Clone, Copy)]
pub struct HttpSettings {
    /// How long a client may take to send a request's headers (HTTP/1.1);
    /// past it the connection is closed.
    pub header_read_timeout: Duration,
    /// After shutdown begins: how long in-flight requests get to finish.
    pub drain_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops
/// accepting and drains: idle keep-alive connections are closed, requests in
/// flight are answered (`Connection: close` on HTTP/1.1, GOAWAY on h2) for up
/// to `drain_timeout`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: HttpSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(settings.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        // Dead or stalled h2 peers are noticed instead of holding connections.
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "accepting a REST connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // A reply is one small write; with Nagle's algorithm on it waits for
        // the peer's delayed ACK of the previous segment (~40 ms).
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let app = router.clone().map_request(move |mut request: http::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            request
        });
        let connection =
            builder.serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(app));
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "REST connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(settings.drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!("REST requests still running at the drain deadline were cut");
    }
    Ok(())
}

/// The peer's address, when the request came through [`serve`].
pub(crate) fn peer(request: &axum::extract::Request) -> Option<SocketAddr> {
    request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}
