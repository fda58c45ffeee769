#!/usr/bin/env python3
"""Platform tests: charts/fluxo installed, upgraded, rolled back, disrupted and uninstalled on a
live API server (the local control plane of scripts/k8s/cluster.sh: real kube-apiserver,
controller-manager and scheduler, kwok nodes in three zones).

Run through scripts/k8s/platform-test.sh, which brings the cluster up and down around it. Each
check prints "ok" or "FAIL" with the reason; the last line is "N passed, M failed" and the exit
code is non-zero when anything failed.

What kwok cannot show: containers do not run. A pod is Running and Ready once scheduled, and a
pod meant to finish (restartPolicy Never/OnFailure: hook Jobs, the `helm test` pod) succeeds.
So these tests check what the API server, admission, the controllers and the scheduler do with
the chart (Pod Security, hooks and their order, rollouts, PDBs, HPAs, topology spread, drains,
uninstall), not what the fluxo process does inside the pods (the Rust and e2e tests do that).
Images are never pulled, so image references and pull secrets are not exercised here.
"""

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "fluxo"
RELEASE = "fluxo"
INSTANCE = f"app.kubernetes.io/instance={RELEASE}"

KUBECTL = HELM = ISTIOCTL = "false"
KUBECONFIG = ""
HELM_TIMEOUT = "180s"


class Fail(Exception):
    """A check failed; the message says why."""


# ---- reporting ---------------------------------------------------------------------------------
passed = 0
failed = 0


def ok(what):
    global passed
    passed += 1
    print(f"  ok    {what}", flush=True)


def bad(what, why):
    global failed
    failed += 1
    print(f"  FAIL  {what}", flush=True)
    for line in str(why).rstrip().splitlines()[:40]:
        print(f"        {line}", flush=True)


def check(what, fn, *args, **kwargs):
    """Runs one check; returns its result, or None when it failed."""
    try:
        result = fn(*args, **kwargs)
    except Fail as e:
        bad(what, e)
        return None
    detail = f": {result}" if isinstance(result, str) and result else ""
    first, *more = f"{what}{detail}".splitlines()
    ok(first)
    for line in more:
        print(f"        {line}", flush=True)
    return result if result is not None else True


def expect_fail(what, pattern, fn, *args, show=None, **kwargs):
    """Self-test: the check must fail, with a reason matching pattern (the lines matching show
    are printed as the reason)."""
    try:
        fn(*args, **kwargs)
    except Fail as e:
        if re.search(pattern, str(e), re.S | re.I):
            lines = [x.strip() for x in str(e).splitlines() if re.search(show or pattern, x, re.I)]
            ok(f"{what}")
            for line in (lines or str(e).strip().splitlines())[:3]:
                print(f"        rejected: {line[:220]}", flush=True)
        else:
            bad(what, f"failed, but not for the expected reason /{pattern}/:\n{e}")
        return
    bad(what, "the broken chart passed the check")


def section(title):
    print(f"\n==> {title}", flush=True)


# ---- tools -------------------------------------------------------------------------------------
def run(cmd, timeout=600, stdin=None):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=stdin)
    except subprocess.TimeoutExpired as e:
        raise Fail(f"{' '.join(cmd[:4])} … did not return within {timeout}s") from e


