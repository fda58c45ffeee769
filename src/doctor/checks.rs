//! The checks, each a pure function of what was read.

use std::collections::{BTreeMap, BTreeSet};

use fluxo_kube::kube::api::DynamicObject;
use fluxo_queue::StreamStatus;
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Pod, PodSpec},
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use super::{
    Check,
    cluster::{ReadError, State},
};

const COMPONENT: &str = "app.kubernetes.io/component";
const VERSION: &str = "app.kubernetes.io/version";
const SCALED_BY: &str = "fluxo.dev/scaled-by";
const NODEPOOL: &str = "karpenter.sh/nodepool";
const PROXY_CONFIG: &str = "proxy.istio.io/config";
/// Targets that have callers and must never be at zero.
const SERVED: [&str; 3] = ["ledger", "balance", "gateway"];

/// Every check, in report order.
pub(crate) fn run(state: &State) -> Vec<Check> {
    vec![
        deployments(state),
        version(state),
        services(state),
        migrations(state),
        consumer_group(state),
        stream_readers(state),
        scaled_object(state),
        keda_lag(state),
        hpa(state),
        pdb(state),
        mesh_mtls(state),
        mesh_injection(state),
        authorization(state),
        node_pools(state),
    ]
}

fn name<K: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>>(
    object: &K,
) -> String {
    object.metadata().name.clone().unwrap_or_default()
}

fn component(deployment: &Deployment) -> &str {
    deployment.metadata.labels.as_ref().and_then(|l| l.get(COMPONENT)).map_or("", String::as_str)
}

fn template_spec(deployment: &Deployment) -> Option<&PodSpec> {
    deployment.spec.as_ref()?.template.spec.as_ref()
}

fn template_labels(deployment: &Deployment) -> BTreeMap<String, String> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

fn template_annotation<'a>(deployment: &'a Deployment, key: &str) -> Option<&'a str> {
    deployment.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref()?.get(key).map(String::as_str)
}

/// The check's answer when a read it needs failed.
fn unreadable(id: &'static str, what: &str, error: &ReadError) -> Check {
    let fix = match error {
        ReadError::Forbidden(_) => {
            format!("doctor needs get/list on {what} in this namespace (see `fluxo doctor --help`)")
        }
        ReadError::NotInstalled => format!("install the component that serves {what}"),
        ReadError::Failed(_) => "check the API server is reachable and try again".to_owned(),
    };
    Check::failed(id, format!("cannot read {what}: {error}"), fix)
}

/// The release's Deployments, or the check to report instead.
fn release_deployments<'a>(state: &'a State, id: &'static str) -> Result<&'a [Deployment], Check> {
    match &state.deployments {
        Err(e) => Err(unreadable(id, "Deployments", e)),
        Ok(d) if d.is_empty() => Err(Check::failed(
            id,
            format!("no Deployments of release {} in namespace {}", state.release, state.namespace),
            "check --release and --namespace (helm list -A shows the releases)",
        )),
        Ok(d) => Ok(d),
    }
}

fn deployments(state: &State) -> Check {
    const ID: &str = "deployments";
    let deployments = match release_deployments(state, ID) {
        Ok(d) => d,
        Err(check) => return check,
    };
    let mut details = Vec::new();
    let mut bad = Vec::new();
    for d in deployments {
        let target = component(d);
        let spec = d.spec.as_ref();
        let status = d.status.clone().unwrap_or_default();
        let want = spec.and_then(|s| s.replicas).unwrap_or(1);
        let available = status.available_replicas.unwrap_or(0);
        let updated = status.updated_replicas.unwrap_or(0);
        let current =
            d.metadata.generation.is_none_or(|g| status.observed_generation.is_some_and(|o| o >= g));
        let stuck = status.conditions.iter().flatten().find(|c| {
            c.type_ == "Progressing" && c.status == "False"
                || c.type_ == "ReplicaFailure" && c.status == "True"
        });
        let line = format!("{}: {available}/{want} available, {updated} updated", name(d));
        if let Some(c) = stuck {
            bad.push(format!(
                "{line}: {} ({})",
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default()
            ));
        } else if want == 0 && SERVED.contains(&target) {
            bad.push(format!("{line}: a served target at zero replicas refuses every call"));
        } else if available < want || updated < want || !current {
            bad.push(format!("{line}: rollout not complete"));
        } else {
            details.push(line);
        }
    }
    if bad.is_empty() {
        Check::passed(ID, format!("{} Deployment(s) available: {}", deployments.len(), details.join("; ")))
            .details(details)
    } else {
        let summary = format!("{} of {} Deployment(s) not available", bad.len(), deployments.len());
        bad.extend(details);
        Check::failed(
            ID,
            summary,
            format!(
                "kubectl -n {} describe deploy -l app.kubernetes.io/instance={}; kubectl get events",
                state.namespace, state.release
            ),
        )
        .details(bad)
    }
}

