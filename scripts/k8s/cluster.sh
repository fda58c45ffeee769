#!/usr/bin/env bash
# A local Kubernetes control plane for trying and testing charts/fluxo, without a cloud account,
# containers or Docker:
#
#   scripts/k8s/cluster.sh build    # build (or reuse) the pinned binaries only
#   scripts/k8s/cluster.sh up       # start the cluster; prints the kubeconfig path
#   scripts/k8s/cluster.sh env      # prints `export KUBECONFIG=...` (eval "$(... env)")
#   scripts/k8s/cluster.sh status   # what runs, and the nodes
#   scripts/k8s/cluster.sh down     # stop everything `up` started, delete etcd's data (logs stay)
#
# What runs (all on 127.0.0.1):
#   - etcd from Debian (etcd-server; installed with apt-get when missing and we are root);
#   - kube-apiserver, kube-controller-manager, kube-scheduler and kubectl, built from the
#     k8s.io/kubernetes module of the Go module proxy (cached in target/k8s-bin/<version>/);
#   - kwok (sigs.k8s.io/kwok), which plays the kubelets: three fake nodes, one per zone
#     (topology.kubernetes.io/zone), whose pods go Running and Ready without containers, and
#     whose pods meant to finish (restartPolicy Never/OnFailure: Jobs, `helm test`) succeed.
# Every wait polls with a deadline; a step that does not happen in time fails with the log of
# the component concerned.
#
# Environment:
#   FLUXO_K8S_CLUSTER_DIR   state dir (default target/k8s-cluster): kubeconfig, PKI, logs, pids
#   FLUXO_K8S_NODES         number of kwok nodes (default 3, spread over three zones)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# ---- pinned versions -----------------------------------------------------------------------
KUBE_VERSION=v1.35.4    # k8s.io/kubernetes: kube-apiserver, -controller-manager, -scheduler, kubectl
KUBE_STAGING=v0.35.4    # the published k8s.io/<staging> modules of that release
KWOK_VERSION=v0.7.0     # sigs.k8s.io/kwok

BIN="$ROOT/target/k8s-bin/$KUBE_VERSION"
KWOK_BIN="$ROOT/target/k8s-bin/kwok-$KWOK_VERSION"
STATE="${FLUXO_K8S_CLUSTER_DIR:-$ROOT/target/k8s-cluster}"
NODES="${FLUXO_K8S_NODES:-3}"
ZONES=(zone-a zone-b zone-c)

export GOTOOLCHAIN=local

