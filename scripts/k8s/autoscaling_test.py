#!/usr/bin/env python3
"""Autoscaling platform tests: the chart's ScaledObject driven by the real KEDA, and the repository's
NodePools driven by the real Karpenter, on the local control plane (scripts/k8s/cluster.sh).

Run through scripts/k8s/platform-test.sh (which brings a fresh cluster up and down around it),
inside scripts/test.sh, whose PostgreSQL and Redis it uses (FLUXO_TEST_POSTGRES_URL,
FLUXO_TEST_REDIS_URL). What runs, all as processes on 127.0.0.1:

- KEDA (scripts/k8s/autoscalers.sh builds it): the operator, the metrics API server behind an
  APIService for external.metrics.k8s.io (the kube-apiserver's aggregation layer proxies to it
  through an ExternalName Service on localhost), the admission webhooks; each with its own
  ServiceAccount token and RBAC, so the RBAC keda/README.md gives is what is exercised.
- Karpenter with its kwok cloud provider: karpenter/nodepools.yaml with a KWOKNodeClass in place
  of the EC2NodeClass; the nodes it creates are played by the cluster's kwok.
- fluxo itself: `fluxo serve --target ledger` (with its outbox relay) books entries into the test
  PostgreSQL and publishes them to the test Redis; `fluxo serve --target consolidator` processes
  run by this test drain the stream (kwok pods run no code, so the Deployment's pods stand for
  capacity, and these processes for the work they would do).

KEDA reaches Redis through a TCP relay in this process, so "Redis unreachable for KEDA" is a
real broken connection while fluxo keeps its own.

Then scripts/k8s/doctor_test.py: `fluxo doctor` and the pod-deletion cost on this installation
(FLUXO_AUTOSCALING_DOCTOR_ONLY=1 runs only those after the set-up, for local iteration), and last
the notifier (notifier.enabled): its own ScaledObject on the notifiers' group, woken from zero by
one entry while the consolidators rest, the webhook delivered by a real `fluxo serve --target
notifier` to the suite's HTTPS receiver and verified with the Standard Webhooks library
(FLUXO_AUTOSCALING_NOTIFIER_ONLY=1 runs only that after the set-up).

Each scenario prints its figures. The last line is "N passed, M failed".
"""

import argparse
import atexit
import base64
import http.client
import json
import math
import os
import pathlib
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse

import yaml

import doctor_test
import platform_test as pt
from platform_test import Fail, bad, check, ok, section, poll

ROOT = pt.ROOT
CHART = pt.CHART
NS = "fluxo-autoscale"
KEDA_NS = "keda"
SO = "fluxo-consolidator"            # ScaledObject, HPA and Deployment share the name
DEPLOY = "fluxo-consolidator"
STREAM = "fluxo:platform:entries"
GROUP = "consolidators"
VALUES = ROOT / "scripts" / "k8s" / "autoscaling-values.yaml"
# The notifier (section "notifier" below): its own Deployment and ScaledObject on its own group.
NOTIFIER = "fluxo-notifier"           # ScaledObject and Deployment
NGROUP = "notifiers"
WEBHOOK_KEY = base64.b64encode(b"fluxo-platform-test-sealing-key!").decode()
# fluxo-consumers' consolidateAfter is 2m in karpenter/nodepools.yaml; the test's copy waits this long.
CONSOLIDATE_AFTER = "10s"

STATE = pathlib.Path()
PROCS = []          # (name, Popen, log path)
REDIS = None        # test-suite Redis (direct)
PROXY = None        # KEDA's way to Redis
FLUXO = ""
LEDGER_ADDR = ""
GHZ = ""
VAL = {}            # the test values, parsed
FIG = {}            # measured figures, printed at the end
# Local iteration only (refused under CI): no Karpenter, pods on the cluster's static kwok nodes.
CLUSTER_DIR = ""
NO_KARPENTER = bool(os.environ.get("FLUXO_AUTOSCALING_NO_KARPENTER"))


# ---- processes -----------------------------------------------------------------------------------
def spawn(name, cmd, env=None, cwd=None):
    if not os.access(cmd[0], os.X_OK):
        raise Fail(f"{cmd[0]} not found: scripts/k8s/autoscalers.sh build (or cargo build) makes it")
    log = STATE / f"{name}.log"
    f = open(log, "ab")
    full_env = base_env(cmd)
    full_env.update(env or {})
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
                         cwd=cwd, start_new_session=True)
    f.close()
    PROCS.append((name, p, log))
    return p


def stop(p, secs=20):
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        p.wait(secs)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(10)


def stop_all():
    for _, p, _ in reversed(PROCS):
        stop(p, 10)
    if PROXY:
        PROXY.close()


def log_tail(name, pattern=None, n=6):
    for pname, _, log in PROCS:
        if pname == name:
            try:
                lines = log.read_text(errors="replace").splitlines()
            except OSError:
                return []
            # Log records only (they start with a timestamp), not the stack traces under them.
            lines = [x for x in lines if x[:1].isdigit()]
            if pattern:
                lines = [x for x in lines if re.search(pattern, x, re.I)]
            return [redact(x)[:300] for x in lines[-n:]]
    return []


def redact(line):
    """Never print a URL's password."""
    return re.sub(r"(://[^:/@\s]*:)[^@\s]+@", r"\1***@", line)


def alive(name):
    for pname, p, _ in PROCS:
        if pname == name and p.poll() is None:
            return True
    return False


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---- a minimal Redis client (RESP2) --------------------------------------------------------------
class RedisError(Exception):
    pass


class Redis:
    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 6379
        self.password = urllib.parse.unquote(u.password) if u.password else None
        self.db = int(u.path.strip("/") or 0)
        self.sock = None
        self.buf = b""

    def connect(self):
        self.sock = socket.create_connection((self.host, self.port), timeout=10)
        self.buf = b""
        if self.password:
            self.cmd("AUTH", self.password)
        if self.db:
            self.cmd("SELECT", self.db)

    def cmd(self, *args):
        if self.sock is None:
            self.connect()
        out = b"*%d\r\n" % len(args)
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out += b"$%d\r\n%s\r\n" % (len(a), a)
        try:
            self.sock.sendall(out)
            return self._reply()
        except (OSError, ConnectionError):
            self.sock = None
            raise

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def _reply(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            raise RedisError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n).decode(errors="replace")
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RedisError(f"unexpected reply {line[:40]!r}")

    def group_info(self, stream=STREAM, group=None):
        group = group or GROUP
        try:
            groups = self.cmd("XINFO", "GROUPS", stream)
        except RedisError:
            return None
        for g in groups:
            d = dict(zip(g[::2], g[1::2]))
            if d.get("name") == group:
                return d
        return None


# ---- a TCP relay: KEDA's path to Redis, which the test can cut -------------------------------------
class Relay:
    def __init__(self, target_host, target_port):
        self.target = (target_host, target_port)
        self.port = free_port()
        self.lsock = None
        self.conns = []
        self.lock = threading.Lock()
        self.open()

    def open(self):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.lsock = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, s):
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.target, timeout=5)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns += [c, up]
            threading.Thread(target=self._pump, args=(c, up), daemon=True).start()

    def _pump(self, a, b):
        socks = [a, b]
        try:
            while True:
                r, _, _ = select.select(socks, [], [], 1.0)
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        raise OSError
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            for s in socks:
                try:
                    s.close()
                except OSError:
                    pass

    def close(self):
        """Redis unreachable: the listener goes (connections refused) and open connections drop."""
        if self.lsock:
            try:
                # shutdown first: close() alone leaves the socket listening while the accept
                # thread is blocked in accept(), and one more connection would still get through.
                self.lsock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                self.lsock.close()
            except OSError:
                pass
            self.lsock = None
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    c.close()
                except OSError:
                    pass
            self.conns = []


# ---- the API server, directly (polling through kubectl is too slow on a busy 2-core machine) -------
class Api:
    def __init__(self, cluster_dir):
        pki = pathlib.Path(cluster_dir) / "pki"
        self.port = int((pathlib.Path(cluster_dir) / "api-port").read_text())
        self.ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self.local = threading.local()

    def get(self, path):
        for attempt in range(3):
            c = getattr(self.local, "conn", None)
            if c is None:
                c = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=30)
                self.local.conn = c
            try:
                c.request("GET", path)
                r = c.getresponse()
                body = r.read()
            except (OSError, http.client.HTTPException):
                self.local.conn = None
                if attempt == 2:
                    raise
                continue
            if r.status == 404:
                return None
            if r.status >= 300:
                raise Fail(f"GET {path}: {r.status} {body[:300]!r}")
            return json.loads(body)


API = None


def deploy(name=DEPLOY):
    return API.get(f"/apis/apps/v1/namespaces/{NS}/deployments/{name}")


def replicas(name=DEPLOY):
    d = deploy(name)
    return (d or {}).get("spec", {}).get("replicas", 0) or 0


def so_obj(name=SO):
    return API.get(f"/apis/keda.sh/v1alpha1/namespaces/{NS}/scaledobjects/{name}")