def kubectl(*args, stdin=None, timeout=120):
    p = run([KUBECTL, "--kubeconfig", KUBECONFIG, *args], timeout=timeout, stdin=stdin)
    if p.returncode != 0:
        raise Fail(f"kubectl {' '.join(args)}: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


def kget(*args):
    return json.loads(kubectl("get", "-o", "json", *args))


def helm(*args, timeout=600):
    return run([HELM, "--kubeconfig", KUBECONFIG, *args], timeout=timeout)


def poll(what, secs, fn, interval=0.25):
    """Calls fn until it returns (True, detail); Fail with the last detail after secs."""
    deadline = time.monotonic() + secs
    detail = ""
    while True:
        try:
            done, detail = fn()
        except Fail as e:
            done, detail = False, str(e)
        if done:
            return detail
        if time.monotonic() >= deadline:
            raise Fail(f"{what}: not within {secs}s; last seen: {detail}")
        time.sleep(interval)


def warnings_in(stderr):
    """Warnings the API server sent back (client-go prints them as 'W… warnings.go' or 'Warning:')."""
    return [
        line
        for line in stderr.splitlines()
        if re.match(r"^W\d{4} ", line) or line.startswith("Warning:") or "warnings.go" in line
    ]


# ---- the chart ---------------------------------------------------------------------------------
class Case:
    """One values file installed into its own namespace enforcing Pod Security `restricted`."""

    def __init__(self, name, values, chart=CHART, extra_set=(), timeout=None):
        self.name = name
        self.ns = f"fluxo-{name}"
        self.chart = str(chart)
        self.values = values  # list of --values files
        self.extra_set = list(extra_set)
        self.timeout = timeout or HELM_TIMEOUT
        self.rendered = None
        self.extra_nodes = []
        self.rev1_manifest = None

    def value_args(self, *more_sets):
        args = []
        for v in self.values:
            args += ["--values", str(v)]
        for s in self.extra_set + list(more_sets):
            args += ["--set", s]
        return args

    def render(self, *more_sets):
        p = run([HELM, "template", RELEASE, self.chart, "--namespace", self.ns, "--kube-version", KUBE_VERSION[1:],
                 *self.value_args(*more_sets)])
        if p.returncode != 0:
            raise Fail(f"helm template: {p.stderr}")
        return [d for d in yaml.safe_load_all(p.stdout) if d]

    def objs(self, kind, docs=None):
        return [d for d in (docs if docs is not None else self.rendered) if d["kind"] == kind]

    def values_get(self):
        p = helm("get", "values", RELEASE, "-n", self.ns, "--all", "-o", "json")
        if p.returncode != 0:
            raise Fail(p.stderr)
        return json.loads(p.stdout)


def hooks_of(docs):
    """Hook Jobs of a rendering, in the order helm runs them (weight, then name)."""
    jobs = []
    for d in docs:
        ann = d["metadata"].get("annotations") or {}
        if d["kind"] == "Job" and "pre-install" in ann.get("helm.sh/hook", ""):
            jobs.append((int(ann.get("helm.sh/hook-weight", "0")), d["metadata"]["name"]))
    return [n for _, n in sorted(jobs)]


# ---- cluster set-up ------------------------------------------------------------------------------
def module_zip(module):
    """The module zip in the Go module cache (scripts/validate-k8s.sh already downloaded it)."""
    p = subprocess.run(["go", "mod", "download", "-json", module], capture_output=True, text=True,
                       timeout=600, cwd=ROOT / "target")
    try:
        info = json.loads(p.stdout)
    except ValueError as e:
        raise Fail(f"go mod download {module}: {p.stderr}") from e
    z = info.get("Zip", "")
    if not z or not os.path.isfile(z):
        raise Fail(f"go mod download {module}: {info.get('Error', 'no zip')}")
    return z


def crd_docs(zpath, pattern):
    rx = re.compile(pattern)
    out = []
    with zipfile.ZipFile(zpath) as zf:
        for n in sorted(zf.namelist()):
            inner = n.split("@", 1)[1].split("/", 1)[1]
            if rx.fullmatch(inner):
                out += [d for d in yaml.safe_load_all(zf.read(n)) if d and d.get("kind") == "CustomResourceDefinition"]
    if not out:
        raise Fail(f"no CRDs matching {pattern} in {zpath}")
    return out


def apply_server_side(docs, manager):
    text = yaml.safe_dump_all(docs, sort_keys=False)
    p = run([KUBECTL, "--kubeconfig", KUBECONFIG, "apply", "--server-side", "--field-manager", manager,
             "--force-conflicts", "-f", "-"], stdin=text, timeout=300)
    if p.returncode != 0:
        raise Fail(p.stderr)
    warn = warnings_in(p.stderr)
    if warn:
        raise Fail("admission warnings:\n" + "\n".join(warn))
    return p.stdout


def install_crds():
    pins = VERSIONS
    sets = [
        ("KEDA", f"github.com/kedacore/keda/v2@{pins['KEDA_VERSION']}", r"config/crd/bases/.*\.yaml"),
        ("Istio", f"istio.io/api@{pins['ISTIO_API_VERSION']}", r"kubernetes/customresourcedefinitions\.gen\.yaml"),
        ("Karpenter", f"github.com/aws/karpenter-provider-aws@{pins['KARPENTER_VERSION']}", r"pkg/apis/crds/.*\.yaml"),
        ("prometheus-operator",
         f"github.com/prometheus-operator/prometheus-operator@{pins['PROMETHEUS_OPERATOR_VERSION']}",
         r"example/prometheus-operator-crd/monitoring\.coreos\.com_prometheusrules\.yaml"),
        # Argo Rollouts' CRDs only: the chart can hand rollouts to it; its controller is not run here.
        ("Argo Rollouts", f"github.com/argoproj/argo-rollouts@{pins['ARGO_ROLLOUTS_VERSION']}",
         r"manifests/crds/.*-crd\.yaml"),
    ]
    for label, module, pattern in sets:
        def one():
            docs = crd_docs(module_zip(module), pattern)
            apply_server_side(docs, "fluxo-platform-test")
            names = [d["metadata"]["name"] for d in docs]
            poll(f"{label} CRDs Established", 60,
                 lambda: established(names))
            return f"{len(names)} CRDs from {module}"
        check(f"{label} CRDs applied (server-side) and Established", one)


def established(names):
    crds = {c["metadata"]["name"]: c for c in kget("crd")["items"]}
    missing = [n for n in names if not any(
        c["type"] == "Established" and c["status"] == "True"
        for c in (crds.get(n, {}).get("status", {}).get("conditions") or []))]
    return (not missing, f"not Established: {missing}")


def cluster_pieces():
    """istio/, karpenter/, keda/ manifests (not the upstream charts' values) applied server-side."""
    ensure_namespace("istio-system", restricted=False)
    for d in ("istio", "karpenter", "keda"):
        for f in sorted((ROOT / d).glob("*.yaml")):
            if "values" in f.name:
                continue
            docs = [x for x in yaml.safe_load_all(f.read_text()) if x]

            def one(docs=docs, f=f):
                apply_server_side(docs, "fluxo-cluster-pieces")
                for x in docs:
                    ns = x["metadata"].get("namespace")
                    live = kget(x["kind"].lower() + "." + x["apiVersion"].split("/")[0]
                                if "/" in x["apiVersion"] else x["kind"].lower(),
                                x["metadata"]["name"], "--show-managed-fields", *(["-n", ns] if ns else []))
                    managers = {m["manager"] for m in live["metadata"].get("managedFields", [])}
                    if "fluxo-cluster-pieces" not in managers:
                        raise Fail(f"{x['kind']}/{x['metadata']['name']}: not owned by the server-side apply")
                return f"{len(docs)} objects"
            check(f"kubectl apply --server-side {f.relative_to(ROOT)}", one)


def ingress_gateway():
    """The Istio ingress gateway chart (the upstream chart that scripts/validate-k8s.sh unpacks from
    the istio.io/istio module) with istio/ingress-gateway-values.yaml: the pods the chart's
    Gateway selects (istio=ingressgateway). The Service is ClusterIP here: no load balancer
    controller would ever give a LoadBalancer an address, and helm --wait waits for one."""
    chart = ROOT / "target" / "k8s-validate" / "upstream" / "istio-gateway"
    if not (chart / "Chart.yaml").is_file():
        raise Fail(f"{chart} missing: run scripts/validate-k8s.sh first (it unpacks the upstream charts)")
    p = helm("upgrade", "--install", "istio-ingressgateway", str(chart), "-n", "istio-ingress", "--create-namespace",
             "--values", str(ROOT / "istio" / "ingress-gateway-values.yaml"), "--set", "service.type=ClusterIP",
             "--wait", "--timeout", "120s")
    if p.returncode != 0:
        raise Fail(f"helm install istio-ingressgateway: {p.stderr}")
    if warnings_in(p.stderr):
        raise Fail("admission warnings:\n" + "\n".join(warnings_in(p.stderr)))
    ready = kget("deployment", "-n", "istio-ingress", "istio-ingressgateway")["status"].get("readyReplicas", 0)
    return f"{ready} gateway pods Ready (labels istio=ingressgateway)"


def ensure_namespace(ns, restricted=True):
    labels = {}
    if restricted:
        v = "v" + KUBE_VERSION.split(".")[0][1:] + "." + KUBE_VERSION.split(".")[1]
        for mode in ("enforce", "audit", "warn"):
            labels[f"pod-security.kubernetes.io/{mode}"] = "restricted"
            labels[f"pod-security.kubernetes.io/{mode}-version"] = v
    doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}
    apply_server_side([doc], "fluxo-platform-test")
    poll(f"ServiceAccount default in {ns}", 30, lambda: (bool(kubectl("-n", ns, "get", "sa", "default", "-o", "name")), ""))