/// The fluxo container: the first one that is not a mesh proxy.
fn fluxo_image(spec: &PodSpec) -> Option<String> {
    spec.containers.iter().find(|c| c.name != "istio-proxy").and_then(|c| c.image.clone())
}

fn version(state: &State) -> Check {
    const ID: &str = "version";
    let deployments = match release_deployments(state, ID) {
        Ok(d) => d,
        Err(check) => return check,
    };
    // version label + image → where it was seen.
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in deployments {
        let label = template_labels(d).get(VERSION).cloned().unwrap_or_else(|| "?".into());
        let image = template_spec(d).and_then(fluxo_image).unwrap_or_else(|| "?".into());
        seen.entry(format!("{label} ({image})")).or_default().push(format!("deployment/{}", name(d)));
    }
    if let Ok(pods) = &state.pods {
        for pod in pods.iter().filter(|p| is_running(p)) {
            let label = pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(VERSION))
                .cloned()
                .unwrap_or_else(|| "?".into());
            let image = pod.spec.as_ref().and_then(fluxo_image).unwrap_or_else(|| "?".into());
            seen.entry(format!("{label} ({image})")).or_default().push(format!("pod/{}", name(pod)));
        }
    }
    let details: Vec<String> = seen.iter().map(|(v, w)| format!("{v}: {}", w.join(", "))).collect();
    match seen.len() {
        1 => Check::passed(
            ID,
            format!("every Deployment and running pod is on {}", seen.keys().next().map_or("", |s| s)),
        ),
        n => Check::failed(
            ID,
            format!("{n} fluxo versions are running at once"),
            "finish the rollout (kubectl rollout status) or `helm upgrade` every target to one version",
        )
        .details(details),
    }
}

fn is_running(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

fn services(state: &State) -> Check {
    const ID: &str = "services";
    let services = match &state.services {
        Err(e) => return unreadable(ID, "Services", e),
        Ok(s) => s,
    };
    if services.is_empty() {
        return Check::failed(
            ID,
            "the release has no Services: nothing can call fluxo",
            "helm upgrade the release (the chart creates one per served target)",
        );
    }
    let mut bad = Vec::new();
    let mut grpc = 0;
    for service in services {
        for port in service.spec.as_ref().and_then(|s| s.ports.clone()).unwrap_or_default() {
            let target = match &port.target_port {
                Some(IntOrString::String(s)) => s.clone(),
                _ => String::new(),
            };
            if port.name.as_deref() == Some("grpc") || target == "grpc" {
                grpc += 1;
                if port.app_protocol.as_deref() != Some("grpc") {
                    bad.push(format!(
                        "service/{} port {}: appProtocol {:?}, not grpc (the mesh treats it as opaque TCP: no per-call balancing, retries or gRPC status metrics)",
                        name(service),
                        port.port,
                        port.app_protocol.unwrap_or_default()
                    ));
                }
            }
        }
    }
    if bad.is_empty() && grpc > 0 {
        Check::passed(
            ID,
            format!("{grpc} gRPC port(s) on {} Service(s), each with appProtocol: grpc", services.len()),
        )
    } else if grpc == 0 {
        Check::failed(ID, "no Service port of the release serves gRPC", "helm upgrade the release")
    } else {
        Check::failed(
            ID,
            format!("{} gRPC port(s) without appProtocol: grpc", bad.len()),
            "set appProtocol: grpc on the port (helm upgrade restores the chart's Services)",
        )
        .details(bad)
    }
}

fn migrations(state: &State) -> Check {
    const ID: &str = "migrations";
    let mut details = Vec::new();
    let mut bad = Vec::new();
    match &state.jobs {
        Err(e) => return unreadable(ID, "Jobs", e),
        Ok(jobs) => {
            for job in jobs.iter().filter(|j| {
                j.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(COMPONENT))
                    .is_some_and(|c| c == "migrate" || c == "queue-init")
            }) {
                let status = job.status.clone().unwrap_or_default();
                let failed =
                    status.conditions.iter().flatten().any(|c| c.type_ == "Failed" && c.status == "True");
                let line = format!(
                    "job/{}: {} succeeded, {} failed",
                    name(job),
                    status.succeeded.unwrap_or(0),
                    status.failed.unwrap_or(0)
                );
                if failed { bad.push(line) } else { details.push(line) }
            }
        }
    }
    if !bad.is_empty() {
        return Check::failed(
            ID,
            "a hook Job failed",
            format!(
                "kubectl -n {} logs job/<name> shows why; fix it and `helm upgrade` again (the hook reruns)",
                state.namespace
            ),
        )
        .details(bad);
    }
    match &state.schema {
        None => Check::skipped(
            ID,
            "hook Jobs did not fail (a succeeded hook is deleted); the schema is not checked: give doctor the database (FLUXO_DATABASE__URL)",
        )
        .details(details),
        Some(Err(e)) => Check::failed(ID, format!("cannot read the schema: {e}"), "check FLUXO_DATABASE__URL and that the database is reachable from here"),
        Some(Ok((true, true))) => Check::passed(ID, "migrations applied: the ledger's and the read model's schemas are current").details(details),
        Some(Ok((ledger, balance))) => {
            let behind: Vec<&str> = [(ledger, "ledger"), (balance, "read model")].iter().filter(|(ok, _)| !*ok).map(|(_, n)| *n).collect();
            Check::failed(
                ID,
                format!("schema not current: {} (pods answer NOT_SERVING)", behind.join(", ")),
                "run `fluxo migrate` with the release's settings (the chart's pre-upgrade hook: helm upgrade)",
            )
        }
    }
}