def condition(obj, type_):
    for c in (obj or {}).get("status", {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return {}


def consolidator_pods():
    sel = urllib.parse.quote("app.kubernetes.io/component=consolidator")
    return API.get(f"/api/v1/namespaces/{NS}/pods?labelSelector={sel}")["items"]


def so_story(name=SO):
    """KEDA's own account: the ScaledObject's conditions and health, its events, the operator's errors."""
    lines = []
    o = so_obj(name)
    for c in (o or {}).get("status", {}).get("conditions") or []:
        lines.append(f"ScaledObject {c['type']}={c['status']} {c.get('reason', '')}: {c.get('message', '')}")
    health = (o or {}).get("status", {}).get("health") or {}
    for k, v in sorted(health.items()):
        lines.append(f"health {k}: {v}")
    evs = API.get(f"/api/v1/namespaces/{NS}/events?fieldSelector=involvedObject.name%3D{name}")["items"]
    evs.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
    for e in evs[-4:]:
        lines.append(f"event {e['type']} {e['reason']}: {e['message'][:240]}")
    for x in log_tail("keda-operator", pattern=r"\tERROR\t", n=3):
        lines.append(f"keda-operator: {x}")
    return "\n".join(lines)


# ---- set-up ---------------------------------------------------------------------------------------
def base_env(cmd):
    """The environment a child inherits; fluxo gets no FLUXO_* variable but those the test sets
    (it refuses unknown ones, and the scripts export e.g. FLUXO_K8S_CLUSTER_DIR)."""
    e = dict(os.environ)
    if cmd and cmd[0] == FLUXO:
        e = {k: v for k, v in e.items() if not k.startswith("FLUXO_")}
    return e


def sh(*cmd, env=None, timeout=300, what=None):
    e = base_env(cmd)
    e.update(env or {})
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout)
    if p.returncode != 0:
        raise Fail(f"{what or cmd[0]}: exit {p.returncode}: {redact((p.stderr or p.stdout)[-1500:])}")
    return p.stdout


def openssl_certs():
    d = STATE / "keda-certs"
    d.mkdir(parents=True, exist_ok=True)
    sans = ",".join([f"DNS:{n}.{KEDA_NS}.svc" for n in ("keda-operator", "keda-metrics-apiserver", "keda-admission-webhooks")]
                    + [f"DNS:{n}.{KEDA_NS}.svc.cluster.local" for n in ("keda-operator", "keda-metrics-apiserver")]
                    + ["DNS:localhost", "IP:127.0.0.1"])
    cmds = [
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=fluxo-test-keda-ca",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt")],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=keda", "-keyout", str(d / "tls.key"),
         "-out", str(d / "tls.csr")],
    ]
    for c in cmds:
        sh(*c, what="openssl")
    (d / "tls.ext").write_text(f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\n"
                               "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n")
    sh("openssl", "x509", "-req", "-in", str(d / "tls.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
       "-CAcreateserial", "-days", "2", "-extfile", str(d / "tls.ext"), "-out", str(d / "tls.crt"), what="openssl")
    os.chmod(d / "tls.key", 0o600)
    return d


def token_kubeconfig(sa, cluster_dir, ns=KEDA_NS):
    """A kubeconfig for a ServiceAccount (a bound token, never printed)."""
    token = pt.kubectl("-n", ns, "create", "token", sa, "--duration", "3h").strip()
    port = (pathlib.Path(cluster_dir) / "api-port").read_text().strip()
    path = STATE / f"{sa}.kubeconfig"
    cfg = {"apiVersion": "v1", "kind": "Config",
           "clusters": [{"name": "local", "cluster": {"server": f"https://127.0.0.1:{port}",
                                                      "certificate-authority": str(pathlib.Path(cluster_dir) / "pki" / "ca.crt")}}],
           "users": [{"name": sa, "user": {"token": token}}],
           "contexts": [{"name": "local", "context": {"cluster": "local", "user": sa}}],
           "current-context": "local"}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def keda_rbac_docs():
    """KEDA's RBAC as its Helm chart creates it by default (keda/README.md), for the three
    components; keda-operator-secrets is the part finding 3 is about."""
    return yaml.safe_load_all((ROOT / "scripts" / "k8s" / "keda-rbac.yaml").read_text())


def apply(docs, manager="fluxo-autoscaling-test"):
    return pt.apply_server_side([d for d in docs if d], manager)


def keda_objects(certs, adapter_port, webhook_port):
    ca = base64.b64encode((certs / "ca.crt").read_bytes()).decode()
    return [
        # The aggregation layer resolves an ExternalName Service to its name: localhost here.
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "keda-metrics-apiserver", "namespace": KEDA_NS},
         "spec": {"type": "ExternalName", "externalName": "localhost",
                  "ports": [{"name": "https", "port": adapter_port, "protocol": "TCP"}]}},
        {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
         "metadata": {"name": "v1beta1.external.metrics.k8s.io"},
         "spec": {"service": {"name": "keda-metrics-apiserver", "namespace": KEDA_NS, "port": adapter_port},
                  "group": "external.metrics.k8s.io", "version": "v1beta1", "caBundle": ca,
                  "groupPriorityMinimum": 100, "versionPriority": 100}},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
         "metadata": {"name": "keda-admission"},
         "webhooks": [{
             "name": "vscaledobject.kb.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
             "failurePolicy": "Fail", "matchPolicy": "Equivalent", "timeoutSeconds": 10,
             "clientConfig": {"url": f"https://127.0.0.1:{webhook_port}/validate-keda-sh-v1alpha1-scaledobject",
                              "caBundle": ca},
             "rules": [{"apiGroups": ["keda.sh"], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE"],
                        "resources": ["scaledobjects"]}]}]},
    ]


def start_keda(paths, cluster_dir):
    certs = openssl_certs()
    adapter_port, webhook_port, grpc_port = free_port(), free_port(), free_port()
    apply(keda_objects(certs, adapter_port, webhook_port))
    kc = {sa: token_kubeconfig(sa, cluster_dir) for sa in ("keda-operator", "keda-metrics-server", "keda-webhook")}
    common = {"WATCH_NAMESPACE": "", "POD_NAMESPACE": KEDA_NS, "KEDA_CLUSTER_OBJECT_NAMESPACE": KEDA_NS,
              "KUBE_FEATURE_WatchListClient": "false"}
    cadir = STATE / "keda-custom-ca"
    cadir.mkdir(exist_ok=True)
    global OPERATOR_METRICS
    OPERATOR_METRICS = free_port()
    spawn("keda-operator", [f"{paths['KEDA_BIN']}/keda", "--leader-elect=false",
                            f"--metrics-bind-address=127.0.0.1:{OPERATOR_METRICS}",
                            f"--health-probe-bind-address=127.0.0.1:{free_port()}",
                            f"--metrics-service-bind-address=127.0.0.1:{grpc_port}",
                            f"--cert-dir={certs}", "--enable-cert-rotation=false",
                            "--enable-webhook-patching=false", "--enable-apiservice-patching=false",
                            f"--ca-dir={cadir}", "--zap-log-level=info", "--zap-encoder=console"],
          env={**common, "KUBECONFIG": kc["keda-operator"], "POD_NAME": "keda-operator-local",
               "OPERATOR_NAME": "keda-operator"})
    spawn("keda-metrics-apiserver", [f"{paths['KEDA_BIN']}/keda-adapter",
                                     f"--secure-port={adapter_port}", "--bind-address=127.0.0.1",
                                     f"--cert-dir={certs}", f"--tls-cert-file={certs}/tls.crt",
                                     f"--tls-private-key-file={certs}/tls.key",
                                     f"--metrics-service-address=127.0.0.1:{grpc_port}",
                                     f"--port={free_port()}",
                                     f"--authentication-kubeconfig={kc['keda-metrics-server']}",
                                     f"--authorization-kubeconfig={kc['keda-metrics-server']}",
                                     f"--lister-kubeconfig={kc['keda-metrics-server']}",
                                     "--zap-log-level=info", "--zap-encoder=console"],
          env={**common, "KUBECONFIG": kc["keda-metrics-server"], "POD_NAME": "keda-metrics-apiserver-local"})
    spawn("keda-admission-webhooks", [f"{paths['KEDA_BIN']}/keda-admission-webhooks",
                                      f"--port={webhook_port}", f"--cert-dir={certs}",
                                      f"--metrics-bind-address=127.0.0.1:{free_port()}",
                                      f"--health-probe-bind-address=127.0.0.1:{free_port()}",
                                      "--zap-log-level=info", "--zap-encoder=console"],
          env={**common, "KUBECONFIG": kc["keda-webhook"], "POD_NAME": "keda-admission-webhooks-local"})

    def available():
        for n in ("keda-operator", "keda-metrics-apiserver", "keda-admission-webhooks"):
            if not alive(n):
                raise Fail(f"{n} exited:\n" + "\n".join(log_tail(n, n=15)))
        a = API.get("/apis/apiregistration.k8s.io/v1/apiservices/v1beta1.external.metrics.k8s.io")
        c = condition(a, "Available")
        return c.get("status") == "True", f"APIService Available={c.get('status')}: {c.get('message', '')}"
    poll("external.metrics.k8s.io served by KEDA's metrics API server", 120, available, interval=1)
    # The HPA controller's own path: the aggregated API, as the horizontal-pod-autoscaler identity.
    out = pt.kubectl("get", "--raw", "/apis/external.metrics.k8s.io/v1beta1",
                     "--as", "system:serviceaccount:kube-system:horizontal-pod-autoscaler")
    res = json.loads(out)
    return (f"operator, metrics API server (APIService Available through the aggregator, "
            f"{res.get('groupVersion')} listed for the HPA controller's identity), admission webhooks; "
            f"ports: adapter {adapter_port}, webhooks {webhook_port}, operator gRPC {grpc_port}")


