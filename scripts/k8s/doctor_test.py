"""`fluxo doctor` and the consolidators' pod-deletion cost, on the autoscaling suite's cluster.

Run by scripts/k8s/autoscaling_test.py after its scenarios, with the real KEDA, Karpenter and fluxo
processes it started: `run(at)` takes that module (its helpers and state).

- doctor on the chart as installed (mesh on: the test's Helm post-renderer runs `istioctl
  kube-inject`, Istio's own injection templates, since no istiod runs here) passes every check,
  at rest and with lag (KEDA Active, its metric held against fluxo's);
- each broken install is reported by the right check with exit status 1: ScaledObject removed,
  consumer group missing, a PDB that blocks every eviction, mesh on but pods not injected;
- two consolidator pods, one of which (its real `fluxo serve --target consolidator` run here
  with that pod's name and its ServiceAccount's token) holds pending work: scaling 2 -> 1 deletes
  the idle one.
"""

import json
import os
import pathlib
import subprocess
import time
import urllib.parse

import platform_test as pt
from platform_test import Fail, check, poll, section

AT = None  # the autoscaling test module


def doctor(*extra, env=None):
    """Runs fluxo doctor --output json; (exit status, report)."""
    cmd = [AT.FLUXO, "doctor", "--kubeconfig", pt.KUBECONFIG, "--namespace", AT.NS, "--release", pt.RELEASE,
           "--output", "json", *extra]
    full = AT.base_env(cmd)
    full.update(AT.fluxo_env(env))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=full)
    try:
        report = json.loads(p.stdout)
    except json.JSONDecodeError as e:
        raise Fail(f"fluxo doctor (exit {p.returncode}) printed no JSON report: {p.stdout[-800:]}{p.stderr[-800:]}") from e
    return p.returncode, report


def by_id(report):
    return {c["id"]: c for c in report["checks"]}


def story(report):
    return "\n".join(f"{c['status']:8} {c['id']}: {c['summary']}" + "".join(f"\n           {d}" for d in c.get("details", []))
                     for c in report["checks"])


def healthy(expect_passed, what):
    rc, report = doctor()
    checks = by_id(report)
    failed = [c for c in report["checks"] if c["status"] == "failed"]
    if rc != 0 or failed or not report["healthy"]:
        raise Fail(f"doctor exit {rc} on {what}:\n{story(report)}")
    not_passed = [i for i in expect_passed if checks.get(i, {}).get("status") != "passed"]
    if not_passed:
        raise Fail(f"expected these checks to pass on {what}: {not_passed}\n{story(report)}")
    return report


def broken(check_id, pattern, what):
    """doctor must exit 1 with check_id failed (summary/details matching pattern)."""
    import re
    rc, report = doctor()
    c = by_id(report).get(check_id)
    text = (c or {}).get("summary", "") + "\n" + "\n".join((c or {}).get("details", []))
    if rc != 1 or not c or c["status"] != "failed" or not re.search(pattern, text, re.I):
        raise Fail(f"{what}: expected exit 1 with {check_id} failed /{pattern}/, got exit {rc}:\n{story(report)}")
    others = [x["id"] for x in report["checks"] if x["status"] == "failed" and x["id"] != check_id]
    return f"{check_id}: {c['summary'][:160]}" + (f" (also failed: {', '.join(others)})" if others else "") + f"; fix: {c.get('fix', '')[:120]}"


# ---- mesh injection: istioctl kube-inject as a Helm post-renderer -----------------------------------
def injector():
    """A post-renderer script that injects the Istio sidecar with istioctl's offline templates."""
    state = AT.STATE
    istioctl = str(AT.ROOT / "target" / "tools" / "istioctl")
    mesh, inject, values = state / "mesh.yaml", state / "inject-config.yaml", state / "inject-values.yaml"
    if not inject.exists():
        # As istio/istiod-values.yaml installs it: Istio CNI (no privileged istio-init, so the
        # injected pods pass Pod Security `restricted`), native sidecars (the chart's annotation).
        out = pt.run([istioctl, "manifest", "generate", "--set", "components.cni.enabled=true",
                      "--set", "values.pilot.cni.enabled=true", "--set", "values.global.proxy.image=proxyv2"],
                     timeout=300)
        if out.returncode != 0:
            raise Fail(f"istioctl manifest generate: {out.stderr[-600:]}")
        import yaml
        docs = [d for d in yaml.safe_load_all(out.stdout) if d]
        cms = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}
        try:
            mesh.write_text(cms["istio"]["data"]["mesh"])
            inject.write_text(cms["istio-sidecar-injector"]["data"]["config"])
            values.write_text(cms["istio-sidecar-injector"]["data"]["values"])
        except KeyError as e:
            raise Fail(f"istioctl manifest generate has no {e} ConfigMap data") from e
    script = state / "inject.sh"
    # kube-inject also lists MutatingWebhookConfigurations (there are none here) before it injects
    # from the files; client-go's watch-list is off as for kubectl (see cluster.sh).
    script.write_text(
        "#!/bin/sh\nKUBE_FEATURE_WatchListClient=false exec " + istioctl + f" kube-inject -f - --kubeconfig {pt.KUBECONFIG} "
        f"--meshConfigFile {mesh} --injectConfigFile {inject} --valuesFile {values}\n")
    script.chmod(0o755)
    return str(script)