fn consumer_group(state: &State) -> Check {
    const ID: &str = "consumer-group";
    match &state.stream {
        None => Check::skipped(ID, "no Redis settings given (FLUXO_REDIS__URL): the group is not checked"),
        Some(Err(e)) => Check::failed(
            ID,
            format!("cannot read the stream: {e}"),
            "check FLUXO_REDIS__URL and that Redis is reachable from here",
        ),
        Some(Ok(view)) => match view.before.group(&view.names.group) {
            Some(g) => Check::passed(
                ID,
                format!(
                    "group {} on stream {}: lag {}, pending {}, {} consumer(s)",
                    g.name,
                    view.names.stream,
                    g.lag.map_or_else(|| "unknown".into(), |l| l.to_string()),
                    g.pending,
                    g.consumers
                ),
            ),
            None => Check::failed(
                ID,
                format!(
                    "consumer group {} does not exist on stream {}: nothing consumes the ledger's events and KEDA cannot read a lag",
                    view.names.group, view.names.stream
                ),
                "run `fluxo queue init` with the release's settings (the chart's hook: helm upgrade)",
            ),
        },
    }
}

/// Every group on the stream has its reader in the release, and the notifier
/// its group: a group nobody reads keeps the consolidators from trimming
/// what it has not consumed (the stream grows without end); a notifier
/// without its group sends nothing.
fn stream_readers(state: &State) -> Check {
    const ID: &str = "stream-readers";
    let Some(Ok(view)) = &state.stream else {
        return Check::skipped(ID, "the stream is not readable (see consumer-group)");
    };
    let Ok(deployments) = &state.deployments else {
        return Check::skipped(ID, "the Deployments are not readable (see deployments)");
    };
    let has = |target: &str| deployments.iter().any(|d| component(d) == target);
    let problems = readers_missing(&view.before, &view.names.group, &view.notifier_group, has("notifier"));
    if problems.is_empty() {
        let groups: Vec<&str> = view.before.groups.iter().map(|g| g.name.as_str()).collect();
        return Check::passed(
            ID,
            format!(
                "every group on stream {} is read by this release: {}",
                view.names.stream,
                groups.join(", ")
            ),
        );
    }
    let fix = if problems.iter().any(|p| p.starts_with("the notifier")) {
        "run `fluxo queue init --notifiers` with the release's settings (the chart's hook does with notifier.enabled)"
    } else {
        "enable what reads the group (notifier.enabled=true for the notifiers' group), or remove a group no \
         target is meant to read: `XGROUP DESTROY <stream> <group>` (its unread entries can then be trimmed)"
    };
    Check::failed(ID, problems.join("; "), fix)
}

/// What [`stream_readers`] finds wrong: groups without a reader, or the
/// notifier without its group.
fn readers_missing(
    status: &StreamStatus,
    consolidators: &str,
    notifiers: &str,
    notifier_deployed: bool,
) -> Vec<String> {
    let mut problems: Vec<String> = status
        .groups
        .iter()
        .filter(|g| g.name != consolidators && !(g.name == notifiers && notifier_deployed))
        .map(|g| {
            let reader =
                if g.name == notifiers { "the notifier is not deployed" } else { "no fluxo target reads it" };
            let unread = match g.lag {
                Some(0) => "every entry written from now on stays unread and keeps".to_owned(),
                Some(n) => format!("{n} entries unread keep"),
                None => "its unread entries keep".to_owned(),
            };
            format!("group {} has no reader ({reader}): {unread} the stream from being trimmed", g.name)
        })
        .collect();
    if notifier_deployed && status.group(notifiers).is_none() {
        problems.push(format!(
            "the notifier is deployed but its group {notifiers} does not exist: no webhook is sent"
        ));
    }
    problems
}