def start_karpenter(paths, cluster_dir):
    docs = []
    mod = pathlib.Path(paths["KARPENTER_MODULE"])
    for f in sorted((mod / "kwok" / "charts" / "crds").glob("*.yaml")) + sorted((mod / "kwok" / "apis" / "crds").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d and d.get("kind") == "CustomResourceDefinition"]
    apply(docs)
    names = [d["metadata"]["name"] for d in docs]
    poll("Karpenter CRDs Established", 60, lambda: pt.established(names))
    spawn("karpenter", [f"{paths['KARPENTER_BIN']}/karpenter-kwok"],
          env={"KUBECONFIG": str(pathlib.Path(cluster_dir) / "kubeconfig"), "SYSTEM_NAMESPACE": "kube-system",
               "DISABLE_LEADER_ELECTION": "true", "METRICS_PORT": str(free_port()),
               "HEALTH_PROBE_PORT": str(free_port()), "LOG_LEVEL": "info", "BATCH_IDLE_DURATION": "1s",
               "BATCH_MAX_DURATION": "5s", "KUBE_FEATURE_WatchListClient": "false"})
    # The repository's NodePools, with the kwok node class in place of the EC2NodeClass.
    pools = test_nodepools()
    apply([{"apiVersion": "karpenter.kwok.sh/v1alpha1", "kind": "KWOKNodeClass", "metadata": {"name": "fluxo"}}] + pools)

    def ready():
        if not alive("karpenter"):
            raise Fail("karpenter exited:\n" + "\n".join(log_tail("karpenter", n=15)))
        out = []
        for p in pools:
            live = API.get(f"/apis/karpenter.sh/v1/nodepools/{p['metadata']['name']}")
            out.append((p["metadata"]["name"], condition(live, "Ready").get("status")))
        return all(s == "True" for _, s in out), f"NodePools Ready: {out}"
    poll("Karpenter's NodePools Ready", 120, ready, interval=1)
    return f"NodePools {', '.join(p['metadata']['name'] for p in pools)} Ready with KWOKNodeClass fluxo"


def test_nodepools():
    """karpenter/nodepools.yaml as it is, but for the node class (KWOKNodeClass standing in for the
    EC2NodeClass) and the consumers' consolidateAfter (2m -> the test's value, to keep the suite short)."""
    pools = [p for p in yaml.safe_load_all((ROOT / "karpenter" / "nodepools.yaml").read_text()) if p]
    for p in pools:
        p["spec"]["template"]["spec"]["nodeClassRef"] = {"group": "karpenter.kwok.sh", "kind": "KWOKNodeClass",
                                                         "name": "fluxo"}
        if p["metadata"]["name"] == "fluxo-consumers":
            p["spec"]["disruption"]["consolidateAfter"] = CONSOLIDATE_AFTER
    return pools


def fluxo_env(extra=None):
    env = {"FLUXO_DATABASE__URL": DB_URL, "FLUXO_REDIS__URL": os.environ["FLUXO_TEST_REDIS_URL"],
           "FLUXO_CONSOLIDATOR__STREAM": STREAM, "FLUXO_CONSOLIDATOR__GROUP": GROUP,
           "FLUXO_WEBHOOKS__GROUP": NGROUP, "FLUXO_WEBHOOKS__SECRET_KEY": WEBHOOK_KEY,
           "FLUXO_WEBHOOKS__ALLOW_NETS": '["127.0.0.0/8"]',
           "FLUXO_LOG__LEVEL": "warn", "OTEL_SDK_DISABLED": "true"}
    env.update(extra or {})
    return env


def create_database():
    """A database of its own on the test suite's PostgreSQL, migrated by `fluxo migrate`."""
    global DB_URL
    base = os.environ["FLUXO_TEST_POSTGRES_URL"]
    u = urllib.parse.urlparse(base)
    name = "fluxo_platform_autoscale"
    psql = shutil.which("psql") or (os.path.join(os.environ.get("FLUXO_TEST_PG_BINDIR", ""), "psql"))
    if not os.path.exists(psql):
        raise Fail("psql not found (FLUXO_TEST_PG_BINDIR or PATH): needed to create the test database")
    sh(psql, base, "-v", "ON_ERROR_STOP=1", "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", what="psql")
    sh(psql, base, "-v", "ON_ERROR_STOP=1", "-qc", f"CREATE DATABASE {name}", what="psql")
    DB_URL = urllib.parse.urlunparse(u._replace(path="/" + name))
    sh(FLUXO, "migrate", env=fluxo_env(), what="fluxo migrate")
    # The chart's queue-init hook runs `fluxo queue init`; kwok runs no containers, so the test does.
    REDIS.cmd("DEL", STREAM)
    sh(FLUXO, "queue", "init", env=fluxo_env(), what="fluxo queue init")
    g = REDIS.group_info()
    if not g:
        raise Fail(f"fluxo queue init made no group {GROUP} on {STREAM}")
    return f"database {name} migrated; group {GROUP} on {STREAM} (lag {g.get('lag')})"


def start_ledger():
    global LEDGER_ADDR
    port = free_port()
    LEDGER_ADDR = f"127.0.0.1:{port}"
    spawn("fluxo-ledger", [FLUXO, "serve", "--target", "ledger"],
          env=fluxo_env({"FLUXO_GRPC__LISTEN": LEDGER_ADDR, "FLUXO_RELAY__MAX_IDLE_MS": "50"}))

    def serving():
        if not alive("fluxo-ledger"):
            raise Fail("fluxo ledger exited:\n" + "\n".join(log_tail("fluxo-ledger", n=15)))
        p = subprocess.run([GRPCURL, "-plaintext", "-d", '{"service":""}', LEDGER_ADDR, "grpc.health.v1.Health/Check"],
                           capture_output=True, text=True, timeout=30)
        return '"SERVING"' in p.stdout, (p.stdout + p.stderr).strip()[-200:]
    poll("fluxo ledger SERVING", 90, serving, interval=0.5)
    return f"fluxo serve --target ledger on {LEDGER_ADDR} (outbox relay inside)"


CONSUMERS = []


def start_consolidators(n, extra=None):
    for i in range(n):
        name = f"fluxo-consolidator-{len(CONSUMERS)}"
        p = spawn(name, [FLUXO, "serve", "--target", "consolidator"],
                  env=fluxo_env({"FLUXO_GRPC__LISTEN": f"127.0.0.1:{free_port()}",
                                 "FLUXO_CONSOLIDATOR__CONSUMER_NAME": name,
                                 "FLUXO_CONSOLIDATOR__TRIM_INTERVAL_MS": "1000", **(extra or {})}))
        CONSUMERS.append((name, p))


def stop_consolidators():
    while CONSUMERS:
        _, p = CONSUMERS.pop()
        stop(p)


# ---- booking ---------------------------------------------------------------------------------------
RUN_ID = f"{int(time.time())}-{os.getpid()}"
BOOKED = [0]


def book(n, tag):
    """n entries through the real ledger: ghz (grpc-go) for many, grpcurl for one."""
    if n == 1:
        req = {"merchantId": f"m-{tag}", "type": "CREDIT", "amount": {"currencyCode": "BRL", "minorUnits": "100"},
               "description": "platform autoscaling test", "requestId": f"r-{RUN_ID}-{tag}-{BOOKED[0]}"}
        sh(GRPCURL, "-plaintext", "-d", json.dumps(req), LEDGER_ADDR, "fluxo.ledger.v1.LedgerService/RecordEntry",
           what="grpcurl RecordEntry")
        BOOKED[0] += 1
        return
    data = ('{"merchantId":"m-' + tag + '-{{mod .RequestNumber 20}}","type":"CREDIT",'
            '"amount":{"currencyCode":"BRL","minorUnits":"100"},"description":"platform autoscaling test",'
            '"requestId":"r-' + RUN_ID + '-' + tag + '-{{.RequestNumber}}"}')
    out = sh(GHZ, "--insecure", "--call", "fluxo.ledger.v1.LedgerService/RecordEntry", "-d", data,
             "-n", str(n), "-c", "16", "--connections", "4", "--format", "json", LEDGER_ADDR,
             timeout=600, what="ghz RecordEntry")
    rep = json.loads(out)
    good = (rep.get("statusCodeDistribution") or {}).get("OK", 0)
    if good != n:
        raise Fail(f"ghz: {good} of {n} RecordEntry calls OK: {rep.get('statusCodeDistribution')} {rep.get('errorDistribution')}")
    BOOKED[0] += n
    return rep


def stream_ms(entry_id):
    return int(entry_id.split("-")[0]) / 1000.0


def wait_lag(pred, secs, what):
    def f():
        g = REDIS.group_info()
        if not g:
            return False, "no group"
        return pred(g), f"lag={g.get('lag')} pending={g.get('pending')} last-delivered={g.get('last-delivered-id')}"
    return poll(what, secs, f, interval=0.5)