# The test cluster serves no resource metrics API (no metrics-server): the CPU HPAs of ledger,
# balance and gateway could never scale there, and doctor says so (its hpa check fails with
# FailedGetResourceMetric). The healthy install here leaves them off; KEDA's HPA stays.
NO_CPU_HPA = [f"{t}.autoscaling.enabled=false" for t in ("ledger", "balance", "gateway")]


def upgrade(*sets, inject=True, cpu_hpa=False):
    sets = (*([] if cpu_hpa else NO_CPU_HPA), *sets)
    args = ["upgrade", "--install", pt.RELEASE, str(AT.CHART), "-n", AT.NS, *AT.helm_values(*sets), "--timeout", "120s"]
    if inject:
        args += ["--post-renderer", injector()]
    p = pt.helm(*args)
    if p.returncode != 0:
        raise Fail(f"helm upgrade: {p.stderr.strip()[-1500:]}")


def rolled_out():
    def f():
        ds = pt.kget("-n", AT.NS, "deploy", "-l", pt.INSTANCE)["items"]
        waiting = [d["metadata"]["name"] for d in ds
                   if (d["status"].get("updatedReplicas", 0) < d["spec"].get("replicas", 0)
                       or d["status"].get("availableReplicas", 0) < d["spec"].get("replicas", 0)
                       or d["status"].get("replicas", 0) != d["spec"].get("replicas", 0))]
        return not waiting, f"waiting for {waiting}"
    poll("the release's Deployments rolled out", 180, f, interval=1)


PASSING = ["deployments", "version", "services", "migrations", "consumer-group", "stream-readers", "scaledobject", "keda-lag",
           "hpa", "pdb", "mesh-mtls", "mesh-injection", "authorization", "nodepools"]


