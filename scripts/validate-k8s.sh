#!/usr/bin/env bash
# Offline validation of fluxo's Kubernetes packaging: charts/fluxo, istio/, keda/, karpenter/.
#
#   scripts/validate-k8s.sh            # from any directory
#
# Needs only Go, Python 3 and the package registries (Go module proxy, PyPI): no cluster, no
# Docker, no GitHub downloads, no `helm repo` fetches.
#  1. installs pinned tools with `GOBIN=<repo>/target/tools go install module@version`
#     (skipped when the binary there was built from that exact module version);
#  2. fetches, through the Go module proxy, the Kubernetes OpenAPI (k8s.io/kubernetes) and the
#     real CRDs of KEDA, Istio, Karpenter, the prometheus-operator and Argo Rollouts (their Go modules), and converts them into strict
#     JSON schemas (scripts/k8s/schemas.py): unknown fields are errors;
#  3. helm lint --strict, then helm template over a matrix of values files, each rendering
#     validated by kubeconform -strict, by istioctl validate (Istio objects) and by
#     scripts/k8s/check_manifests.py (invariants);
#     and scripts/k8s/monitoring.py (Grafana dashboards are valid JSON, every dashboard query and
#     PrometheusRule parses with Prometheus' own PromQL and rule-file parser, built from
#     scripts/k8s/promql, and reads only metrics fluxo exports);
#  4. validates the standalone manifests under istio/ and karpenter/ the same way;
#  5. self-tests: deliberately broken manifests must be rejected, or the validators are toothless.
# Prints "N passed, M failed" last; exits non-zero on any failure.
#
# Environment: FLUXO_K8S_ISTIOCTL=0 skips building istioctl (the Istio objects are still checked
# against the Istio CRD schemas and Istio's retryOn list by check_manifests.py).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/target/tools"
WORK="$ROOT/target/k8s-validate"
CHART="$ROOT/charts/fluxo"
K8S_SCRIPTS="$ROOT/scripts/k8s"

# ---- pinned versions -----------------------------------------------------------------------
HELM_VERSION=v3.22.0            # helm.sh/helm/v3
KUBECONFORM_VERSION=v0.8.0      # github.com/yannh/kubeconform
KUBE_VERSION=v1.35.4            # k8s.io/kubernetes (OpenAPI) and helm --kube-version
KEDA_VERSION=v2.21.0            # github.com/kedacore/keda/v2 (CRDs, redis-streams scaler source)
ISTIO_API_VERSION=v1.31.1       # istio.io/api (CRDs)
KARPENTER_VERSION=v1.15.1       # github.com/aws/karpenter-provider-aws (NodePool, EC2NodeClass CRDs)
PROMETHEUS_OPERATOR_VERSION=v0.90.1 # github.com/prometheus-operator/prometheus-operator (PrometheusRule CRD)
ARGO_ROLLOUTS_VERSION=v1.10.2   # github.com/argoproj/argo-rollouts (Rollout, AnalysisTemplate CRDs)
# The PromQL checker (scripts/k8s/promql) pins github.com/prometheus/prometheus in its go.mod.
# istio.io/istio publishes no semver tags; istioctl is built from a pinned commit through the
# module in scripts/k8s/istioctl (see its go.mod for why it carries replace directives).
ISTIO_VERSION=v0.0.0-20260827124520-eed52ebb66ad
PYYAML_VERSION=6.0.2
NAMESPACE=fluxo
RELEASE=fluxo

export GOTOOLCHAIN=local
export PATH="$TOOLS:$PATH"
mkdir -p "$TOOLS" "$WORK"

passed=0
failed=0
log="$WORK/last-check.log"

section() { printf '\n==> %s\n' "$*"; }
pass() { passed=$((passed + 1)); printf '  ok    %s\n' "$1"; }
fail() { failed=$((failed + 1)); printf '  FAIL  %s\n' "$1"; }

# check "description" command...: one check; the command's output is shown only on failure.
check() {
    local what=$1
    shift
    if "$@" >"$log" 2>&1; then
        pass "$what"
    else
        fail "$what"
        sed 's/^/        /' "$log"
    fi
}

# expect_failure "description" command...: the command must fail (self-tests).
expect_failure() {
    local what=$1
    shift
    if "$@" >"$log" 2>&1; then
        fail "$what (the broken input was accepted)"
        sed 's/^/        /' "$log"
    else
        pass "$what"
        grep -m2 -E 'FAIL|invalid|error|not allowed' "$log" | sed 's/^/        rejected: /' || true
    fi
}

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "validate-k8s: $1 is required" >&2; exit 2; }
}
need go
need python3