def drain_backlog(secs=180):
    """Real consolidators drain what is in the stream, then stop."""
    start_consolidators(2)
    try:
        wait_lag(lambda g: g.get("lag") == 0 and g.get("pending") == 0, secs, "stream drained by fluxo consolidators")
    finally:
        stop_consolidators()


# ---- helm -------------------------------------------------------------------------------------------
def helm_values(*sets):
    args = ["--values", str(VALUES)]
    if NO_KARPENTER:
        args += ["--set", "karpenter.enabled=false"]
    for s in sets:
        args += ["--set", s]
    return args


def helm_upgrade(*sets, install=False):
    p = pt.helm("upgrade", "--install", pt.RELEASE, str(CHART), "-n", NS, *helm_values(*sets), "--timeout", "120s")
    if p.returncode != 0:
        raise Fail(f"helm upgrade: {p.stderr.strip()[-1500:]}")
    return p


def render(*sets):
    p = pt.run([pt.HELM, "template", pt.RELEASE, str(CHART), "-n", NS, "--kube-version", pt.KUBE_VERSION[1:],
                *helm_values(*sets)])
    if p.returncode != 0:
        raise Fail(f"helm template: {p.stderr}")
    return [d for d in yaml.safe_load_all(p.stdout) if d]


def redis_secret(address):
    apply([{"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "fluxo-redis", "namespace": NS},
            "stringData": {"url": os.environ["FLUXO_TEST_REDIS_URL"], "address": address, "password": ""}},
           {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "fluxo-database", "namespace": NS},
            "stringData": {"url": DB_URL}}])


# ---- scenarios ----------------------------------------------------------------------------------------
def so_ready(want="True"):
    def f():
        o = so_obj()
        c = condition(o, "Ready")
        return c.get("status") == want, so_story()
    return f


