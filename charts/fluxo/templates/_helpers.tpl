{{/* vim: set filetype=mustache: */}}

{{- define "fluxo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fluxo.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fluxo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The four targets, in a fixed order. */}}
{{- define "fluxo.targets" -}}
ledger balance consolidator notifier gateway
{{- end -}}

{{/* Targets that serve gRPC to callers (have a Service). */}}
{{- define "fluxo.servedTargets" -}}
ledger balance gateway
{{- end -}}

{{- define "fluxo.labels" -}}
helm.sh/chart: {{ include "fluxo.chart" . }}
app.kubernetes.io/name: {{ include "fluxo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fluxo
{{- end -}}

{{/* Labels shared by every pod of the release (used by mesh-wide selectors). */}}
{{- define "fluxo.releaseSelector" -}}
app.kubernetes.io/name: {{ include "fluxo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one target. Call with (dict "root" $ "target" "ledger"). */}}
{{- define "fluxo.selectorLabels" -}}
{{ include "fluxo.releaseSelector" .root }}
app.kubernetes.io/component: {{ .target }}
{{- end -}}

{{- define "fluxo.componentLabels" -}}
{{ include "fluxo.labels" .root }}
app.kubernetes.io/component: {{ .target }}
{{- end -}}

{{/* Resource name of one target: <fullname>-<target>. */}}
{{- define "fluxo.targetName" -}}
{{- printf "%s-%s" (include "fluxo.fullname" .root) .target | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* ServiceAccount name of one target. */}}
{{- define "fluxo.serviceAccountName" -}}
{{- $t := index .root.Values .target -}}
{{- if $t.serviceAccount.name -}}
{{- $t.serviceAccount.name -}}
{{- else -}}
{{- include "fluxo.targetName" . -}}
{{- end -}}
{{- end -}}

{{- define "fluxo.hookServiceAccountName" -}}
{{- printf "%s-hooks" (include "fluxo.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fluxo.testServiceAccountName" -}}
{{- printf "%s-test" (include "fluxo.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Istio principal of a ServiceAccount: <trustDomain>/ns/<ns>/sa/<name>. */}}
{{- define "fluxo.principal" -}}
{{- printf "%s/ns/%s/sa/%s" .root.Values.istio.trustDomain .root.Release.Namespace .sa -}}
{{- end -}}

{{- define "fluxo.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "fluxo.configMapName" -}}
{{- printf "%s-config" (include "fluxo.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* FQDN of a target's Service. */}}
{{- define "fluxo.serviceHost" -}}
{{- printf "%s.%s.svc.%s" (include "fluxo.targetName" .) .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{/*
terminationGracePeriodSeconds of a target: preStop sleep + shutdown delay + shutdown timeout
(rounded up to whole seconds) + margin, unless overridden. Fails the render when an override
would cut the drain short.
*/}}
{{- define "fluxo.gracePeriod" -}}
{{- $t := index .root.Values .target -}}
{{- $g := .root.Values.config.grpc -}}
{{- $drainMs := add (mul (int $t.preStopSleepSeconds) 1000) (int $g.shutdownDelayMs) (int $g.shutdownTimeoutMs) -}}
{{- $drainS := div (add $drainMs 999) 1000 -}}
{{- if $t.terminationGracePeriodSeconds -}}
{{- if le (int $t.terminationGracePeriodSeconds) (int $drainS) -}}
{{- fail (printf "%s.terminationGracePeriodSeconds=%v must exceed preStop+shutdownDelay+shutdownTimeout=%vs" .target $t.terminationGracePeriodSeconds $drainS) -}}
{{- end -}}
{{- $t.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add $drainS (int .root.Values.terminationGraceMarginSeconds) -}}
{{- end -}}
{{- end -}}

{{/* Pod annotations shared by every fluxo pod: config checksum and the Istio proxy settings. */}}
{{- define "fluxo.podAnnotations" -}}
checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
{{- with .root.Values.secrets.revision }}
checksum/secrets: {{ . | toString | sha256sum }}
{{- end }}
{{- if .root.Values.istio.enabled }}
{{- if .root.Values.istio.nativeSidecar }}
sidecar.istio.io/nativeSidecar: "true"
{{- end }}
proxy.istio.io/config: {{ include "fluxo.proxyConfig" .root | quote }}
{{- end }}
{{- end -}}

{{- define "fluxo.proxyConfig" -}}
{{- $p := .Values.istio.proxy -}}
{{- $cfg := dict "terminationDrainDuration" $p.terminationDrainDuration -}}
{{- if $p.exitOnZeroActiveConnections -}}
{{- $_ := set $cfg "proxyMetadata" (dict "EXIT_ON_ZERO_ACTIVE_CONNECTIONS" "true") -}}
{{- end -}}
{{- toJson $cfg -}}
{{- end -}}

{{/* Environment shared by every fluxo container (Deployments and hook Jobs). */}}
{{- define "fluxo.secretEnv" -}}
- name: FLUXO_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.database.name }}
      key: {{ .Values.secrets.database.urlKey }}
- name: FLUXO_REDIS__URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.redis.name }}
      key: {{ .Values.secrets.redis.urlKey }}
{{- end -}}

{{/* Non-secret settings as name/value pairs (a dict), shared by the ConfigMap and the hooks. */}}
{{- define "fluxo.configEnv" -}}
{{- $c := .Values.config -}}
FLUXO_DATABASE__MIGRATE_ON_START: "false"
FLUXO_DATABASE__MAX_CONNECTIONS: {{ $c.database.maxConnections | quote }}
FLUXO_GRPC__LISTEN: {{ printf "0.0.0.0:%v" $c.grpc.port | quote }}
FLUXO_GRPC__AUTH: {{ include "fluxo.grpcAuth" . | quote }}
FLUXO_GRPC__MAX_CONCURRENT_REQUESTS: {{ $c.grpc.maxConcurrentRequests | quote }}
FLUXO_GRPC__REQUEST_TIMEOUT_MS: {{ $c.grpc.requestTimeoutMs | quote }}
FLUXO_GRPC__SHUTDOWN_DELAY_MS: {{ $c.grpc.shutdownDelayMs | quote }}
FLUXO_GRPC__SHUTDOWN_TIMEOUT_MS: {{ $c.grpc.shutdownTimeoutMs | quote }}
FLUXO_LEDGER__TIME_ZONE: {{ $c.ledger.timeZone | quote }}
FLUXO_LEDGER__WRITERS: {{ $c.ledger.writers | quote }}
FLUXO_LEDGER__MAX_BATCH: {{ $c.ledger.maxBatch | quote }}
FLUXO_LOG__FORMAT: {{ $c.log.format | quote }}
FLUXO_LOG__LEVEL: {{ $c.log.level | quote }}
FLUXO_CONSOLIDATOR__STREAM: {{ $c.consolidator.stream | quote }}
FLUXO_CONSOLIDATOR__GROUP: {{ $c.consolidator.group | quote }}
FLUXO_WEBHOOKS__GROUP: {{ $c.webhooks.group | quote }}
{{- with $c.otel.endpoint }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ . | quote }}
{{- end }}
{{- with $c.otel.tracesSampler }}
OTEL_TRACES_SAMPLER: {{ . | quote }}
{{- end }}
{{- with $c.otel.tracesSamplerArg }}
OTEL_TRACES_SAMPLER_ARG: {{ . | quote }}
{{- end }}
{{- with $c.otel.metricExportIntervalMs }}
OTEL_METRIC_EXPORT_INTERVAL: {{ . | quote }}
{{- end }}
{{- range $k, $v := $c.extraEnv }}
{{ $k }}: {{ $v | quote }}
{{- end }}
{{- end -}}

{{/* Karpenter placement of a target. */}}
{{- define "fluxo.karpenterNodeSelector" -}}
{{- if .root.Values.karpenter.enabled -}}
{{- if eq .target "consolidator" -}}
karpenter.sh/nodepool: {{ .root.Values.karpenter.spotNodePool }}
{{- else -}}
karpenter.sh/nodepool: {{ .root.Values.karpenter.onDemandNodePool }}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fluxo.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end -}}

{{- define "fluxo.containerSecurityContext" -}}
{{ toYaml .Values.securityContext }}
{{- end -}}

{{/* Connection metadata of the redis-streams triggers (call with the consolidator ctx). */}}
{{- define "fluxo.redisTriggerMetadata" -}}
stream: {{ .root.Values.config.consolidator.stream | quote }}
consumerGroup: {{ ternary .root.Values.config.webhooks.group .root.Values.config.consolidator.group (eq .target "notifier") | quote }}
{{- with .root.Values.keda.redis.address }}
address: {{ . | quote }}
{{- end }}
{{- if .root.Values.keda.redis.enableTLS }}
enableTLS: "true"
{{- if .root.Values.keda.redis.unsafeSsl }}
unsafeSsl: "true"
{{- end }}
{{- end }}
{{- end -}}

{{/* Who may call gRPC: "mesh" behind Istio (mTLS and the AuthorizationPolicies), otherwise "jwt"
     (every call carries a bearer token). config.grpc.auth overrides. */}}
{{- define "fluxo.grpcAuth" -}}
{{- if .Values.config.grpc.auth -}}{{ .Values.config.grpc.auth }}{{- else if .Values.istio.enabled -}}mesh{{- else -}}jwt{{- end -}}
{{- end -}}

{{/* Whether a target verifies bearer tokens: the gateway always, ledger and balance under grpc auth "jwt". */}}
{{- define "fluxo.verifiesTokens" -}}
{{- if or (eq .target "gateway") (and (eq (include "fluxo.grpcAuth" .root) "jwt") (has .target (list "ledger" "balance" "all"))) -}}true{{- end -}}
{{- end -}}

{{/* Where the CA bundle (tls.caBundle) is mounted. */}}
{{- define "fluxo.caBundlePath" -}}
/etc/fluxo/tls/ca.pem
{{- end -}}

{{- define "fluxo.caBundleEnabled" -}}
{{- if or .Values.tls.caBundle.configMap .Values.tls.caBundle.secret }}true{{ end -}}
{{- end -}}

{{/* Env of every fluxo container for TLS (after fluxo.secretEnv). */}}
{{- define "fluxo.tlsEnv" -}}
{{- if .Values.tls.redis.useCaBundle }}
{{- if not (include "fluxo.caBundleEnabled" .) }}
{{- fail "tls.redis.useCaBundle needs a CA bundle: set tls.caBundle.configMap or tls.caBundle.secret" }}
{{- end }}
- name: FLUXO_REDIS__TLS_CA_FILE
  value: {{ include "fluxo.caBundlePath" . }}
{{- end }}
{{- end -}}

{{/* volumeMounts entry of the CA bundle, if any. */}}
{{- define "fluxo.tlsVolumeMount" -}}
{{- if include "fluxo.caBundleEnabled" . }}
- name: ca-bundle
  mountPath: /etc/fluxo/tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* volumes entry of the CA bundle, if any. */}}
{{- define "fluxo.tlsVolume" -}}
{{- $b := .Values.tls.caBundle -}}
{{- if $b.configMap }}
- name: ca-bundle
  configMap:
    name: {{ $b.configMap }}
    items:
      - key: {{ $b.key }}
        path: ca.pem
{{- else if $b.secret }}
- name: ca-bundle
  secret:
    secretName: {{ $b.secret }}
    items:
      - key: {{ $b.key }}
        path: ca.pem
{{- end }}
{{- end -}}

{{/*
gRPC methods the `helm test` pod calls (templates/tests): the health check, and server reflection,
which grpcurl uses first to learn the Health service's schema (v1, then v1alpha on older servers).
*/}}
{{- define "fluxo.testGrpcPaths" -}}
["/grpc.health.v1.Health/Check", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"]
{{- end -}}

{{/* "true" when Argo Rollouts owns this target's pods (call with root/target). */}}
{{- define "fluxo.rolloutOwned" -}}
{{- $a := .root.Values.progressiveDelivery.argoRollouts -}}
{{- if and $a.enabled (has .target $a.targets) }}true{{ end -}}
{{- end -}}

{{/* "true" when this target (dict "root" "target") sets its pod-deletion cost. */}}
{{- define "fluxo.podDeletionCost" -}}
{{- if and (eq .target "consolidator") .root.Values.consolidator.podDeletionCost.enabled -}}
true
{{- end -}}
{{- end -}}