log() { echo "cluster.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

need() { # command hint
    command -v "$1" >/dev/null 2>&1 || die "$1 not found: $2"
}

# need_pkg command debian-package: installs the package when the command is missing and we can
# (root with apt-get), else fails with a clear message.
need_pkg() {
    command -v "$1" >/dev/null 2>&1 && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "$1 not found: installing $2 from Debian"
        { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2" ||
            { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
                DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2"; }; } >&2 ||
            die "apt-get install $2 failed"
    fi
    command -v "$1" >/dev/null 2>&1 || die "$1 not found: install Debian's $2 (apt-get install $2)"
}

# ---- build -----------------------------------------------------------------------------------
binaries_ok() {
    local b
    for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
        [ -x "$BIN/$b" ] || return 1
    done
    [ -f "$BIN/.built" ] && [ "$(cat "$BIN/.built")" = "$KUBE_VERSION" ]
}

build_kube() {
    if binaries_ok; then
        log "kube binaries $KUBE_VERSION cached in ${BIN#"$ROOT"/}"
        return
    fi
    need go "Go is needed to build the control plane from the Go module proxy"
    local start=$SECONDS json dir src="$ROOT/target/k8s-bin/src-$KUBE_VERSION"
    mkdir -p "$BIN"
    json="$(cd "$ROOT/target/k8s-bin" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION")" ||
        die "go mod download k8s.io/kubernetes@$KUBE_VERSION failed: $json"
    dir="$(python3 -c 'import json,sys; print(json.load(sys.stdin).get("Dir",""))' <<<"$json")"
    [ -d "$dir" ] || die "go mod download gave no module dir for k8s.io/kubernetes@$KUBE_VERSION: $json"
    # The module zip has no staging/ tree: point every staging replace at the published module
    # of the same release instead, in a writable copy.
    rm -rf "$src"
    cp -r "$dir" "$src"
    chmod -R u+w "$src"
    rm -f "$src/go.work" "$src/go.work.sum"
    local -a edits=()
    local m
    while read -r m; do
        edits+=("-replace=$m=$m@$KUBE_STAGING")
    done < <(awk '$2 == "=>" && $3 ~ /^\.\/staging\// { print $1 }' "$src/go.mod")
    [ "${#edits[@]}" -gt 0 ] || die "no staging replace directives found in k8s.io/kubernetes@$KUBE_VERSION go.mod"
    (cd "$src" && GOWORK=off go mod edit "${edits[@]}")
    local minor=${KUBE_VERSION#v1.}
    minor=${minor%%.*}
    local v=k8s.io/component-base/version
    local ldflags="-s -w -X $v.gitVersion=$KUBE_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
    log "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl $KUBE_VERSION (several minutes)"
    (cd "$src" && GOWORK=off GOFLAGS=-mod=mod nice -n 10 go build -trimpath -ldflags "$ldflags" -o "$BIN/" \
        ./cmd/kube-apiserver ./cmd/kube-controller-manager ./cmd/kube-scheduler ./cmd/kubectl) ||
        die "go build of the Kubernetes $KUBE_VERSION binaries failed"
    "$BIN/kube-apiserver" --version | grep -qx "Kubernetes $KUBE_VERSION" ||
        die "kube-apiserver reports $("$BIN/kube-apiserver" --version), not $KUBE_VERSION"
    echo "$KUBE_VERSION" >"$BIN/.built"
    rm -rf "$src"
    log "built the kube binaries in $((SECONDS - start))s"
}

build_kwok() {
    if [ -x "$KWOK_BIN/kwok" ] && go version -m "$KWOK_BIN/kwok" 2>/dev/null |
        awk '$1 == "mod" && $2 == "sigs.k8s.io/kwok" { print $3 }' | grep -qx "$KWOK_VERSION"; then
        log "kwok $KWOK_VERSION cached in ${KWOK_BIN#"$ROOT"/}"
        return
    fi
    need go "Go is needed to install kwok from the Go module proxy"
    local start=$SECONDS
    mkdir -p "$KWOK_BIN"
    (cd "$ROOT/target/k8s-bin" && GOBIN="$KWOK_BIN" nice -n 10 go install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION") ||
        die "go install sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION failed"
    log "installed kwok $KWOK_VERSION in $((SECONDS - start))s"
}

build() {
    mkdir -p "$ROOT/target/k8s-bin"
    build_kube
    build_kwok
}

# ---- up / down -------------------------------------------------------------------------------
KUBECONFIG_FILE="$STATE/kubeconfig"
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for "what" seconds component command...: polls command until it succeeds; fails with the
# component's log when the deadline passes or the component exits.
wait_for() {
    local what=$1 secs=$2 comp=$3
    shift 3
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [ -n "$comp" ] && ! kill -0 "$(cat "$STATE/$comp.pid" 2>/dev/null)" 2>/dev/null; then
            tail -n 40 "$STATE/$comp.log" >&2 || true
            die "$comp exited while waiting for $what (log: $STATE/$comp.log)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            [ -z "$comp" ] || tail -n 40 "$STATE/$comp.log" >&2 || true
            die "timed out after ${secs}s waiting for $what"
        fi
        sleep 0.2
    done
}

start() { # name command...: runs in the background, pid in $STATE/<name>.pid
    local name=$1
    shift
    # Clients use plain LIST + WATCH rather than streaming lists (see --watch-cache below).
    KUBE_FEATURE_WatchListClient=false "$@" >"$STATE/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/$name.pid"
}


pki() {
    local d="$STATE/pki"
    mkdir -p "$d"
    local q=(-loglevel error)
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=fluxo-local-ca" \
        -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
    cert() { # name subject [san]
        openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$d/$1.key" -out "$d/$1.csr" 2>/dev/null
        if [ -n "${3:-}" ]; then
            printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$3" >"$d/$1.ext"
        else
            printf 'extendedKeyUsage=clientAuth\n' >"$d/$1.ext"
        fi
        openssl x509 -req -in "$d/$1.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 2 \
            -extfile "$d/$1.ext" -out "$d/$1.crt" 2>/dev/null
    }
    cert apiserver "/CN=kube-apiserver" "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    cert admin "/O=system:masters/CN=fluxo-admin"
    cert controller-manager "/CN=system:kube-controller-manager"
    cert scheduler "/CN=system:kube-scheduler"
    cert front-proxy-client "/CN=front-proxy-client"
    # Service-account token signing keys, new for every cluster.
    openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
    openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
}

kubeconfig() { # file user
    cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
  - name: fluxo-local
    cluster:
      server: https://127.0.0.1:$API_PORT
      certificate-authority: $STATE/pki/ca.crt
users:
  - name: $2
    user:
      client-certificate: $STATE/pki/$2.crt
      client-key: $STATE/pki/$2.key
contexts:
  - name: fluxo-local
    context: {cluster: fluxo-local, user: $2}
current-context: fluxo-local
KC
    chmod 600 "$1"
}

kctl() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

nodes_ready() {
    local want=$1 out
    out="$(kctl get nodes -l type=kwok -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.type=="Ready")].status}{" "}{.spec.taints[*].key}{"\n"}{end}')" || return 1
    [ "$(grep -c ' True $' <<<"$out")" -eq "$want" ]
}

write_kwok_config() {
    # Pods: Running and Ready once scheduled; pods that are meant to finish (restartPolicy Never
    # or OnFailure: Job pods, `helm test` pods) succeed; deleted pods go away.
    cat >"$STATE/kwok.yaml" <<'YAML'
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  enableCRDs: []
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-ready
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
      - {key: .metadata.deletionTimestamp, operator: DoesNotExist}
      - {key: .status.podIP, operator: DoesNotExist}
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
        - {type: Initialized, status: "True", lastTransitionTime: {{ $now | Quote }}}
        - {type: ContainersReady, status: "True", lastTransitionTime: {{ $now | Quote }}}
        - {type: Ready, status: "True", lastTransitionTime: {{ $now | Quote }}}
        - {type: PodScheduled, status: "True", lastTransitionTime: {{ $now | Quote }}}
      {{ range .spec.readinessGates }}
        - {type: {{ .conditionType | Quote }}, status: "True", lastTransitionTime: {{ $now | Quote }}}
      {{ end }}
      containerStatuses:
      {{ range .spec.containers }}
        - name: {{ .name | Quote }}
          image: {{ .image | Quote }}
          ready: true
          started: true
          restartCount: 0
          state:
            running:
              startedAt: {{ $now | Quote }}
      {{ end }}
      initContainerStatuses:
      {{ range .spec.initContainers }}
        - name: {{ .name | Quote }}
          image: {{ .image | Quote }}
          restartCount: 0
          {{ if eq .restartPolicy "Always" }}
          ready: true
          started: true
          state:
            running:
              startedAt: {{ $now | Quote }}
          {{ else }}
          ready: true
          state:
            terminated:
              exitCode: 0
              reason: Completed
              startedAt: {{ $now | Quote }}
              finishedAt: {{ $now | Quote }}
          {{ end }}
      {{ end }}
      hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
      podIP: {{ PodIPWith .spec.nodeName false .metadata.uid .metadata.name .metadata.namespace | Quote }}
      phase: Running
      startTime: {{ $now | Quote }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-complete
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
      - {key: .metadata.deletionTimestamp, operator: DoesNotExist}
      - {key: .status.phase, operator: In, values: [Running]}
      - {key: .spec.restartPolicy, operator: In, values: [Never, OnFailure]}
  next:
    statusTemplate: |
      {{ $now := Now }}
      {{ $start := .status.startTime }}
      conditions:
        - {type: Initialized, status: "True", lastTransitionTime: {{ $now | Quote }}}
        - {type: ContainersReady, status: "False", reason: PodCompleted, lastTransitionTime: {{ $now | Quote }}}
        - {type: Ready, status: "False", reason: PodCompleted, lastTransitionTime: {{ $now | Quote }}}
        - {type: PodScheduled, status: "True", lastTransitionTime: {{ $now | Quote }}}
      containerStatuses:
      {{ range .spec.containers }}
        - name: {{ .name | Quote }}
          image: {{ .image | Quote }}
          ready: false
          started: false
          restartCount: 0
          state:
            terminated:
              exitCode: 0
              reason: Completed
              startedAt: {{ $start | Quote }}
              finishedAt: {{ $now | Quote }}
      {{ end }}
      phase: Succeeded
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-delete
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
      - {key: .metadata.deletionTimestamp, operator: Exists}
  next:
    finalizers: {empty: true}
    delete: true
YAML
}

node_manifest() { # index zone
    cat <<NODE
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$1
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/arch: amd64
    kubernetes.io/os: linux
    kubernetes.io/hostname: kwok-node-$1
    topology.kubernetes.io/region: local
    topology.kubernetes.io/zone: $2
spec: {}
status:
  allocatable: {cpu: "16", memory: 64Gi, pods: "110", ephemeral-storage: 100Gi}
  capacity: {cpu: "16", memory: 64Gi, pods: "110", ephemeral-storage: 100Gi}
  nodeInfo:
    architecture: amd64
    operatingSystem: linux
    kubeletVersion: fake
    kubeProxyVersion: fake
---
NODE
}

running() { # component
    [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null
}

up() {
    local c
    for c in "${COMPONENTS[@]}"; do
        running "$c" && die "$c from an earlier 'up' still runs (pid $(cat "$STATE/$c.pid")); run '$0 down' first"
    done
    need_pkg etcd etcd-server
    need_pkg openssl openssl
    need_pkg curl curl
    need python3 "python3 is needed"
    local etcd_bin
    etcd_bin="$(command -v etcd)"
    build
    local start=$SECONDS
    # A start that fails half way stops what it had started.
    trap 'rc=$?; if [ "$rc" -ne 0 ]; then down || true; fi; exit "$rc"' EXIT
    rm -rf "$STATE"
    mkdir -p "$STATE"
    pki

    local etcd_port etcd_peer cm_port sched_port kwok_port
    etcd_port=$(free_port)
    etcd_peer=$(free_port)
    API_PORT=$(free_port)
    cm_port=$(free_port)
    sched_port=$(free_port)
    kwok_port=$(free_port)
    echo "$API_PORT" >"$STATE/api-port"

    start etcd "$etcd_bin" --name fluxo-local --data-dir "$STATE/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "fluxo-local=http://127.0.0.1:$etcd_peer" --listen-metrics-urls "" \
        --quota-backend-bytes 2147483648 --snapshot-count 10000
    wait_for "etcd health" 30 etcd curl -fsS "http://127.0.0.1:$etcd_port/health"

    # Admission plugins as EKS enables them, minus NodeRestriction (kwok writes node and pod
    # status with the admin identity, not as system:node:<name>).
    local admission=NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,DefaultTolerationSeconds
    admission+=,ExtendedResourceToleration,Priority,PodSecurity,TaintNodesByCondition,StorageObjectInUseProtection
    admission+=,PersistentVolumeClaimResize,RuntimeClass,DefaultIngressClass,CertificateApproval,CertificateSigning
    admission+=,CertificateSubjectRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook
    admission+=,ValidatingAdmissionPolicy,ResourceQuota
    local p="$STATE/pki"
    # --watch-cache=false: Debian's etcd 3.4 has no watch progress notifications, and without
    # them the watch cache refuses streaming list requests (sendInitialEvents), which kwok's
    # client-go keeps retrying with backoff: pods then wait up to a minute for their next state.
    # Watches served straight from etcd work; the cluster is small enough not to need the cache.
    start kube-apiserver "$BIN/kube-apiserver" \
        --etcd-servers "http://127.0.0.1:$etcd_port" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
        --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" \
        --client-ca-file "$p/ca.crt" \
        --requestheader-client-ca-file "$p/ca.crt" --requestheader-allowed-names front-proxy-client \
        --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
        --requestheader-extra-headers-prefix X-Remote-Extra- \
        --proxy-client-cert-file "$p/front-proxy-client.crt" --proxy-client-key-file "$p/front-proxy-client.key" \
        --endpoint-reconciler-type none \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-account-key-file "$p/sa.pub" --service-account-signing-key-file "$p/sa.key" \
        --api-audiences https://kubernetes.default.svc.cluster.local \
        --authorization-mode RBAC --anonymous-auth=false \
        --enable-admission-plugins "$admission" \
        --service-cluster-ip-range 10.96.0.0/16 \
        --profiling=false --event-ttl 2h --watch-cache=false
    kubeconfig "$KUBECONFIG_FILE" admin
    kubeconfig "$STATE/controller-manager.kubeconfig" controller-manager
    kubeconfig "$STATE/scheduler.kubeconfig" scheduler
    wait_for "kube-apiserver /readyz" 120 kube-apiserver kctl get --raw /readyz
    # RBAC bootstrap roles exist once the poststarthook ran (part of /readyz).

    start kube-controller-manager "$BIN/kube-controller-manager" \
        --kubeconfig "$STATE/controller-manager.kubeconfig" \
        --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
        --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port "$cm_port" --leader-elect=false \
        --use-service-account-credentials \
        --service-account-private-key-file "$p/sa.key" --root-ca-file "$p/ca.crt" \
        --cluster-signing-cert-file "$p/ca.crt" --cluster-signing-key-file "$p/ca.key" \
        --service-cluster-ip-range 10.96.0.0/16 --cluster-name fluxo-local \
        --controllers '*' --profiling=false
    start kube-scheduler "$BIN/kube-scheduler" \
        --kubeconfig "$STATE/scheduler.kubeconfig" \
        --authentication-kubeconfig "$STATE/scheduler.kubeconfig" \
        --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port "$sched_port" --leader-elect=false --profiling=false
    wait_for "kube-controller-manager /healthz" 60 kube-controller-manager \
        curl -fsSk "https://127.0.0.1:$cm_port/healthz"
    wait_for "kube-scheduler /healthz" 60 kube-scheduler curl -fsSk "https://127.0.0.1:$sched_port/healthz"

    # Nodes renew their Lease in kube-node-lease as kubelets do, so the node lifecycle controller
    # (which lifts the not-ready taint, and marks pods not Ready on nodes that go silent) sees
    # them alive.
    write_kwok_config
    start kwok "$KWOK_BIN/kwok" --kubeconfig "$KUBECONFIG_FILE" --config "$STATE/kwok.yaml" \
        --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
        --cidr 10.244.0.0/16 --node-ip 10.240.0.1 \
        --server-address "127.0.0.1:$kwok_port" --node-port 0 --node-lease-duration-seconds 40
    wait_for "kwok /healthz" 60 kwok curl -fsS "http://127.0.0.1:$kwok_port/healthz"

    local i
    for i in $(seq 0 $((NODES - 1))); do
        node_manifest "$i" "${ZONES[$((i % ${#ZONES[@]}))]}"
    done >"$STATE/nodes.yaml"
    kctl apply -f "$STATE/nodes.yaml" >/dev/null
    # Ready as kwok reports it, and the node lifecycle controller has lifted the not-ready taint.
    wait_for "$NODES kwok nodes Ready and untainted" 120 kwok nodes_ready "$NODES"
    wait_for "the default ServiceAccount" 60 kube-controller-manager kctl -n default get serviceaccount default
    trap - EXIT
    log "cluster up in $((SECONDS - start))s: $NODES nodes in zones ${ZONES[*]}"
    echo "$KUBECONFIG_FILE"
}

down() {
    local c pid rc=0
    # Reverse start order: the control plane before its storage.
    for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
        c=${COMPONENTS[$i]}
        [ -f "$STATE/$c.pid" ] || continue
        pid="$(cat "$STATE/$c.pid")"
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            local deadline=$((SECONDS + 20))
            while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
            if kill -0 "$pid" 2>/dev/null; then
                log "$c (pid $pid) ignored SIGTERM for 20s: killing it"
                kill -KILL "$pid" 2>/dev/null || rc=1
            fi
        fi
        rm -f "$STATE/$c.pid"
    done
    [ -d "$STATE" ] && rm -rf "$STATE/etcd"
    return "$rc"
}

status() {
    local c
    for c in "${COMPONENTS[@]}"; do
        if running "$c"; then echo "$c: running (pid $(cat "$STATE/$c.pid"))"; else echo "$c: not running"; fi
    done
    [ -f "$KUBECONFIG_FILE" ] && running kube-apiserver && kctl get nodes -L topology.kubernetes.io/zone
}

case "${1:-}" in
build) build ;;
up) up ;;
down) down ;;
env) echo "export KUBECONFIG=$KUBECONFIG_FILE PATH=$BIN:$ROOT/target/tools:\$PATH" ;;
status) status ;;
*) die "usage: $0 build|up|down|env|status" ;;
esac