def secrets_for(case):
    """The Secrets the chart reads (it never creates them): made up values, right keys."""
    wanted = {}

    def walk(x):
        if isinstance(x, dict):
            ref = x.get("secretKeyRef")
            if isinstance(ref, dict) and ref.get("name"):
                wanted.setdefault(ref["name"], set()).add(ref["key"])
            sec = x.get("secret")
            if isinstance(sec, dict) and sec.get("secretName"):
                keys = wanted.setdefault(sec["secretName"], set())
                keys.update(i["key"] for i in sec.get("items") or [])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for d in case.rendered:
        if d["kind"] in ("Deployment", "Job", "Pod"):
            walk(d["spec"])
        if d["kind"] == "TriggerAuthentication":
            for s in d["spec"].get("secretTargetRef") or []:
                wanted.setdefault(s["name"], set()).add(s["key"])
    docs = [{"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
             "metadata": {"name": n, "namespace": case.ns},
             "stringData": {k: "not-a-real-value" for k in sorted(keys) or ["placeholder"]}}
            for n, keys in sorted(wanted.items())]
    # The ingress Gateway's TLS certificate lives next to the gateway pods (istio-ingress).
    for g in case.objs("Gateway"):
        for srv in g["spec"].get("servers") or []:
            cred = (srv.get("tls") or {}).get("credentialName")
            if cred:
                crt, key = self_signed(srv.get("hosts") or ["fluxo.local"])
                docs.append({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                             "metadata": {"name": cred, "namespace": "istio-ingress"},
                             "stringData": {"tls.crt": crt, "tls.key": key}})
                wanted.setdefault(f"istio-ingress/{cred}", set())
    if docs:
        apply_server_side(docs, "fluxo-platform-test")
    return sorted(wanted)


def self_signed(hosts):
    """A throwaway self-signed certificate and key (PEM) for the given hosts."""
    host = hosts[0].split("/")[-1].replace("*", "wildcard")
    with tempfile.TemporaryDirectory() as d:
        p = run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={host}",
                 "-keyout", f"{d}/key.pem", "-out", f"{d}/crt.pem"], timeout=60)
        if p.returncode != 0:
            raise Fail(f"openssl: {p.stderr}")
        return pathlib.Path(f"{d}/crt.pem").read_text(), pathlib.Path(f"{d}/key.pem").read_text()


def karpenter_nodes(case):
    """Nodes as Karpenter would provision them from karpenter/nodepools.yaml (labels, taints), one
    per zone and NodePool, when the rendering pins pods to NodePools."""
    pools_wanted = {(d["spec"]["template"]["spec"].get("nodeSelector") or {}).get("karpenter.sh/nodepool")
                    for d in case.objs("Deployment")} - {None}
    if not pools_wanted:
        return []
    pools = {p["metadata"]["name"]: p for p in yaml.safe_load_all((ROOT / "karpenter/nodepools.yaml").read_text())
             if p and p["kind"] == "NodePool"}
    missing = pools_wanted - set(pools)
    if missing:
        raise Fail(f"the chart selects NodePools {sorted(missing)} that karpenter/nodepools.yaml does not define")
    nodes = []
    for name in sorted(pools_wanted):
        tpl = pools[name]["spec"]["template"]
        reqs = {r["key"]: r for r in tpl["spec"].get("requirements", [])}
        capacity = (reqs.get("karpenter.sh/capacity-type", {}).get("values") or ["on-demand"])[0]
        for zone in ZONES:
            n = f"{name}-{zone}"
            nodes.append({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {
                    "name": n,
                    "annotations": {"kwok.x-k8s.io/node": "fake"},
                    "labels": {**(tpl.get("metadata", {}).get("labels") or {}),
                               "type": "kwok-karpenter", "karpenter.sh/nodepool": name,
                               "karpenter.sh/capacity-type": capacity, "kubernetes.io/hostname": n,
                               "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                               "topology.kubernetes.io/zone": zone},
                },
                "spec": {"taints": tpl["spec"].get("taints") or []},
                "status": {"allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
                           "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110"}},
            })
    apply_server_side(nodes, "fluxo-platform-test")
    names = [n["metadata"]["name"] for n in nodes]
    poll("Karpenter-like nodes Ready and without the not-ready taint", 90, lambda: nodes_ready(names))
    return names


def nodes_ready(names):
    items = {n["metadata"]["name"]: n for n in kget("nodes")["items"]}
    waiting = []
    for name in names:
        n = items.get(name)
        ready = n and any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions") or [])
        tainted = n and any(t["key"].startswith("node.kubernetes.io/") for t in n["spec"].get("taints") or [])
        if not ready or tainted:
            waiting.append(name)
    return (not waiting, f"waiting for {waiting}")


def priority_classes(case):
    """PriorityClasses the rendering uses but does not create (the cluster must provide them)."""
    used = {d["spec"]["template"]["spec"].get("priorityClassName") for d in case.objs("Deployment")} - {None}
    made = {d["metadata"]["name"] for d in case.objs("PriorityClass")}
    need = sorted(used - made)
    if need:
        apply_server_side([{"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                            "metadata": {"name": n}, "value": 100000,
                            "description": "made by the platform test: the chart uses it without creating it"}
                           for n in need], "fluxo-platform-test")
    return need


# ---- observations ----------------------------------------------------------------------------------
def rv_now(ns):
    """The API server's current resourceVersion (etcd's revision: later writes have larger ones)."""
    return int(json.loads(kubectl("get", "--raw", f"/api/v1/namespaces/{ns}/events?limit=1"))["metadata"]["resourceVersion"])


def events(ns, since_rv=0):
    evs = [e for e in kget("events", "-n", ns)["items"] if int(e["metadata"]["resourceVersion"]) > since_rv]
    return sorted(evs, key=lambda e: int(e["metadata"]["resourceVersion"]))


def warning_events(ns, since_rv=0):
    return [f"{e['involvedObject']['kind']}/{e['involvedObject']['name']}: {e['reason']}: {e['message']}"
            for e in events(ns, since_rv) if e["type"] == "Warning"]


def pods(ns, selector=INSTANCE):
    return kget("pods", "-n", ns, "-l", selector)["items"]


def deployments(ns):
    return {d["metadata"]["name"]: d for d in kget("deployments", "-n", ns, "-l", INSTANCE)["items"]}


def diagnose(ns, since_rv=0):
    """Why an install or upgrade did not converge: warning events, pending pods, failed Jobs."""
    lines = warning_events(ns, since_rv)[-15:]
    for p in pods(ns, "app.kubernetes.io/instance"):
        if p["status"].get("phase") != "Running" or not p["spec"].get("nodeName"):
            lines.append(f"pod {p['metadata']['name']}: phase {p['status'].get('phase')}, "
                         f"node {p['spec'].get('nodeName') or '-'}")
    for j in kget("jobs", "-n", ns)["items"]:
        st = j.get("status", {})
        if not st.get("succeeded"):
            lines.append(f"Job {j['metadata']['name']}: active {st.get('active', 0)}, failed {st.get('failed', 0)}, "
                         f"not complete")
    return "\n".join(lines)


