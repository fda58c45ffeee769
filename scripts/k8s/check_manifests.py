#!/usr/bin/env python3
"""Invariants over manifests rendered by `helm template` (one values file per call).

  check_manifests.py --manifests FILE --namespace NS --keda-zip ZIP [--istio-zip ZIP] [--label NAME]

Each assertion on each object is one check. Prints one line per failure and, last,
"CHECKS passed=<n> failed=<m>". Exit status 1 when anything failed.

The redis-streams trigger metadata keys (and TriggerAuthentication parameters) are not
constrained by KEDA's CRD schema (metadata is a map of strings), so they are checked against
the `keda:"name=..."` tags of the scaler's Go source, read from the KEDA module zip fetched
through the Go module proxy: a misspelled key fails here. When --istio-zip is given (istioctl
unavailable), VirtualService retryOn policies are checked against the list in Istio's
validation source the same way.
"""

import argparse
import json
import re
import sys
import zipfile

import yaml

SECRETISH = re.compile(r"(PASSWORD|SECRET|TOKEN|CREDENTIAL|PRIVATE_KEY|_URL$|__URL$)")
CREDENTIAL_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@", re.I)
KEY_MATERIAL = re.compile(r"-----BEGIN [A-Z ]*(PRIVATE KEY|CERTIFICATE)-----|\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.")
PRINCIPAL = re.compile(r"^(?P<td>[^/]+)/ns/(?P<ns>[^/]+)/sa/(?P<sa>[^/]+)$")
WORKLOAD_KINDS = ("Deployment", "Job", "CronJob", "Pod", "StatefulSet", "DaemonSet")
# PriorityClasses every cluster has; any other name must be rendered by the chart.
BUILTIN_PRIORITY_CLASSES = {"system-cluster-critical", "system-node-critical"}
GRPCURL_REFLECTION = {"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                      "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"}
CA_BUNDLE_PATH = "/etc/fluxo/tls/ca.pem"


class Checks:
    def __init__(self, label):
        self.label = label
        self.passed = 0
        self.failed = 0

    def check(self, ok, what):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            print(f"FAIL [{self.label}] {what}")
        return ok


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def pod_template(doc):
    if doc.get("kind") == "CronJob":
        return doc.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {})
    return doc.get("spec", {}).get("template", {})


def pod_spec(doc):
    kind = doc.get("kind")
    if kind == "Pod":
        return doc.get("spec", {})
    if kind in WORKLOAD_KINDS:
        return pod_template(doc).get("spec", {})
    return None


def pod_meta(doc):
    if doc.get("kind") == "Pod":
        return doc.get("metadata", {})
    return pod_template(doc).get("metadata", {})


def containers(spec):
    for c in spec.get("containers", []) or []:
        yield c, False
    for c in spec.get("initContainers", []) or []:
        yield c, True


def image_repo_of(docs):
    """The fluxo image repository (the one the Deployments run)."""
    for d in docs:
        if d.get("kind") == "Deployment":
            image = pod_spec(d)["containers"][0].get("image", "")
            return image.split("@")[0].split(":")[0]
    return None


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------- KEDA / Istio source facts


def keda_fields(zip_path):
    """{(struct, ...)}: keys accepted by the redis-streams scaler, from its Go struct tags."""
    with zipfile.ZipFile(zip_path) as zf:
        def src(suffix):
            names = [n for n in zf.namelist() if n.endswith(suffix)]
            if len(names) != 1:
                sys.exit(f"check_manifests.py: {suffix} not found once in {zip_path}")
            return zf.read(names[0]).decode()

        streams = src("/pkg/scalers/redis_streams_scaler.go")
        common = src("/pkg/scalers/redis_scaler.go")

    def struct_tags(source, struct):
        m = re.search(r"type " + struct + r" struct \{(.*?)\n\}", source, re.S)
        if not m:
            sys.exit(f"check_manifests.py: struct {struct} not found in KEDA source")
        out = []
        for line in m.group(1).splitlines():
            t = re.search(r'`keda:"([^"]*)"`', line)
            if not t:
                continue
            opts = [o.strip() for o in t.group(1).split(",")]
            kv = dict(o.split("=", 1) for o in opts if "=" in o)
            flags = {o for o in opts if "=" not in o}
            if "name" not in kv:
                continue
            out.append({
                "names": kv["name"].split(";"),
                "order": kv.get("order", "").split(";"),
                "required": "optional" not in flags and "default" not in kv,
            })
        return out

    own = struct_tags(streams, "redisStreamsMetadata")
    # The connection struct is embedded as optional: its fields are never required on their own.
    conn = [dict(f, required=False) for f in struct_tags(common, "redisConnectionInfo")]
    meta, auth, required = set(), set(), []
    for f in own + conn:
        if "triggerMetadata" in f["order"]:
            meta.update(f["names"])
        if "resolvedEnv" in f["order"]:
            meta.update(n + "FromEnv" for n in f["names"])
        if "authParams" in f["order"]:
            auth.update(f["names"])
        if f["required"] and "triggerMetadata" in f["order"]:
            required.append(f["names"])
    return meta, auth, required