fn consolidator(state: &State) -> Option<&Deployment> {
    state.deployments.as_ref().ok()?.iter().find(|d| component(d) == "consolidator")
}

fn keda_intended(state: &State) -> bool {
    consolidator(state)
        .and_then(|d| d.metadata.annotations.as_ref())
        .and_then(|a| a.get(SCALED_BY))
        .is_some_and(|s| s == "keda")
}

/// The ScaledObject scaling the consolidator Deployment.
fn consolidator_scaled_object(state: &State) -> Option<&DynamicObject> {
    let target = consolidator(state).map(name)?;
    state.scaled_objects.as_ref().ok()?.iter().find(|so| {
        so.data.pointer("/spec/scaleTargetRef/name").and_then(|n| n.as_str()) == Some(target.as_str())
    })
}

fn condition<'a>(object: &'a DynamicObject, type_: &str) -> Option<(&'a str, String)> {
    let conditions = object.data.pointer("/status/conditions")?.as_array()?;
    let c = conditions.iter().find(|c| c.get("type").and_then(|t| t.as_str()) == Some(type_))?;
    let text = |k: &str| c.get(k).and_then(|v| v.as_str()).unwrap_or("");
    Some((text("status"), format!("{} {}", text("reason"), text("message")).trim().to_owned()))
}

fn group_lag(status: &StreamStatus, group: &str) -> Option<(i64, i64)> {
    let g = status.group(group)?;
    Some((g.lag.unwrap_or(0), g.pending))
}

fn scaled_object(state: &State) -> Check {
    const ID: &str = "scaledobject";
    let intended = keda_intended(state);
    if !intended && consolidator_scaled_object(state).is_none() {
        return Check::skipped(
            ID,
            "the release does not scale its consolidators with KEDA (keda.enabled=false)",
        );
    }
    if let Err(e) = &state.scaled_objects {
        return match e {
            ReadError::NotInstalled => Check::failed(
                ID,
                "KEDA is not installed (no ScaledObject API) but the release expects it",
                "install KEDA (keda/README.md) or set keda.enabled=false",
            ),
            e => unreadable(ID, "ScaledObjects", e),
        };
    }
    let Some(so) = consolidator_scaled_object(state) else {
        return Check::failed(
            ID,
            "no ScaledObject scales the consolidators: they stay at whatever replica count they had (zero: events are not consolidated)",
            "helm upgrade the release to recreate it",
        );
    };
    let so_name = so.metadata.name.clone().unwrap_or_default();
    let (ready, why) = condition(so, "Ready").unwrap_or(("Unknown", "no Ready condition yet".into()));
    if ready != "True" {
        return Check::failed(
            ID,
            format!("ScaledObject {so_name} is not Ready: {why}"),
            format!(
                "kubectl -n {} describe scaledobject {so_name}; the KEDA operator's log says why",
                state.namespace
            ),
        );
    }
    let (active, _) = condition(so, "Active").unwrap_or(("Unknown", String::new()));
    let lag = state
        .stream
        .as_ref()
        .and_then(|s| s.as_ref().ok())
        .and_then(|v| group_lag(&v.before, &v.names.group));
    let activation = trigger(so, "lag").and_then(|t| meta_int(t, "activationLagCount")).unwrap_or(0);
    match lag {
        Some((lag, pending)) if (lag > activation || pending > 0) && active != "True" => Check::failed(
            ID,
            format!(
                "ScaledObject {so_name} is Ready but not Active while the group has lag {lag}, pending {pending}"
            ),
            "KEDA does not see the work fluxo sees: check the trigger's stream, group and address (the keda-lag check)",
        ),
        Some((lag, pending)) => Check::passed(
            ID,
            format!("ScaledObject {so_name} Ready, Active {active} (lag {lag}, pending {pending})"),
        ),
        None => Check::passed(ID, format!("ScaledObject {so_name} Ready, Active {active}")),
    }
}

fn trigger<'a>(so: &'a DynamicObject, name: &str) -> Option<&'a serde_json::Value> {
    so.data
        .pointer("/spec/triggers")?
        .as_array()?
        .iter()
        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
}

fn meta_int(trigger: &serde_json::Value, key: &str) -> Option<i64> {
    trigger.pointer(&format!("/metadata/{key}"))?.as_str()?.parse().ok()
}

fn meta_str<'a>(trigger: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    trigger.pointer(&format!("/metadata/{key}"))?.as_str()
}

/// fluxo's value of the chart's formula, max(lag, pending × lagCount / pendingEntriesCount), in milli-units.
fn fluxo_value(
    status: &StreamStatus,
    group: &str,
    lag_count: i64,
    pending_count: Option<i64>,
) -> Option<i64> {
    let (lag, pending) = group_lag(status, group)?;
    let by_pending = match pending_count {
        Some(p) if p > 0 => pending.saturating_mul(1000).saturating_mul(lag_count) / p,
        _ => 0,
    };
    Some(lag.saturating_mul(1000).max(by_pending))
}