def scenarios():
    def at_rest():
        # The ingress gateway's identity, which the gateway's AuthorizationPolicy admits, exists
        # where Istio's ingress gateway is installed; here only its ServiceAccount stands for it.
        AT.apply([{"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": "istio-ingressgateway", "namespace": "istio-ingress"}}])
        upgrade()
        rolled_out()
        g = AT.REDIS.group_info() or {}
        if g.get("lag") or g.get("pending"):
            AT.drain_backlog()
        expect = [c for c in PASSING if not (AT.NO_KARPENTER and c == "nodepools")]
        report = healthy(expect, "the chart as installed")
        c = by_id(report)
        return f"{len(report['checks'])} checks, none failed; {c['keda-lag']['summary']}"
    if check("doctor: a healthy install (mesh injected, KEDA, Karpenter) passes every check", at_rest) is None:
        return

    def with_lag():
        AT.book(300, "doctor-lag")
        AT.wait_lag(lambda g: (g.get("lag") or 0) >= 300, 60, "300 entries waiting")
        poll("ScaledObject Active", 90,
             lambda: (AT.condition(AT.so_obj(), "Active").get("status") == "True", AT.so_story()), interval=1)
        # KEDA's metrics server answers from its last poll: wait until it has seen the lag.
        report = None
        # KEDA scales the consolidators out meanwhile (Karpenter adds a node): doctor passes once
        # that scale-out is available.
        deadline = time.monotonic() + 150
        while True:
            rc, report = doctor()
            if rc == 0 or time.monotonic() > deadline:
                break
            time.sleep(2)
        if rc != 0:
            raise Fail(f"doctor exit {rc} with lag:\n{story(report)}")
        c = by_id(report)
        import re
        shown = re.match(r"KEDA's metric (\d+)\.", c["keda-lag"]["summary"])
        if c["keda-lag"]["status"] != "passed" or not shown or int(shown.group(1)) == 0:
            raise Fail(f"expected KEDA and fluxo to agree on a non-zero lag:\n{story(report)}")
        return f"{c['scaledobject']['summary']}; {c['keda-lag']['summary']}"
    check("doctor: with 300 entries waiting, ScaledObject Active and KEDA's metric agrees with fluxo's lag", with_lag)
    AT.drain_backlog()

    # ---- broken installs: each reported by the right check, exit 1
    def so_removed():
        pt.kubectl("-n", AT.NS, "delete", "scaledobject", AT.SO, "--wait=true")
        try:
            return broken("scaledobject", r"no ScaledObject", "ScaledObject removed")
        finally:
            upgrade()
    check("doctor: ScaledObject removed -> scaledobject fails, exit 1", so_removed)

    def group_missing():
        AT.REDIS.cmd("XGROUP", "DESTROY", AT.STREAM, AT.GROUP)
        try:
            return broken("consumer-group", r"does not exist", "consumer group missing")
        finally:
            AT.sh(AT.FLUXO, "queue", "init", env=AT.fluxo_env(), what="fluxo queue init")
            AT.drain_backlog()
    check("doctor: consumer group missing -> consumer-group fails, exit 1", group_missing)

    def pdb_blocks():
        name = "platform-team-ledger"
        AT.apply([{"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                   "metadata": {"name": name, "namespace": AT.NS},
                   "spec": {"minAvailable": "100%",
                            "selector": {"matchLabels": {"app.kubernetes.io/instance": pt.RELEASE,
                                                         "app.kubernetes.io/component": "ledger"}}}}])
        try:
            return broken("pdb", rf"pdb/{name} on deployment/\S*ledger: minAvailable is 100%", "a blocking PDB")
        finally:
            pt.kubectl("-n", AT.NS, "delete", "pdb", name, "--wait=true")
    check("doctor: a PodDisruptionBudget that blocks every eviction -> pdb fails, exit 1", pdb_blocks)

    def not_injected():
        # The injector did not run for this rollout (namespace label lost, webhook down): new pods
        # without the sidecar while the chart's STRICT PeerAuthentication and policies stand.
        upgrade(inject=False)
        rolled_out()
        try:
            return broken("mesh-injection", r"has no istio-proxy", "pods not injected")
        finally:
            upgrade()
            rolled_out()
    check("doctor: mesh on but pods not injected -> mesh-injection fails, exit 1", not_injected)
    def hpa_without_metrics():
        upgrade(cpu_hpa=True)
        rolled_out()
        try:
            def reported():
                try:
                    return True, broken("hpa", r"FailedGetResourceMetric", "CPU HPAs without a metrics API")
                except Fail as e:
                    return False, str(e)
            return poll("doctor reports the HPAs that cannot read CPU", 90, reported, interval=3)
        finally:
            upgrade()
            rolled_out()
    check("doctor: CPU HPAs on a cluster without a resource metrics API -> hpa fails, exit 1", hpa_without_metrics)
    check("doctor: repaired install passes again",
          lambda: f"{len(healthy([c for c in PASSING if not (AT.NO_KARPENTER and c == 'nodepools')], 'the repaired install')['checks'])} checks, none failed")


# ---- pod-deletion cost -------------------------------------------------------------------------------
def pods():
    return [p for p in AT.consolidator_pods() if not p["metadata"].get("deletionTimestamp")]


