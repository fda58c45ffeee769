//! The gRPC server stack shared by every fluxo target, so each behaves the same
//! way towards Kubernetes and the mesh:
//!
//! - `grpc.health.v1` with real readiness: NOT_SERVING until the target's
//!   [`Readiness`] check passes, and again from the moment shutdown begins;
//! - server reflection, so `grpcurl` needs no proto files;
//! - admission control: beyond a concurrency limit calls are refused at once
//!   with RESOURCE_EXHAUSTED instead of queueing (health and reflection exempt);
//! - deadlines: the caller's `grpc-timeout`, capped by a server maximum;
//! - a request span per call, continuing the caller's W3C trace context, and an
//!   `x-request-id` accepted or minted and echoed back;
//! - graceful shutdown: NOT_SERVING, an optional delay for endpoints to drop
//!   the pod, then draining in-flight calls within a deadline.

mod admission;
pub mod identity;
mod malformed;
pub mod status;
pub mod stream;

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::oneshot};
use tonic::{body::Body, server::NamedService, service::RoutesBuilder, transport::server::TcpIncoming};
use tonic_health::{ServingStatus, server::HealthReporter};

pub use admission::{ACCESS, AdmissionLayer, REQUEST_ID_HEADER, request_id};
pub use malformed::MalformedRequestLayer;

/// Health service name that reports the process alive (for liveness and
/// startup probes), independent of readiness.
pub const LIVENESS_SERVICE: &str = "liveness";

/// A target's answer to "can you serve traffic now?".
#[async_trait::async_trait]
pub trait Readiness: Send + Sync + 'static {
    /// `Ok` when ready; otherwise why not, for the logs.
    async fn check(&self) -> Result<(), String>;
}

/// Ready when the database answers and every migration of `M` (a service's
/// migrator) is applied.
pub struct SchemaReadiness<M> {
    db: fluxo_db::Db,
    component: &'static str,
    migrator: std::marker::PhantomData<fn() -> M>,
}

impl<M> SchemaReadiness<M> {
    /// Checks `db` for the schema of `component` (`ledger`, `balance`: named in the reason).
    pub fn new(db: fluxo_db::Db, component: &'static str) -> Self {
        Self { db, component, migrator: std::marker::PhantomData }
    }
}

impl<M> std::fmt::Debug for SchemaReadiness<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaReadiness").field("component", &self.component).finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl<M: sea_orm_migration::MigratorTrait + 'static> Readiness for SchemaReadiness<M> {
    async fn check(&self) -> Result<(), String> {
        fluxo_db::migration::readiness::<M>(&self.db, self.component).await
    }
}

/// Ready when every one of its checks is.
#[derive(Clone, Default)]
pub struct AllReady(pub Vec<Arc<dyn Readiness>>);

impl std::fmt::Debug for AllReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AllReady({} checks)", self.0.len())
    }
}

#[async_trait::async_trait]
impl Readiness for AllReady {
    async fn check(&self) -> Result<(), String> {
        for check in &self.0 {
            check.check().await?;
        }
        Ok(())
    }
}

/// Settings of the gRPC server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Calls served at once before new ones are refused with RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    /// Longest a call may run, whatever deadline the caller set.
    pub request_timeout: Duration,
    /// After SIGTERM: how long to keep serving while reporting NOT_SERVING, so
    /// load balancers stop sending new calls before the listener closes.
    pub shutdown_delay: Duration,
    /// Then: how long in-flight calls get to finish before they are cut.
    pub shutdown_timeout: Duration,
    /// How often readiness is re-checked.
    pub readiness_interval: Duration,
}

/// Why the server stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The reflection service could not read the descriptor set.
    #[error("invalid descriptor set for reflection: {0}")]
    Reflection(String),
    /// The serving task panicked.
    #[error("gRPC server task failed: {0}")]
    Crashed(String),
    /// The transport failed.
    #[error("gRPC transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A bound gRPC server, collecting services before it starts.
pub struct GrpcServer {
    listener: TcpListener,
    config: ServerConfig,
    routes: RoutesBuilder,
    health: HealthReporter,
    services: Vec<&'static str>,
    callers: identity::CallerAuth,
    hold: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// Turns true when in-flight calls start draining: streams without end
    /// (watches) close then, so their readers resume elsewhere.
    draining: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for GrpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServer")
            .field("listen", &self.listener.local_addr().ok())
            .field("services", &self.services)
            .finish_non_exhaustive()
    }
}

