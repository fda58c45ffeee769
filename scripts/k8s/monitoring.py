#!/usr/bin/env python3
"""Checks the monitoring objects of a rendered chart: Grafana dashboard ConfigMaps and
PrometheusRules.

    monitoring.py --manifests rendered.yaml --promql-check target/tools/promql-check --work DIR

- every ConfigMap labelled grafana_dashboard holds JSON dashboards with a uid, a title and
  panels, uids unique across the release;
- every query, rule and Argo Rollouts analysis query parses as PromQL (with Prometheus' own parser, through promql-check;
  Grafana variables are substituted first), and every rule file passes Prometheus' rule-file
  validation (the checks of `promtool check rules`);
- every metric they read is one fluxo exports (after the OTLP -> Prometheus translation) or one
  of the few external ones named below, so a renamed metric cannot leave a silent dashboard.
  KEDA's operator metrics (the alerts on the autoscaler itself) are allowed only when --keda-zip
  is given and KEDA's own source (pkg/metricscollector/prommetrics.go) defines them.

Prints one line per finding and "CHECKS passed=N failed=M" last; exits 1 on any failure.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import zipfile

import yaml

# What fluxo exports, as Prometheus names (docs/operations.md lists the OpenTelemetry names).
FLUXO_METRICS = {
    "rpc_server_duration_seconds": "histogram",
    "fluxo_consolidation_delay_seconds": "histogram",
    "fluxo_consolidator_events_total": "counter",
    "fluxo_outbox_backlog": "gauge",
    "fluxo_outbox_oldest_age_seconds": "gauge",
    "fluxo_stream_lag": "gauge",
    "fluxo_stream_pending": "gauge",
    "fluxo_stream_dead_letters": "gauge",
    "fluxo_balance_cache_hits_total": "counter",
    "fluxo_balance_cache_misses_total": "counter",
    "fluxo_gateway_rate_limited_total": "counter",
    "fluxo_watch_slow_readers_total": "counter",
    "fluxo_webhooks_delivery_delay_seconds": "histogram",
    "fluxo_webhooks_attempts_total": "counter",
    "fluxo_webhooks_failures_total": "counter",
    "fluxo_webhooks_dead_letters": "gauge",
    "fluxo_webhooks_deliveries_made_total": "counter",
    "db_client_connection_count": "gauge",
    "db_client_connection_max": "gauge",
}
EXTERNAL_METRICS = {"kube_deployment_status_replicas_available"}  # kube-state-metrics
# Read from KEDA's operator (its Prometheus endpoint, keda/values.yaml), not from fluxo: the
# autoscaler's own health, which no fluxo process can report while the consolidators are at zero.
KEDA_METRICS_USED = {"keda_scaled_object_errors_total", "keda_scaler_detail_errors_total", "keda_scaler_active"}


def keda_metrics(zip_path):
    """Prometheus names KEDA's operator registers, read from its source in the module zip."""
    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if n.endswith("/pkg/metricscollector/prommetrics.go")]
        if len(names) != 1:
            sys.exit(f"monitoring.py: prommetrics.go not found once in {zip_path}")
        src = zf.read(names[0]).decode()
    found = set()
    for block in re.findall(r"prometheus\.\w+Opts\{(.*?)\}", src, re.S):
        ns = re.search(r"Namespace:\s*(\w+|\"\w*\")", block)
        sub = re.search(r'Subsystem:\s*"(\w*)"', block)
        name = re.search(r'Name:\s*"(\w+)"', block)
        if not name:
            continue
        prefix = "keda" if ns and ns.group(1) in ("DefaultPromMetricsNamespace", '"keda"') else None
        if prefix:
            found.add("_".join(p for p in (prefix, sub.group(1) if sub else "", name.group(1)) if p))
    return found
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "irate", "increase", "deriv",
    "histogram_quantile", "absent", "absent_over_time", "label_values", "and", "or", "unless",
    "on", "ignoring", "group_left", "group_right", "offset", "bool", "topk", "bottomk",
    "max_over_time", "min_over_time", "avg_over_time", "clamp_min", "clamp_max", "vector",
}
GRAFANA_VARIABLES = [("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h")]