# ---- the checks --------------------------------------------------------------------------------------
def helm_run(case, verb_args, since_rv):
    p = helm(*verb_args, timeout=int(case.timeout.rstrip("s")) + 120)
    warn = warnings_in(p.stderr)
    if p.returncode != 0:
        raise Fail(f"helm {verb_args[0]} failed: {p.stderr.strip()[-1500:]}\n{diagnose(case.ns, since_rv)}")
    if warn:
        raise Fail("admission warnings on helm's stderr:\n" + "\n".join(warn))
    return p


def install(case):
    case.rv_install = rv_now(case.ns)
    helm_run(case, ["install", RELEASE, case.chart, "-n", case.ns, "--wait", "--timeout", case.timeout,
                    *case.value_args()], case.rv_install)
    return f"{len(case.rendered)} objects, no admission warnings"


def job_runs(ns, since_rv):
    """Per hook Job run since since_rv: [(name, uid, created_rv, completed_rv)] from the job
    controller's events (they outlive the Jobs, which the hooks delete on success)."""
    runs = {}
    for e in events(ns, since_rv):
        o = e["involvedObject"]
        if o["kind"] != "Job":
            continue
        r = runs.setdefault(o["uid"], {"name": o["name"], "created": None, "completed": None, "failed": None})
        rv = int(e["metadata"]["resourceVersion"])
        if e["reason"] == "SuccessfulCreate" and r["created"] is None:
            r["created"] = rv
        elif e["reason"] == "Completed":
            r["completed"] = rv
        elif e["reason"] in ("BackoffLimitExceeded", "DeadlineExceeded"):
            r["failed"] = e["message"]
    return sorted(runs.values(), key=lambda r: r["created"] or 0)


def first_rollout_rv(ns, since_rv):
    rvs = [int(e["metadata"]["resourceVersion"]) for e in events(ns, since_rv)
           if e["involvedObject"]["kind"] == "Deployment" and e["reason"] == "ScalingReplicaSet"]
    return min(rvs) if rvs else None


def hooks_ran_in_order(case, since_rv, docs=None):
    expected = hooks_of(docs or case.rendered)
    if not expected:
        runs = job_runs(case.ns, since_rv)
        if runs:
            raise Fail(f"no hooks expected, but Jobs ran: {[r['name'] for r in runs]}")
        return "the values enable no hooks, and none ran"
    runs = job_runs(case.ns, since_rv)
    names = [r["name"] for r in runs]
    if names != expected:
        raise Fail(f"hook Jobs run {names}, expected exactly {expected} in this order")
    prev = None
    for r in runs:
        if r["failed"] or r["completed"] is None:
            raise Fail(f"hook Job {r['name']} did not complete: {r['failed'] or 'no Completed event'}")
        if prev and r["created"] < prev["completed"]:
            raise Fail(f"hook Job {r['name']} started before {prev['name']} completed")
        prev = r
    rollout = first_rollout_rv(case.ns, since_rv)
    if rollout is not None and rollout < prev["completed"]:
        raise Fail(f"Deployments rolled out before the last hook ({prev['name']}) completed")
    # Jobs of the reconcile CronJob run whenever its schedule falls during the test: not hooks.
    left = [j["metadata"]["name"] for j in kget("jobs", "-n", case.ns)["items"] if not from_cronjob(j)]
    if left:
        raise Fail(f"succeeded hook Jobs must be deleted (hook-delete-policy), still there: {left}")
    return " then ".join(expected) + ", each completed before the next, before any Deployment rolled out; deleted"


def deployments_available(case):
    want = {d["metadata"]["name"] for d in case.objs("Deployment")}
    live = deployments(case.ns)
    if set(live) != want:
        raise Fail(f"Deployments {sorted(live)}, rendered {sorted(want)}")
    problems = []
    for name, d in sorted(live.items()):
        st = d.get("status", {})
        avail = any(c["type"] == "Available" and c["status"] == "True" for c in st.get("conditions") or [])
        r = d["spec"].get("replicas", 1)
        if not avail or st.get("readyReplicas", 0) != r or st.get("updatedReplicas", 0) != r \
                or st.get("observedGeneration") != d["metadata"]["generation"]:
            problems.append(f"{name}: available={avail} ready={st.get('readyReplicas', 0)}/{r} "
                            f"updated={st.get('updatedReplicas', 0)}")
    if problems:
        raise Fail("\n".join(problems))
    return ", ".join(f"{n} {d['status'].get('readyReplicas', 0)}/{d['spec']['replicas']}" for n, d in sorted(live.items()))


def wait_available(case, secs=120):
    return poll("every Deployment Available and rolled out", secs, lambda: (True, deployments_available(case)))


