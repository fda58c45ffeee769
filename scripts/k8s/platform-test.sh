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
# Two suites, each on a fresh cluster:
#   chart        scripts/k8s/platform_test.py: install, upgrade, rollback, drain, uninstall
#   autoscaling  scripts/k8s/autoscaling_test.py: the real KEDA (operator, metrics API server,
#                admission webhooks) and Karpenter (kwok provider) built by scripts/k8s/autoscalers.sh,
#                scaling the chart's consolidators on the test suite's Redis, fed by real fluxo
#                processes. Needs FLUXO_TEST_POSTGRES_URL / FLUXO_TEST_REDIS_URL (run it inside
#                scripts/test.sh: FLUXO_TEST_CMD=./scripts/k8s/platform-test.sh ./scripts/test.sh),
#                grpcurl and ghz (FLUXO_TEST_GRPCURL / FLUXO_TEST_GHZ, which test.sh installs) and
#                the fluxo binary (FLUXO_BIN, default target/debug/fluxo, built when missing).
#                Then scripts/k8s/doctor_test.py on the same cluster: `fluxo doctor` on a healthy and
#                on broken installs, and the consolidators' pod-deletion cost on a scale-in.
#
# Environment:
#   FLUXO_PLATFORM_HELM_TIMEOUT   helm --timeout for install/upgrade/rollback (default 180s)
#   FLUXO_PLATFORM_SUITES         suites to run (default "chart autoscaling"); all of them under CI
#   FLUXO_BIN                     the fluxo binary for the autoscaling suite
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

SUITES="${FLUXO_PLATFORM_SUITES:-chart autoscaling}"
if [ -n "${CI:-}" ] && [ "$SUITES" != "chart autoscaling" ]; then
    die "FLUXO_PLATFORM_SUITES is for local iteration only; CI runs every platform suite"
fi
FLUXO_BIN="${FLUXO_BIN:-$ROOT/target/debug/fluxo}"

start=$SECONDS
"$ROOT/scripts/k8s/cluster.sh" build || die "could not build the control plane binaries"
if [[ " $SUITES " == *" autoscaling "* ]]; then
    "$ROOT/scripts/k8s/autoscalers.sh" build || die "could not build KEDA and Karpenter (scripts/k8s/autoscalers.sh)"
    if [ ! -x "$FLUXO_BIN" ]; then
        log "$FLUXO_BIN not found: cargo build --locked --bin fluxo"
        (cd "$ROOT" && cargo build --locked --bin fluxo) >&2 || die "cargo build of the fluxo binary failed"
    fi
fi
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

bin="$ROOT/target/k8s-bin/$(sed -n 's/^KUBE_VERSION=\([^ ]*\).*/\1/p' "$ROOT/scripts/k8s/cluster.sh")"
status=0
total_passed=0
total_failed=0
out_dir="$FLUXO_K8S_CLUSTER_DIR.out"
mkdir -p "$out_dir"

# run_suite name command...: a fresh cluster, the suite, the cluster down again; adds up the counts.
run_suite() {
    local name=$1 rc=0 up_start=$SECONDS kubeconfig line
    shift
    if ! kubeconfig="$("$ROOT/scripts/k8s/cluster.sh" up)"; then
        log "the cluster did not come up for the $name suite (logs in $FLUXO_K8S_CLUSTER_DIR)"
        total_failed=$((total_failed + 1))
        status=1
        return
    fi
    log "$name: cluster up in $((SECONDS - up_start))s"
    local suite_start=$SECONDS
    "$@" --kubeconfig "$kubeconfig" 2>&1 | tee "$out_dir/$name.log" || rc=$?
    line="$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$out_dir/$name.log" | tail -n 1)"
    if [ -n "$line" ]; then
        total_passed=$((total_passed + ${line%% passed*}))
        local f=${line#*, }
        total_failed=$((total_failed + ${f%% failed*}))
    else
        total_failed=$((total_failed + 1))
        rc=1
    fi
    [ "$rc" -eq 0 ] || status=1
    log "$name suite: ${line:-no result line} in $((SECONDS - suite_start))s"
    "$ROOT/scripts/k8s/cluster.sh" down || { log "cluster.sh down failed"; status=1; }
}

for suite in $SUITES; do
    case "$suite" in
    chart)
        run_suite chart python3 "$ROOT/scripts/k8s/platform_test.py" --kubectl "$bin/kubectl" \
            --helm "$TOOLS/helm" --istioctl "$TOOLS/istioctl" "$@"
        ;;
    autoscaling)
        run_suite autoscaling python3 "$ROOT/scripts/k8s/autoscaling_test.py" --kubectl "$bin/kubectl" \
            --helm "$TOOLS/helm" --cluster-dir "$FLUXO_K8S_CLUSTER_DIR" --fluxo "$FLUXO_BIN"
        ;;
    *) die "unknown platform suite $suite (chart, autoscaling)" ;;
    esac
done
log "total ${SECONDS}s (binaries ${build_secs}s)"
echo
echo "$total_passed passed, $total_failed failed"
exit "$status"
