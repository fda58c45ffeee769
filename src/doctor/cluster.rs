//! What doctor reads: the release's objects from the Kubernetes API, KEDA's
//! metric, and fluxo's own view of its schema and stream.

use std::{collections::BTreeSet, fmt, future::Future, time::Duration};

use fluxo_kube::kube::{
    self, Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
};
use fluxo_queue::{StreamNames, StreamStatus};
use k8s_openapi::api::{
    apps::v1::Deployment,
    autoscaling::v2::HorizontalPodAutoscaler,
    batch::v1::Job,
    core::v1::{ConfigMap, Pod, Service, ServiceAccount},
    policy::v1::PodDisruptionBudget,
};
use serde::de::DeserializeOwned;

use super::Progress;
use crate::config::Config;

/// Why something could not be read.
#[derive(Debug, Clone)]
pub(crate) enum ReadError {
    /// The API (a CRD's group) is not served: the component is not installed.
    NotInstalled,
    /// RBAC refused doctor.
    Forbidden(String),
    /// Anything else (unreachable, timed out, malformed).
    Failed(String),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotInstalled => f.write_str("not installed (the API is not served)"),
            Self::Forbidden(what) => write!(f, "forbidden: {what}"),
            Self::Failed(why) => f.write_str(why),
        }
    }
}

pub(crate) type Read<T> = Result<T, ReadError>;

/// fluxo's stream as fluxo sees it, read twice around KEDA's metric.
#[derive(Debug, Clone)]
pub(crate) struct StreamView {
    pub(crate) names: StreamNames,
    /// The notifiers' group on the same stream (`webhooks.group`).
    pub(crate) notifier_group: String,
    pub(crate) before: StreamStatus,
    pub(crate) after: Option<StreamStatus>,
}

/// Everything the checks look at, read once.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) namespace: String,
    pub(crate) release: String,
    pub(crate) deployments: Read<Vec<Deployment>>,
    pub(crate) pods: Read<Vec<Pod>>,
    pub(crate) services: Read<Vec<Service>>,
    pub(crate) jobs: Read<Vec<Job>>,
    pub(crate) pdbs: Read<Vec<PodDisruptionBudget>>,
    pub(crate) hpas: Read<Vec<HorizontalPodAutoscaler>>,
    pub(crate) scaled_objects: Read<Vec<DynamicObject>>,
    pub(crate) peer_authentications: Read<Vec<DynamicObject>>,
    pub(crate) authorization_policies: Read<Vec<DynamicObject>>,
    pub(crate) node_pools: Read<Vec<DynamicObject>>,
    /// (namespace, ServiceAccount) named by a principal → whether it exists.
    pub(crate) principals: Vec<((String, String), Read<bool>)>,
    /// KEDA's value of the consolidators' metric (milli-units), by ScaledObject name.
    pub(crate) keda_metric: Vec<(String, Read<i64>)>,
    /// None when doctor has no Redis settings.
    pub(crate) stream: Option<Read<StreamView>>,
    /// (ledger schema current, balance schema current); None without database settings.
    pub(crate) schema: Option<Read<(bool, bool)>>,
}

fn read_error(error: kube::Error) -> ReadError {
    match error {
        kube::Error::Api(status) if status.code == 404 => ReadError::NotInstalled,
        kube::Error::Api(status) if status.code == 403 => ReadError::Forbidden(status.message),
        other => ReadError::Failed(other.to_string()),
    }
}

async fn bounded<T>(timeout: Duration, what: &str, read: impl Future<Output = Read<T>>) -> Read<T> {
    match tokio::time::timeout(timeout, read).await {
        Ok(read) => read,
        Err(_) => Err(ReadError::Failed(format!("reading {what} took longer than {timeout:?}"))),
    }
}

