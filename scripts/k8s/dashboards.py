#!/usr/bin/env python3
"""Writes fluxo's Grafana dashboards to charts/fluxo/dashboards/*.json.

The dashboards are data; this script only saves typing and keeps their panels uniform. Edit it
and re-run it (python3 scripts/k8s/dashboards.py), or edit the JSON in Grafana and export it over
the file: validate-k8s.sh checks the JSON and every query's PromQL, not that it came from here.

Metric names follow the OTLP -> Prometheus translation (Prometheus' OTLP receiver or the
collector's prometheus/prometheusremotewrite exporters with default settings): dots become
underscores, the unit is appended (`_seconds`), counters end in `_total`, histograms expose
`_bucket`/`_sum`/`_count`, and `service.name` becomes the `job` label (fluxo-ledger, ...).
"""
import json
import os

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "charts", "fluxo", "dashboards")
DS = {"type": "prometheus", "uid": "${datasource}"}
SERVER_ERRORS = "2|4|8|13|14|15"  # UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE, DATA_LOSS


def panel(title, exprs, unit, x, y, w=12, h=8, kind="timeseries", description=""):
    targets = [
        {"refId": chr(ord("A") + i), "datasource": DS, "expr": e, "legendFormat": legend}
        for i, (e, legend) in enumerate(exprs)
    ]
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": targets,
    }


def row(title, y):
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}


def dashboard(uid, title, description, panels, variables):
    for i, p in enumerate(panels):
        p["id"] = i + 1
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["fluxo"],
        "timezone": "utc",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
             "current": {}, "hide": 0},
        ] + variables},
        "annotations": {"list": []},
        "panels": panels,
    }


def job_variable():
    return {
        "type": "query", "name": "job", "label": "Target", "datasource": DS,
        "query": {"query": "label_values(rpc_server_duration_seconds_count, job)", "refId": "job"},
        "definition": "label_values(rpc_server_duration_seconds_count, job)",
        "regex": "/fluxo-.*/", "multi": True, "includeAll": True, "current": {}, "refresh": 2, "hide": 0,
    }


def golden_signals():
    sel = 'job=~"$job"'
    calls = f"rpc_server_duration_seconds_count{{{sel}}}"
    panels = [
        row("Traffic", 0),
        panel("Calls per second by method", [
            (f"sum by (job, rpc_method) (rate({calls}[$__rate_interval]))", "{{job}} {{rpc_method}}"),
        ], "reqps", 0, 1, w=24),
        row("Errors", 9),
        panel("Server errors (share of calls)", [
            (f'sum by (job) (rate(rpc_server_duration_seconds_count{{{sel}, rpc_grpc_status_code=~"{SERVER_ERRORS}"}}[$__rate_interval]))'
             f" / sum by (job) (rate({calls}[$__rate_interval]))", "{{job}}"),
        ], "percentunit", 0, 10, description="UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE, DATA_LOSS: what the availability SLO counts."),
        panel("Calls by status code", [
            (f"sum by (job, rpc_grpc_status_code) (rate({calls}[$__rate_interval]))", "{{job}} code {{rpc_grpc_status_code}}"),
        ], "reqps", 12, 10, description="0 OK, 3 INVALID_ARGUMENT, 5 NOT_FOUND, 6 ALREADY_EXISTS, 8 RESOURCE_EXHAUSTED (shed), 9 FAILED_PRECONDITION, 14 UNAVAILABLE."),
        panel("REST calls refused by the rate limiter", [
            ('sum by (job) (rate(fluxo_gateway_rate_limited_total[$__rate_interval]))', "{{job}}"),
        ], "reqps", 0, 18, w=24),
        row("Latency", 26),
    ]
    for i, q in enumerate(["0.5", "0.95", "0.99"]):
        panels.append(panel(f"p{q[2:] or '50'} latency by method".replace("p5 ", "p50 "), [
            (f"histogram_quantile({q}, sum by (job, rpc_method, le) (rate(rpc_server_duration_seconds_bucket{{{sel}}}[$__rate_interval])))",
             "{{job}} {{rpc_method}}"),
        ], "s", 8 * i, 27, w=8))
    panels += [
        row("Saturation", 35),
        panel("Database connections in use / pool size", [
            (f'sum by (job) (db_client_connection_count{{{sel}, db_client_connection_state="used"}})', "{{job}} used"),
            (f"sum by (job) (db_client_connection_max{{{sel}}})", "{{job}} max"),
        ], "short", 0, 36),
        panel("Balance cache hit ratio", [
            ("sum(rate(fluxo_balance_cache_hits_total[$__rate_interval])) / "
             "(sum(rate(fluxo_balance_cache_hits_total[$__rate_interval])) + sum(rate(fluxo_balance_cache_misses_total[$__rate_interval])))",
             "hit ratio"),
        ], "percentunit", 12, 36),
    ]
    return dashboard("fluxo-golden-signals", "fluxo / golden signals",
                     "Traffic, errors, latency and saturation of each fluxo target's gRPC API.", panels, [job_variable()])


