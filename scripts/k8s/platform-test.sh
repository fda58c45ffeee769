#!/usr/bin/env bash
# Platform tests of charts/fluxo on a live control plane:
#
#   scripts/k8s/platform-test.sh [case...]    # cases: defaults, or ci/<case>-values.yaml names
#
# Brings up the local cluster (scripts/k8s/cluster.sh: etcd, kube-apiserver, controller-manager,
# scheduler, kwok nodes in three zones) in its own state dir, runs scripts/k8s/platform_test.py
# against it, and always tears the cluster down again (also on failure or interrupt).
# Uses helm and istioctl from target/tools and the CRD module zips that scripts/validate-k8s.sh
# installs and downloads: run that first (scripts/test.sh does).
# Prints "N passed, M failed" last; exits non-zero on any failure.
#
# Environment:
#   FLUXO_PLATFORM_HELM_TIMEOUT   helm --timeout for install/upgrade/rollback (default 180s)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TOOLS="$ROOT/target/tools"
export FLUXO_K8S_CLUSTER_DIR="$ROOT/target/k8s-platform-test"
export GOTOOLCHAIN=local
# kubectl and helm: plain LIST + WATCH (see start() in cluster.sh).
export KUBE_FEATURE_WatchListClient=false

log() { echo "platform-test: $*" >&2; }
die() {
    log "error: $*"
    echo "0 passed, 1 failed"
    exit 1
}

for tool in helm istioctl; do
    [ -x "$TOOLS/$tool" ] || die "$TOOLS/$tool not found: run scripts/validate-k8s.sh first (it installs helm and istioctl there)"
done
command -v python3 >/dev/null 2>&1 || die "python3 not found"
# PyYAML: from the system, or where validate-k8s.sh installed it.
if ! python3 -c 'import yaml' 2>/dev/null; then
    export PYTHONPATH="$ROOT/target/k8s-validate/pylib${PYTHONPATH:+:$PYTHONPATH}"
    python3 -c 'import yaml' 2>/dev/null || die "PyYAML not found: run scripts/validate-k8s.sh first"
fi

start=$SECONDS
"$ROOT/scripts/k8s/cluster.sh" build || die "could not build the control plane binaries"
build_secs=$((SECONDS - start))

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    "$ROOT/scripts/k8s/cluster.sh" down || { log "cluster.sh down failed"; rc=1; }
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

up_start=$SECONDS
kubeconfig="$("$ROOT/scripts/k8s/cluster.sh" up)" || die "the cluster did not come up (logs in $FLUXO_K8S_CLUSTER_DIR)"
log "binaries ready in ${build_secs}s, cluster up in $((SECONDS - up_start))s"

bin="$ROOT/target/k8s-bin/$(sed -n 's/^KUBE_VERSION=\([^ ]*\).*/\1/p' "$ROOT/scripts/k8s/cluster.sh")"
status=0
python3 "$ROOT/scripts/k8s/platform_test.py" --kubeconfig "$kubeconfig" --kubectl "$bin/kubectl" \
    --helm "$TOOLS/helm" --istioctl "$TOOLS/istioctl" "$@" || status=$?
log "total ${SECONDS}s (binaries ${build_secs}s)"
exit "$status"