fn keda_lag(state: &State) -> Check {
    const ID: &str = "keda-lag";
    let Some(so) = consolidator_scaled_object(state) else {
        return Check::skipped(ID, "no ScaledObject (see the scaledobject check)");
    };
    let so_name = so.metadata.name.clone().unwrap_or_default();
    let Some(view) = state.stream.as_ref().and_then(|s| s.as_ref().ok()) else {
        return Check::skipped(ID, "fluxo's own lag is unknown (no readable Redis: see consumer-group)");
    };
    let Some(lag_trigger) = trigger(so, "lag")
        .or_else(|| so.data.pointer("/spec/triggers").and_then(|t| t.as_array()).and_then(|t| t.first()))
    else {
        return Check::failed(
            ID,
            format!("ScaledObject {so_name} has no trigger"),
            "helm upgrade the release",
        );
    };
    let (stream, group) =
        (meta_str(lag_trigger, "stream").unwrap_or(""), meta_str(lag_trigger, "consumerGroup").unwrap_or(""));
    if stream != view.names.stream || group != view.names.group {
        return Check::failed(
            ID,
            format!(
                "KEDA reads stream {stream:?} group {group:?}, fluxo consumes stream {:?} group {:?}",
                view.names.stream, view.names.group
            ),
            "set config.consolidator.stream/group once (the chart gives both to the ScaledObject and the pods) and helm upgrade",
        );
    }
    let Some((_, keda)) = state.keda_metric.iter().find(|(n, _)| *n == so_name) else {
        return Check::skipped(ID, "KEDA's metric was not read");
    };
    let keda = match keda {
        Ok(v) => *v,
        Err(e) => {
            return Check::failed(
                ID,
                format!("KEDA cannot give its lag metric: {e}"),
                "check KEDA's metrics API server (kubectl get apiservice v1beta1.external.metrics.k8s.io) and its log",
            );
        }
    };
    let lag_count = meta_int(lag_trigger, "lagCount").unwrap_or(5);
    let pending_count = trigger(so, "pending").and_then(|t| meta_int(t, "pendingEntriesCount"));
    let samples: Vec<i64> = [Some(&view.before), view.after.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|s| fluxo_value(s, group, lag_count, pending_count))
        .collect();
    let (Some(low), Some(high)) = (samples.iter().min(), samples.iter().max()) else {
        return Check::skipped(ID, "fluxo's group is missing (see consumer-group)");
    };
    // Agreement within one replica's worth of lag, around fluxo's readings
    // taken just before and after KEDA's.
    let slack = lag_count.saturating_mul(1000);
    let shown = |m: i64| format!("{}.{:03}", m / 1000, m % 1000);
    if keda >= low - slack && keda <= high + slack {
        Check::passed(
            ID,
            format!(
                "KEDA's metric {} agrees with fluxo's {} (within lagCount {lag_count})",
                shown(keda),
                shown(*high)
            ),
        )
    } else {
        Check::failed(
            ID,
            format!(
                "KEDA's metric {} disagrees with fluxo's {}–{} (more than lagCount {lag_count} apart)",
                shown(keda),
                shown(*low),
                shown(*high)
            ),
            "KEDA reads another Redis or a stale value: check the trigger's address (Secret key or keda.redis.address) and the operator's log",
        )
    }
}

fn hpa(state: &State) -> Check {
    const ID: &str = "hpa";
    let hpas = match &state.hpas {
        Err(e) => return unreadable(ID, "HorizontalPodAutoscalers", e),
        Ok(h) => h,
    };
    let targets: BTreeSet<String> =
        state.deployments.as_ref().map(|d| d.iter().map(name).collect()).unwrap_or_default();
    let mine: Vec<_> = hpas
        .iter()
        .filter(|h| {
            h.spec.as_ref().is_some_and(|s| {
                s.scale_target_ref.kind == "Deployment" && targets.contains(&s.scale_target_ref.name)
            })
        })
        .collect();
    if mine.is_empty() {
        return Check::skipped(ID, "no HorizontalPodAutoscaler scales the release's Deployments");
    }
    let mut details = Vec::new();
    let mut bad = Vec::new();
    for h in mine {
        let status = h.status.clone().unwrap_or_default();
        let current = status.current_replicas.unwrap_or(0);
        let desired = status.desired_replicas;
        let failing = status.conditions.iter().flatten().find(|c| {
            c.status == "False"
                && (c.type_ == "AbleToScale"
                    || c.type_ == "ScalingActive" && c.reason.as_deref() != Some("ScalingDisabled"))
        });
        let line = format!("hpa/{}: current {current}, desired {desired}", name(h));
        match failing {
            Some(c) => bad.push(format!(
                "{line}: {} {} ({})",
                c.type_,
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default()
            )),
            None if current != desired => details.push(format!("{line} (scaling)")),
            None => details.push(line),
        }
    }
    if bad.is_empty() {
        Check::passed(ID, details.join("; "))
    } else {
        Check::failed(
            ID,
            format!("{} HPA(s) cannot scale", bad.len()),
            "kubectl describe hpa shows the metric error; for KEDA's, see the keda-lag check",
        )
        .details(bad)
    }
}

fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else { return false };
    let matched = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    matched && expressions
}

/// Why `pdb` can never let an eviction through for a Deployment of `replicas`, if it cannot.
fn blocks_every_eviction(pdb: &PodDisruptionBudget, replicas: i32, scales_to_zero: bool) -> Option<String> {
    let spec = pdb.spec.as_ref()?;
    let status = pdb.status.as_ref();
    let zero = |v: &IntOrString| {
        matches!(v, IntOrString::Int(0)) || matches!(v, IntOrString::String(s) if s.trim() == "0%")
    };
    if let Some(max) = &spec.max_unavailable
        && zero(max)
    {
        return Some("maxUnavailable is 0".into());
    }
    match &spec.min_available {
        Some(IntOrString::String(s)) if s.trim() == "100%" => return Some("minAvailable is 100%".into()),
        Some(IntOrString::Int(min)) if *min >= replicas && replicas > 0 => {
            return Some(format!("minAvailable {min} ≥ the {replicas} replica(s) it protects"));
        }
        Some(IntOrString::Int(min)) if *min >= 1 && scales_to_zero => {
            return Some(format!(
                "minAvailable {min} on a target that scales to zero: its last pods can never be evicted"
            ));
        }
        _ => {}
    }
    let status = status?;
    (status.disruptions_allowed == 0
        && status.expected_pods > 0
        && status.current_healthy >= status.desired_healthy)
        .then(|| format!("0 disruptions allowed with all {} pod(s) healthy", status.current_healthy))
}

fn pdb(state: &State) -> Check {
    const ID: &str = "pdb";
    let pdbs = match &state.pdbs {
        Err(e) => return unreadable(ID, "PodDisruptionBudgets", e),
        Ok(p) => p,
    };
    let Ok(deployments) = &state.deployments else { return Check::skipped(ID, "no Deployments read") };
    let mut details = Vec::new();
    let mut bad = Vec::new();
    for pdb in pdbs {
        let selector = pdb.spec.as_ref().and_then(|s| s.selector.as_ref());
        for d in deployments.iter().filter(|d| selects(selector, &template_labels(d))) {
            let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let scales_to_zero =
                d.metadata.annotations.as_ref().and_then(|a| a.get(SCALED_BY)).is_some_and(|s| s == "keda");
            match blocks_every_eviction(pdb, replicas, scales_to_zero) {
                Some(why) => bad.push(format!("pdb/{} on deployment/{}: {why}", name(pdb), name(d))),
                None => details.push(format!("pdb/{} on deployment/{}", name(pdb), name(d))),
            }
        }
    }
    if !bad.is_empty() {
        Check::failed(
            ID,
            format!("{} PodDisruptionBudget(s) block every eviction: node drains (Karpenter consolidation, upgrades) hang", bad.len()),
            "use maxUnavailable ≥ 1 (the chart's pdb.maxUnavailable) and delete PDBs that require every pod",
        )
        .details(bad)
    } else if details.is_empty() {
        Check::skipped(ID, "no PodDisruptionBudget covers the release's pods")
    } else {
        Check::passed(ID, format!("{} PodDisruptionBudget(s) allow evictions", details.len()))
            .details(details)
    }
}

fn mesh_on(state: &State) -> bool {
    state.deployments.as_ref().is_ok_and(|d| d.iter().any(|d| template_annotation(d, PROXY_CONFIG).is_some()))
}

fn mesh_mtls(state: &State) -> Check {
    const ID: &str = "mesh-mtls";
    if !mesh_on(state) {
        return Check::skipped(ID, "the release runs without the mesh (istio.enabled=false)");
    }
    let pas = match &state.peer_authentications {
        Err(ReadError::NotInstalled) => {
            return Check::failed(
                ID,
                "the release expects Istio but its APIs are not served",
                "install Istio (istio/README.md) or set istio.enabled=false",
            );
        }
        Err(e) => return unreadable(ID, "PeerAuthentications", e),
        Ok(p) => p,
    };
    let strict: Vec<String> = pas
        .iter()
        .filter(|pa| pa.data.pointer("/spec/mtls/mode").and_then(|m| m.as_str()) == Some("STRICT"))
        .filter_map(|pa| pa.metadata.name.clone())
        .collect();
    if strict.is_empty() {
        Check::failed(
            ID,
            "no STRICT PeerAuthentication covers the release: plain-text callers reach fluxo",
            "set istio.strictMtls=true and helm upgrade (or apply a STRICT PeerAuthentication)",
        )
    } else {
        Check::passed(ID, format!("mTLS STRICT ({})", strict.join(", ")))
    }
}