def rbac_scenario():
    """Finding 3: KEDA resolves every Secret the consolidator's environment names (the database URL
    too), not just the TriggerAuthentication's; with Secret access narrowed to the Redis Secret the
    ScaledObject is never Ready and no HPA is made; with keda/rbac.yaml it is."""
    narrowed = [d for d in yaml.safe_load_all((ROOT / "scripts" / "k8s" / "keda-rbac-narrowed.yaml").read_text()) if d]
    docs_rbac = [d for d in keda_rbac_docs() if d]

    def narrowed_fails():
        apply(narrowed, "fluxo-autoscaling-rbac")
        helm_upgrade(install=True)
        time.sleep(0)  # nothing waited for: the poll below has the deadline
        try:
            poll("ScaledObject Ready with the narrowed Secret access", 45, so_ready())
        except Fail as e:
            hpa = API.get(f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/{SO}")
            if hpa:
                raise Fail(f"an HPA was made although the ScaledObject is not Ready:\n{e}")
            story = so_story()
            if not re.search(r"secret", story, re.I):
                raise Fail(f"not Ready, but KEDA does not say why in terms of Secrets:\n{story}")
            return "not Ready, no HPA; KEDA says:\n" + "\n".join(
                x for x in story.splitlines() if re.search(r"secret|forbidden|Ready", x, re.I))[:1200]
        raise Fail("the ScaledObject went Ready with access to the Redis Secret only: finding 3 did not reproduce")

    def docs_ready():
        # Back to the documented RBAC: drop the narrowed objects, apply keda/rbac.yaml.
        for d in narrowed:
            kind = d["kind"].lower()
            ns = d["metadata"].get("namespace")
            pt.kubectl("delete", kind, d["metadata"]["name"], *(["-n", ns] if ns else []), "--ignore-not-found")
        apply(docs_rbac)
        t0 = time.monotonic()
        poll("ScaledObject Ready with keda/rbac.yaml", 90, so_ready(), interval=0.5)
        hpa = poll("HPA made by KEDA", 30, lambda: (bool(API.get(
            f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/{SO}")), "no HPA yet"), interval=0.5)
        hpa = API.get(f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/{SO}")
        want = VAL["keda"]["behavior"]
        got = hpa["spec"].get("behavior") or {}
        for way in ("scaleUp", "scaleDown"):
            if got.get(way, {}).get("stabilizationWindowSeconds") != want[way]["stabilizationWindowSeconds"]:
                raise Fail(f"HPA {way} {got.get(way)} is not the chart's {want[way]}")
        metrics = [m["external"]["metric"]["name"] for m in hpa["spec"].get("metrics") or []]
        return (f"Ready {time.monotonic() - t0:.1f}s after the RBAC change; HPA {SO}: min {hpa['spec'].get('minReplicas')} "
                f"max {hpa['spec']['maxReplicas']}, metrics {metrics}, behavior as the values")
    check("finding 3: with Secret access narrowed to the Redis Secret, the ScaledObject stays not Ready (KEDA's error shown)",
          narrowed_fails)
    return check("finding 3: with keda/rbac.yaml the ScaledObject goes Ready and KEDA makes the HPA", docs_ready)


def at_zero(secs=90):
    def f():
        r = replicas()
        o = so_obj()
        return r == 0 and condition(o, "Active").get("status") == "False", f"replicas {r}; {so_story()}"
    return poll("consolidator Deployment at 0, ScaledObject not Active", secs, f, interval=0.5)


def wake(secs, label):
    """Books one entry; returns seconds from its XADD (stream id time) to the Deployment's scale-up."""
    before = REDIS.cmd("XREVRANGE", STREAM, "+", "-", "COUNT", "1")
    book(1, label)

    def f():
        r = replicas()
        return r >= 1, f"replicas {r}"
    try:
        poll(f"consolidator woken from zero ({label})", secs, f, interval=0.2)
    except Fail as e:
        raise Fail(f"{e}\n{so_story()}")
    seen = time.time()
    last = REDIS.cmd("XREVRANGE", STREAM, "+", "-", "COUNT", "1")
    if not last or last == before:
        raise Fail("the entry never reached the stream (relay?)")
    xadd = stream_ms(last[0][0])
    return seen - xadd


def good_at_zero():
    """The chart as shipped, the stream drained by real consolidators, the Deployment back at 0."""
    helm_upgrade()
    g = REDIS.group_info() or {}
    if g.get("lag") or g.get("pending"):
        drain_backlog()
    poll("consolidator Deployment back at 0 with the working ScaledObject", 180,
         lambda: (replicas() == 0, f"replicas {replicas()}"), interval=0.5)


def broken(what, sets, pattern, prepare=None):
    """Self-test: a broken ScaledObject must not wake the consolidator, and KEDA must say why."""
    def run():
        good_at_zero()
        helm_upgrade(*sets)
        if prepare:
            prepare()
        try:
            took = wake(30, f"broken-{what.split()[0]}")
        except Fail as e:
            story = so_story()
            if replicas() != 0:
                raise Fail(f"scaled to {replicas()} replicas although the ScaledObject is broken\n{story}")
            if not re.search(pattern, story, re.I | re.S):
                raise Fail(f"did not wake, but KEDA's error does not match /{pattern}/:\n{story}")
            lines = [x for x in story.splitlines() if re.search(pattern, x, re.I)]
            raise Fail("did not wake; KEDA: " + (lines[-1] if lines else story.splitlines()[0]))
        return f"woke after {took:.1f}s"
    pt.expect_fail(f"self-test: {what}: no scale-up, KEDA's own error visible", pattern, run)


def self_tests():
    # Wrong group (finding 2): without the guard, the lag trigger reads XLEN and scales to the maximum.
    broken("wrong consumer group (finding 2: no scaling on XLEN)", [f"config.consolidator.group={GROUP}-typo"],
           r"NOGROUP")
    broken("wrong stream name", [f"config.consolidator.stream={STREAM}-typo"], r"NOGROUP|no such key")

    def drop_ta():
        pt.kubectl("-n", NS, "delete", "triggerauthentication", f"{SO}-redis")
        # A spec change makes KEDA rebuild its scalers (it caches them while the spec is unchanged).
        pt.kubectl("-n", NS, "patch", "scaledobject", SO, "--type", "merge", "-p", '{"spec":{"pollingInterval":6}}')
    broken("missing TriggerAuthentication", [], r"triggerauthentication|not found", prepare=drop_ta)
    good_at_zero()


def scenarios():
    # ---- wake from zero
    check("ScaledObject at rest: Deployment at 0, not Active", lambda: (at_zero(120), "replicas 0")[1])

    def wake_from_zero():
        t = wake(60, "wake")
        FIG["wake_from_zero_s"] = t
        o = so_obj()
        return (f"{t:.1f}s from the entry's XADD to the Deployment at >= 1 replica "
                f"(pollingInterval {VAL['keda']['pollingInterval']}s); Active={condition(o, 'Active').get('status')}")
    if not check("wake from zero: one entry booked through the real ledger and relay wakes the consolidator", wake_from_zero):
        return

    # ---- scale out on lag
    timeline = []
    stop_ev = threading.Event()

    def sample():
        while not stop_ev.is_set():
            try:
                d = deploy()
                pods = consolidator_pods()
                pend = sum(1 for p in pods if p["status"].get("phase") == "Pending")
                timeline.append((time.time(), d["spec"].get("replicas", 0), pend, len(pods)))
            except Exception:  # noqa: BLE001 - a missed sample is fine
                pass
            stop_ev.wait(0.5)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    maxr = VAL["keda"]["maxReplicaCount"]
    lag_count = int(VAL["keda"]["lagCount"])
    backlog = lag_count * maxr * 3 // 2

    def scale_out():
        t0 = time.time()
        book(backlog, "backlog")
        t_booked = time.time()
        try:
            poll(f"Deployment at maxReplicaCount {maxr}", 180, lambda: (replicas() >= maxr, f"replicas {replicas()}"),
                 interval=0.5)
        except Fail as e:
            raise Fail(f"{e}\n{so_story()}")
        t_max = time.time()
        FIG["time_to_max_s"] = t_max - t0
        # The chart's scale-up policies: at most max(4 pods, 100 %) more than 15 s before (2 s of
        # slack: the steps are observed by polling, each up to a sample late).
        steps = []
        prev = None
        for t, r, _, _ in timeline:
            if r != prev:
                steps.append((t, r))
                prev = r
        for t, r in steps:
            earlier = [r0 for t0_, r0 in steps if t0_ <= t - 13]
            base = earlier[-1] if earlier else steps[0][1]
            allowed = max(base + 4, base * 2)
            if r > allowed:
                raise Fail(f"scaled to {r} from {base} within 15 s: the chart allows {allowed} ({steps})")
        g = REDIS.group_info()
        return (f"{backlog} entries booked in {t_booked - t0:.1f}s (lag {g.get('lag')}, lagCount {lag_count}); "
                f"max {maxr} replicas {t_max - t0:.1f}s after the first of them; steps (s from start: replicas) "
                + ", ".join(f"{t - t0:.0f}:{r}" for t, r in steps))
    if not check("scale out on lag: a backlog far beyond lagCount per replica drives the HPA to maxReplicaCount, "
                 "no faster than the chart's scaleUp policies", scale_out):
        stop_ev.set()
        return

    # ---- Karpenter provisions the consumers' nodes
    def provisioned():
        t0 = min([t for t, _, pend, _ in timeline if pend > 0] or [time.time()])

        def all_running():
            pods = consolidator_pods()
            running = [p for p in pods if p["status"].get("phase") == "Running"]
            return len(running) >= maxr, f"{len(running)}/{len(pods)} consolidator pods Running"
        poll("scaled-out consolidators Running on Karpenter's nodes", 180, all_running, interval=0.5)
        FIG["karpenter_provision_s"] = time.time() - t0
        nodes = pool_nodes("fluxo-consumers")
        pods = consolidator_pods()
        on = {p["spec"].get("nodeName") for p in pods}
        if not on <= {n["metadata"]["name"] for n in nodes}:
            raise Fail(f"consolidators on nodes outside fluxo-consumers: {on}")
        for n in nodes:
            taints = {(t["key"], t.get("effect")) for t in n["spec"].get("taints") or []}
            if ("fluxo.dev/consumers", "NoSchedule") not in taints:
                raise Fail(f"{n['metadata']['name']} lacks the pool's taint: {taints}")
        cpu = sum(cpu_m(n["status"]["capacity"]["cpu"]) for n in nodes)
        limit = cpu_m(pool("fluxo-consumers")["spec"]["limits"]["cpu"])
        if cpu > limit:
            raise Fail(f"{cpu}m CPU provisioned > the pool's limit {limit}m")
        types = sorted({n["metadata"]["labels"].get("node.kubernetes.io/instance-type") for n in nodes})
        zones = sorted({n["metadata"]["labels"].get("topology.kubernetes.io/zone") for n in nodes})
        return (f"{len(nodes)} nodes ({', '.join(types)}; zones {', '.join(zones)}; {cpu}m CPU <= limit {limit}m), "
                f"all {maxr} consolidators Running {FIG['karpenter_provision_s']:.1f}s after the first went Pending")
    if NO_KARPENTER:
        poll("consolidators Running", 120, lambda: (sum(p["status"].get("phase") == "Running" for p in consolidator_pods()) >= maxr, ""))
    elif not check("Karpenter: the NodePool provisions nodes for the Pending consolidators (taint, limits)", provisioned):
        stop_ev.set()
        return

    # ---- a pod holding a batch: karpenter.sh/do-not-disrupt
    held = {}

    def annotate():
        pods = sorted(consolidator_pods(), key=lambda p: p["metadata"]["name"])
        p = pods[0]
        pt.kubectl("-n", NS, "annotate", "pod", p["metadata"]["name"], "karpenter.sh/do-not-disrupt=true",
                   "controller.kubernetes.io/pod-deletion-cost=1000", "--overwrite")
        held["pod"], held["node"] = p["metadata"]["name"], p["spec"]["nodeName"]
        return f"{held['pod']} on {held['node']} annotated karpenter.sh/do-not-disrupt=true (and a deletion cost, so the ReplicaSet keeps it on scale-in)"
    check("a consolidator pod annotated karpenter.sh/do-not-disrupt (it stands for a pod holding a batch)", annotate)

    # ---- drain: real consolidators, one message held delivered-but-unacknowledged
    def drain():
        # The test takes one message as a consumer of the group and does not acknowledge it yet.
        r = REDIS.cmd("XREADGROUP", "GROUP", GROUP, "platform-test-holder", "COUNT", "1", "STREAMS", STREAM, ">")
        held["msg"] = r[0][1][0][0]
        t0 = time.time()
        # Consolidators that do not claim the held message (claim idle far above the test's length).
        start_consolidators(3, {"FLUXO_CONSOLIDATOR__CLAIM_IDLE_MS": "3600000"})
        wait_lag(lambda g: g.get("lag") == 0 and g.get("pending") == 1, 300, "backlog drained but for the held message")
        FIG["drain_s"] = time.time() - t0
        g = REDIS.group_info()
        return f"{backlog} entries applied by 3 fluxo consolidators in {FIG['drain_s']:.1f}s; lag {g['lag']}, pending {g['pending']} (held)"
    if not check("scale-in: real `fluxo serve --target consolidator` processes drain the backlog", drain):
        stop_ev.set()
        return

    def held_keeps_one():
        cooldown = VAL["keda"]["cooldownPeriod"]
        t0 = time.time()
        floor = None
        # Well past the cooldown: the pending trigger holds a replica while the message is unacknowledged.
        while time.time() - t0 < cooldown + 3 * VAL["keda"]["pollingInterval"] + 20:
            r = replicas()
            floor = r if floor is None else min(floor, r)
            if r == 0:
                raise Fail(f"scaled to zero {time.time() - t0:.0f}s after the drain with a message pending\n{so_story()}")
            time.sleep(0.5)
        node_ok = "" if NO_KARPENTER else held_node_intact(held)
        return (f"{time.time() - t0:.0f}s (cooldown {cooldown}s) with lag 0 and 1 pending: replicas never below "
                f"{floor}; {node_ok}")
    check("scale to zero never while a message is delivered but unacknowledged (the pending trigger)", held_keeps_one)

    def do_not_disrupt():
        # The scale-in left other consumer nodes empty or underutilized; Karpenter removes those
        # but not the node of the annotated pod.
        t0 = time.time()
        poll("Karpenter consolidating around the do-not-disrupt pod", 240,
             lambda: (len(pool_nodes("fluxo-consumers")) == 1, f"consumer nodes: {[n['metadata']['name'] for n in pool_nodes('fluxo-consumers')]}"),
             interval=1)
        FIG["karpenter_consolidate_scale_in_s"] = time.time() - t0
        # (Not drift: with the pool's terminationGracePeriod Karpenter v1 disrupts a drifted node even
        # under a do-not-disrupt pod, which waits out that grace period; see karpenter/README.md.)
        return (f"{held_node_intact(held)}; the other consumer nodes consolidated in "
                f"{FIG['karpenter_consolidate_scale_in_s']:.0f}s, budget respected")
    if not NO_KARPENTER:
        check("Karpenter: consolidation after scale-in spares the do-not-disrupt pod's node",
              do_not_disrupt)

    def to_zero():
        # The held message is claimed and applied by a consolidator that claims quickly.
        start_consolidators(1, {"FLUXO_CONSOLIDATOR__CLAIM_IDLE_MS": "1000"})
        wait_lag(lambda g: g.get("lag") == 0 and g.get("pending") == 0, 120, "held message claimed and applied")
        t_drained = time.time()
        stop_consolidators()
        poll("back to zero after the cooldown", 240, lambda: (replicas() == 0, f"replicas {replicas()}"), interval=0.5)
        FIG["back_to_zero_s"] = time.time() - t_drained
        g = REDIS.group_info()
        rec = sh(FLUXO, "balances", "reconcile", env=fluxo_env(), what="fluxo balances reconcile")
        return (f"{FIG['back_to_zero_s']:.1f}s after lag and pending reached 0 (cooldown {VAL['keda']['cooldownPeriod']}s); "
                f"lag {g['lag']}, pending {g['pending']}; fluxo balances reconcile: {rec.strip().splitlines()[-1][:160] if rec.strip() else 'ok'}")
    check("scale to zero: drained (lag 0, nothing pending), the Deployment returns to 0 after the cooldown", to_zero)

    def consolidate_empty():
        t0 = time.time()
        poll("empty consumer nodes consolidated", 240, lambda: (len(pool_nodes("fluxo-consumers")) == 0,
             f"consumer nodes left: {[n['metadata']['name'] for n in pool_nodes('fluxo-consumers')]}"), interval=1)
        FIG["karpenter_consolidate_empty_s"] = time.time() - t0
        return f"the last consumer node removed {FIG['karpenter_consolidate_empty_s']:.0f}s after its pods went; max nodes disrupted at once {DISRUPT['max']} (budget {DISRUPT['budget']})"
    if not NO_KARPENTER:
        check("Karpenter: empty nodes consolidated after scale to zero", consolidate_empty)
    stop_ev.set()
    FIG["timeline"] = timeline


DISRUPT = {"max": 0, "budget": ""}


def watch_disruption():
    """Records how many consumer nodes are being disrupted at once (Karpenter's disrupted taint or
    a deletion under way), to hold it against the pool's budget."""
    def run():
        while True:
            try:
                nodes = pool_nodes("fluxo-consumers")
                going = [n for n in nodes if n["metadata"].get("deletionTimestamp") or any(
                    t["key"] == "karpenter.sh/disrupted" for t in n["spec"].get("taints") or [])]
                if len(going) > DISRUPT["max"]:
                    DISRUPT["max"] = len(going)
                    DISRUPT["at"] = (len(going), len(nodes))
                    budget = pool("fluxo-consumers")["spec"]["disruption"]["budgets"][0]["nodes"]
                    allowed = math.ceil(int(budget.rstrip("%")) * len(nodes) / 100) if budget.endswith("%") else int(budget)
                    DISRUPT["budget"] = f"{budget} of {len(nodes)} nodes = {allowed}"
                    if len(going) > max(allowed, 1):
                        DISRUPT["violations"] = DISRUPT.get("violations", []) + [(len(going), len(nodes))]
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.5)
    threading.Thread(target=run, daemon=True).start()


def held_node_intact(held):
    n = API.get(f"/api/v1/nodes/{held['node']}")
    if not n:
        raise Fail(f"{held['node']}, the node of the do-not-disrupt pod, is gone")
    if n["metadata"].get("deletionTimestamp") or any(t["key"] == "karpenter.sh/disrupted" for t in n["spec"].get("taints") or []):
        raise Fail(f"{held['node']} is being disrupted although {held['pod']} has do-not-disrupt")
    p = API.get(f"/api/v1/namespaces/{NS}/pods/{held['pod']}")
    if not p or p["metadata"].get("deletionTimestamp"):
        raise Fail(f"{held['pod']} was evicted or deleted")
    return f"{held['pod']} still running on {held['node']}, node not disrupted"


def pool(name):
    return API.get(f"/apis/karpenter.sh/v1/nodepools/{name}")


def pool_nodes(name):
    sel = urllib.parse.quote(f"karpenter.sh/nodepool={name}")
    return API.get(f"/api/v1/nodes?labelSelector={sel}")["items"]


def cpu_m(q):
    q = str(q)
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def release_startup_taints():
    """Plays the Istio CNI agent: once a Karpenter node is Ready, its cni.istio.io/not-ready startup
    taint goes (istiod's taint controller does this on EKS)."""
    sel = urllib.parse.quote("karpenter.sh/nodepool")
    for n in API.get(f"/api/v1/nodes?labelSelector={sel}")["items"]:
        taints = n["spec"].get("taints") or []
        ready = condition({"status": n.get("status", {})}, "Ready").get("status") == "True"
        if ready and any(t["key"] == "cni.istio.io/not-ready" for t in taints):
            p = subprocess.run([pt.KUBECTL, "--kubeconfig", pt.KUBECONFIG, "taint", "node", n["metadata"]["name"],
                                "cni.istio.io/not-ready:NoSchedule-"], capture_output=True, text=True, timeout=60)
            if p.returncode != 0 and "not found" not in p.stderr:
                raise Fail(f"kubectl taint: {p.stderr}")


def cni_agent():
    while True:
        try:
            release_startup_taints()
        except Exception:  # noqa: BLE001 - the next round retries
            pass
        time.sleep(0.5)


def redis_unreachable():
    """KEDA loses Redis (fluxo keeps it): the ScaledObject says so, the operator's error counters that
    FluxoAutoscalerCannotReadLag reads rise, and the fallback does not engage (finding 1)."""
    def run():
        at_zero(120)
        before = keda_counter()
        PROXY.close()
        t0 = time.time()
        try:
            def says_so():
                o = so_obj()
                story = so_story()
                failing = [k for k, v in ((o or {}).get("status", {}).get("health") or {}).items()
                           if v.get("status") == "Failing"]
                warned = re.search(r"event Warning KEDA\w*Failed: .*(refused|connect)", story)
                return bool(failing and warned and keda_counter() > before), story
            story = poll("KEDA reports the lost Redis (health, events, error counter)", 90, says_so, interval=1)
            took = time.time() - t0
            # Finding 1: well past failureThreshold polls, the failure count has not grown and the
            # fallback has not engaged; the Ready condition still reads as before the cut.
            threshold = 3
            time.sleep(0)  # the poll below has the deadline
            t1 = time.time()
            poll("failureThreshold x pollingInterval x 2 elapsed", 120,
                 lambda: (time.time() - t1 >= threshold * VAL["keda"]["pollingInterval"] * 2, ""), interval=1)
            o = so_obj()
            fb = condition(o, "Fallback")
            fails = {k: v.get("numberOfFailures") for k, v in (o["status"].get("health") or {}).items()}
            if fb.get("status") == "True":
                raise Fail(f"the fallback engaged on an unreachable Redis: finding 1 no longer holds, update the docs\n{so_story()}")
            if replicas() != 0:
                raise Fail(f"replicas {replicas()} while Redis is unreachable at zero")
            ready = condition(o, "Ready")
            after = keda_counter()
            rule_ok = alert_reads(after)
        finally:
            PROXY.open()
        poll("ScaledObject healthy again once Redis is reachable", 90, lambda: (all(
            v.get("status") == "Happy" for v in (so_obj()["status"].get("health") or {}).values()), so_story()), interval=1)
        lines = [x for x in story.splitlines() if re.search(r"event Warning", x)][-2:]
        return (f"reported {took:.0f}s after the cut: health Failing, Warning events; keda_scaled_object_errors_total "
                f"{before:g} -> {after:g} ({rule_ok}); after {threshold} x 2 polls failures {fails}, "
                f"Fallback={fb.get('status')} (finding 1: it never engages on connection errors), "
                f"Ready={ready.get('status')} (stale), replicas 0\n" + "\n".join(lines))
    check("Redis unreachable for KEDA: the ScaledObject's conditions and fluxo's KEDA alert inputs say so", run)


def keda_counter():
    """keda_scaled_object_errors_total for the consolidators' ScaledObject, from the operator's /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", OPERATOR_METRICS, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("keda_scaled_object_errors_total{") and f'scaledObject="{SO}"' in line and f'namespace="{NS}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def alert_reads(value):
    """The chart's FluxoAutoscalerCannotReadLag reads exactly the series that rose (same metric,
    same namespace/scaledObject selector)."""
    docs = render("monitoring.prometheusRule.enabled=true")
    rules = [r for d in docs if d["kind"] == "PrometheusRule" for g in d["spec"]["groups"] for r in g["rules"]]
    rule = next((r for r in rules if r.get("alert") == "FluxoAutoscalerCannotReadLag"), None)
    if not rule:
        raise Fail("the chart renders no FluxoAutoscalerCannotReadLag")
    expr = rule["expr"]
    if "keda_scaled_object_errors_total" not in expr or f'scaledObject="{SO}"' not in expr.replace(" ", ""):
        raise Fail(f"FluxoAutoscalerCannotReadLag does not select this ScaledObject's error counter: {expr}")
    return f"FluxoAutoscalerCannotReadLag selects that counter (rate > 0, for {rule.get('for')})"


def trim_guard():
    """Finding 4: entries deleted before delivery leave Redis without a lag (nil), which KEDA reads
    as 0 and would never wake on. fluxo never deletes entries (no XDEL) and trims only below the
    group's last delivered id."""
    def fluxo_trims_safely():
        g = REDIS.group_info()
        n = REDIS.cmd("XLEN", STREAM)
        if g.get("lag") is None:
            raise Fail(f"lag is nil after fluxo's trimming: {g}")
        if n >= BOOKED[0]:
            raise Fail(f"the stream was never trimmed ({n} entries for {BOOKED[0]} booked)")
        at_zero(120)
        took = wake(60, "after-trim")
        FIG["wake_after_trim_s"] = took
        return f"stream trimmed to {n} of {BOOKED[0]} entries, lag {g.get('lag')} (a number); a new entry woke the consolidator in {took:.1f}s"
    check("finding 4: fluxo's trimming (below the last delivered id) keeps the lag a number and wake-from-zero working",
          fluxo_trims_safely)

    def deleting_before_delivery():
        s, grp = f"{STREAM}:trim-probe", "probe"
        REDIS.cmd("DEL", s)
        for i in range(5):
            REDIS.cmd("XADD", s, "*", "n", i)
        REDIS.cmd("XGROUP", "CREATE", s, grp, "0")
        REDIS.cmd("XREADGROUP", "GROUP", grp, "c", "COUNT", "2", "STREAMS", s, ">")
        REDIS.cmd("XACK", s, grp, *[e[0] for e in REDIS.cmd("XRANGE", s, "-", "+", "COUNT", "2")])
        lag_before = REDIS.group_info(s, grp).get("lag")
        undelivered = REDIS.cmd("XRANGE", s, "-", "+")[3][0]
        REDIS.cmd("XDEL", s, undelivered)          # an entry the group has not read yet
        lag_after = REDIS.group_info(s, grp).get("lag")
        REDIS.cmd("DEL", s)
        if lag_after is not None:
            raise Fail(f"Redis still reports lag {lag_after} after deleting an undelivered entry")
        return f"lag {lag_before} before, nil after XDEL of an entry not yet delivered (KEDA reads nil as 0)"
    check("finding 4: deleting an entry before delivery makes Redis report no lag (why fluxo never does)",
          deleting_before_delivery)


def main():
    global STATE, REDIS, PROXY, FLUXO, GHZ, GRPCURL, VAL, API, CLUSTER_DIR
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--kubectl", required=True)
    ap.add_argument("--helm", required=True)
    ap.add_argument("--cluster-dir", required=True)
    ap.add_argument("--fluxo", required=True)
    ap.add_argument("--no-self-tests", action="store_true")
    a = ap.parse_args()
    pt.KUBECTL, pt.HELM, pt.KUBECONFIG = a.kubectl, a.helm, a.kubeconfig
    CLUSTER_DIR = a.cluster_dir
    pt.VERSIONS = pt.read_pins()
    pt.KUBE_VERSION = pt.VERSIONS["KUBE_VERSION"]
    STATE = ROOT / "target" / "k8s-autoscaling"
    shutil.rmtree(STATE, ignore_errors=True)
    STATE.mkdir(parents=True)
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    start = time.monotonic()

    section("autoscaling: KEDA and Karpenter on the control plane, fluxo on the test suite's PostgreSQL and Redis")
    missing = [v for v in ("FLUXO_TEST_REDIS_URL", "FLUXO_TEST_POSTGRES_URL") if not os.environ.get(v)]
    FLUXO = a.fluxo
    GRPCURL = os.environ.get("FLUXO_TEST_GRPCURL") or shutil.which("grpcurl") or ""
    GHZ = os.environ.get("FLUXO_TEST_GHZ") or shutil.which("ghz") or ""
    if missing or not os.access(FLUXO, os.X_OK) or not GRPCURL or not GHZ:
        bad("prerequisites", f"missing: {missing + ([] if os.access(FLUXO, os.X_OK) else [FLUXO])}"
            f"{'' if GRPCURL else ' grpcurl'}{'' if GHZ else ' ghz'}: run inside scripts/test.sh "
            "(FLUXO_TEST_CMD=./scripts/k8s/platform-test.sh ./scripts/test.sh), after cargo build")
        print(f"\n{pt.passed} passed, {pt.failed} failed")
        return 1
    paths = dict(x.split("=", 1) for x in sh(str(ROOT / "scripts" / "k8s" / "autoscalers.sh"), "paths").split())
    API = Api(a.cluster_dir)
    REDIS = Redis(os.environ["FLUXO_TEST_REDIS_URL"])
    PROXY = Relay(REDIS.host, REDIS.port)

    steps = [
        ("CRDs of the pinned versions (KEDA, Istio, prometheus-operator, ...)", lambda: (pt.install_crds(), "")[1]),
        ("namespaces", lambda: (pt.ensure_namespace(NS), pt.ensure_namespace(KEDA_NS, restricted=False),
                                pt.ensure_namespace("istio-ingress", restricted=False), "")[3]),
        ("KEDA's ServiceAccounts and the RBAC of keda/rbac.yaml but for Secrets (finding 3 below)",
         lambda: (apply([d for d in keda_rbac_docs() if d and not is_secret_rule_doc(d)]), "")[1]),
        ("fluxo's database and consumer group", create_database),
        ("fluxo ledger", start_ledger),
        ("KEDA operator, metrics API server, admission webhooks", lambda: start_keda(paths, a.cluster_dir)),
    ]
    if NO_KARPENTER:
        if os.environ.get("CI"):
            bad("FLUXO_AUTOSCALING_NO_KARPENTER", "is for local iteration only; CI runs Karpenter")
            print(f"\n{pt.passed} passed, {pt.failed} failed")
            return 1
        print("  (FLUXO_AUTOSCALING_NO_KARPENTER: Karpenter not run, its checks skipped)")
    else:
        steps.append(("Karpenter (kwok provider) and the repository's NodePools", lambda: start_karpenter(paths, a.cluster_dir)))
    so_doc = next(d for d in render() if d["kind"] == "ScaledObject")["spec"]
    lag_trigger = next(tr for tr in so_doc["triggers"] if tr["name"] == "lag")
    VAL.update(keda={"pollingInterval": so_doc["pollingInterval"], "cooldownPeriod": so_doc["cooldownPeriod"],
                     "maxReplicaCount": so_doc["maxReplicaCount"], "lagCount": lag_trigger["metadata"]["lagCount"],
                     "behavior": so_doc["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]})
    pt.install_crds()
    for what, fn in steps[1:]:
        if check(what, fn) is None:
            print(f"\n{pt.passed} passed, {pt.failed} failed")
            return 1
    # Every Secret the chart reads (placeholders), then the real fluxo-redis and fluxo-database.
    case = pt.Case("autoscale", [VALUES])
    case.rendered = render()
    pt.secrets_for(case)
    redis_secret(f"127.0.0.1:{PROXY.port}")
    watch_disruption()
    threading.Thread(target=cni_agent, daemon=True).start()

    section("KEDA RBAC (finding 3)")
    if rbac_scenario() is None:
        print(f"\n{pt.passed} passed, {pt.failed} failed")
        return 1
    if os.environ.get("FLUXO_AUTOSCALING_DOCTOR_ONLY"):
        # Local iteration only (refused under CI): the doctor and deletion-cost tests alone.
        if os.environ.get("CI"):
            bad("FLUXO_AUTOSCALING_DOCTOR_ONLY", "is for local iteration only; CI runs the whole suite")
        else:
            doctor_test.run(sys.modules[__name__])
        print(f"\n{pt.passed} passed, {pt.failed} failed")
        return 1 if pt.failed else 0
    if os.environ.get("FLUXO_AUTOSCALING_NOTIFIER_ONLY"):
        # Local iteration only (refused under CI): the notifier section alone.
        if os.environ.get("CI"):
            bad("FLUXO_AUTOSCALING_NOTIFIER_ONLY", "is for local iteration only; CI runs the whole suite")
        else:
            section("notifier: its own ScaledObject on its own group, from zero")
            notifier_scenario()
        print(f"\n{pt.passed} passed, {pt.failed} failed")
        return 1 if pt.failed else 0
    check("KEDA's admission webhook rejects a second ScaledObject for the same Deployment", webhook_rejects)
    if not a.no_self_tests:
        section("broken ScaledObjects (self-tests): nothing scales, KEDA's own error shown")
        self_tests()
    section("scenarios")
    scenarios()
    section("Redis unreachable for KEDA (finding 1)")
    redis_unreachable()
    section("trimming (finding 4)")
    trim_guard()
    doctor_test.run(sys.modules[__name__])
    if DISRUPT.get("violations"):
        bad("Karpenter disruption budget", f"more consumer nodes disrupted at once than the budget allows: {DISRUPT}")
    section("notifier: its own ScaledObject on its own group, from zero")
    notifier_scenario()
    section("figures")
    for k, v in FIG.items():
        if k != "timeline":
            print(f"  {k}: {v:.1f}" if isinstance(v, float) else f"  {k}: {v}")
    print(f"\n(autoscaling tests took {time.monotonic() - start:.0f}s)")
    print(f"\n{pt.passed} passed, {pt.failed} failed")
    return 1 if pt.failed else 0


# ---- the notifier ------------------------------------------------------------------------------------
def notifier_group():
    return REDIS.group_info(group=NGROUP)


def start_receiver():
    """The suite's HTTPS webhook receiver (crates/testing/receiver.py): each delivery verified by the
    Standard Webhooks reference library against the secret in a file the test writes once it has it."""
    py = os.environ.get("FLUXO_TEST_STANDARDWEBHOOKS_PYTHON")
    cert, key = os.environ.get("FLUXO_TEST_TLS_CERT"), os.environ.get("FLUXO_TEST_TLS_KEY")
    if not (py and cert and key):
        raise Fail("FLUXO_TEST_STANDARDWEBHOOKS_PYTHON, FLUXO_TEST_TLS_CERT and FLUXO_TEST_TLS_KEY are set by scripts/test.sh")
    secret_file = STATE / "webhook-secret"
    secret_file.write_text("whsec_" + base64.b64encode(b"not the secret yet").decode())
    p = spawn("webhook-receiver", [py, str(ROOT / "crates" / "testing" / "receiver.py"), f"@{secret_file}", cert, key])
    log = STATE / "webhook-receiver.log"
    def listening():
        if p.poll() is not None:
            raise Fail(f"the receiver exited: {log.read_text()[-500:]}")
        port = next((int(x.split()[1]) for x in log.read_text().splitlines() if x.startswith("port ")), None)
        return port is not None, port
    port = poll("webhook receiver listening", 30, listening, interval=0.2)
    return port, secret_file, log


def deliveries(log):
    return [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]


def start_notifier():
    name = f"fluxo-notifier-{len(CONSUMERS)}"
    p = spawn(name, [FLUXO, "serve", "--target", "notifier"],
              env=fluxo_env({"FLUXO_GRPC__LISTEN": f"127.0.0.1:{free_port()}",
                             "FLUXO_CONSOLIDATOR__CONSUMER_NAME": name,
                             "FLUXO_WEBHOOKS__CA_FILE": os.environ["FLUXO_TEST_TLS_CA"],
                             "FLUXO_WEBHOOKS__POLL_MS": "100"}))
    CONSUMERS.append((name, p))


def notifier_scenario():
    """notifier.enabled on the installed chart: the notifiers' group made by `fluxo queue init
    --notifiers` (the hook's command), the Deployment at zero until an entry is booked, woken by
    KEDA on its own group's lag while the consolidators' group is drained, the webhook delivered
    by a real `fluxo serve --target notifier` and verified by the Standard Webhooks library, then
    back to zero."""
    sets = ["notifier.enabled=true", "secrets.webhooks.name=fluxo-webhooks"]
    state = {}

    def install():
        apply([{"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": "fluxo-webhooks", "namespace": NS}, "stringData": {"secret-key": WEBHOOK_KEY}}])
        rendered = render(*sets)
        so = next((d for d in rendered if d["kind"] == "ScaledObject" and d["metadata"]["name"] == NOTIFIER), None)
        if not so:
            raise Fail(f"no ScaledObject {NOTIFIER} rendered with {sets}")
        groups = {tr["metadata"].get("consumerGroup") for tr in so["spec"]["triggers"]}
        if groups != {NGROUP}:
            raise Fail(f"the notifier's triggers read groups {groups}, not only {NGROUP}")
        # The notifiers' group made before the notifier is deployed: doctor names it (nothing reads
        # it, so the consolidators' trim keeps what it has not consumed).
        sh(FLUXO, "queue", "init", "--notifiers", env=fluxo_env(), what="fluxo queue init --notifiers")
        if not notifier_group():
            raise Fail(f"fluxo queue init --notifiers made no group {NGROUP} on {STREAM}")
        doctor_test.AT = sys.modules[__name__]
        _, report = doctor_test.doctor()
        c = doctor_test.by_id(report).get("stream-readers") or {}
        if c.get("status") != "failed" or NGROUP not in c.get("summary", ""):
            raise Fail(f"doctor's stream-readers check does not name the unread group {NGROUP}:\n{doctor_test.story(report)}")
        state["doctor_before"] = c["summary"][:160]
        helm_upgrade(*sets)
        poll(f"ScaledObject {NOTIFIER} Ready", 90, lambda: (
            condition(so_obj(NOTIFIER), "Ready").get("status") == "True", so_story(NOTIFIER)), interval=0.5)
        # The group starts at the stream's oldest entry: what the earlier sections left is read by a
        # real notifier (no subscription yet: nothing to send), then the Deployment rests at 0.
        start_notifier()
        try:
            poll("notifiers' group drained", 120, lambda: (
                (notifier_group() or {}).get("lag") == 0 and (notifier_group() or {}).get("pending") == 0,
                f"{notifier_group()}"), interval=0.5)
        finally:
            stop_consolidators()
        drain_backlog()
        poll(f"{NOTIFIER} and {DEPLOY} at 0", 240, lambda: (
            replicas(NOTIFIER) == 0 and replicas() == 0,
            f"{NOTIFIER} {replicas(NOTIFIER)}, {DEPLOY} {replicas()}; {so_story(NOTIFIER)}"), interval=0.5)
        hpa = API.get(f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/{NOTIFIER}") or {}
        _, report = doctor_test.doctor()
        c = doctor_test.by_id(report).get("stream-readers") or {}
        if c.get("status") != "passed":
            raise Fail(f"doctor's stream-readers check with the notifier deployed:\n{doctor_test.story(report)}")
        return (f"Deployment {NOTIFIER} at 0, ScaledObject Ready on group {NGROUP} "
                f"(HPA min {hpa.get('spec', {}).get('minReplicas')} max {hpa.get('spec', {}).get('maxReplicas')}); "
                f"doctor before the notifier was deployed: {state['doctor_before']}; after: passed")
    if not check("notifier.enabled: its Deployment and ScaledObject on the notifiers' group, at rest at 0", install):
        return

    def wake_and_deliver():
        port, secret_file, log = start_receiver()
        merchant = f"m-notify-{RUN_ID}"
        req = {"merchantId": merchant, "endpointUrl": f"https://localhost:{port}/fluxo",
               "eventTypes": ["entry.recorded"], "requestId": f"sub-{RUN_ID}"}
        out = sh(GRPCURL, "-plaintext", "-d", json.dumps(req), LEDGER_ADDR,
                 "fluxo.webhooks.v1.WebhookService/CreateSubscription", what="grpcurl CreateSubscription")
        secret_file.write_text(json.loads(out)["secret"])
        before = REDIS.cmd("XREVRANGE", STREAM, "+", "-", "COUNT", "1")
        entry = json.loads(sh(GRPCURL, "-plaintext", "-d", json.dumps(
            {"merchantId": merchant, "type": "CREDIT", "amount": {"currencyCode": "BRL", "minorUnits": "4200"},
             "description": "platform notifier test", "requestId": f"r-{RUN_ID}-notify"}),
            LEDGER_ADDR, "fluxo.ledger.v1.LedgerService/RecordEntry", what="grpcurl RecordEntry"))
        BOOKED[0] += 1
        entry_id = entry["id"]
        poll(f"{NOTIFIER} woken from zero", 60, lambda: (replicas(NOTIFIER) >= 1, f"replicas {replicas(NOTIFIER)}; {so_story(NOTIFIER)}"),
             interval=0.2)
        last = REDIS.cmd("XREVRANGE", STREAM, "+", "-", "COUNT", "1")
        if not last or last == before:
            raise Fail("the entry never reached the stream (relay?)")
        FIG["notifier_wake_from_zero_s"] = time.time() - stream_ms(last[0][0])
        # The consolidators' group is drained: their Deployment goes back to 0, the notifier's stays
        # up, its group still holding the event (each ScaledObject reads its own group).
        drain_backlog()
        t0 = time.time()

        dropped = []

        def consolidator_rests():
            n, c = replicas(NOTIFIER), replicas()
            if n < 1:
                dropped.append(f"{NOTIFIER} went to {n} with its group's event undelivered: {notifier_group()}")
            return c == 0 or bool(dropped), f"{DEPLOY} {c}, {NOTIFIER} {n}"
        poll(f"{DEPLOY} back at 0 while {NOTIFIER} stays up", 240, consolidator_rests, interval=0.5)
        if dropped:
            raise Fail(dropped[0])
        held = time.time() - t0
        if deliveries(log):
            raise Fail(f"a delivery arrived with no notifier running: {deliveries(log)}")
        start_notifier()
        try:
            def verified():
                got = next((d for d in deliveries(log) if d["verified"]), None)
                return got is not None, got or f"{deliveries(log)}"
            got = poll("the webhook delivered and verified", 60, verified, interval=0.2)
            poll("notifiers' group drained", 60, lambda: (
                (notifier_group() or {}).get("lag") == 0 and (notifier_group() or {}).get("pending") == 0,
                f"{notifier_group()}"), interval=0.5)
        finally:
            stop_consolidators()
        body = json.loads(got["body"])
        if body.get("type") != "entry.recorded" or entry_id not in got["body"]:
            raise Fail(f"the delivery is not entry {entry_id}'s entry.recorded: {got['body'][:300]}")
        t1 = time.time()
        poll(f"{NOTIFIER} back at 0 after the cooldown", 240, lambda: (replicas(NOTIFIER) == 0, f"replicas {replicas(NOTIFIER)}"),
             interval=0.5)
        FIG["notifier_back_to_zero_s"] = time.time() - t1
        return (f"woke {FIG['notifier_wake_from_zero_s']:.1f}s after the XADD; stayed up {held:.0f}s while {DEPLOY} went to 0; "
                f"webhook {got['id']} for {entry_id} verified by standardwebhooks; back to 0 {FIG['notifier_back_to_zero_s']:.1f}s after its group drained")
    check("notifier woken from zero by its own group's lag, the webhook delivered and verified, back to zero", wake_and_deliver)


def is_secret_rule_doc(d):
    return d.get("metadata", {}).get("name") == "keda-operator-secrets"


def webhook_rejects():
    so = so_obj()
    dup = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
           "metadata": {"name": "fluxo-consolidator-duplicate", "namespace": NS},
           "spec": {"scaleTargetRef": {"name": DEPLOY}, "triggers": so["spec"]["triggers"][:1]}}
    p = pt.run([pt.KUBECTL, "--kubeconfig", pt.KUBECONFIG, "apply", "--dry-run=server", "-f", "-"], stdin=json.dumps(dup))
    if p.returncode == 0:
        raise Fail("the API server accepted a second ScaledObject for the same Deployment")
    msg = p.stderr.strip().splitlines()[-1]
    if "admission webhook" not in msg:
        raise Fail(f"rejected, but not by KEDA's webhook: {msg}")
    return f"rejected: {msg[:220]}"


if __name__ == "__main__":
    sys.exit(main())
