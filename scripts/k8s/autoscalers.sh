#!/usr/bin/env bash
# KEDA and Karpenter for the local control plane (scripts/k8s/cluster.sh), as real processes:
#
#   scripts/k8s/autoscalers.sh build      # build (or reuse) the pinned binaries only
#   scripts/k8s/autoscalers.sh paths      # print NAME=path lines of the binaries and their modules
#
# What is built, from the Go module proxy (cached in target/k8s-bin/<name>-<version>/):
#   - KEDA (github.com/kedacore/keda/v2): the operator (cmd/operator), the metrics API server
#     (cmd/adapter) and the admission webhooks (cmd/webhooks). Its go.mod has version replaces,
#     which `go install` refuses, so it is built inside a writable copy of the downloaded module.
#   - Karpenter (sigs.k8s.io/karpenter): its kwok cloud provider (kwok/), the whole Karpenter
#     controller set with "instances" that are kwok nodes.
# The module directories are printed by `paths` too: the platform tests apply the CRDs of the
# very release they run (KEDA's config/crd, Karpenter's kwok/charts/crds and kwok/apis/crds).
#
# The processes themselves are started and stopped by scripts/k8s/platform_test.py (autoscaling
# scenarios), with certificates it makes and loopback addresses only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# ---- pinned versions -----------------------------------------------------------------------
# KEDA: the version whose CRDs and scaler source scripts/validate-k8s.sh checks the chart against
# (v2.21.0: k8s.io/* v0.36 clients, within client-go's skew of the v1.35 API server).
KEDA_VERSION="$(sed -n 's/^KEDA_VERSION=\([^ ]*\).*/\1/p' "$ROOT/scripts/validate-k8s.sh")"
# Karpenter's core module (its kwok provider). v1.14.1: k8s.io/* v0.35.1 and controller-runtime
# v0.23 (made for v1.35 API servers), and a go directive (1.26.6) the Go toolchain here builds;
# v1.14.3 and v1.15.0 need a newer Go (GOTOOLCHAIN=local refuses them). validate-k8s.sh pins
# karpenter-provider-aws separately for the EC2NodeClass CRD.
KARPENTER_VERSION=v1.14.1
[ -n "$KEDA_VERSION" ] || { echo "autoscalers.sh: KEDA_VERSION not found in scripts/validate-k8s.sh" >&2; exit 1; }

KEDA_BIN="$ROOT/target/k8s-bin/keda-$KEDA_VERSION"
KARPENTER_BIN="$ROOT/target/k8s-bin/karpenter-$KARPENTER_VERSION"

export GOTOOLCHAIN=local

log() { echo "autoscalers.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

need_go() {
    command -v go >/dev/null 2>&1 || die "go not found: Go is needed to build $1 from the Go module proxy"
}

# module_dir module@version: downloads the module (zip from the Go module proxy) and prints its
# read-only directory in the module cache.
module_dir() {
    local json dir
    json="$(cd "$ROOT/target/k8s-bin" && go mod download -json "$1")" || die "go mod download $1 failed: $json"
    dir="$(python3 -c 'import json,sys; print(json.load(sys.stdin).get("Dir",""))' <<<"$json")"
    [ -d "$dir" ] || die "go mod download gave no module dir for $1: $json"
    echo "$dir"
}

# built dir version: the .built stamp of a cache dir says which version its binaries are.
built() { [ -f "$1/.built" ] && [ "$(cat "$1/.built")" = "$2" ]; }

build_keda() {
    local b ok=1
    for b in keda keda-adapter keda-admission-webhooks; do [ -x "$KEDA_BIN/$b" ] || ok=0; done
    if [ "$ok" = 1 ] && built "$KEDA_BIN" "$KEDA_VERSION"; then
        log "KEDA $KEDA_VERSION cached in ${KEDA_BIN#"$ROOT"/}"
        return
    fi
    need_go "KEDA"
    local start=$SECONDS dir src="$ROOT/target/k8s-bin/src-keda-$KEDA_VERSION"
    mkdir -p "$KEDA_BIN"
    dir="$(module_dir "github.com/kedacore/keda/v2@$KEDA_VERSION")"
    rm -rf "$src"
    cp -r "$dir" "$src"
    chmod -R u+w "$src"
    local ld="-s -w -X=github.com/kedacore/keda/v2/version.Version=${KEDA_VERSION#v} -X=github.com/kedacore/keda/v2/version.GitCommit=module-proxy"
    log "building KEDA $KEDA_VERSION: operator, metrics API server, admission webhooks (many minutes cold: every scaler is compiled in)"
    (cd "$src" && GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0 nice -n 10 go build -trimpath -ldflags "$ld" \
        -o "$KEDA_BIN/keda" ./cmd/operator) || die "go build of KEDA's operator $KEDA_VERSION failed"
    (cd "$src" && GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0 nice -n 10 go build -trimpath -ldflags "$ld" \
        -o "$KEDA_BIN/keda-adapter" ./cmd/adapter) || die "go build of KEDA's metrics API server $KEDA_VERSION failed"
    (cd "$src" && GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0 nice -n 10 go build -trimpath -ldflags "$ld" \
        -o "$KEDA_BIN/keda-admission-webhooks" ./cmd/webhooks) || die "go build of KEDA's admission webhooks $KEDA_VERSION failed"
    echo "$KEDA_VERSION" >"$KEDA_BIN/.built"
    rm -rf "$src"
    log "built KEDA $KEDA_VERSION in $((SECONDS - start))s"
}

build_karpenter() {
    if [ -x "$KARPENTER_BIN/karpenter-kwok" ] && built "$KARPENTER_BIN" "$KARPENTER_VERSION"; then
        log "Karpenter $KARPENTER_VERSION (kwok provider) cached in ${KARPENTER_BIN#"$ROOT"/}"
        return
    fi
    need_go "Karpenter"
    local start=$SECONDS dir src="$ROOT/target/k8s-bin/src-karpenter-$KARPENTER_VERSION"
    mkdir -p "$KARPENTER_BIN"
    dir="$(module_dir "sigs.k8s.io/karpenter@$KARPENTER_VERSION")"
    rm -rf "$src"
    cp -r "$dir" "$src"
    chmod -R u+w "$src"
    log "building Karpenter $KARPENTER_VERSION with its kwok cloud provider (several minutes cold)"
    (cd "$src" && GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0 nice -n 10 go build -trimpath -ldflags "-s -w" \
        -o "$KARPENTER_BIN/karpenter-kwok" ./kwok) || die "go build of Karpenter's kwok provider $KARPENTER_VERSION failed"
    echo "$KARPENTER_VERSION" >"$KARPENTER_BIN/.built"
    rm -rf "$src"
    log "built Karpenter $KARPENTER_VERSION in $((SECONDS - start))s"
}

build() {
    mkdir -p "$ROOT/target/k8s-bin"
    build_keda
    build_karpenter
}

paths() {
    mkdir -p "$ROOT/target/k8s-bin"
    need_go "KEDA and Karpenter"
    echo "KEDA_VERSION=$KEDA_VERSION"
    echo "KEDA_BIN=$KEDA_BIN"
    echo "KEDA_MODULE=$(module_dir "github.com/kedacore/keda/v2@$KEDA_VERSION")"
    echo "KARPENTER_VERSION=$KARPENTER_VERSION"
    echo "KARPENTER_BIN=$KARPENTER_BIN"
    echo "KARPENTER_MODULE=$(module_dir "sigs.k8s.io/karpenter@$KARPENTER_VERSION")"
}

case "${1:-}" in
build) build ;;
paths) paths ;;
*) die "usage: $0 build|paths" ;;
esac