async fn list<K>(api: Api<K>, selector: Option<&str>) -> Read<Vec<K>>
where
    K: kube::Resource + Clone + DeserializeOwned + fmt::Debug,
{
    let params = match selector {
        Some(selector) => ListParams::default().labels(selector),
        None => ListParams::default(),
    };
    api.list(&params).await.map(|l| l.items).map_err(read_error)
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// Reads the installation `release` in `namespace`.
pub(crate) async fn gather(
    client: Client,
    config: &Config,
    namespace: &str,
    release: &str,
    timeout: Duration,
    progress: &mut Progress,
) -> anyhow::Result<State> {
    const STEPS: usize = 8;
    let ns = namespace;
    let selector = format!("app.kubernetes.io/instance={release}");
    let sel = Some(selector.as_str());
    let c = || client.clone();

    progress.step(1, STEPS, "Deployments, Pods, Services and Jobs");
    let deployments =
        bounded(timeout, "Deployments", list(Api::<Deployment>::namespaced(c(), ns), sel)).await;
    // Nothing readable at all: say so once instead of a page of failed checks.
    if let Err(ReadError::Failed(why)) = &deployments {
        anyhow::bail!("cannot read the cluster: {why}");
    }
    let pods = bounded(timeout, "Pods", list(Api::<Pod>::namespaced(c(), ns), sel)).await;
    let services = bounded(timeout, "Services", list(Api::<Service>::namespaced(c(), ns), sel)).await;
    let jobs = bounded(timeout, "Jobs", list(Api::<Job>::namespaced(c(), ns), sel)).await;
    let config_maps = bounded(timeout, "ConfigMaps", list(Api::<ConfigMap>::namespaced(c(), ns), sel)).await;

    progress.step(2, STEPS, "PodDisruptionBudgets and HorizontalPodAutoscalers");
    let pdbs =
        bounded(timeout, "PodDisruptionBudgets", list(Api::<PodDisruptionBudget>::namespaced(c(), ns), None))
            .await;
    let hpas = bounded(
        timeout,
        "HorizontalPodAutoscalers",
        list(Api::<HorizontalPodAutoscaler>::namespaced(c(), ns), None),
    )
    .await;

    progress.step(3, STEPS, "KEDA ScaledObjects");
    let so = resource("keda.sh", "v1alpha1", "ScaledObject", "scaledobjects");
    let scaled_objects =
        bounded(timeout, "ScaledObjects", list(Api::<DynamicObject>::namespaced_with(c(), ns, &so), sel))
            .await;

    progress.step(4, STEPS, "Istio PeerAuthentications and AuthorizationPolicies");
    let pa = resource("security.istio.io", "v1", "PeerAuthentication", "peerauthentications");
    let peer_authentications = bounded(
        timeout,
        "PeerAuthentications",
        list(Api::<DynamicObject>::namespaced_with(c(), ns, &pa), sel),
    )
    .await;
    let ap = resource("security.istio.io", "v1", "AuthorizationPolicy", "authorizationpolicies");
    let authorization_policies = bounded(
        timeout,
        "AuthorizationPolicies",
        list(Api::<DynamicObject>::namespaced_with(c(), ns, &ap), sel),
    )
    .await;

    progress.step(5, STEPS, "ServiceAccounts named by the AuthorizationPolicies");
    let mut principals = Vec::new();
    if let Ok(policies) = &authorization_policies {
        let named: BTreeSet<(String, String)> = policies.iter().flat_map(principals_of).collect();
        for (sa_ns, sa) in named {
            let api = Api::<ServiceAccount>::namespaced(c(), &sa_ns);
            let exists = bounded(timeout, "ServiceAccounts", async {
                api.get_opt(&sa).await.map(|found| found.is_some()).map_err(read_error)
            })
            .await;
            principals.push(((sa_ns, sa), exists));
        }
    }

    progress.step(6, STEPS, "Karpenter NodePools");
    let np = resource("karpenter.sh", "v1", "NodePool", "nodepools");
    let node_pools =
        bounded(timeout, "NodePools", list(Api::<DynamicObject>::all_with(c(), &np), None)).await;

    progress.step(7, STEPS, "fluxo's stream and KEDA's metric");
    let names = stream_names(config, config_maps.as_ref().ok().map(Vec::as_slice));
    let redis = config
        .redis_config()
        .map(|settings| fluxo_queue::client(&settings).map_err(|e| ReadError::Failed(e.to_string())));
    let read_stream = |client: fred::prelude::Client| {
        let names = names.clone();
        async move {
            bounded(timeout, "the Redis stream", async {
                fluxo_queue::stream_status(&client, &names)
                    .await
                    .map_err(|e| ReadError::Failed(format!("redis: {e}")))
            })
            .await
        }
    };
    let before = match &redis {
        Some(Ok(client)) => Some(read_stream(client.clone()).await),
        Some(Err(e)) => Some(Err(e.clone())),
        None => None,
    };
    let mut keda_metric = Vec::new();
    if let (Ok(objects), Ok(hpas)) = (&scaled_objects, &hpas) {
        for object in objects {
            let name = object.metadata.name.clone().unwrap_or_default();
            let value = bounded(timeout, "KEDA's metric", keda_value(&client, ns, &name, hpas)).await;
            keda_metric.push((name, value));
        }
    }
    let after = match (&redis, &before) {
        (Some(Ok(client)), Some(Ok(_))) => read_stream(client.clone()).await.ok(),
        _ => None,
    };
    let notifier_group =
        release_setting(config_maps.as_ref().ok().map(Vec::as_slice), "FLUXO_WEBHOOKS__GROUP")
            .unwrap_or_else(|| config.webhooks.group.clone());
    let stream = before.map(|b| {
        b.map(|before| StreamView {
            names: names.clone(),
            notifier_group: notifier_group.clone(),
            before,
            after,
        })
    });

    progress.step(8, STEPS, "the database schema");
    let schema = match &config.database.url {
        Some(_) => Some(bounded(timeout, "the database schema", schema(config)).await),
        None => None,
    };

    Ok(State {
        namespace: namespace.to_owned(),
        release: release.to_owned(),
        deployments,
        pods,
        services,
        jobs,
        pdbs,
        hpas,
        scaled_objects,
        peer_authentications,
        authorization_policies,
        node_pools,
        principals,
        keda_metric,
        stream,
        schema,
    })
}

/// The stream and group the release's pods use (its ConfigMap), else doctor's own settings.
fn stream_names(config: &Config, config_maps: Option<&[ConfigMap]>) -> StreamNames {
    let setting = |key: &str| release_setting(config_maps, key);
    let own = config.stream_names();
    StreamNames::new(
        &setting("FLUXO_CONSOLIDATOR__STREAM").unwrap_or(own.stream),
        &setting("FLUXO_CONSOLIDATOR__GROUP").unwrap_or(own.group),
    )
}

/// A setting of the release's ConfigMap, when it has one (and it is not empty).
fn release_setting(config_maps: Option<&[ConfigMap]>, key: &str) -> Option<String> {
    config_maps?.iter().find_map(|cm| cm.data.as_ref()?.get(key).cloned()).filter(|v| !v.is_empty())
}

/// (namespace, ServiceAccount) of every `<trust domain>/ns/<ns>/sa/<sa>` principal of a policy.
pub(crate) fn principals_of(policy: &DynamicObject) -> Vec<(String, String)> {
    let rules = policy.data.pointer("/spec/rules").and_then(|r| r.as_array()).cloned().unwrap_or_default();
    rules
        .iter()
        .flat_map(|rule| rule.get("from").and_then(|f| f.as_array()).cloned().unwrap_or_default())
        .flat_map(|from| {
            from.pointer("/source/principals").and_then(|p| p.as_array()).cloned().unwrap_or_default()
        })
        .filter_map(|p| p.as_str().and_then(parse_principal))
        .collect()
}

/// `cluster.local/ns/payments/sa/api` → ("payments", "api"); None for wildcards.
pub(crate) fn parse_principal(principal: &str) -> Option<(String, String)> {
    let (_, rest) = principal.split_once("/ns/")?;
    let (ns, sa) = rest.split_once("/sa/")?;
    if ns.is_empty() || sa.is_empty() || ns.contains('*') || sa.contains('*') || sa.contains('/') {
        return None;
    }
    Some((ns.to_owned(), sa.to_owned()))
}

/// KEDA's current value of the metric its HPA for `scaled_object` scales on,
/// from the external metrics API, in milli-units.
async fn keda_value(
    client: &Client,
    ns: &str,
    scaled_object: &str,
    hpas: &[HorizontalPodAutoscaler],
) -> Read<i64> {
    let metric = hpas
        .iter()
        .filter(|h| h.spec.as_ref().is_some_and(|s| s.scale_target_ref.kind == "Deployment"))
        .flat_map(|h| h.spec.as_ref().and_then(|s| s.metrics.clone()).unwrap_or_default())
        .filter_map(|m| m.external)
        .find(|e| {
            e.metric
                .selector
                .as_ref()
                .and_then(|s| s.match_labels.as_ref())
                .and_then(|l| l.get("scaledobject.keda.sh/name"))
                .is_some_and(|n| n == scaled_object)
        })
        .map(|e| e.metric.name)
        .ok_or_else(|| {
            ReadError::Failed(format!("no HPA scales on ScaledObject {scaled_object}'s metric"))
        })?;
    let selector = format!("scaledobject.keda.sh/name={scaled_object}");
    let uri = format!(
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric}?labelSelector={}",
        percent_encode(&selector)
    );
    let request = http::Request::get(uri).body(Vec::new()).map_err(|e| ReadError::Failed(e.to_string()))?;
    let list: serde_json::Value = client.request(request).await.map_err(read_error)?;
    let value = list
        .pointer("/items/0/value")
        .and_then(|v| v.as_str())
        .ok_or_else(|| ReadError::Failed(format!("KEDA returned no value for {metric}")))?;
    quantity_milli(value)
        .ok_or_else(|| ReadError::Failed(format!("KEDA's value {value:?} is not a quantity")))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// A Kubernetes quantity ("12", "1500m", "1.5k", "2M") in milli-units.
pub(crate) fn quantity_milli(q: &str) -> Option<i64> {
    let (number, scale): (&str, i64) = match q.char_indices().last()? {
        (i, 'm') => (&q[..i], 1),
        (i, 'k') => (&q[..i], 1_000_000),
        (i, 'M') => (&q[..i], 1_000_000_000),
        (i, 'G') => (&q[..i], 1_000_000_000_000),
        _ => (q, 1_000),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let whole: i64 = whole.parse().ok()?;
    let mut value = whole.checked_mul(scale)?;
    let mut unit = scale;
    for digit in fraction.chars() {
        unit /= 10;
        value = value.checked_add(i64::from(digit.to_digit(10)?) * unit)?;
    }
    Some(value)
}

async fn schema(config: &Config) -> Read<(bool, bool)> {
    let failed = |e: &dyn fmt::Display| ReadError::Failed(format!("database: {e}"));
    let db = fluxo_db::Db::connect(&config.db_config()).await.map_err(|e| failed(&e))?;
    let ledger = fluxo_db::migration::schema_is_current::<fluxo_ledger::Migrator>(&db)
        .await
        .map_err(|e| failed(&e))?;
    let balance = fluxo_db::migration::schema_is_current::<fluxo_balance::Migrator>(&db)
        .await
        .map_err(|e| failed(&e))?;
    // The ledger target serves the webhook subscriptions too, and is not ready without their schema.
    let subscriptions = fluxo_db::migration::schema_is_current::<fluxo_notifier::Migrator>(&db)
        .await
        .map_err(|e| failed(&e))?;
    Ok((ledger && subscriptions, balance))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_read_exactly() {
        assert_eq!(quantity_milli("12"), Some(12_000));
        assert_eq!(quantity_milli("1500m"), Some(1_500));
        assert_eq!(quantity_milli("1.5k"), Some(1_500_000));
        assert_eq!(quantity_milli("2M"), Some(2_000_000_000));
        assert_eq!(quantity_milli("0"), Some(0));
        assert_eq!(quantity_milli("x"), None);
        assert_eq!(quantity_milli(""), None);
    }

    #[test]
    fn principals_name_a_namespace_and_a_service_account() {
        assert_eq!(parse_principal("cluster.local/ns/pay/sa/api"), Some(("pay".into(), "api".into())));
        assert_eq!(parse_principal("td.example/ns/pay/sa/api"), Some(("pay".into(), "api".into())));
        assert_eq!(parse_principal("*"), None);
        assert_eq!(parse_principal("cluster.local/ns/pay/sa/*"), None);
        assert_eq!(parse_principal("cluster.local/ns/*/sa/api"), None);
    }
}