# ---- 1. tools --------------------------------------------------------------------------------
# The module version a binary was built from, as recorded by the Go toolchain.
built_version() {
    [ -x "$1" ] && go version -m "$1" 2>/dev/null | awk -v m="$2" '($1 == "mod" || $1 == "dep") && $2 == m { print $3 }'
}

install_tool() { # name module package version
    local name=$1 module=$2 package=$3 version=$4
    if [ "$(built_version "$TOOLS/$name" "$module" || true)" = "$version" ]; then
        pass "$name $version (cached in target/tools)"
        return
    fi
    local start=$SECONDS
    if (cd "$WORK" && GOBIN="$TOOLS" go install "$package@$version") >"$log" 2>&1; then
        pass "$name $version installed with go install ($((SECONDS - start))s)"
    else
        fail "go install $package@$version"
        sed 's/^/        /' "$log"
        return 1
    fi
}

section "tools"
install_tool helm helm.sh/helm/v3 helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
install_tool kubeconform github.com/yannh/kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION"

ISTIOCTL=""
if [ "${FLUXO_K8S_ISTIOCTL:-1}" != 0 ]; then
    if [ "$(built_version "$TOOLS/istioctl" istio.io/istio || true)" = "$ISTIO_VERSION" ]; then
        pass "istioctl $ISTIO_VERSION (cached in target/tools)"
        ISTIOCTL="$TOOLS/istioctl"
    else
        start=$SECONDS
        if (cd "$K8S_SCRIPTS/istioctl" && GOBIN="$TOOLS" GOFLAGS="${GOFLAGS:-} -mod=readonly" \
            go install istio.io/istio/istioctl/cmd/istioctl) >"$log" 2>&1; then
            pass "istioctl $ISTIO_VERSION built ($((SECONDS - start))s)"
            ISTIOCTL="$TOOLS/istioctl"
        else
            fail "build istioctl (scripts/k8s/istioctl)"
            sed 's/^/        /' "$log"
        fi
    fi
fi

# PromQL and rule files are checked with Prometheus' own parser: a small program over its
# packages (seconds to build) rather than promtool (its discovery dependencies take many minutes).
PROMQL_CHECK=""
promql_module_version="$(awk '$1 == "github.com/prometheus/prometheus" { print $2 }' "$K8S_SCRIPTS/promql/go.mod")"
if [ "$(built_version "$TOOLS/promql-check" github.com/prometheus/prometheus || true)" = "$promql_module_version" ]; then
    pass "promql-check (Prometheus $promql_module_version parser, cached in target/tools)"
    PROMQL_CHECK="$TOOLS/promql-check"
else
    start=$SECONDS
    if (cd "$K8S_SCRIPTS/promql" && GOFLAGS="${GOFLAGS:-} -mod=readonly" go build -o "$TOOLS/promql-check" .) >"$log" 2>&1; then
        pass "promql-check built from scripts/k8s/promql (Prometheus $promql_module_version, $((SECONDS - start))s)"
        PROMQL_CHECK="$TOOLS/promql-check"
    else
        fail "build promql-check (scripts/k8s/promql)"
        sed 's/^/        /' "$log"
    fi
fi

if python3 -c 'import yaml' 2>/dev/null; then
    pass "PyYAML available"
elif PYTHONPATH="$WORK/pylib" python3 -c 'import yaml' 2>/dev/null; then
    export PYTHONPATH="$WORK/pylib${PYTHONPATH:+:$PYTHONPATH}"
    pass "PyYAML (cached in target/k8s-validate/pylib)"
elif python3 -m pip install --quiet --disable-pip-version-check --target "$WORK/pylib" "PyYAML==$PYYAML_VERSION" >"$log" 2>&1; then
    export PYTHONPATH="$WORK/pylib${PYTHONPATH:+:$PYTHONPATH}"
    pass "PyYAML $PYYAML_VERSION installed from PyPI (target/k8s-validate/pylib)"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null &&
    { apt-get install -y -qq python3-yaml || { apt-get update -qq && apt-get install -y -qq python3-yaml; }; } >"$log" 2>&1 &&
    python3 -c 'import yaml' 2>/dev/null; then
    pass "PyYAML installed from Debian (python3-yaml)"
else
    fail "PyYAML: neither pip install PyYAML==$PYYAML_VERSION nor apt-get install python3-yaml worked"
    sed 's/^/        /' "$log"
fi