def deletion_cost():
    sa = f"{pt.RELEASE}-consolidator"
    sa_ref = f"system:serviceaccount:{AT.NS}:{sa}"

    def rbac():
        can = {}
        for verb, res in (("patch", "pods"), ("get", "pods"), ("list", "pods"), ("delete", "pods"),
                          ("get", "secrets"), ("patch", "deployments")):
            p = pt.run([pt.KUBECTL, "--kubeconfig", pt.KUBECONFIG, "auth", "can-i", verb, res, "-n", AT.NS, "--as", sa_ref])
            can[f"{verb} {res}"] = p.stdout.strip() == "yes"
        extra = [k for k, v in can.items() if v and k != "patch pods"]
        if not can["patch pods"] or extra:
            raise Fail(f"the consolidators' Role must allow patch on pods and nothing else: {can}")
        return "patch pods: yes; get/list/delete pods, get secrets, patch deployments: no"

    def two_to_one():
        upgrade("keda.enabled=false", "consolidator.replicas=2", "consolidator.podDeletionCost.intervalSeconds=1")
        poll("exactly two consolidator pods, both Running", 180,
             lambda: (len(pods()) == 2 and all(p.get("status", {}).get("phase") == "Running" for p in pods()),
                      [(p["metadata"]["name"], p.get("status", {}).get("phase")) for p in pods()]), interval=1)
        busy, idle = sorted(p["metadata"]["name"] for p in pods())
        kubeconfig = AT.token_kubeconfig(sa, AT.CLUSTER_DIR, ns=AT.NS)
        # The busy pod's consolidator reaches PostgreSQL through a relay the test cuts: what it
        # reads it cannot apply, so it holds it (pending, retried).
        u = urllib.parse.urlparse(AT.DB_URL)
        relay = AT.Relay(u.hostname or "127.0.0.1", u.port or 5432)
        # Same host name (TLS verifies it), the relay's port.
        userinfo = u.netloc.rsplit("@", 1)[0] + "@" if "@" in u.netloc else ""
        db_url = urllib.parse.urlunparse(u._replace(netloc=f"{userinfo}{u.hostname}:{relay.port}"))
        p = AT.spawn("fluxo-consolidator-busy", [AT.FLUXO, "serve", "--target", "consolidator"],
                     env=AT.fluxo_env({"FLUXO_DATABASE__URL": db_url, "FLUXO_GRPC__LISTEN": f"127.0.0.1:{AT.free_port()}",
                                       "POD_NAME": busy, "POD_NAMESPACE": AT.NS, "KUBECONFIG": kubeconfig,
                                       "FLUXO_CONSOLIDATOR__POD_DELETION_COST_INTERVAL_MS": "1000",
                                       # Retried by its own claims every few seconds, never
                                       # dead-lettered while the database is away.
                                       "FLUXO_CONSOLIDATOR__CLAIM_IDLE_MS": "4000",
                                       "FLUXO_CONSOLIDATOR__MAX_DELIVERIES": "100000",
                                       "FLUXO_LOG__LEVEL": "info,fluxo=debug,fluxo_kube=debug"}))
        try:
            def annotated(want):
                def f():
                    pod = AT.API.get(f"/api/v1/namespaces/{AT.NS}/pods/{busy}") or {}
                    cost = (pod.get("metadata", {}).get("annotations") or {}).get("controller.kubernetes.io/pod-deletion-cost")
                    return want(cost), f"pod-deletion-cost {cost!r}; " + " | ".join(AT.log_tail("fluxo-consolidator-busy", n=3))
                return f
            poll("the busy pod's consolidator reports its cost (0 while idle)", 60, annotated(lambda c: c == "0"), interval=0.5)
            relay.close()
            AT.book(40, "deletion-cost")
            poll("the busy pod holds the entries it cannot apply (cost > 0)", 90,
                 annotated(lambda c: c is not None and int(c) > 0), interval=0.5)
            held = annotated(lambda c: True)()[1].split("'")[1]
            idle_pod = AT.API.get(f"/api/v1/namespaces/{AT.NS}/pods/{idle}") or {}
            idle_cost = (idle_pod.get("metadata", {}).get("annotations") or {}).get("controller.kubernetes.io/pod-deletion-cost")
            pt.kubectl("-n", AT.NS, "scale", "deploy", AT.DEPLOY, "--replicas=1")
            left = poll("one consolidator pod left", 90,
                        lambda: (len(pods()) == 1, [x["metadata"]["name"] for x in pods()]), interval=0.5)
            remaining = [x["metadata"]["name"] for x in pods()]
            if remaining != [busy]:
                raise Fail(f"scaling 2 -> 1 deleted the busy pod {busy} (cost {held}) and kept {remaining} (cost {idle_cost!r})")
            relay.open()
            poll("the busy consolidator applies what it held once PostgreSQL is back (cost back to 0)", 120,
                 annotated(lambda c: c == "0"), interval=0.5)
            return f"kept {busy} (cost {held}: entries it held), deleted {idle} (cost {idle_cost or 'unset'})"
        finally:
            AT.stop(p)
            relay.close()
            upgrade()
            AT.drain_backlog()

    check("pod-deletion cost: the consolidators' Role is patch on pods, nothing else", rbac)
    check("pod-deletion cost: scaling 2 -> 1 deletes the idle consolidator, keeps the one holding work", two_to_one)


def run(at):
    global AT
    AT = at
    section("fluxo doctor (kube crate)")
    scenarios()
    section("consolidators' pod-deletion cost")
    deletion_cost()
