//! What the client commands (`fluxo entries …`, `fluxo balances export`,
//! `fluxo periods …`) share: where fluxo answers over gRPC and the token
//! they call it with.

use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};

/// How a client command reaches fluxo.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// fluxo's gRPC address (`fluxo serve` prints it; in Kubernetes, a port-forward to the
    /// ledger or balance Service).
    #[arg(long, env = "FLUXO_ADDR", default_value = "http://127.0.0.1:50051", value_name = "URL")]
    pub addr: String,
    /// Bearer token sent with every call (needed when gRPC asks for tokens, `grpc.auth = jwt`).
    #[arg(long, env = "FLUXO_TOKEN", hide_env_values = true, value_name = "JWT")]
    pub token: Option<SecretString>,
    /// Longest wait for one call, in seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub call_timeout_secs: u64,
}

impl ClientArgs {
    /// A channel to `addr` (connected lazily, reconnecting as needed).
    pub fn channel(&self) -> anyhow::Result<Channel> {
        let endpoint = Endpoint::from_shared(self.addr.clone())
            .with_context(|| format!("--addr {} is not a URL", self.addr))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(self.call_timeout_secs.max(1)));
        Ok(endpoint.connect_lazy())
    }

    /// `message` as a request carrying the token, when one is given.
    pub fn request<T>(&self, message: T) -> anyhow::Result<Request<T>> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            let value = MetadataValue::try_from(format!("Bearer {}", token.expose_secret()))
                .map_err(|_| anyhow::anyhow!("--token holds characters a header cannot carry"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// A short description of a failed call: its code and message, never its metadata.
pub fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