# ---- 2. schemas from the Go module proxy -----------------------------------------------------
# The zip of module@version in the module cache, downloaded (and checksum-verified against
# sum.golang.org) by `go mod download`. A module whose go.mod asks for a newer Go than the
# local one is still downloaded and verified; only its extraction is refused, and the zip is
# all this script reads.
module_zip() {
    local json
    json="$(cd "$WORK" && go mod download -json "$1" 2>/dev/null || true)"
    python3 - "$1" "$json" <<'EOF'
import json, os, sys
mod, raw = sys.argv[1], sys.argv[2]
try:
    info = json.loads(raw)
except ValueError:
    sys.exit(f"go mod download {mod}: no answer")
err, z = info.get("Error", ""), info.get("Zip", "")
if z and os.path.isfile(z) and (not err or "requires go >=" in err):
    print(z)
else:
    sys.exit(f"go mod download {mod}: {err or 'no zip'}")
EOF
}

section "CRDs and OpenAPI through the Go module proxy"
declare -A ZIP
for spec in "k8s=k8s.io/kubernetes@$KUBE_VERSION" "keda=github.com/kedacore/keda/v2@$KEDA_VERSION" \
    "istioapi=istio.io/api@$ISTIO_API_VERSION" "karpenter=github.com/aws/karpenter-provider-aws@$KARPENTER_VERSION" \
    "istio=istio.io/istio@$ISTIO_VERSION" \
    "promop=github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
    "argo=github.com/argoproj/argo-rollouts@$ARGO_ROLLOUTS_VERSION"; do
    key=${spec%%=*}
    mod=${spec#*=}
    if ZIP[$key]="$(module_zip "$mod" 2>"$log")"; then
        pass "module $mod"
    else
        fail "module $mod"
        sed 's/^/        /' "$log"
    fi
done
[ "$failed" -eq 0 ] || { echo "validate-k8s: cannot continue without tools and schemas"; echo "$passed passed, $failed failed"; exit 1; }

SCHEMAS="$WORK/schemas"
stamp="k8s=$KUBE_VERSION keda=$KEDA_VERSION istio=$ISTIO_API_VERSION karpenter=$KARPENTER_VERSION prometheus-operator=$PROMETHEUS_OPERATOR_VERSION argo-rollouts=$ARGO_ROLLOUTS_VERSION $(cksum <"$K8S_SCRIPTS/schemas.py")"
if [ -f "$SCHEMAS/.stamp" ] && [ "$(cat "$SCHEMAS/.stamp")" = "$stamp" ]; then
    pass "strict JSON schemas (cached: $(find "$SCHEMAS" -name '*.json' | wc -l) kinds)"
else
    rm -rf "$SCHEMAS"
    check "strict JSON schemas from swagger.json and CRDs" python3 "$K8S_SCRIPTS/schemas.py" --out "$SCHEMAS" \
        --k8s "${ZIP[k8s]}" \
        --crds "${ZIP[keda]}::*/config/crd/bases/*.yaml" \
        --crds "${ZIP[istioapi]}::*/kubernetes/customresourcedefinitions.gen.yaml" \
        --crds "${ZIP[karpenter]}::*/pkg/apis/crds/*.yaml" \
        --crds "${ZIP[promop]}::*/example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml" \
        --crds "${ZIP[argo]}::*/manifests/crds/*-crd.yaml"
    echo "$stamp" >"$SCHEMAS/.stamp"
fi
LOCATION="$SCHEMAS/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json"

kubeconform_strict() {
    kubeconform -strict -summary -schema-location "$LOCATION" "$@"
}

# Istio objects of a manifest file into their own file (for istioctl validate).
istio_only() {
    python3 - "$1" "$2" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
keep = [d for d in docs if d.get("apiVersion", "").split("/")[0].endswith("istio.io")]
with open(sys.argv[2], "w") as f:
    yaml.safe_dump_all(keep, f, sort_keys=False)
print(len(keep))
EOF
}

istioctl_validate() { # file
    local only n
    mkdir -p "$WORK/istio-only"
    only="$WORK/istio-only/$(printf '%s' "${1#"$ROOT"/}" | tr '/' '_')"
    n="$(istio_only "$1" "$only")"
    [ "$n" -gt 0 ] || return 0
    "$ISTIOCTL" validate -f "$only"
}

invariants() { # manifests label
    local out
    local -a extra=()
    [ -n "$ISTIOCTL" ] || extra=(--istio-zip "${ZIP[istio]}")
    out="$(python3 "$K8S_SCRIPTS/check_manifests.py" --manifests "$1" --namespace "$NAMESPACE" \
        --keda-zip "${ZIP[keda]}" --label "$2" "${extra[@]}" 2>&1)" || true
    local counts
    counts="$(printf '%s\n' "$out" | awk '/^CHECKS /{print}')"
    if [ -z "$counts" ]; then
        fail "invariants [$2]: checker did not run"
        printf '%s\n' "$out" | sed 's/^/        /'
        return
    fi
    local p f
    p="$(sed -E 's/.*passed=([0-9]+).*/\1/' <<<"$counts")"
    f="$(sed -E 's/.*failed=([0-9]+).*/\1/' <<<"$counts")"
    passed=$((passed + p))
    failed=$((failed + f))
    if [ "$f" -eq 0 ]; then
        printf '  ok    invariants [%s]: %s checks\n' "$2" "$p"
    else
        printf '  FAIL  invariants [%s]: %s of %s checks failed\n' "$2" "$f" "$((p + f))"
        printf '%s\n' "$out" | grep '^FAIL' | sed 's/^/        /'
    fi
}

monitoring() { # manifests label
    if [ -z "$PROMQL_CHECK" ]; then
        fail "dashboards and rules [$2]: no promql-check"
        return
    fi
    if ! grep -qE '^kind: (PrometheusRule|AnalysisTemplate)|grafana_dashboard:' "$1"; then
        return 0
    fi
    check "dashboards (JSON) and PrometheusRule (rule files, PromQL, metric names) [$2]" \
        python3 "$K8S_SCRIPTS/monitoring.py" --manifests "$1" --promql-check "$PROMQL_CHECK" --work "$WORK/monitoring/$2" --keda-zip "${ZIP[keda]}"
}

# ---- 3. the chart ----------------------------------------------------------------------------
section "helm lint --strict"
HELM_KUBE="--kube-version=${KUBE_VERSION#v}"
CASES=(defaults)
for f in "$CHART"/ci/*-values.yaml; do CASES+=("$(basename "$f" -values.yaml)"); done
values_args() { [ "$1" = defaults ] || printf -- '--values=%s\n' "$CHART/ci/$1-values.yaml"; }

for case in "${CASES[@]}"; do
    mapfile -t va < <(values_args "$case")
    check "helm lint --strict [$case]" helm lint --strict "$HELM_KUBE" "${va[@]}" "$CHART"
done

section "helm template | kubeconform -strict | istioctl validate | invariants"
mkdir -p "$WORK/rendered"
for case in "${CASES[@]}"; do
    mapfile -t va < <(values_args "$case")
    out="$WORK/rendered/$case.yaml"
    if helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "$HELM_KUBE" "${va[@]}" >"$out" 2>"$log"; then
        pass "helm template [$case]: $(grep -c '^kind:' "$out") objects"
    else
        fail "helm template [$case]"
        sed 's/^/        /' "$log"
        continue
    fi
    check "kubeconform -strict [$case] (Kubernetes $KUBE_VERSION, KEDA $KEDA_VERSION, Istio $ISTIO_API_VERSION, Karpenter $KARPENTER_VERSION)" \
        kubeconform_strict "$out"
    [ -z "$ISTIOCTL" ] || check "istioctl validate [$case]" istioctl_validate "$out"
    invariants "$out" "$case"
    monitoring "$out" "$case"
done

section "values.schema.json rejects bad values"
expect_failure "unknown key (ledger.replicaz)" helm template "$RELEASE" "$CHART" "$HELM_KUBE" --set ledger.replicaz=2
expect_failure "ledger scaled to zero (the outbox relay must run)" helm template "$RELEASE" "$CHART" "$HELM_KUBE" --set ledger.autoscaling.minReplicas=0
expect_failure "a credential in keda.redis.address" helm template "$RELEASE" "$CHART" "$HELM_KUBE" --set 'keda.redis.address=redis://:hunter2@redis:6379'
expect_failure "grace period shorter than the drain" helm template "$RELEASE" "$CHART" "$HELM_KUBE" --set ledger.terminationGracePeriodSeconds=20
expect_failure "tls.redis.useCaBundle without a CA bundle" helm template "$RELEASE" "$CHART" "$HELM_KUBE" --set tls.redis.useCaBundle=true

# ---- 4. standalone manifests -----------------------------------------------------------------
section "istio/, karpenter/, keda/ manifests and the upstream charts they configure"
for dir in istio karpenter keda; do
    while IFS= read -r f; do
        rel="${f#"$ROOT"/}"
        check "kubeconform -strict $rel" kubeconform_strict "$f"
        if [ -n "$ISTIOCTL" ] && [ "$dir" = istio ]; then
            check "istioctl validate $rel" istioctl_validate "$f"
        fi
    done < <(find "$ROOT/$dir" -maxdepth 1 -name '*.yaml' ! -name '*values*.yaml' | sort)
done

# What the CRD schemas cannot say (CEL rules are not checked by kubeconform): the AMI is pinned,
# every NodePool points at a defined EC2NodeClass, consumers and APIs are on separate pools.
karpenter_rules() {
    python3 - "$ROOT/karpenter/nodepools.yaml" "$ROOT/karpenter/ec2nodeclass.yaml" <<'PY'
import re, sys, yaml
docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]
classes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "EC2NodeClass"}
pools = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NodePool"}
errors = []
for name, c in classes.items():
    for term in c["spec"]["amiSelectorTerms"]:
        alias = term.get("alias", "")
        if not re.fullmatch(r"(al2023|al2|bottlerocket)@v[0-9][0-9.]*", alias):
            errors.append(f"EC2NodeClass {name}: AMI alias {alias!r} is not a pinned family@version")
for name, p in pools.items():
    ref = p["spec"]["template"]["spec"]["nodeClassRef"]
    if ref["name"] not in classes or ref["kind"] != "EC2NodeClass" or ref["group"] != "karpenter.k8s.aws":
        errors.append(f"NodePool {name}: nodeClassRef {ref} is not a defined EC2NodeClass")
    reqs = {r["key"]: r for r in p["spec"]["template"]["spec"]["requirements"]}
    ct = set(reqs.get("karpenter.sh/capacity-type", {}).get("values", []))
    if name == "fluxo-on-demand" and ct != {"on-demand"}:
        errors.append(f"NodePool {name}: must be on-demand only, got {sorted(ct)}")
    if name == "fluxo-consumers" and "spot" not in ct:
        errors.append(f"NodePool {name}: spot should be allowed, got {sorted(ct)}")
    if not p["spec"].get("disruption", {}).get("budgets"):
        errors.append(f"NodePool {name}: no disruption budgets")
print("\n".join(errors) or f"{len(pools)} NodePools, {len(classes)} EC2NodeClass: ok")
sys.exit(1 if errors else 0)
PY
}
check "karpenter/: AMI alias pinned, nodeClassRef defined, on-demand vs spot pools, budgets" karpenter_rules

# Upstream charts, rendered from the same Go module zips (no `helm repo`): our install values
# must render, and the output must validate.
unpack_chart() { # zip path-inside-module dest
    rm -rf "$3"
    mkdir -p "$3"
    python3 - "$1" "$2" "$3" <<'PY'
import os, sys, zipfile
zpath, inner, dest = sys.argv[1:]
prefix = inner.rstrip("/") + "/"
with zipfile.ZipFile(zpath) as zf:
    # Entries are "<module>@<version>/<path>"; module paths contain no "@".
    inside = lambda n: n.split("@", 1)[1].split("/", 1)[1]
    names = [n for n in zf.namelist() if inside(n).startswith(prefix) and not n.endswith("/")]
    if not names:
        sys.exit(f"{inner} not in {zpath}")
    for n in names:
        out = os.path.join(dest, inside(n)[len(prefix):])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "wb") as f:
            f.write(zf.read(n))
PY
}
render_upstream() { # release chart-dir namespace values-file out
    helm template "$1" "$2" --namespace "$3" "$HELM_KUBE" --values "$4" >"$5"
}
upstream() { # label zip chart-path release namespace values-file
    local dir="$WORK/upstream/$1" out="$WORK/rendered/upstream-$1.yaml"
    if ! unpack_chart "$2" "$3" "$dir" >"$log" 2>&1; then
        fail "unpack the $1 chart from its Go module"
        sed 's/^/        /' "$log"
        return 0
    fi
    if render_upstream "$4" "$dir" "$5" "$6" "$out" 2>"$log"; then
        pass "helm template $1 chart (from its Go module) with ${6#"$ROOT"/}"
        check "kubeconform -strict $1 chart output" kubeconform_strict "$out"
    else
        fail "helm template $1 chart with ${6#"$ROOT"/}"
        sed 's/^/        /' "$log"
    fi
}
upstream karpenter "${ZIP[karpenter]}" charts/karpenter karpenter kube-system "$ROOT/karpenter/values.yaml"
upstream istiod "${ZIP[istio]}" manifests/charts/istio-control/istio-discovery istiod istio-system "$ROOT/istio/istiod-values.yaml"
upstream istio-gateway "${ZIP[istio]}" manifests/charts/gateway istio-ingressgateway istio-ingress "$ROOT/istio/ingress-gateway-values.yaml"
upstream istio-cni "${ZIP[istio]}" manifests/charts/istio-cni istio-cni istio-system "$ROOT/istio/cni-values.yaml"

# What must reach istiod, read from its rendered chart (a misplaced key renders silently):
# native sidecars and IP auto-allocation in istiod's env, Istio CNI in the injector's values (so
# injected pods get no istio-init with NET_ADMIN/NET_RAW: the "restricted" Pod Security
# Standard), the node taint controller, an istio-cni DaemonSet, and no deprecated
# ISTIO_META_DNS_AUTO_ALLOCATE in the values.
istio_mesh_rules() { # rendered-istiod values-file rendered-cni
    python3 - "$@" <<'PY'
import json, sys, yaml
istiod, values_file, cni = sys.argv[1:]
docs = [d for d in yaml.safe_load_all(open(istiod)) if d]
errors = []
deploy = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "istiod"]
env = {e["name"]: e.get("value") for d in deploy for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
for name in ("ENABLE_NATIVE_SIDECARS", "PILOT_ENABLE_IP_AUTOALLOCATE", "PILOT_ENABLE_NODE_UNTAINT_CONTROLLERS"):
    if str(env.get(name)).lower() != "true":
        errors.append(f"istiod env {name} is {env.get(name)!r}, not true")
inj = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "istio-sidecar-injector"]
vals = json.loads(inj[0]["data"]["values"]) if inj else {}
if not ((vals.get("pilot") or {}).get("cni") or {}).get("enabled"):
    errors.append("the sidecar injector's values lack pilot.cni.enabled: injected pods would get istio-init (NET_ADMIN, NET_RAW)")
def keys(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield k
            yield from keys(v)
    elif isinstance(node, list):
        for v in node:
            yield from keys(v)
if "ISTIO_META_DNS_AUTO_ALLOCATE" in set(keys(yaml.safe_load(open(values_file)))):
    errors.append("ISTIO_META_DNS_AUTO_ALLOCATE is deprecated: use PILOT_ENABLE_IP_AUTOALLOCATE (auto-allocation v2)")
if not any(d["kind"] == "DaemonSet" for d in yaml.safe_load_all(open(cni)) if d):
    errors.append("the istio-cni chart rendered no DaemonSet")
print("\n".join(errors) or "istiod: native sidecars, IP auto-allocation v2, Istio CNI, untaint controller: ok")
sys.exit(1 if errors else 0)
PY
}
check "istio/: istiod gets native sidecars, IP auto-allocation v2, Istio CNI (restricted pods) and the untaint controller" \
    istio_mesh_rules "$WORK/rendered/upstream-istiod.yaml" "$ROOT/istio/istiod-values.yaml" "$WORK/rendered/upstream-istio-cni.yaml"

# ---- 5. self-tests: the validators must reject wrong fields ----------------------------------
section "self-tests (broken manifests must be rejected)"
mkdir -p "$WORK/broken"
defaults="$WORK/rendered/defaults.yaml"
sed 's/^  cooldownPeriod:/  cooldownPeriood:/' "$defaults" >"$WORK/broken/scaledobject-field.yaml"
expect_failure "kubeconform: misspelled ScaledObject spec field (cooldownPeriood)" kubeconform_strict "$WORK/broken/scaledobject-field.yaml"
sed 's/activationLagCount:/activationLagCnt:/' "$defaults" >"$WORK/broken/trigger-metadata.yaml"
expect_failure "invariants: misspelled redis-streams metadata key (activationLagCnt)" \
    python3 "$K8S_SCRIPTS/check_manifests.py" --manifests "$WORK/broken/trigger-metadata.yaml" --namespace "$NAMESPACE" --keda-zip "${ZIP[keda]}"
sed 's/formula: "max(lag, pending \* \(.*\))"/formula: "lag"/' "$defaults" >"$WORK/broken/scaling-modifiers.yaml"
expect_failure "invariants: a formula that ignores the pending trigger (a missing group would scale on XLEN)" \
    python3 "$K8S_SCRIPTS/check_manifests.py" --manifests "$WORK/broken/scaling-modifiers.yaml" --namespace "$NAMESPACE" --keda-zip "${ZIP[keda]}"
sed 's/consecutiveGatewayErrors:/consecutiveGatewayError:/' "$defaults" >"$WORK/broken/destinationrule-field.yaml"
expect_failure "kubeconform: misspelled DestinationRule field (consecutiveGatewayError)" kubeconform_strict "$WORK/broken/destinationrule-field.yaml"
sed '0,/terminationGracePeriodSeconds:/s//terminationGracePeriodSecond:/' "$defaults" >"$WORK/broken/deployment-field.yaml"
expect_failure "kubeconform: misspelled Deployment pod field (terminationGracePeriodSecond)" kubeconform_strict "$WORK/broken/deployment-field.yaml"
if [ -f "$ROOT/karpenter/nodepools.yaml" ]; then
    sed 's/consolidationPolicy:/consolidationPolicyy:/' "$ROOT/karpenter/nodepools.yaml" >"$WORK/broken/nodepool-field.yaml"
    expect_failure "kubeconform: misspelled Karpenter NodePool field (consolidationPolicyy)" kubeconform_strict "$WORK/broken/nodepool-field.yaml"
fi
sed 's/retryOn: connect-failure,refused-stream,unavailable,resource-exhausted$/retryOn: connect-failure,refused-stream,unavailable,resource-exhausted,cancelled/' \
    "$defaults" >"$WORK/broken/retry-cancelled.yaml"
expect_failure "invariants: retrying writes on cancelled" \
    python3 "$K8S_SCRIPTS/check_manifests.py" --manifests "$WORK/broken/retry-cancelled.yaml" --namespace "$NAMESPACE" --keda-zip "${ZIP[keda]}"
leak_check() {
    helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "$HELM_KUBE" \
        --set 'config.otel.endpoint=http://collector:s3cret@otel.observability:4317' >"$WORK/broken/leak.yaml" &&
        python3 "$K8S_SCRIPTS/check_manifests.py" --manifests "$WORK/broken/leak.yaml" --namespace "$NAMESPACE" --keda-zip "${ZIP[keda]}"
}
expect_failure "invariants: a password rendered in plain text (credentials in a ConfigMap URL)" leak_check
production="$WORK/rendered/production.yaml"
if [ -f "$production" ] && [ -n "$PROMQL_CHECK" ]; then
    sed 's/max(fluxo_outbox_oldest_age_seconds) >/max(fluxo_outbox_oldest_age_seconds) > >/' "$production" >"$WORK/broken/rule-promql.yaml"
    expect_failure "monitoring: an alert expression that is not PromQL" \
        python3 "$K8S_SCRIPTS/monitoring.py" --manifests "$WORK/broken/rule-promql.yaml" --promql-check "$PROMQL_CHECK" --work "$WORK/broken/monitoring-1" --keda-zip "${ZIP[keda]}"
    sed 's/fluxo_stream_dead_letters/fluxo_stream_deadletters/' "$production" >"$WORK/broken/metric-name.yaml"
    expect_failure "monitoring: a dashboard and an alert reading a metric fluxo does not export" \
        python3 "$K8S_SCRIPTS/monitoring.py" --manifests "$WORK/broken/metric-name.yaml" --promql-check "$PROMQL_CHECK" --work "$WORK/broken/monitoring-2" --keda-zip "${ZIP[keda]}"
    sed 's/^    - name: fluxo.api.alerts$/    - name: fluxo.api.alerts\n      interval_typo: 1m/' "$production" >"$WORK/broken/rule-field.yaml"
    expect_failure "kubeconform: misspelled PrometheusRule group field (interval_typo)" kubeconform_strict "$WORK/broken/rule-field.yaml"
fi
# Istio CNI off: injected pods would need istio-init (NET_ADMIN, NET_RAW).
sed '/^cni:$/,/^  enabled: true$/s/^  enabled: true$/  enabled: false/' "$ROOT/istio/istiod-values.yaml" >"$WORK/broken/istiod-values.yaml"
broken_istiod() {
    render_upstream istiod "$WORK/upstream/istiod" istio-system "$WORK/broken/istiod-values.yaml" "$WORK/broken/upstream-istiod.yaml" &&
        istio_mesh_rules "$WORK/broken/upstream-istiod.yaml" "$WORK/broken/istiod-values.yaml" "$WORK/rendered/upstream-istio-cni.yaml"
}
expect_failure "istio/: Istio CNI off in istiod (injected pods get istio-init)" broken_istiod
if [ -f "$production" ]; then
    # The upgrade breaker: a hook bypassing its proxy for RDS while its DNS proxy answers with a 240.240.x.x address.
    sed 's/{\\"proxyMetadata\\":{\\"ISTIO_META_DNS_CAPTURE\\":\\"false\\"}}/{}/' "$production" >"$WORK/broken/hook-dns.yaml"
    expect_failure "invariants: a hook bypassing its proxy while capturing DNS (helm upgrade in the mesh)" \
        python3 "$K8S_SCRIPTS/check_manifests.py" --manifests "$WORK/broken/hook-dns.yaml" --namespace "$NAMESPACE" --keda-zip "${ZIP[keda]}"
    sed 's/retryOn: connect-failure,refused-stream,reset,unavailable,resource-exhausted,deadline-exceeded$/retryOn: connect-failure,refused-stream,unavailable,resource-exhausted,deadline-exceeded/' \
        "$production" >"$WORK/broken/read-per-try.yaml"
    expect_failure "invariants: a per-try timeout Envoy does not retry (reads without reset)" \
        python3 "$K8S_SCRIPTS/check_manifests.py" --manifests "$WORK/broken/read-per-try.yaml" --namespace "$NAMESPACE" --keda-zip "${ZIP[keda]}"
    sed '0,/^kind: PriorityClass$/s//kind: PriorityClassX/' "$production" | python3 -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(sys.stdin) if d and d.get("kind") != "PriorityClassX"]
yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)' >"$WORK/broken/no-priorityclass.yaml"
    expect_failure "invariants: pods naming a PriorityClass nobody creates" \
        python3 "$K8S_SCRIPTS/check_manifests.py" --manifests "$WORK/broken/no-priorityclass.yaml" --namespace "$NAMESPACE" --keda-zip "${ZIP[keda]}"
    sed 's|"/grpc.health.v1.Health/Check", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"|"/grpc.health.v1.Health/Check"|' \
        "$production" >"$WORK/broken/test-no-reflection.yaml"
    expect_failure "invariants: helm test identity without server reflection (grpcurl)" \
        python3 "$K8S_SCRIPTS/check_manifests.py" --manifests "$WORK/broken/test-no-reflection.yaml" --namespace "$NAMESPACE" --keda-zip "${ZIP[keda]}"
    # Any principal could then send x-fluxo-admin to the gRPC APIs.
    sed 's/request.headers\[x-fluxo-admin\]/request.headers[x-fluxo-other]/' "$production" >"$WORK/broken/identity-headers.yaml"
    expect_failure "invariants: the forwarded-identity headers not denied from principals but the gateway's" \
        python3 "$K8S_SCRIPTS/check_manifests.py" --manifests "$WORK/broken/identity-headers.yaml" --namespace "$NAMESPACE" --keda-zip "${ZIP[keda]}"
    sed 's/FLUXO_GRPC__AUTH: "mesh"/FLUXO_GRPC__AUTH: "open"/' "$production" >"$WORK/broken/grpc-open.yaml"
    expect_failure "invariants: gRPC open to every caller in a cluster" \
        python3 "$K8S_SCRIPTS/check_manifests.py" --manifests "$WORK/broken/grpc-open.yaml" --namespace "$NAMESPACE" --keda-zip "${ZIP[keda]}"
    sed 's/keda_scaled_object_errors_total/keda_scaled_object_errorz_total/; s/keda_scaler_detail_errors_total/keda_scaler_detail_errorz_total/' \
        "$production" >"$WORK/broken/no-keda-alert.yaml"
    expect_failure "invariants: a scale-to-zero ScaledObject without an alert on KEDA's scaler errors" \
        python3 "$K8S_SCRIPTS/check_manifests.py" --manifests "$WORK/broken/no-keda-alert.yaml" --namespace "$NAMESPACE" --keda-zip "${ZIP[keda]}"
fi
progressive="$WORK/rendered/progressive.yaml"
if [ -f "$progressive" ]; then
    sed 's/^  workloadRef:$/  workloadRefs:/' "$progressive" >"$WORK/broken/rollout-field.yaml"
    expect_failure "kubeconform: misspelled Argo Rollouts field (workloadRefs)" kubeconform_strict "$WORK/broken/rollout-field.yaml"
    sed 's/^  replicas: 0$/  replicas: 2/' "$progressive" >"$WORK/broken/rollout-two-owners.yaml"
    expect_failure "invariants: a Rollout and its Deployment both running pods" \
        python3 "$K8S_SCRIPTS/check_manifests.py" --manifests "$WORK/broken/rollout-two-owners.yaml" --namespace "$NAMESPACE" --keda-zip "${ZIP[keda]}"
    if [ -n "$PROMQL_CHECK" ]; then
        sed 's/histogram_quantile(0.99, sum by (le)/histogram_quantile(0.99, sum by (le) (/' "$progressive" >"$WORK/broken/analysis-promql.yaml"
        expect_failure "monitoring: an Argo Rollouts analysis query that is not PromQL" \
            python3 "$K8S_SCRIPTS/monitoring.py" --manifests "$WORK/broken/analysis-promql.yaml" --promql-check "$PROMQL_CHECK" --work "$WORK/broken/monitoring-3" --keda-zip "${ZIP[keda]}"
    fi
fi
if [ -n "$ISTIOCTL" ]; then
    sed 's/retryOn: connect-failure,refused-stream,unavailable,resource-exhausted$/retryOn: connect-failure,unavailble/' \
        "$defaults" >"$WORK/broken/retry-typo.yaml"
    expect_failure "istioctl validate: unknown retryOn policy (unavailble)" istioctl_validate "$WORK/broken/retry-typo.yaml"
fi

printf '\n%s passed, %s failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]