fn injected(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    let named = |c: &k8s_openapi::api::core::v1::Container| c.name == "istio-proxy";
    spec.is_some_and(|s| s.containers.iter().any(named) || s.init_containers.iter().flatten().any(named))
}

fn mesh_injection(state: &State) -> Check {
    const ID: &str = "mesh-injection";
    if !mesh_on(state) {
        return Check::skipped(ID, "the release runs without the mesh");
    }
    let pods = match &state.pods {
        Err(e) => return unreadable(ID, "Pods", e),
        Ok(p) => p,
    };
    // Pods that run or are about to (not finished Job pods, not those going away).
    let live: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
        })
        .collect();
    let missing: Vec<String> = live
        .iter()
        .filter(|p| !injected(p))
        .map(|p| format!("pod/{} has no istio-proxy", name(*p)))
        .collect();
    if missing.is_empty() {
        Check::passed(ID, format!("all {} pod(s) have the Istio sidecar", live.len()))
    } else {
        Check::failed(
            ID,
            format!("{} of {} pod(s) are not in the mesh: STRICT mTLS refuses their calls and they bypass the AuthorizationPolicies", missing.len(), live.len()),
            format!("label the namespace (kubectl label ns {} istio-injection=enabled, or istio.io/rev) and restart the pods", state.namespace),
        )
        .details(missing)
    }
}

fn authorization(state: &State) -> Check {
    const ID: &str = "authorization";
    if !mesh_on(state) {
        return Check::skipped(ID, "the release runs without the mesh");
    }
    let policies = match &state.authorization_policies {
        Err(e) => return unreadable(ID, "AuthorizationPolicies", e),
        Ok(p) => p,
    };
    let mut bad = Vec::new();
    let mut good = 0;
    for ((ns, sa), exists) in &state.principals {
        let users: Vec<String> = policies
            .iter()
            .filter(|p| super::cluster::principals_of(p).iter().any(|(n, s)| n == ns && s == sa))
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        match exists {
            Ok(true) => good += 1,
            Ok(false) => {
                bad.push(format!("serviceaccount {ns}/{sa} (named by {}) does not exist", users.join(", ")))
            }
            Err(e) => bad.push(format!("serviceaccount {ns}/{sa}: cannot read ({e})")),
        }
    }
    if bad.is_empty() {
        Check::passed(
            ID,
            format!("{} AuthorizationPolicy(ies) name {good} existing ServiceAccount(s)", policies.len()),
        )
    } else {
        Check::failed(
            ID,
            format!("{} principal(s) name no existing ServiceAccount: those callers are refused", bad.len()),
            "fix istio.internalCallers / istio.ingress.principal (cluster.local/ns/<ns>/sa/<name>) and helm upgrade",
        )
        .details(bad)
    }
}