def names_in(expr):
    """Metric names an expression reads (identifiers outside braces, strings and durations)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1()", text)
    found = set()
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_][a-zA-Z0-9_:]*)", text):
        word = m.group(1)
        if word in PROMQL_WORDS or re.fullmatch(r"[0-9.e]+", word):
            continue
        found.add(word)
    return found


def known(name, recorded):
    if name in recorded or name in EXTERNAL_METRICS:
        return True
    for base, kind in FLUXO_METRICS.items():
        if name == base:
            return True
        if kind == "histogram" and name in (f"{base}_bucket", f"{base}_sum", f"{base}_count"):
            return True
    return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifests", required=True)
    ap.add_argument("--promql-check", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--keda-zip")
    args = ap.parse_args()
    if args.keda_zip:
        defined = keda_metrics(args.keda_zip)
        missing = KEDA_METRICS_USED - defined
        if missing:
            sys.exit(f"monitoring.py: KEDA does not define {sorted(missing)} (it defines {sorted(defined)})")
        EXTERNAL_METRICS.update(KEDA_METRICS_USED)
    os.makedirs(args.work, exist_ok=True)
    docs = [d for d in yaml.safe_load_all(open(args.manifests)) if d]
    passed, failed = 0, 0

    def result(ok, what):
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAIL {what}")

    exprs = []  # (where, expr)
    uids = {}
    for d in docs:
        meta = d.get("metadata", {})
        if d.get("kind") != "ConfigMap" or (meta.get("labels") or {}).get("grafana_dashboard") is None:
            continue
        for key, raw in (d.get("data") or {}).items():
            where = f"ConfigMap {meta.get('name')} {key}"
            try:
                dash = json.loads(raw)
            except ValueError as e:
                result(False, f"{where}: not JSON: {e}")
                continue
            ok = all(dash.get(k) for k in ("uid", "title", "panels"))
            result(ok, f"{where}: a dashboard needs uid, title and panels")
            uid = dash.get("uid")
            result(uid not in uids, f"{where}: uid {uid!r} also used by {uids.get(uid)}")
            uids[uid] = where
            for p in dash.get("panels", []):
                for t in p.get("targets", []):
                    if "expr" in t:
                        exprs.append((f"{where} panel {p.get('title')!r}", t["expr"]))
            for v in dash.get("templating", {}).get("list", []):
                q = v.get("query")
                if v.get("type") == "query" and isinstance(q, dict) and q.get("query", "").startswith("label_values("):
                    inner = re.match(r"label_values\((.*),\s*\w+\)$", q["query"])
                    if inner:
                        exprs.append((f"{where} variable {v.get('name')}", inner.group(1)))

    rule_files = []
    recorded = set()
    for d in docs:
        if d.get("kind") != "PrometheusRule":
            continue
        name = d["metadata"]["name"]
        path = os.path.join(args.work, f"rules-{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(d["spec"], f, sort_keys=False)
        rule_files.append(path)
        for g in d["spec"].get("groups", []):
            for r in g.get("rules", []):
                if "record" in r:
                    recorded.add(r["record"])
                exprs.append((f"PrometheusRule {name} {r.get('alert') or r.get('record')}", r["expr"]))

    # Argo Rollouts analyses (progressiveDelivery): their Prometheus queries, with the
    # template's {{args.x}} placeholders filled in, are PromQL over fluxo's metrics too.
    for d in docs:
        if d.get("kind") != "AnalysisTemplate":
            continue
        for m in d["spec"].get("metrics", []):
            query = ((m.get("provider") or {}).get("prometheus") or {}).get("query")
            if query:
                query = re.sub(r"\{\{\s*args\.([\w-]+)\s*\}\}", r"\1", query)
                exprs.append((f"AnalysisTemplate {d['metadata']['name']} {m.get('name')}", query))

    if not exprs and not rule_files:
        print("no dashboards or rules rendered")
        print(f"CHECKS passed={passed} failed={failed}")
        return 1 if failed else 0

    for where, expr in exprs:
        unknown = sorted(n for n in names_in(expr) if not known(n, recorded))
        result(not unknown, f"{where}: reads metrics neither fluxo nor (with --keda-zip) KEDA exports: {unknown}")

    expr_file = os.path.join(args.work, "exprs.txt")
    with open(expr_file, "w") as f:
        for _, expr in exprs:
            for var, value in GRAFANA_VARIABLES:
                expr = expr.replace(var, value)
            expr = re.sub(r"\$\{?\w+\}?", ".+", expr)
            f.write(" ".join(expr.split()) + "\n")
    for mode, files in (("exprs", [expr_file]), ("rules", rule_files)):
        if not files:
            continue
        out = subprocess.run([args.promql_check, mode, *files], capture_output=True, text=True)
        result(out.returncode == 0, f"promql-check {mode}: {out.stdout.strip()} {out.stderr.strip()}")
        if out.returncode == 0:
            print(f"promql-check {mode}: {out.stdout.strip()}")
    print(f"CHECKS passed={passed} failed={failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