def eligible(node, pod):
    """Can the pod go on this node (nodeSelector, taints, cordon)?"""
    if node["spec"].get("unschedulable"):
        return False
    labels = node["metadata"].get("labels") or {}
    for k, v in (pod["spec"].get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            return False
    tols = pod["spec"].get("tolerations") or []
    for t in node["spec"].get("taints") or []:
        if t["effect"] not in ("NoSchedule", "NoExecute"):
            continue
        if not any((tol.get("operator") == "Exists" and tol.get("key") in (None, t["key"])) or
                   (tol.get("key") == t["key"] and tol.get("value") == t.get("value") and
                    tol.get("effect") in (None, "", t["effect"])) for tol in tols):
            return False
    return True


def spread_ok(case, exclude_nodes=()):
    """Every topologySpreadConstraint of every Deployment holds over the nodes its pods may use."""
    nodes = {n["metadata"]["name"]: n for n in kget("nodes")["items"] if n["metadata"]["name"] not in exclude_nodes}
    all_pods = [p for p in pods(case.ns) if p["status"].get("phase") == "Running" and
                not p["metadata"].get("deletionTimestamp")]
    report, problems = [], []
    for name, d in sorted(deployments(case.ns).items()):
        tsc = d["spec"]["template"]["spec"].get("topologySpreadConstraints") or []
        sel = d["spec"]["selector"]["matchLabels"]
        mine = [p for p in all_pods if all(p["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        if not mine:
            problems.append(f"{name}: no running pods")
            continue
        off = [p["metadata"]["name"] for p in mine if p["spec"].get("nodeName") not in nodes]
        if off:
            problems.append(f"{name}: pods on excluded nodes: {off}")
        for c in tsc:
            key = c["topologyKey"]
            domains = {}
            for n in nodes.values():
                if eligible(n, mine[0]) and key in n["metadata"]["labels"]:
                    domains.setdefault(n["metadata"]["labels"][key], 0)
            for p in mine:
                n = nodes.get(p["spec"].get("nodeName"))
                if n and key in n["metadata"]["labels"]:
                    domains[n["metadata"]["labels"][key]] = domains.get(n["metadata"]["labels"][key], 0) + 1
            skew = max(domains.values()) - min(domains.values()) if domains else 0
            if skew > c["maxSkew"]:
                problems.append(f"{name}: {key} skew {skew} > maxSkew {c['maxSkew']} ({domains})")
            elif key == "topology.kubernetes.io/zone":
                report.append(f"{name} {sorted(domains.values(), reverse=True)}")
    if problems:
        raise Fail("\n".join(problems))
    if not report:
        return "no topology spread constraints rendered (pods scheduled)"
    return "pods per zone: " + ", ".join(report)


def pdbs_and_hpas(case, secs=90):
    want_pdb = {d["metadata"]["name"] for d in case.objs("PodDisruptionBudget")}
    want_hpa = {d["metadata"]["name"] for d in case.objs("HorizontalPodAutoscaler")}

    def state():
        problems = []
        live = {p["metadata"]["name"]: p for p in kget("pdb", "-n", case.ns)["items"]}
        if set(live) != want_pdb:
            return False, f"PDBs {sorted(live)}, rendered {sorted(want_pdb)}"
        for n, p in live.items():
            st = p.get("status", {})
            if st.get("observedGeneration") != p["metadata"]["generation"] or st.get("expectedPods", 0) < 1 \
                    or st.get("currentHealthy") != st.get("expectedPods") or st.get("disruptionsAllowed", 0) < 1:
                problems.append(f"PDB {n}: {st}")
        hpas = {h["metadata"]["name"]: h for h in kget("hpa", "-n", case.ns)["items"]}
        if set(hpas) != want_hpa:
            return False, f"HPAs {sorted(hpas)}, rendered {sorted(want_hpa)}"
        for n, h in hpas.items():
            conds = {c["type"]: c for c in h.get("status", {}).get("conditions") or []}
            # The HPA controller took it up: it can scale the target (no metrics server here, so
            # ScalingActive stays False for want of CPU metrics).
            if conds.get("AbleToScale", {}).get("status") != "True":
                problems.append(f"HPA {n}: AbleToScale is not True: {conds.get('AbleToScale')}")
            target = h["spec"]["scaleTargetRef"]["name"]
            if target not in deployments(case.ns):
                problems.append(f"HPA {n}: targets missing Deployment {target}")
        return not problems, "\n".join(problems)

    poll("PDBs observed by the disruption controller and HPAs by the HPA controller", secs, state)
    return f"{len(want_pdb)} PDBs (each allows one disruption), {len(want_hpa)} HPAs (AbleToScale)"


def hpas_at_min(case):
    """An autoscaled Deployment has no replicas field: it starts with 1 pod, and the HPA controller
    brings it to minReplicas (before any metric: there is no metrics server here)."""
    # An HPA on a Rollout (progressiveDelivery) is Argo Rollouts' to honour; its controller is not run here.
    want = {h["spec"]["scaleTargetRef"]["name"]: h["spec"].get("minReplicas", 1)
            for h in case.objs("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["kind"] == "Deployment"}
    if not want:
        return "no HPAs on Deployments in these values"

    def state():
        live = deployments(case.ns)
        low = {n: live.get(n, {}).get("spec", {}).get("replicas") for n, m in want.items()
               if (live.get(n, {}).get("spec", {}).get("replicas") or 0) < m}
        return not low, f"below minReplicas: {low}"
    poll("HPAs scaled to minReplicas", 90, state)
    return ", ".join(f"{n} {m}" for n, m in sorted(want.items()))


def pod_templates(ns):
    return {n: d["spec"]["template"] for n, d in deployments(ns).items()}


def reads_configmap(template, cm):
    s = json.dumps(template["spec"])
    return f'"name": "{cm}"' in s and ("configMapRef" in s or "configMapKeyRef" in s or '"configMap"' in s)


def pod_uids(ns):
    out = {}
    for p in pods(ns):
        comp = p["metadata"]["labels"].get("app.kubernetes.io/component")
        if p["metadata"].get("ownerReferences") and p["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet":
            out.setdefault(comp, set()).add(p["metadata"]["uid"])
    return out


def upgrade(case, sets, expect_rolled, what):
    """helm upgrade with extra --set values; exactly the Deployments in expect_rolled get new pods."""
    before_t = pod_templates(case.ns)
    before_p = pod_uids(case.ns)
    since = rv_now(case.ns)
    helm_run(case, ["upgrade", RELEASE, case.chart, "-n", case.ns, "--wait", "--timeout", case.timeout,
                    *case.value_args(*sets)], since)
    after_t = pod_templates(case.ns)
    rolled = sorted(n for n in after_t if before_t.get(n) != after_t[n])
    if rolled != sorted(expect_rolled):
        raise Fail(f"{what}: pod templates changed for {rolled}, expected exactly {sorted(expect_rolled)}")
    # Rolled targets end with none of their old pods, the others keep every pod.
    comp = {n: deployments(case.ns)[n]["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component")
            for n in after_t}

    def pods_state():
        now = pod_uids(case.ns)
        issues = []
        for n, c in comp.items():
            old, new = before_p.get(c, set()), now.get(c, set())
            if n in expect_rolled and old & new:
                issues.append(f"{n}: {len(old & new)} old pods still there")
            if n not in expect_rolled and old != new:
                issues.append(f"{n}: pods replaced although nothing it reads changed")
        return not issues, "; ".join(issues)

    poll(f"{what}: old pods replaced", 90, pods_state)
    wait_available(case)
    hooks = hooks_ran_in_order(case, since, case.render(*sets))
    return f"rolled {rolled or 'nothing'}; hooks again: {hooks.split(',')[0]}"


def release_objects(ns):
    """(kind, name) of every namespaced object labelled with the release."""
    types = [t for t in kubectl("api-resources", "--verbs=list,delete", "--namespaced", "-o", "name").split()
             if t not in ("events", "events.events.k8s.io")]
    items = kget(",".join(types), "-n", ns, "-l", INSTANCE)["items"]
    # What the CronJob controller makes on its schedule (Jobs) depends on the clock, not the release.
    return sorted((i["kind"], i["metadata"]["name"]) for i in items if not from_cronjob(i))


def from_cronjob(obj):
    return any(o.get("kind") == "CronJob" for o in obj["metadata"].get("ownerReferences") or [])


def manifest_objects(text, ns):
    docs = [d for d in yaml.safe_load_all(text) if d]
    return sorted((d["kind"], d["metadata"]["name"]) for d in docs
                  if d["kind"] not in ("PriorityClass",) and d["metadata"].get("namespace", ns) == ns)


def owned_by_workloads(objs):
    """Objects the controllers make from the release's (ReplicaSets, Pods, EndpointSlices...)."""
    return [o for o in objs if o[0] not in ("ReplicaSet", "Pod", "EndpointSlice", "Endpoints",
                                            "ControllerRevision")]


def rollback(case):
    since = rv_now(case.ns)
    p = helm_run(case, ["rollback", RELEASE, "1", "-n", case.ns, "--wait", "--timeout", case.timeout], since)
    del p
    wait_available(case)
    live = owned_by_workloads(release_objects(case.ns))
    want = manifest_objects(case.rev1_manifest, case.ns)
    hooks_sa = [o for o in live if o[0] == "ServiceAccount" and o not in want]
    extra = [o for o in live if o not in want and o not in hooks_sa]
    missing = [o for o in want if o not in live]
    if extra or missing:
        raise Fail(f"after rollback to revision 1: extra {extra}, missing {missing}")
    cur = {n: t["metadata"].get("annotations", {}).get("checksum/config") for n, t in pod_templates(case.ns).items()}
    first = {d["metadata"]["name"]: d["spec"]["template"]["metadata"].get("annotations", {}).get("checksum/config")
             for d in yaml.safe_load_all(case.rev1_manifest) if d and d["kind"] == "Deployment"}
    if cur != first:
        raise Fail(f"pod templates not back to revision 1: {cur} vs {first}")
    cm = [d for d in yaml.safe_load_all(case.rev1_manifest) if d and d["kind"] == "ConfigMap"
          and d["metadata"]["name"] == case.configmap]
    live_cm = kget("configmap", "-n", case.ns, case.configmap)["data"]
    if cm and live_cm != cm[0]["data"]:
        raise Fail(f"ConfigMap {case.configmap} not back to revision 1's data")
    runs = job_runs(case.ns, since)
    if runs:
        raise Fail(f"the chart has no rollback hooks, but Jobs ran: {[r['name'] for r in runs]}")
    hist = json.loads(helm("history", RELEASE, "-n", case.ns, "-o", "json").stdout)
    if hist[-1]["status"] != "deployed" or "Rollback to 1" not in hist[-1]["description"]:
        raise Fail(f"helm history: {hist[-1]}")
    return f"revision {hist[-1]['revision']}: revision 1's {len(want)} objects and config, no hooks run"


def evict(ns, pod):
    body = json.dumps({"apiVersion": "policy/v1", "kind": "Eviction",
                       "metadata": {"name": pod, "namespace": ns}})
    return run([KUBECTL, "--kubeconfig", KUBECONFIG, "create", "--raw",
                f"/api/v1/namespaces/{ns}/pods/{pod}/eviction", "-f", "-"], stdin=body)


def set_cordon(names, on):
    for n in names:
        kubectl("cordon" if on else "uncordon", n)


def eviction_honours_pdb(case):
    """With every node cordoned (replacements cannot start), the first eviction of a target with
    maxUnavailable 1 is allowed and the second is refused by the Eviction API."""
    pdbs = {p["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component"): p
            for p in kget("pdb", "-n", case.ns)["items"]}
    by_comp = {}
    for p in pods(case.ns):
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp"):
            by_comp.setdefault(p["metadata"]["labels"].get("app.kubernetes.io/component"), []).append(p)
    nodes = [n["metadata"]["name"] for n in kget("nodes")["items"]]
    target = next((c for c in sorted(pdbs) if len(by_comp.get(c, [])) >= 2), None)
    set_cordon(nodes, True)
    try:
        if target is None:
            comp = sorted(by_comp)[0]
            victim = by_comp[comp][0]["metadata"]["name"]
            r = evict(case.ns, victim)
            if r.returncode != 0:
                raise Fail(f"eviction of {victim} (no PDB) refused: {r.stderr.strip()}")
            return f"no PDB with two pods in these values; {victim} (no PDB) evicted at once"
        a, b = [p["metadata"]["name"] for p in by_comp[target][:2]]
        r = evict(case.ns, a)
        if r.returncode != 0:
            raise Fail(f"first eviction ({a}) refused although the PDB allows one: {r.stderr.strip()}")
        r = evict(case.ns, b)
        if r.returncode == 0:
            raise Fail(f"second eviction ({b}) accepted while {a}'s replacement cannot start: PDB not honoured")
        if "disruption budget" not in r.stderr:
            raise Fail(f"second eviction refused for another reason: {r.stderr.strip()}")
    finally:
        set_cordon(nodes, False)
        if target is not None:
            replace_pending(case, by_comp[target])
    wait_available(case)
    return f"{target}: {a} evicted, {b} refused (would violate the PDB), replaced once uncordoned"


def replace_pending(case, before):
    """The replacements of evicted pods waited while every node was cordoned; the scheduler put them
    on whichever node was uncordoned first, which no spread rule would choose. Delete them once every
    node is schedulable again so their ReplicaSet makes new ones the scheduler places on all nodes,
    and the next check starts from the state the chart's rules make, not from the test's cordons."""
    known = {p["metadata"]["name"] for p in before}
    comp = before[0]["metadata"]["labels"].get("app.kubernetes.io/component")
    fresh = [p["metadata"]["name"] for p in pods(case.ns, f"{INSTANCE},app.kubernetes.io/component={comp}")
             if p["metadata"]["name"] not in known and not p["metadata"].get("deletionTimestamp")]
    if not fresh:
        return

    def gone():
        left = {p["metadata"]["name"] for p in pods(case.ns)} & set(fresh)
        return not left, f"still there: {sorted(left)}"

    kubectl("delete", "pod", "-n", case.ns, "--wait=false", *fresh)
    poll("replacements made under cordon deleted", 120, gone)


def drain(case, timeout="120s"):
    """kubectl drain (cordon + Eviction API, retried while a PDB refuses) of the node with the most
    fluxo pods: it finishes, the pods come back elsewhere, within the spread rules."""
    counts = {}
    for p in pods(case.ns):
        if p["spec"].get("nodeName"):
            counts[p["spec"]["nodeName"]] = counts.get(p["spec"]["nodeName"], 0) + 1
    node = max(sorted(counts), key=lambda n: counts[n])
    try:
        spread_ok(case)
    except Fail as e:
        raise Fail(f"before the drain, the spread rules already did not hold (not the drain's doing):\n{e}")
    p = run([KUBECTL, "--kubeconfig", KUBECONFIG, "drain", node, "--pod-selector", INSTANCE,
             "--delete-emptydir-data", "--ignore-daemonsets", f"--timeout={timeout}"],
            timeout=int(timeout.rstrip("s")) + 60)
    try:
        if p.returncode != 0:
            refused = [line for line in p.stderr.splitlines() if "disruption budget" in line]
            raise Fail(f"drain of {node} did not finish within {timeout}: "
                       f"{(refused or p.stderr.strip().splitlines() or ['?'])[-1]}")
        left = [x["metadata"]["name"] for x in pods(case.ns) if x["spec"].get("nodeName") == node]
        if left:
            raise Fail(f"pods still on {node} after the drain: {left}")
        wait_available(case)
        spread = spread_ok(case, exclude_nodes={node})
    finally:
        kubectl("uncordon", node)
    return f"{node} ({counts[node]} pods) drained; {spread}"


def istioctl_analyze(case):
    """istioctl analyze of the release namespace, with the ingress gateway installed: errors fail
    (istioctl's own threshold); warnings are listed in the result."""
    p = run([ISTIOCTL, "analyze", "--kubeconfig", KUBECONFIG, "-n", case.ns, "--failure-threshold", "Error"],
            timeout=300)
    if p.returncode != 0:
        raise Fail(f"istioctl analyze (exit {p.returncode}):\n{p.stdout}{p.stderr}")
    msgs = [line for line in p.stdout.splitlines() if line.startswith(("Error", "Warning"))]
    if not msgs:
        return "no errors or warnings"
    return f"no errors; {len(msgs)} warnings:\n" + "\n".join(msgs)


def helm_test(case):
    tests = [d["metadata"]["name"] for d in case.rendered if d["kind"] == "Pod" and
             (d["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"]
    since = rv_now(case.ns)
    p = helm("test", RELEASE, "-n", case.ns, "--timeout", "120s", timeout=240)
    if p.returncode != 0:
        raise Fail(f"helm test: {p.stderr.strip()}\n{diagnose(case.ns, since)}")
    if warnings_in(p.stderr):
        raise Fail("admission warnings:\n" + "\n".join(warnings_in(p.stderr)))
    ran = re.findall(r"TEST SUITE:\s+(\S+)", p.stdout)
    phases = re.findall(r"Phase:\s+(\S+)", p.stdout)
    if not tests:
        if ran and ran != ["None"]:
            raise Fail(f"no test pods rendered, but helm ran {ran}")
        return "these values render no test pod (tests.enabled=false)"
    if ran != tests or phases != ["Succeeded"] * len(tests):
        raise Fail(f"helm test ran {ran} with phases {phases}, expected {tests} Succeeded:\n{p.stdout}")
    return f"{', '.join(tests)} Succeeded"


def uninstall(case):
    since = rv_now(case.ns)
    p = helm("uninstall", RELEASE, "-n", case.ns, "--wait", "--timeout", case.timeout, timeout=400)
    if p.returncode != 0:
        raise Fail(f"helm uninstall: {p.stderr}")
    del since
    # What the docs say stays: the hooks' ServiceAccount (NOTES.txt, docs/deploy-eks.md).
    expect = sorted(("ServiceAccount", d["metadata"]["name"]) for d in case.rendered
                    if d["kind"] == "ServiceAccount" and "pre-install" in
                    (d["metadata"].get("annotations") or {}).get("helm.sh/hook", ""))
    poll("only the documented leftovers remain after helm uninstall", 90,
         lambda: (release_objects(case.ns) == expect, f"left: {release_objects(case.ns)}"))
    releases = kget("secrets", "-n", case.ns, "-l", f"owner=helm,name={RELEASE}")["items"]
    if releases:
        raise Fail(f"helm release records left: {[s['metadata']['name'] for s in releases]}")
    if expect:
        kubectl("-n", case.ns, "delete", "sa", "-l", f"{INSTANCE},app.kubernetes.io/component=hooks")
    return f"left exactly {expect or 'nothing'} (documented); deleted it as the docs say" if expect \
        else "left nothing"


# ---- one values file, end to end --------------------------------------------------------------------
def setup(case):
    case.rendered = case.render()
    ensure_namespace(case.ns)
    made = secrets_for(case)
    case.extra_nodes = karpenter_nodes(case)
    pcs = priority_classes(case)
    case.configmap = next((d["metadata"]["name"] for d in case.objs("ConfigMap")
                           if any(reads_configmap(x["spec"]["template"], d["metadata"]["name"])
                                  for x in case.objs("Deployment"))), None)
    bits = [f"namespace {case.ns} (Pod Security restricted enforced)", f"Secrets {made}"]
    if case.extra_nodes:
        bits.append(f"{len(case.extra_nodes)} nodes labelled and tainted as karpenter/nodepools.yaml provisions them")
    if pcs:
        bits.append(f"PriorityClass {pcs} created (used by the chart, created by nobody)")
    return "; ".join(bits)


def teardown(case):
    run([HELM, "--kubeconfig", KUBECONFIG, "uninstall", RELEASE, "-n", case.ns, "--wait", "--timeout", "60s"])
    run([KUBECTL, "--kubeconfig", KUBECONFIG, "delete", "namespace", case.ns, "--wait=true", "--timeout=120s"],
        timeout=180)
    if case.extra_nodes:
        run([KUBECTL, "--kubeconfig", KUBECONFIG, "delete", "node", *case.extra_nodes, "--timeout=60s"])


def lifecycle(case):
    section(f"[{case.name}] install, upgrade, rollback, disruptions, helm test, uninstall")
    t0 = time.monotonic()
    tag = f"[{case.name}]"
    try:
        if not check(f"{tag} set-up", setup, case):
            return
        if not check(f"{tag} helm install --wait", install, case):
            return
        case.rev1_manifest = helm("get", "manifest", RELEASE, "-n", case.ns).stdout
        check(f"{tag} hooks ran in order and completed", hooks_ran_in_order, case, case.rv_install)
        check(f"{tag} HPAs scale their Deployments to minReplicas", hpas_at_min, case)
        check(f"{tag} every Deployment Available", wait_available, case)
        vals = case.values_get()
        if vals.get("progressiveDelivery", {}).get("argoRollouts", {}).get("enabled"):
            # Argo Rollouts' controller is not run here (only its CRDs): the Rollouts that own the
            # ledger's and balance's pods are accepted by the API server, their Deployments kept at
            # zero replicas, and nothing creates their pods. What follows needs those pods.
            print(f"  n/a   {tag} spread, PDBs, upgrades, rollback, disruptions, helm test: "
                  "no Argo Rollouts controller on this cluster to run the Rollouts' pods")
            check(f"{tag} helm uninstall leaves what the docs say", uninstall, case)
            return
        check(f"{tag} pods spread over zones and hosts as the topology rules say", spread_ok, case)
        check(f"{tag} PDBs and HPAs accepted and taken up by their controllers", pdbs_and_hpas, case)
        level = "debug" if vals["config"]["log"]["level"] != "debug" else "info"
        readers = sorted(n for n, t in pod_templates(case.ns).items() if case.configmap and
                         reads_configmap(t, case.configmap))
        check(f"{tag} helm upgrade config.log.level={level}: the ConfigMap's readers roll, hooks run again",
              upgrade, case, [f"config.log.level={level}"], readers, "config.log.level")
        ledger = next((n for n, d in deployments(case.ns).items()
                       if d["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == "ledger"), None)
        dash = not vals["monitoring"]["dashboards"]["enabled"]
        sets = [f"config.log.level={level}", "ledger.extraEnv.RUST_BACKTRACE=full", f"monitoring.dashboards.enabled={str(dash).lower()}"]
        check(f"{tag} helm upgrade ledger.extraEnv (+ dashboards {'on' if dash else 'off'}): only the ledger rolls",
              upgrade, case, sets, [ledger] if ledger else [], "ledger.extraEnv")
        check(f"{tag} helm rollback to revision 1", rollback, case)
        check(f"{tag} Eviction API honours the PDB", eviction_honours_pdb, case)
        check(f"{tag} node drain moves pods within the rules", drain, case)
        if vals.get("istio", {}).get("enabled"):
            check(f"{tag} istioctl analyze against the live API server", istioctl_analyze, case)
        else:
            print(f"  n/a   {tag} istioctl analyze: mesh off in these values (istio.enabled=false)")
        check(f"{tag} helm test", helm_test, case)
        check(f"{tag} helm uninstall leaves what the docs say", uninstall, case)
    finally:
        teardown(case)
        print(f"  ({case.name}: {time.monotonic() - t0:.0f}s)", flush=True)


# ---- self-tests: a broken chart must fail the platform checks --------------------------------------
def broken_chart(tmp, template, old, new):
    dst = pathlib.Path(tmp) / "fluxo"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(CHART, dst)
    f = dst / "templates" / template
    text = f.read_text()
    if old not in text:
        raise Fail(f"self-test set-up: {old!r} not in {template}")
    f.write_text(text.replace(old, new, 1))
    return dst


def self_tests():
    section("self-tests (a broken chart must fail the platform checks)")
    base = [CHART / "ci" / "mesh-off-values.yaml"]
    with tempfile.TemporaryDirectory() as tmp:
        # 1. A pod that violates `restricted`: the ReplicaSets cannot create pods, helm warns.
        case = Case("selftest-psa", base, extra_set=["securityContext.allowPrivilegeEscalation=true"], timeout="45s")
        try:
            setup(case)
            expect_fail("a container with allowPrivilegeEscalation: true (violates restricted)",
                        r"PodSecurity|restricted", install, case, show=r"violate PodSecurity")
        finally:
            teardown(case)
        # 2. A hook that never completes (its pod can never be scheduled): the install fails.
        chart = broken_chart(tmp, "hooks.yaml", "      restartPolicy: Never\n",
                             "      restartPolicy: Never\n      nodeSelector: {fluxo.dev/no-such-node: \"true\"}\n")
        case = Case("selftest-hook", base, chart=chart, timeout="20s")
        try:
            setup(case)

            expect_fail("a hook Job that never completes (short helm timeout)",
                        r"timed out.*Job fluxo-migrate.*not complete", install, case,
                        show=r"timed out|Job fluxo-migrate|FailedScheduling")
        finally:
            teardown(case)
        # 3. A PDB that blocks every eviction: the drain cannot finish.
        chart = broken_chart(tmp, "pdb.yaml", "  maxUnavailable: {{ $t.pdb.maxUnavailable }}\n",
                             "  maxUnavailable: 0\n")
        case = Case("selftest-pdb", base, chart=chart)
        try:
            setup(case)
            if check("[selftest-pdb] helm install --wait", install, case):
                expect_fail("a PDB with maxUnavailable: 0 (blocks every eviction): the drain fails",
                            r"disruption budget|did not finish", drain, case, "20s", show=r"disruption budget")
                expect_fail("a PDB with maxUnavailable: 0: the PDB check reports no disruption allowed",
                            r"disruptionsAllowed", pdbs_and_hpas, case, 10, show=r"PDB fluxo-ledger")
        finally:
            teardown(case)


# ---- main ---------------------------------------------------------------------------------------------
def read_pins():
    """Pinned versions live in scripts/validate-k8s.sh (one place for the CRDs' versions)."""
    text = (ROOT / "scripts" / "validate-k8s.sh").read_text()
    pins = dict(re.findall(r"^([A-Z_]+_VERSION)=(\S+)", text, re.M))
    for k in ("KUBE_VERSION", "KEDA_VERSION", "ISTIO_API_VERSION", "KARPENTER_VERSION", "PROMETHEUS_OPERATOR_VERSION",
              "ARGO_ROLLOUTS_VERSION"):
        if k not in pins:
            sys.exit(f"platform_test: {k} not found in scripts/validate-k8s.sh")
    return pins


def main():
    global KUBECTL, HELM, ISTIOCTL, KUBECONFIG, VERSIONS, KUBE_VERSION, ZONES, HELM_TIMEOUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--kubectl", required=True)
    ap.add_argument("--helm", required=True)
    ap.add_argument("--istioctl", required=True)
    ap.add_argument("--zones", default="zone-a,zone-b,zone-c")
    ap.add_argument("--no-self-tests", action="store_true")
    ap.add_argument("cases", nargs="*", help="values cases (defaults, or the name of a ci/<name>-values.yaml)")
    a = ap.parse_args()
    KUBECTL, HELM, ISTIOCTL, KUBECONFIG = a.kubectl, a.helm, a.istioctl, a.kubeconfig
    ZONES = a.zones.split(",")
    VERSIONS = read_pins()
    KUBE_VERSION = VERSIONS["KUBE_VERSION"]
    HELM_TIMEOUT = os.environ.get("FLUXO_PLATFORM_HELM_TIMEOUT", HELM_TIMEOUT)
    all_cases = ["defaults"] + sorted(f.name[: -len("-values.yaml")] for f in (CHART / "ci").glob("*-values.yaml"))
    cases = a.cases or all_cases
    unknown = set(cases) - set(all_cases)
    if unknown:
        sys.exit(f"platform_test: unknown cases {sorted(unknown)}; known: {all_cases}")
    start = time.monotonic()

    section(f"cluster: Kubernetes {KUBE_VERSION}, CRDs of the pinned versions, cluster-level manifests")
    version = json.loads(kubectl("version", "-o", "json"))["serverVersion"]["gitVersion"]
    if version != KUBE_VERSION:
        bad("API server version", f"{version}, expected {KUBE_VERSION}")
    else:
        ok(f"API server {version}, {len(kget('nodes')['items'])} kwok nodes in zones {ZONES}")
    install_crds()
    cluster_pieces()
    check("Istio ingress gateway chart installed with istio/ingress-gateway-values.yaml", ingress_gateway)
    if failed:
        print(f"\n{passed} passed, {failed} failed")
        return 1

    for name in cases:
        values = [] if name == "defaults" else [CHART / "ci" / f"{name}-values.yaml"]
        lifecycle(Case(name, values))
    if not a.no_self_tests:
        self_tests()
    print(f"\n(platform tests took {time.monotonic() - start:.0f}s)")
    print(f"\n{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