fn node_pools(state: &State) -> Check {
    const ID: &str = "nodepools";
    let wanted: BTreeSet<String> = state
        .deployments
        .as_ref()
        .map(|ds| {
            ds.iter()
                .filter_map(|d| template_spec(d)?.node_selector.as_ref()?.get(NODEPOOL).cloned())
                .collect()
        })
        .unwrap_or_default();
    if wanted.is_empty() {
        return Check::skipped(ID, "the release does not pin Karpenter NodePools (karpenter.enabled=false)");
    }
    let pools = match &state.node_pools {
        Err(ReadError::NotInstalled) => {
            return Check::failed(
                ID,
                "the release's pods select Karpenter NodePools but Karpenter is not installed",
                "install Karpenter and karpenter/nodepools.yaml, or set karpenter.enabled=false",
            );
        }
        Err(e) => return unreadable(ID, "NodePools", e),
        Ok(p) => p,
    };
    let mut bad = Vec::new();
    let mut good = Vec::new();
    for pool in &wanted {
        match pools.iter().find(|p| p.metadata.name.as_deref() == Some(pool)) {
            None => bad.push(format!("nodepool/{pool} does not exist: pods selecting it stay Pending")),
            Some(p) => match condition(p, "Ready") {
                Some(("True", _)) => good.push(pool.clone()),
                Some((_, why)) => bad.push(format!("nodepool/{pool} is not Ready: {why}")),
                None => bad.push(format!("nodepool/{pool} has no Ready condition")),
            },
        }
    }
    if bad.is_empty() {
        Check::passed(ID, format!("NodePools Ready: {}", good.join(", ")))
    } else {
        Check::failed(
            ID,
            format!("{} NodePool(s) the release needs are not Ready", bad.len()),
            "kubectl apply -f karpenter/nodepools.yaml; kubectl describe nodepool shows why one is not Ready",
        )
        .details(bad)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::policy::v1::{PodDisruptionBudgetSpec, PodDisruptionBudgetStatus};

    use super::*;

    fn pdb(
        max: Option<IntOrString>,
        min: Option<IntOrString>,
        status: Option<(i32, i32, i32, i32)>,
    ) -> PodDisruptionBudget {
        PodDisruptionBudget {
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: max,
                min_available: min,
                ..Default::default()
            }),
            status: status.map(|(allowed, healthy, desired, expected)| PodDisruptionBudgetStatus {
                disruptions_allowed: allowed,
                current_healthy: healthy,
                desired_healthy: desired,
                expected_pods: expected,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_pdb_that_can_never_let_a_pod_go_is_told_from_one_that_can() {
        assert!(blocks_every_eviction(&pdb(Some(IntOrString::Int(0)), None, None), 2, false).is_some());
        assert!(
            blocks_every_eviction(&pdb(Some(IntOrString::String("0%".into())), None, None), 2, false)
                .is_some()
        );
        assert!(blocks_every_eviction(&pdb(None, Some(IntOrString::Int(2)), None), 2, false).is_some());
        assert!(blocks_every_eviction(&pdb(None, Some(IntOrString::Int(1)), None), 3, true).is_some());
        assert!(
            blocks_every_eviction(&pdb(None, Some(IntOrString::String("100%".into())), None), 3, false)
                .is_some()
        );
        assert!(blocks_every_eviction(&pdb(None, None, Some((0, 2, 2, 2))), 2, false).is_some());
        // Healthy: one may go; or zero allowed only because a pod is already down.
        assert!(
            blocks_every_eviction(&pdb(Some(IntOrString::Int(1)), None, Some((1, 2, 1, 2))), 2, false)
                .is_none()
        );
        assert!(
            blocks_every_eviction(&pdb(Some(IntOrString::Int(1)), None, Some((0, 1, 2, 2))), 2, false)
                .is_none()
        );
        assert!(blocks_every_eviction(&pdb(None, Some(IntOrString::Int(1)), None), 3, false).is_none());
    }

    #[test]
    fn a_group_nobody_in_the_release_reads_is_named_and_so_is_a_notifier_without_its_group() {
        let group = |name: &str, lag| fluxo_queue::GroupInfo {
            name: name.into(),
            lag: Some(lag),
            pending: 0,
            consumers: 0,
            last_delivered: None,
        };
        let status = |groups| StreamStatus { length: 10, groups, dead_letters: 0 };
        let both = status(vec![group("consolidators", 0), group("notifiers", 7)]);
        assert!(readers_missing(&both, "consolidators", "notifiers", true).is_empty());
        let unread = readers_missing(&both, "consolidators", "notifiers", false);
        assert_eq!(unread.len(), 1);
        assert!(
            unread[0].contains("group notifiers") && unread[0].contains("notifier is not deployed"),
            "{unread:?}"
        );
        assert!(unread[0].contains("7 entries"), "{unread:?}");
        let stray = status(vec![group("consolidators", 0), group("old-reporting", 3)]);
        let found = readers_missing(&stray, "consolidators", "notifiers", false);
        assert!(
            found.len() == 1 && found[0].contains("old-reporting") && found[0].contains("no fluxo target"),
            "{found:?}"
        );
        let alone = status(vec![group("consolidators", 0)]);
        let missing = readers_missing(&alone, "consolidators", "notifiers", true);
        assert!(
            missing.len() == 1 && missing[0].contains("its group notifiers does not exist"),
            "{missing:?}"
        );
        assert!(readers_missing(&alone, "consolidators", "notifiers", false).is_empty());
    }

    #[test]
    fn the_formula_keda_scales_on_is_recomputed_from_fluxos_readings() {
        let status = |lag, pending| StreamStatus {
            length: 0,
            groups: vec![fluxo_queue::GroupInfo {
                name: "g".into(),
                lag: Some(lag),
                pending,
                consumers: 1,
                last_delivered: None,
            }],
            dead_letters: 0,
        };
        assert_eq!(fluxo_value(&status(120, 0), "g", 100, Some(500)), Some(120_000));
        // 1000 pending at 100 lag per 500 pending = 200.
        assert_eq!(fluxo_value(&status(0, 1000), "g", 100, Some(500)), Some(200_000));
        assert_eq!(fluxo_value(&status(7, 1000), "g", 100, None), Some(7_000));
        assert_eq!(fluxo_value(&status(7, 0), "other", 100, None), None);
    }
}