def istio_retry_policies(zip_path):
    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if n.endswith("/pkg/config/validation/validation.go")]
        if len(names) != 1:
            sys.exit("check_manifests.py: Istio validation.go not found")
        source = zf.read(names[0]).decode()
    m = re.search(r"supportedRetryOnPolicies = sets\.New\((.*?)\n\t\)", source, re.S)
    if not m:
        sys.exit("check_manifests.py: supportedRetryOnPolicies not found in Istio source")
    return set(re.findall(r'"([a-z0-9-]+)"', m.group(1)))


# ---------------------------------------------------------------------------------- checks


def duration_s(value):
    """Seconds of an Istio duration ("2s", "1.5s", "500ms", "1m30s"); None when unset."""
    if not value:
        return None
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)(ms|h|m|s)", str(value))
    if not parts or "".join(n + u for n, u in parts) != str(value):
        sys.exit(f"check_manifests.py: cannot read the duration {value!r}")
    return sum(float(n) * units[u] for n, u in parts)


# Long-lived calls: exports of any size and watches without end. The route they take must not
# have a timeout (Istio's 0s), or the mesh cuts them mid-stream.
STREAM_RPCS = {
    "fluxo.ledger.v1": ["/fluxo.ledger.v1.LedgerService/ExportEntries", "/fluxo.ledger.v1.LedgerService/WatchEntries"],
    "fluxo.balance.v1": ["/fluxo.balance.v1.BalanceService/ExportDailyBalances",
                         "/fluxo.balance.v1.BalanceService/WatchDailyBalances"],
}
STREAM_REST = ["/v1/merchants/m-1/entries:export", "/v1/merchants/m-1/balances:export"]


