//! fluxo's access to the Kubernetes API: a client from a kubeconfig or the
//! pod's ServiceAccount, and the consolidators' pod-deletion cost.
//!
//! fluxo serves without Kubernetes; nothing here is needed to run it. `fluxo
//! doctor` reads an installation through [`client`]; a consolidator in a pod
//! reports the work it holds through [`DeletionCost`] so that a scale-in
//! deletes idle pods first.

use std::{path::Path, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use tokio::sync::watch;

pub use kube;

/// The annotation the ReplicaSet controller orders pods by when it scales in:
/// the lowest cost goes first (beta, on by default since Kubernetes 1.22).
pub const DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig could not be read or has no such context.
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    /// Neither a kubeconfig nor an in-cluster ServiceAccount was found.
    #[error("no Kubernetes configuration: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    /// The configuration is unusable (TLS, proxy, auth).
    #[error("kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client for `kubeconfig` (its `context`, or its current one); without a
/// file, as kubectl does: `$KUBECONFIG`, `~/.kube/config`, then the pod's
/// ServiceAccount (in-cluster).
pub async fn client(kubeconfig: Option<&Path>, context: Option<&str>) -> Result<Client, ClientError> {
    let options = KubeConfigOptions { context: context.map(str::to_owned), ..KubeConfigOptions::default() };
    let config = match kubeconfig {
        Some(path) => Config::from_custom_kubeconfig(Kubeconfig::read_from(path)?, &options).await?,
        None if context.is_some() => Config::from_kubeconfig(&options).await?,
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// The pod this process runs in, from the downward API (`POD_NAME`,
/// `POD_NAMESPACE`); `None` outside Kubernetes.
pub fn own_pod() -> Option<(String, String)> {
    let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    Some((var("POD_NAMESPACE")?, var("POD_NAME")?))
}

/// Keeps this pod's `controller.kubernetes.io/pod-deletion-cost` equal to the
/// number of messages its consumer holds, so the ReplicaSet controller picks
/// idle consolidators when KEDA scales in.
///
/// Needs `patch` on `pods` in the pod's namespace (the chart's Role grants that
/// and nothing else). Patches are rate-limited: at most one per
/// [`DeletionCost::min_interval`], coalescing the changes in between. A
/// failure is logged and retried later; it never affects consumption.
#[derive(Debug, Clone)]
pub struct DeletionCost {
    pods: Api<Pod>,
    pod: String,
    min_interval: Duration,
}

impl DeletionCost {
    /// The reporter for the pod named by the downward API, with a client
    /// inferred as [`client`] does. `None`, with the reason logged, outside
    /// Kubernetes or without a usable configuration.
    pub async fn for_own_pod() -> Option<Self> {
        let (namespace, pod) = own_pod()?;
        match client(None, None).await {
            Ok(client) => Some(Self::new(client, &namespace, &pod)),
            Err(error) => {
                tracing::warn!(%error, pod, "no Kubernetes API access: the pod-deletion cost is not reported");
                None
            }
        }
    }

    /// The reporter for pod `namespace`/`pod` through `client`.
    pub fn new(client: Client, namespace: &str, pod: &str) -> Self {
        Self {
            pods: Api::namespaced(client, namespace),
            pod: pod.to_owned(),
            min_interval: Duration::from_secs(10),
        }
    }

    /// The least time between two patches (default 10 s).
    #[must_use]
    pub fn min_interval(mut self, every: Duration) -> Self {
        self.min_interval = every;
        self
    }

    /// Sets the annotation to `cost` once.
    pub async fn set(&self, cost: u64) -> Result<(), kube::Error> {
        let cost = cost.min(i32::MAX as u64).to_string();
        let patch = serde_json::json!({ "metadata": { "annotations": { DELETION_COST_ANNOTATION: cost } } });
        self.pods.patch(&self.pod, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        Ok(())
    }

    /// Reports `held` until it closes or `stop` resolves: the first value at
    /// once, then each change, no more often than `min_interval`.
    pub async fn run(self, mut held: watch::Receiver<u64>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut reported: Option<u64> = None;
        let mut failures = 0u32;
        loop {
            let cost = *held.borrow_and_update();
            if reported != Some(cost) {
                match self.set(cost).await {
                    Ok(()) => {
                        if reported.is_none() || failures > 0 {
                            tracing::info!(pod = %self.pod, cost, "pod-deletion cost reported");
                        } else {
                            tracing::debug!(pod = %self.pod, cost, "pod-deletion cost reported");
                        }
                        reported = Some(cost);
                        failures = 0;
                    }
                    Err(error) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(10) {
                            tracing::warn!(%error, pod = %self.pod, failures, "cannot set the pod-deletion cost; retrying");
                        }
                    }
                }
            }
            // Rate limit: nothing for min_interval (longer after failures),
            // then wait for the next change (a failed patch is retried as is).
            let pause = self.min_interval * failures.clamp(1, 6);
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(pause) => {}
            }
            if failures == 0 {
                tokio::select! {
                    () = &mut stop => return,
                    changed = held.changed() => if changed.is_err() { return },
                }
            }
        }
    }
}