impl GrpcServer {
    /// Binds the listener and registers the health service, NOT_SERVING.
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
        let (health, health_service) = tonic_health::server::health_reporter();
        // The reporter starts the overall service ("") as SERVING; nothing is
        // ready until the first readiness check passes.
        health.set_service_status("", ServingStatus::NotServing).await;
        // Liveness, separate from readiness: SERVING for as long as the process
        // serves gRPC at all, so an outage of the database takes pods out of
        // rotation (readiness) without getting them restarted (liveness).
        health.set_service_status(LIVENESS_SERVICE, ServingStatus::Serving).await;
        let mut routes = RoutesBuilder::default();
        routes.add_service(health_service);
        Ok(Self {
            listener,
            config,
            routes,
            health,
            services: Vec::new(),
            callers: Default::default(),
            hold: None,
            draining: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Turns true when this server starts draining in-flight calls (see
    /// [`stream::Live`]).
    pub fn draining(&self) -> tokio::sync::watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// How callers are authenticated (open by default: loopback installs).
    pub fn authenticate(&mut self, callers: identity::CallerAuth) -> &mut Self {
        self.callers = callers;
        self
    }

    /// After shutdown begins (and its delay), keeps accepting calls until
    /// `done` resolves: a front end in this process that drains its own
    /// requests first still reaches the services while it does.
    pub fn keep_accepting_until(&mut self, done: impl Future<Output = ()> + Send + 'static) -> &mut Self {
        self.hold = Some(Box::pin(done));
        self
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Adds a gRPC service; its health status follows readiness.
    pub async fn add_service<S>(&mut self, service: S) -> &mut Self
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.health.set_service_status(S::NAME, ServingStatus::NotServing).await;
        self.services.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Adds server reflection (v1, and v1alpha for older clients) describing
    /// `descriptor_set`. Call it after the last [`GrpcServer::add_service`]:
    /// reflection advertises exactly the services added so far, plus health.
    pub fn add_reflection(&mut self, descriptor_set: &'static [u8]) -> Result<&mut Self, ServerError> {
        let names: Vec<String> = self
            .services
            .iter()
            .map(|s| (*s).to_owned())
            .chain(["grpc.health.v1.Health".to_owned()])
            .collect();
        let configure = || {
            names.iter().fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(descriptor_set)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
                |builder, name| builder.with_service_name(name.clone()),
            )
        };
        let v1 = configure().build_v1().map_err(|e| ServerError::Reflection(e.to_string()))?;
        let v1alpha = configure().build_v1alpha().map_err(|e| ServerError::Reflection(e.to_string()))?;
        self.routes.add_service(v1);
        self.routes.add_service(v1alpha);
        Ok(self)
    }

    /// Serves until `shutdown` resolves, then drains: NOT_SERVING at once,
    /// `shutdown_delay` of continued service, then in-flight calls get
    /// `shutdown_timeout` to finish.
    pub async fn serve(
        self,
        readiness: Arc<dyn Readiness>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        let Self { listener, config, routes, health, services, callers, hold, draining } = self;
        let addr = listener.local_addr().ok();
        let (stop_accepting, accept_stopped) = oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            // Caps every call; a shorter `grpc-timeout` from the caller wins.
            .timeout(config.request_timeout)
            // Dead peers are noticed instead of holding connections forever.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            // h2 closes a connection (GOAWAY, ENHANCE_YOUR_CALM) once the small DATA
            // frames it holds unread exceed a budget of half the connection window,
            // charging 256 bytes minus the payload per frame. Every unary call brings
            // one such frame, unread until its task first runs, so a flood the CPU
            // cannot keep up with (tonic's default: no stream limit) cut connections
            // and failed every call on them with a transport error. Capped streams
            // keep the held frames within the budget; a client queues the rest.
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_concurrent_streams(Some(streams_per_connection(config.max_concurrent_requests)))
            // Outermost: refusals happen before anything else, and the call's
            // metrics see the code the caller gets.
            .layer(AdmissionLayer::new(config.max_concurrent_requests))
            // Who the caller is, before any of its bytes are decoded.
            .layer(identity::CallerAuthLayer(callers))
            // A request tonic cannot decode is the caller's error, not ours.
            .layer(MalformedRequestLayer)
            .add_routes(routes.routes())
            // tonic's `tcp_nodelay` applies only to listeners it binds itself; an
            // accepted socket with Nagle's algorithm on holds a lone small reply
            // until the peer's delayed ACK (~40 ms a call for one-at-a-time callers).
            .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async {
                let _ = accept_stopped.await;
            });
        let mut server = tokio::spawn(server);

        let (stop_probing, mut probing_stopped) = oneshot::channel::<()>();
        let prober = tokio::spawn(probe(
            readiness,
            health.clone(),
            services.clone(),
            config.readiness_interval,
            async move {
                let _ = (&mut probing_stopped).await;
            },
        ));

        tokio::select! {
            () = shutdown => {}
            result = &mut server => {
                // The transport stopped on its own: report it.
                let _ = stop_probing.send(());
                return joined(result);
            }
        }
        tracing::info!(?addr, delay = ?config.shutdown_delay, "shutting down: reporting NOT_SERVING");
        let _ = stop_probing.send(());
        let _ = prober.await;
        set_all(&health, &services, ServingStatus::NotServing).await;
        tokio::time::sleep(config.shutdown_delay).await;
        if let Some(hold) = hold {
            hold.await;
        }
        tracing::info!(timeout = ?config.shutdown_timeout, "draining in-flight calls");
        draining.send_replace(true);
        let _ = stop_accepting.send(());
        match tokio::time::timeout(config.shutdown_timeout, &mut server).await {
            Ok(result) => {
                tracing::info!("drained; server stopped");
                joined(result)
            }
            Err(_) => {
                server.abort();
                tracing::warn!("calls still running at the shutdown deadline were cut");
                Ok(())
            }
        }
    }
}

/// Flow-control window of a connection (hyper's default, set here because the
/// stream limit below depends on it).
const CONNECTION_WINDOW: u32 = 1 << 20;

/// Open calls a connection may carry: twice what the server admits (room for
/// every admitted call and as many refusals on their way out), at least 64, and
/// never more than h2's small-frame budget holds: half the window at up to 256
/// bytes a call.
fn streams_per_connection(max_concurrent_requests: usize) -> u32 {
    let budget = CONNECTION_WINDOW / 2 / 256;
    u32::try_from(max_concurrent_requests.saturating_mul(2)).unwrap_or(u32::MAX).clamp(64, budget)
}

fn joined(
    result: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Result<(), ServerError> {
    match result {
        Ok(served) => Ok(served?),
        Err(join) => Err(ServerError::Crashed(join.to_string())),
    }
}

async fn set_all(health: &HealthReporter, services: &[&'static str], status: ServingStatus) {
    health.set_service_status("", status).await;
    for name in services {
        health.set_service_status(*name, status).await;
    }
}

/// Re-checks readiness until told to stop, flipping health on each change.
async fn probe(
    readiness: Arc<dyn Readiness>,
    health: HealthReporter,
    services: Vec<&'static str>,
    interval: Duration,
    stop: impl Future<Output = ()>,
) {
    let mut ready = false;
    let work = async {
        loop {
            // A hung database must not freeze readiness at its last answer.
            let result = tokio::time::timeout(interval.max(Duration::from_secs(1)), readiness.check())
                .await
                .unwrap_or_else(|_| Err("readiness check timed out".into()));
            match (&result, ready) {
                (Ok(()), false) => {
                    tracing::info!("ready: reporting SERVING");
                    set_all(&health, &services, ServingStatus::Serving).await;
                    ready = true;
                }
                (Err(reason), true) => {
                    tracing::warn!(%reason, "not ready: reporting NOT_SERVING");
                    set_all(&health, &services, ServingStatus::NotServing).await;
                    ready = false;
                }
                (Err(reason), false) => tracing::info!(%reason, "not ready yet"),
                (Ok(()), true) => {}
            }
            // Poll faster while not ready, so a fresh pod turns ready quickly.
            let pause = if ready { interval } else { interval.min(Duration::from_millis(250)) };
            tokio::time::sleep(pause).await;
        }
    };
    tokio::select! {
        () = work => {}
        () = stop => {}
    }
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C (a terminal).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            futures::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = futures::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("interrupt received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