def route_for(vs, path):
    """The first HTTP route of a VirtualService that `path` takes (Istio's uri matches)."""
    for route in vs["spec"].get("http", []) or []:
        matches = route.get("match") or [{}]
        for m in matches:
            uri = m.get("uri") or {}
            if (not uri or uri.get("exact") == path or ("prefix" in uri and path.startswith(uri["prefix"]))
                    or ("regex" in uri and re.fullmatch(uri["regex"], path))):
                return route
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifests", required=True)
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--keda-zip", required=True)
    ap.add_argument("--istio-zip")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    c = Checks(args.label or args.manifests)

    with open(args.manifests) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    get = lambda kind: by_kind.get(kind, [])  # noqa: E731

    ns = args.namespace
    sa_names = {d["metadata"]["name"] for d in get("ServiceAccount")}
    deployments = {d["metadata"]["name"]: d for d in get("Deployment")}
    configmaps = {d["metadata"]["name"]: d for d in get("ConfigMap")}
    rollouts = {r["metadata"]["name"]: r for r in get("Rollout")}

    c.check(len(deployments) >= 1, "at least one Deployment rendered")

    # -- no secret material ------------------------------------------------------------
    c.check(not get("Secret"), "the chart renders no Secret (it only references existing ones)")

    def walk_strings(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk_strings(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk_strings(v, f"{path}[{i}]")
        elif isinstance(node, str):
            yield path, node

    for d in docs:
        leaked = [p for p, s in walk_strings(d, name_of(d)) if CREDENTIAL_URL.search(s)]
        c.check(not leaked, f"{name_of(d)}: no URL with embedded credentials ({leaked})")
        keys = [p for p, s in walk_strings(d, name_of(d)) if KEY_MATERIAL.search(s)]
        c.check(not keys, f"{name_of(d)}: no PEM keys, certificates or JWTs ({keys})")
    for cm in configmaps.values():
        bad = [k for k in (cm.get("data") or {}) if SECRETISH.search(k)]
        c.check(not bad, f"{name_of(cm)}: no secret-looking keys in a ConfigMap ({bad})")

    # -- workloads ---------------------------------------------------------------------
    for d in docs:
        spec = pod_spec(d)
        if spec is None:
            continue
        meta = pod_meta(d)
        psc = spec.get("securityContext") or {}
        sa = spec.get("serviceAccountName")
        if spec.get("automountServiceAccountToken") is False:
            c.check(True, f"{name_of(d)}: automountServiceAccountToken false")
        else:
            # Only the consolidators hold a token, to patch their own pod-deletion cost: their
            # ServiceAccount is bound to one Role that allows patch on pods and nothing else.
            rules = [r.get("rules") for b in get("RoleBinding")
                     if any(s_.get("kind") == "ServiceAccount" and s_.get("name") == sa for s_ in b.get("subjects") or [])
                     for r in get("Role") if r["metadata"]["name"] == b["roleRef"]["name"]]
            least = [[{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]]
            c.check(d["metadata"]["name"].endswith("-consolidator") and rules == least,
                    f"{name_of(d)}: a mounted token only for the consolidator, whose Role is patch on pods alone "
                    f"(bound rules: {rules})")
        c.check(sa in sa_names, f"{name_of(d)}: serviceAccountName {sa!r} is rendered by the chart")
        for ctr, is_init in containers(spec):
            cid = f"{name_of(d)} container {ctr['name']}"
            res = ctr.get("resources") or {}
            c.check(bool((res.get("requests") or {}).get("cpu")) and bool((res.get("requests") or {}).get("memory")),
                    f"{cid}: cpu and memory requests")
            c.check(bool((res.get("limits") or {}).get("memory")), f"{cid}: memory limit")
            sc = ctr.get("securityContext") or {}
            eff = lambda k: sc.get(k, psc.get(k))  # noqa: E731
            c.check(eff("runAsNonRoot") is True, f"{cid}: runAsNonRoot")
            c.check(sc.get("readOnlyRootFilesystem") is True, f"{cid}: readOnlyRootFilesystem")
            c.check(sc.get("allowPrivilegeEscalation") is False, f"{cid}: allowPrivilegeEscalation false")
            c.check("ALL" in ((sc.get("capabilities") or {}).get("drop") or []) and
                    not (sc.get("capabilities") or {}).get("add"), f"{cid}: capabilities drop ALL, add none")
            c.check(((eff("seccompProfile") or {}).get("type")) == "RuntimeDefault", f"{cid}: seccompProfile RuntimeDefault")
            c.check(not sc.get("privileged"), f"{cid}: not privileged")
            for env in ctr.get("env", []) or []:
                # Service URLs inside the cluster carry no credentials; any URL with one must come from a Secret.
                plain_url = env["name"].endswith("_URL") and "value" in env and "@" not in str(env.get("value"))
                if SECRETISH.search(env["name"]) and not env["name"].endswith("_FILE") and not plain_url:
                    c.check("valueFrom" in env and "secretKeyRef" in env["valueFrom"],
                            f"{cid}: env {env['name']} comes from a Secret, not a literal")
        # Completes / drains inside the mesh.
        labels = meta.get("labels") or {}
        ann = meta.get("annotations") or {}
        if labels.get("sidecar.istio.io/inject") == "true":
            if d["kind"] in ("Job", "CronJob", "Pod"):
                c.check(ann.get("sidecar.istio.io/nativeSidecar") == "true",
                        f"{name_of(d)}: injected run-to-completion pod uses a native sidecar (completes)")
            else:
                c.check(ann.get("sidecar.istio.io/nativeSidecar") == "true" or
                        "EXIT_ON_ZERO_ACTIVE_CONNECTIONS" in ann.get("proxy.istio.io/config", ""),
                        f"{name_of(d)}: proxy outlives the app's drain (native sidecar or EXIT_ON_ZERO_ACTIVE_CONNECTIONS)")

    # -- PriorityClasses: the API server refuses a pod naming one that does not exist ----
    priority_classes = {p["metadata"]["name"] for p in get("PriorityClass")}
    for d in docs:
        spec = pod_spec(d)
        if spec is None or not spec.get("priorityClassName"):
            continue
        pc = spec["priorityClassName"]
        c.check(pc in priority_classes or pc in BUILTIN_PRIORITY_CLASSES,
                f"{name_of(d)}: priorityClassName {pc!r} is rendered by the chart (priorityClass.create) or built in")

    # -- CA bundle: every fluxo container sees the same trust, and what points at it exists --
    fluxo_ctrs = []
    for d in docs:
        spec = pod_spec(d)
        if spec is None:
            continue
        for ctr, _ in containers(spec):
            if (ctr.get("image") or "").split("@")[0].split(":")[0] == image_repo_of(docs):
                fluxo_ctrs.append((d, spec, ctr))
    mounts_ca = lambda spec, ctr: any(  # noqa: E731
        m.get("mountPath") == CA_BUNDLE_PATH.rsplit("/", 1)[0] and any(
            v.get("name") == m.get("name") and (v.get("configMap") or v.get("secret")) for v in spec.get("volumes", []) or [])
        for m in ctr.get("volumeMounts", []) or [])
    with_ca = [(d, ctr) for d, spec, ctr in fluxo_ctrs if mounts_ca(spec, ctr)]
    if with_ca:
        for d, spec, ctr in fluxo_ctrs:
            c.check(mounts_ca(spec, ctr),
                    f"{name_of(d)} container {ctr['name']}: mounts the CA bundle at {CA_BUNDLE_PATH} like the other fluxo containers")
    for d, spec, ctr in fluxo_ctrs:
        env = {e["name"]: e.get("value") for e in ctr.get("env", []) or []}
        if env.get("FLUXO_REDIS__TLS_CA_FILE"):
            c.check(env["FLUXO_REDIS__TLS_CA_FILE"] == CA_BUNDLE_PATH and mounts_ca(spec, ctr),
                    f"{name_of(d)} container {ctr['name']}: FLUXO_REDIS__TLS_CA_FILE points at the mounted CA bundle")

    # -- Deployments: probes, ports, drain ---------------------------------------------
    for name, d in deployments.items():
        spec = pod_spec(d)
        env_cm = {}
        for ctr in spec["containers"]:
            for ref in ctr.get("envFrom", []) or []:
                cm = configmaps.get((ref.get("configMapRef") or {}).get("name"))
                c.check(cm is not None, f"{name_of(d)}: envFrom ConfigMap is rendered")
                if cm:
                    env_cm.update(cm.get("data") or {})
        for ctr in spec["containers"]:
            cid = f"{name_of(d)} container {ctr['name']}"
            ports = {p.get("name"): p["containerPort"] for p in ctr.get("ports", []) or []}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = ctr.get(probe) or {}
                c.check("grpc" in p and p["grpc"].get("port") == ports.get("grpc"),
                        f"{cid}: {probe} is a gRPC probe on the grpc port")
                # Readiness follows the whole server (database, schema, drain); startup and
                # liveness follow the always-SERVING "liveness" service, so an outage never restarts pods.
                want = "" if probe == "readinessProbe" else "liveness"
                c.check(p.get("grpc", {}).get("service", "") == want, f"{cid}: {probe} checks health service {want!r}")
            env = {e["name"]: e.get("value") for e in ctr.get("env", []) or []}
            merged = {**env_cm, **{k: v for k, v in env.items() if v is not None}}
            delay = int(merged.get("FLUXO_GRPC__SHUTDOWN_DELAY_MS", 0))
            timeout = int(merged.get("FLUXO_GRPC__SHUTDOWN_TIMEOUT_MS", 20000))
            prestop = (((ctr.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
            grace = spec.get("terminationGracePeriodSeconds", 30)
            c.check(grace * 1000 > prestop * 1000 + delay + timeout,
                    f"{cid}: grace {grace}s > preStop {prestop}s + delay {delay}ms + timeout {timeout}ms")
            c.check(merged.get("FLUXO_DATABASE__MIGRATE_ON_START") == "false",
                    f"{cid}: migrations run in the hook, not on start")
            c.check(str(merged.get("FLUXO_GRPC__LISTEN", "")).startswith("0.0.0.0:"), f"{cid}: listens on all interfaces")
            redis_env = [e for e in ctr.get("env", []) or [] if e["name"] == "FLUXO_REDIS__URL"]
            if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "ledger":
                c.check(bool(redis_env), f"{cid}: ledger has FLUXO_REDIS__URL (the outbox relay publishes)")
                c.check(str(merged.get("FLUXO_RELAY__ENABLED", "true")).lower() != "false",
                        f"{cid}: the outbox relay is not disabled (FLUXO_RELAY__ENABLED)")
        tsc = spec.get("topologySpreadConstraints") or []
        for t in tsc:
            c.check(matches(t["labelSelector"]["matchLabels"], pod_meta(d).get("labels") or {}),
                    f"{name_of(d)}: topology spread selects its own pods ({t['topologyKey']})")

    # The ledger (outbox relay) never scales to zero.
    hpas = get("HorizontalPodAutoscaler")
    for name, d in deployments.items():
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") != "ledger":
            continue
        hpa = [h for h in hpas if h["spec"]["scaleTargetRef"]["name"] == name]
        owner = rollouts.get(name) if (rollouts.get(name) or {}).get("spec", {}).get("workloadRef", {}).get("name") == name else None
        floor = hpa[0]["spec"].get("minReplicas", 1) if hpa else (owner or d)["spec"].get("replicas", 1)
        c.check(floor >= 1, f"{name_of(d)}: at least one replica, so the outbox relay always runs")

    # -- Services ----------------------------------------------------------------------
    for s in get("Service"):
        for p in s["spec"]["ports"]:
            c.check(bool(p.get("appProtocol")), f"{name_of(s)} port {p.get('name')}: appProtocol set")
            if "grpc" in (p.get("name") or "") or p.get("targetPort") == "grpc":
                c.check(p.get("appProtocol") == "grpc", f"{name_of(s)} port {p.get('name')}: appProtocol grpc")
        sel = s["spec"].get("selector") or {}
        c.check(any(matches(sel, pod_meta(d).get("labels") or {}) for d in deployments.values()),
                f"{name_of(s)}: selects a rendered Deployment's pods")

    # -- Argo Rollouts (progressiveDelivery) ---------------------------------------------
    templates = {t["metadata"]["name"]: t for t in get("AnalysisTemplate")}
    for name, r in rollouts.items():
        ref = r["spec"].get("workloadRef") or {}
        dep = deployments.get(ref.get("name"))
        c.check(ref.get("kind") == "Deployment" and dep is not None, f"{name_of(r)}: workloadRef names a rendered Deployment")
        if dep is None:
            continue
        c.check(matches(r["spec"]["selector"]["matchLabels"], pod_meta(dep).get("labels") or {}),
                f"{name_of(r)}: selector matches its Deployment's pod template")
        # Two controllers must not run the same pods: the Deployment stays at zero.
        c.check(dep["spec"].get("replicas") == 0, f"{name_of(r)}: its Deployment is kept at 0 replicas")
        c.check(not any(h["spec"]["scaleTargetRef"]["name"] == ref.get("name") and h["spec"]["scaleTargetRef"]["kind"] == "Deployment"
                        for h in hpas), f"{name_of(r)}: no HPA scales its Deployment (the HPA scales the Rollout)")
        canary = (r["spec"].get("strategy") or {}).get("canary") or {}
        for t in (canary.get("analysis") or {}).get("templates", []):
            c.check(t.get("templateName") in templates, f"{name_of(r)}: analysis template {t.get('templateName')!r} is rendered")
        c.check(bool((canary.get("analysis") or {}).get("templates")), f"{name_of(r)}: a canary with an analysis")
    for t in templates.values():
        queries = " ".join(((m.get("provider") or {}).get("prometheus") or {}).get("query", "") for m in t["spec"].get("metrics", []))
        c.check("rpc_server_duration_seconds_count" in queries and "rpc_server_duration_seconds_bucket" in queries,
                f"{name_of(t)}: analyses fluxo's gRPC success rate and latency")

    # -- scaling targets and PDBs --------------------------------------------------------
    for h in hpas:
        ref = h["spec"]["scaleTargetRef"]
        c.check((ref.get("kind") == "Deployment" and ref["name"] in deployments) or
                (ref.get("kind") == "Rollout" and ref["name"] in rollouts),
                f"{name_of(h)}: targets a rendered Deployment or Rollout")
    for p in get("PodDisruptionBudget"):
        sel = p["spec"]["selector"]["matchLabels"]
        c.check(any(matches(sel, pod_meta(d).get("labels") or {}) for d in deployments.values()),
                f"{name_of(p)}: selects a rendered Deployment's pods")

    # -- KEDA --------------------------------------------------------------------------
    meta_keys, auth_keys, required = keda_fields(args.keda_zip)
    tauths = {t["metadata"]["name"]: t for t in get("TriggerAuthentication")}
    for so in get("ScaledObject"):
        ref = so["spec"]["scaleTargetRef"]
        target = deployments.get(ref.get("name"))
        component = (so["metadata"].get("labels") or {}).get("app.kubernetes.io/component")
        c.check(component in ("consolidator", "notifier") and target is not None
                and target["metadata"]["labels"].get("app.kubernetes.io/component") == component,
                f"{name_of(so)}: targets its own stream consumer's Deployment (consolidator or notifier)")
        c.check(not any(h["spec"]["scaleTargetRef"]["name"] == ref.get("name") for h in hpas),
                f"{name_of(so)}: no second HPA on the same Deployment")
        triggers = so["spec"]["triggers"]
        lag = [t for t in triggers if t["type"] == "redis-streams" and "lagCount" in t.get("metadata", {})]
        c.check(len(lag) == 1, f"{name_of(so)}: one redis-streams trigger on consumer-group lag")
        for t in lag:
            c.check(t["metadata"].get("activationLagCount") == "0",
                    f"{name_of(so)}: activationLagCount \"0\" (one message wakes it from zero)")
        c.check(so["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {}).get("scaleDown") is not None,
                f"{name_of(so)}: HPA scaleDown behavior set (no thrash)")
        c.check("fallback" in so["spec"], f"{name_of(so)}: fallback set")
        # With a pending trigger beside the lag trigger, one scalingModifiers formula over both: KEDA
        # evaluates it only when every trigger answers, so a missing consumer group (XPENDING:
        # NOGROUP) scales nothing, where the lag trigger alone would read XLEN and scale to the
        # maximum (found running KEDA 2.21 on the platform tests).
        pending = [t for t in triggers if t["type"] == "redis-streams" and "pendingEntriesCount" in t.get("metadata", {})
                   and "lagCount" not in t.get("metadata", {})]
        if lag and pending:
            sm = so["spec"].get("advanced", {}).get("scalingModifiers") or {}
            formula = sm.get("formula", "")
            names = [t.get("name", "") for t in lag + pending]
            c.check(all(names) and all(re.search(rf"\b{re.escape(n)}\b", formula) for n in names),
                    f"{name_of(so)}: scalingModifiers formula over the lag and pending triggers ({formula!r})")
            c.check(sm.get("target") == lag[0]["metadata"].get("lagCount") and sm.get("activationTarget") == "0"
                    and sm.get("metricType", "AverageValue") == "AverageValue",
                    f"{name_of(so)}: scalingModifiers target = lagCount, activationTarget \"0\", AverageValue")
        for t in triggers:
            tid = f"{name_of(so)} trigger {t.get('name', t['type'])}"
            if t["type"] != "redis-streams":
                continue
            md = t.get("metadata", {})
            unknown = sorted(set(md) - meta_keys)
            c.check(not unknown, f"{tid}: metadata keys known to KEDA's redis-streams scaler (unknown: {unknown})")
            for names in required:
                c.check(any(n in md for n in names), f"{tid}: required metadata {names[0]!r} present")
            c.check(md.get("stream") and md.get("consumerGroup"), f"{tid}: stream and consumerGroup set")
            c.check(not any(k in md for k in ("password", "username", "sentinelPassword")),
                    f"{tid}: no credentials in trigger metadata")
            auth = (t.get("authenticationRef") or {}).get("name")
            if auth:
                c.check(auth in tauths, f"{tid}: authenticationRef {auth!r} is rendered")
    for ta in tauths.values():
        spec = ta["spec"]
        c.check(set(spec) <= {"secretTargetRef"}, f"{name_of(ta)}: reads Secrets only (no literal or env values)")
        for r in spec.get("secretTargetRef", []):
            c.check(r["parameter"] in auth_keys, f"{name_of(ta)}: parameter {r['parameter']!r} known to the scaler")

    # -- Istio -------------------------------------------------------------------------
    for ap_ in get("AuthorizationPolicy"):
        sel = (ap_["spec"].get("selector") or {}).get("matchLabels") or {}
        c.check(any(matches(sel, pod_meta(d).get("labels") or {}) for d in deployments.values()),
                f"{name_of(ap_)}: selects a rendered Deployment's pods")
        for rule in ap_["spec"].get("rules", []) or []:
            for frm in rule.get("from", []) or []:
                for principal in (frm.get("source") or {}).get("principals", []) or []:
                    m = PRINCIPAL.match(principal)
                    c.check(m is not None, f"{name_of(ap_)}: principal {principal!r} is <td>/ns/<ns>/sa/<sa>")
                    if m and m.group("ns") == ns:
                        c.check(m.group("sa") in sa_names,
                                f"{name_of(ap_)}: principal {principal!r} matches a rendered ServiceAccount")
    # Only the gateway may send the forwarded-identity headers to the gRPC APIs: a DENY policy
    # per API target refuses each header from every other principal; without a mesh every call
    # carries a token instead (FLUXO_GRPC__AUTH=jwt) and the keys to verify it.
    policies = get("AuthorizationPolicy")
    for name, d in deployments.items():
        component = d["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        if component not in ("ledger", "balance"):
            continue
        ctr = pod_spec(d)["containers"][0]
        env = {e["name"]: e for e in ctr.get("env", []) or []}
        env_cm = {}
        for ref in ctr.get("envFrom", []) or []:
            env_cm.update((configmaps.get((ref.get("configMapRef") or {}).get("name")) or {}).get("data") or {})
        mode = (env.get("FLUXO_GRPC__AUTH") or {}).get("value") or env_cm.get("FLUXO_GRPC__AUTH")
        if policies:
            c.check(mode == "mesh", f"{name_of(d)}: FLUXO_GRPC__AUTH=mesh inside the mesh (got {mode!r})")
            denies = [a for a in policies if a["spec"].get("action") == "DENY"
                      and matches((a["spec"].get("selector") or {}).get("matchLabels") or {}, pod_meta(d).get("labels") or {})]
            for header in ("x-fluxo-subject", "x-fluxo-merchants", "x-fluxo-admin", "x-fluxo-closer"):
                denied = any(
                    any(w.get("key") == f"request.headers[{header}]" and w.get("values") == ["*"] for w in r.get("when", []) or [])
                    and any((f.get("source") or {}).get("notPrincipals") for f in r.get("from", []) or [])
                    for a in denies for r in a["spec"].get("rules", []) or [])
                c.check(denied, f"{name_of(d)}: {header} is denied from every principal but the gateway's")
        else:
            c.check(mode == "jwt", f"{name_of(d)}: FLUXO_GRPC__AUTH=jwt without a mesh (got {mode!r})")
            c.check("FLUXO_AUTH__HS256_SECRET" in env or "FLUXO_AUTH__JWKS_FILE" in env
                    or "FLUXO_AUTH__JWKS_URL" in env or "FLUXO_AUTH__JWKS_URL" in env_cm,
                    f"{name_of(d)}: has keys to verify the tokens on its gRPC calls")
    retry_known = istio_retry_policies(args.istio_zip) if args.istio_zip else None
    for vs in get("VirtualService"):
        for route in vs["spec"].get("http", []) or []:
            retries = route.get("retries") or {}
            rid = f"{name_of(vs)} route {route.get('name')}"
            c.check("timeout" in route or route.get("name") in ("streams", "downloads"), f"{rid}: has a timeout")
            policies = [p for p in (retries.get("retryOn") or "").split(",") if p]
            if retry_known is not None:
                bad = [p for p in policies if p not in retry_known and not p.isdigit()]
                c.check(not bad, f"{rid}: retryOn policies known to Istio (unknown: {bad})")
            c.check(not {"cancelled", "internal", "5xx", "retriable-4xx"} & set(policies),
                    f"{rid}: never retries cancelled/internal/5xx")
            # Envoy retries a per-try timeout only when retryOn holds reset, 5xx or gateway-error;
            # otherwise the per-try timeout, not the route timeout, ends the call (UNAVAILABLE).
            per_try, total = duration_s(retries.get("perTryTimeout")), duration_s(route.get("timeout"))
            cuts_short = retries.get("attempts", 0) > 0 and per_try is not None and (total is None or per_try < total)
            retries_timeouts = bool({"reset", "5xx", "gateway-error"} & set(policies))
            if cuts_short:
                c.check(retries_timeouts,
                        f"{rid}: perTryTimeout {retries.get('perTryTimeout')} below the route timeout is retried "
                        f"(retryOn has reset, 5xx or gateway-error; got {policies})")
            writes = route.get("name") == "writes" or any(
                "RecordEntry" in (m.get("uri") or {}).get("exact", "") or "ReverseEntry" in (m.get("uri") or {}).get("exact", "")
                for m in route.get("match", []) or [])
            if writes or (vs["spec"].get("gateways") or ["mesh"]) != ["mesh"]:
                # A write (REST carries writes too) is never cut or retried while it may be committing.
                c.check(not cuts_short, f"{rid}: carries writes and has no perTryTimeout below the route timeout "
                        f"(a try cut short is reset mid-commit)")
                c.check(not {"deadline-exceeded", "reset", "gateway-error"} & set(policies),
                        f"{rid}: carries writes and does not retry deadline-exceeded, reset or gateway-error")
        text = json.dumps(vs["spec"])
        mesh = (vs["spec"].get("gateways") or ["mesh"]) == ["mesh"]
        paths = [p for pkg, ps in STREAM_RPCS.items() if mesh and pkg in text for p in ps]
        paths += [] if mesh else STREAM_REST
        for path in paths:
            route = route_for(vs, path)
            c.check(route is not None and not duration_s(route.get("timeout")),
                    f"{name_of(vs)}: {path} streams without a route timeout "
                    f"(got {(route or {}).get('name')} with {(route or {}).get('timeout')})")
    # `helm test` through the mesh: grpcurl without proto files asks server reflection first,
    # so a policy admitting the test identity for named paths must admit reflection too.
    test_pods = [p for p in get("Pod") if "test" in ((p["metadata"].get("annotations") or {}).get("helm.sh/hook") or "")]
    for tp in test_pods:
        script = " ".join(" ".join(ctr.get("command", []) + ctr.get("args", [])) for ctr, _ in containers(pod_spec(tp)))
        uses_reflection = "grpcurl" in script and not re.search(r"-proto(set)?\b|-use-reflection=false", script)
        test_sa = pod_spec(tp).get("serviceAccountName")
        for ap_ in get("AuthorizationPolicy"):
            for rule in ap_["spec"].get("rules", []) or []:
                principals = [p for f in rule.get("from", []) or [] for p in (f.get("source") or {}).get("principals", []) or []]
                if not any(p.endswith(f"/sa/{test_sa}") for p in principals):
                    continue
                paths = {p for op in rule.get("to", []) or [] for p in (op.get("operation") or {}).get("paths", []) or []}
                if uses_reflection and paths and "/grpc.health.v1.Health/Check" in paths:
                    c.check(GRPCURL_REFLECTION <= paths,
                            f"{name_of(ap_)}: the helm test identity may call server reflection (grpcurl needs it), not only {sorted(paths)}")

    # KEDA's fallback does nothing at zero replicas and no consolidator reports lag then: when
    # alerts are rendered, one must watch KEDA's own errors for a ScaledObject that can reach zero.
    rules = [r for pr in get("PrometheusRule") for g in pr["spec"].get("groups", []) for r in g.get("rules", [])]
    for so in get("ScaledObject"):
        if not rules or so["spec"].get("minReplicaCount", 0) > 0:
            continue
        name = so["metadata"]["name"]
        def selects(expr):
            found = re.search(r'scaledObject=(~?)"([^"]*)"', expr)
            return bool(found) and (name == found.group(2) if not found.group(1) else name in found.group(2).split("|"))
        watching = [r for r in rules if "alert" in r and re.search(r"keda_(scaled_object|scaler_detail)_errors_total", r["expr"])
                    and selects(r["expr"])]
        c.check(bool(watching), f"{name_of(so)}: scales to zero, so an alert watches KEDA's scaler errors for it")

    for pa in get("PeerAuthentication"):
        c.check(pa["spec"].get("mtls", {}).get("mode") == "STRICT", f"{name_of(pa)}: STRICT mTLS")

    # -- hooks -------------------------------------------------------------------------
    for j in get("Job"):
        ann = j["metadata"].get("annotations") or {}
        hooks = set((ann.get("helm.sh/hook") or "").split(","))
        c.check({"pre-install", "pre-upgrade"} <= hooks, f"{name_of(j)}: pre-install,pre-upgrade hook")
        c.check(pod_spec(j).get("restartPolicy") in ("Never", "OnFailure"), f"{name_of(j)}: run-to-completion restartPolicy")
        c.check(pod_spec(j).get("serviceAccountName") in {
            s["metadata"]["name"] for s in get("ServiceAccount")
            if "pre-install" in (s["metadata"].get("annotations") or {}).get("helm.sh/hook", "")},
            f"{name_of(j)}: runs as a hook ServiceAccount (exists before the Job on install)")
        # On install the ServiceEntries do not exist yet: an injected hook must not need them,
        # so it bypasses its proxy for their ports. On upgrade they exist, and a proxy that
        # captures DNS answers their hosts with an auto-allocated 240.240.x.x address, which a
        # bypassed port cannot reach (istio/istio#50346): such a hook must not capture DNS.
        meta = pod_meta(j)
        if (meta.get("labels") or {}).get("sidecar.istio.io/inject") == "true":
            ann_j = meta.get("annotations") or {}
            excluded = {p for p in (ann_j.get("traffic.sidecar.istio.io/excludeOutboundPorts") or "").split(",") if p}
            for se in get("ServiceEntry"):
                for port in se["spec"].get("ports", []):
                    c.check(str(port["number"]) in excluded,
                            f"{name_of(j)}: bypasses its proxy for {se['spec']['hosts'][0]}:{port['number']} (no ServiceEntry yet on install)")
            if excluded:
                proxy_config = yaml.safe_load(ann_j.get("proxy.istio.io/config") or "{}") or {}
                capture = str((proxy_config.get("proxyMetadata") or {}).get("ISTIO_META_DNS_CAPTURE", "")).lower()
                c.check(capture == "false",
                        f"{name_of(j)}: bypasses its proxy for ports {sorted(excluded)} and so must not capture DNS "
                        f"(proxy.istio.io/config proxyMetadata ISTIO_META_DNS_CAPTURE \"false\"): on upgrade the "
                        f"ServiceEntries exist and the DNS proxy would answer with an unroutable auto-allocated address")
    args_of = lambda j: pod_spec(j)["containers"][0].get("args", [])  # noqa: E731
    jobs = get("Job")
    if jobs:
        c.check(any(args_of(j)[:1] == ["migrate"] for j in jobs), "a hook Job runs `fluxo migrate`")

    print(f"CHECKS passed={c.passed} failed={c.failed}")
    sys.exit(1 if c.failed else 0)


if __name__ == "__main__":
    main()