def pipeline():
    panels = [
        row("Ledger outbox (relay)", 0),
        panel("Outbox backlog (events not yet published)", [("max(fluxo_outbox_backlog)", "backlog")], "short", 0, 1),
        panel("Oldest unpublished event", [("max(fluxo_outbox_oldest_age_seconds)", "age")], "s", 12, 1),
        row("Redis stream (consumer group)", 9),
        panel("Group lag (entries not yet delivered)", [
            ("max by (messaging_destination_name, messaging_consumer_group_name) (fluxo_stream_lag)",
             "{{messaging_consumer_group_name}}"),
        ], "short", 0, 10, w=8),
        panel("Pending (delivered, not acknowledged)", [
            ("max by (messaging_destination_name, messaging_consumer_group_name) (fluxo_stream_pending)",
             "{{messaging_consumer_group_name}}"),
        ], "short", 8, 10, w=8),
        panel("Dead-letter stream size", [("max by (messaging_destination_name) (fluxo_stream_dead_letters)", "{{messaging_destination_name}}")],
              "short", 16, 10, w=8, description="Anything above zero needs an operator: fluxo dlq list / show / replay."),
        row("Consolidation", 18),
        panel("Ledger commit -> balance updated", [
            (f"histogram_quantile({q}, sum by (le) (rate(fluxo_consolidation_delay_seconds_bucket[$__rate_interval])))", f"p{label}")
            for q, label in [("0.5", "50"), ("0.95", "95"), ("0.99", "99")]
        ], "s", 0, 19),
        panel("Events handled by outcome", [
            ("sum by (outcome) (rate(fluxo_consolidator_events_total[$__rate_interval]))", "{{outcome}}"),
        ], "short", 12, 19),
        row("Webhooks (notifier)", 27),
        panel("Event read -> endpoint 2xx", [
            (f"histogram_quantile({q}, sum by (le) (rate(fluxo_webhooks_delivery_delay_seconds_bucket[$__rate_interval])))", f"p{label}")
            for q, label in [("0.5", "50"), ("0.99", "99")]
        ], "s", 0, 28, w=8, description="Retries included: an endpoint that was down for an hour shows here as an hour."),
        panel("Attempts by outcome", [
            ("sum by (outcome) (rate(fluxo_webhooks_attempts_total[$__rate_interval]))", "{{outcome}}"),
        ], "short", 8, 28, w=8),
        panel("Failing endpoints (top 10 subscriptions)", [
            ("topk(10, sum by (subscription_id) (rate(fluxo_webhooks_failures_total[$__rate_interval])))", "{{subscription_id}}"),
        ], "short", 16, 28, w=8, description="fluxo webhooks deliveries list --subscription ID shows what they answered."),
        panel("Dead-lettered deliveries", [("max(fluxo_webhooks_dead_letters)", "dead")], "short", 0, 36, w=24, h=6,
              description="Deliveries given up on: fluxo webhooks deliveries list --state dead, then replay."),
        row("Replicas", 42),
        panel("Available replicas per target", [
            ('sum by (deployment) (kube_deployment_status_replicas_available{deployment=~".*fluxo-(ledger|consolidator|notifier|balance|gateway)"})',
             "{{deployment}}"),
        ], "short", 0, 43, w=24, description="From kube-state-metrics; consolidators and notifiers scale on their group's lag through KEDA, down to zero."),
    ]
    return dashboard("fluxo-pipeline", "fluxo / pipeline",
                     "The asynchronous paths from a ledger commit: outbox, stream, consolidators to the daily balance, notifiers to the webhooks.",
                     panels, [])


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for name, d in [("golden-signals", golden_signals()), ("pipeline", pipeline())]:
        with open(os.path.join(OUT, f"{name}.json"), "w") as f:
            json.dump(d, f, indent=2)
            f.write("\n")
        print(f"wrote {name}.json: {len(d['panels'])} panels")
