{{/* Chart name, truncated for DNS labels. */}}
{{- define "stream-guard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release fullname. Truncated so that "<fullname>-reasoning-worker" still fits a DNS label. */}}
{{- define "stream-guard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 46 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 46 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 46 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of one component's objects: (dict "root" $ "component" "fast-worker"). */}}
{{- define "stream-guard.componentName" -}}
{{- printf "%s-%s" (include "stream-guard.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "stream-guard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object: (dict "root" $ "component" "fast-worker"). */}}
{{- define "stream-guard.labels" -}}
helm.sh/chart: {{ include "stream-guard.chart" .root }}
{{ include "stream-guard.selectorLabels" . }}
app.kubernetes.io/part-of: stream-guard
{{- with .root.Chart.AppVersion }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "stream-guard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stream-guard.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "stream-guard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "stream-guard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "stream-guard.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* host:port of the chart's Triton gRPC endpoint. */}}
{{- define "stream-guard.tritonGrpcAddress" -}}
{{- printf "%s:%d" (include "stream-guard.componentName" (dict "root" . "component" "triton")) (int .Values.triton.ports.grpc) }}
{{- end }}

{{/*
The Settings env vars: every non-null leaf of .Values.config as STREAM_GUARD_<GROUP>__<FIELD>.
Nested groups (kafka.topics) recurse; lists and dict-valued fields are passed as JSON, which
pydantic-settings parses. Strings go through toJson (a JSON string is a valid YAML scalar);
other scalars are JSON-encoded first, so 20971520 never turns into 2.097152e+07.
*/}}
{{- define "stream-guard.configEnv" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- if and (kindIs "invalid" $cfg.triton.url) .Values.triton.enabled }}
{{- $_ := set $cfg.triton "url" (include "stream-guard.tritonGrpcAddress" .) }}
{{- end }}
{{- include "stream-guard.envWalk" (dict "prefix" "STREAM_GUARD" "values" $cfg "depth" 0) }}
{{- end }}

{{- define "stream-guard.envWalk" -}}
{{- /* Settings fields typed dict[...]: one JSON env var, not a nested group. */ -}}
{{- $jsonMaps := list "STREAM_GUARD_POLICY__TENANTS" -}}
{{- $prefix := .prefix -}}
{{- $depth := .depth -}}
{{- range $key, $value := .values }}
{{- $name := printf "%s__%s" $prefix (upper $key) }}
{{- if eq $depth 0 }}{{ $name = printf "%s_%s" $prefix (upper $key) }}{{ end }}
{{- if kindIs "invalid" $value }}
{{- else if and (kindIs "map" $value) (not (has $name $jsonMaps)) }}
{{- include "stream-guard.envWalk" (dict "prefix" $name "values" $value "depth" 1) }}
{{- else if kindIs "string" $value }}
- name: {{ $name }}
  value: {{ toJson $value }}
{{- else }}
- name: {{ $name }}
  value: {{ toJson $value | toJson }}
{{- end }}
{{- end }}
{{- end }}

{{/* Secret-backed Settings fields: (dict "root" $ "reasoning" bool). Never inline values. */}}
{{- define "stream-guard.secretEnv" -}}
{{- $s := .root.Values.secrets -}}
{{- with $s.kafka.existingSecret }}
- name: STREAM_GUARD_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $s.kafka.saslPasswordKey }}
{{- end }}
{{- with $s.s3.existingSecret }}
- name: STREAM_GUARD_S3__ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $s.s3.accessKeyIdKey }}
- name: STREAM_GUARD_S3__SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $s.s3.secretAccessKeyKey }}
{{- end }}
{{- if .reasoning }}
{{- with $s.reasoning.existingSecret }}
- name: STREAM_GUARD_REASONING__API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $s.reasoning.apiKeyKey }}
{{- end }}
{{- end }}
{{- end }}

{{/* Policy files of the ConfigMap as YAML (name -> text): the chart default plus values. */}}
{{- define "stream-guard.policyFiles" -}}
{{- $files := dict "default.yaml" (.Files.Get "files/policies/default.yaml") -}}
{{- range $name, $doc := .Values.policies.files }}
{{- if kindIs "string" $doc }}
{{- $_ := set $files $name $doc }}
{{- else }}
{{- $_ := set $files $name (toYaml $doc) }}
{{- end }}
{{- end }}
{{- toYaml $files }}
{{- end }}

{{- define "stream-guard.terminationGracePeriodSeconds" -}}
{{- $grace := .root.Values.config.shutdown_grace_s -}}
{{- $explicit := .worker.terminationGracePeriodSeconds -}}
{{- if kindIs "invalid" $explicit }}
{{- add (int (ceil $grace)) (int .root.Values.terminationGraceMarginSeconds) }}
{{- else if le (float64 $explicit) (float64 $grace) }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%v) must exceed config.shutdown_grace_s (%v): the kubelet would SIGKILL the worker before it drains" .key $explicit $grace) }}
{{- else }}
{{- int $explicit }}
{{- end }}
{{- end }}

{{/* KEDA's name for a Kafka SASL mechanism. */}}
{{- define "stream-guard.kedaSasl" -}}
{{- $m := default "PLAIN" .Values.config.kafka.sasl_mechanism -}}
{{- get (dict "PLAIN" "plaintext" "SCRAM-SHA-256" "scram_sha256" "SCRAM-SHA-512" "scram_sha512") $m }}
{{- end }}

{{- define "stream-guard.kafkaUsesSasl" -}}
{{- if hasPrefix "SASL_" .Values.config.kafka.security_protocol }}true{{ end }}
{{- end }}

{{- define "stream-guard.kafkaUsesTls" -}}
{{- if has .Values.config.kafka.security_protocol (list "SSL" "SASL_SSL") }}true{{ end }}
{{- end }}

{{- define "stream-guard.kedaAuthNeeded" -}}
{{- if or (include "stream-guard.kafkaUsesSasl" .) (and (include "stream-guard.kafkaUsesTls" .) .Values.secrets.kafka.caKey) }}true{{ end }}
{{- end }}

{{/* Misconfigurations that would only show at runtime fail the render instead. */}}
{{- define "stream-guard.validate" -}}
{{- $c := .Values.config -}}
{{- range $pair := list (list "kafka" "sasl_password" "secrets.kafka.existingSecret") (list "s3" "access_key_id" "secrets.s3.existingSecret") (list "s3" "secret_access_key" "secrets.s3.existingSecret") (list "reasoning" "api_key" "secrets.reasoning.existingSecret") }}
{{- if hasKey (index $c (index $pair 0)) (index $pair 1) }}
{{- fail (printf "config.%s.%s: secrets are never taken from values; store it in a Secret and set %s" (index $pair 0) (index $pair 1) (index $pair 2)) }}
{{- end }}
{{- end }}
{{- if and (include "stream-guard.kafkaUsesSasl" .) (not .Values.secrets.kafka.existingSecret) }}
{{- fail (printf "config.kafka.security_protocol=%s needs the SASL password: set secrets.kafka.existingSecret (key %s)" $c.kafka.security_protocol .Values.secrets.kafka.saslPasswordKey) }}
{{- end }}
{{- if and (include "stream-guard.kafkaUsesSasl" .) (not $c.kafka.sasl_username) }}
{{- fail "config.kafka.sasl_username is required with a SASL security_protocol" }}
{{- end }}
{{- if and .Values.secrets.kafka.caKey (not $c.kafka.ssl_cafile) }}
{{- fail "secrets.kafka.caKey is mounted at config.kafka.ssl_cafile: set that path too (e.g. /etc/stream-guard/kafka-ca/ca.crt)" }}
{{- end }}
{{- if and .Values.secrets.kafka.caKey (not .Values.secrets.kafka.existingSecret) }}
{{- fail "secrets.kafka.caKey needs secrets.kafka.existingSecret" }}
{{- end }}
{{- if has $c.telemetry.http_host (list "127.0.0.1" "localhost" "::1") }}
{{- fail (printf "config.telemetry.http_host=%s: the kubelet's probes and Prometheus reach the pod IP, listen on 0.0.0.0" $c.telemetry.http_host) }}
{{- end }}
{{- $repo := .Values.modelRepository -}}
{{- $sources := 0 -}}
{{- if $repo.s3Url }}{{ $sources = add1 $sources }}{{ end }}
{{- if $repo.existingClaim }}{{ $sources = add1 $sources }}{{ end }}
{{- if $repo.volume }}{{ $sources = add1 $sources }}{{ end }}
{{- if gt $sources 1 }}
{{- fail "modelRepository: set only one of s3Url, existingClaim, volume" }}
{{- end }}
{{- if and .Values.triton.enabled (eq $sources 0) }}
{{- fail "triton.enabled needs a model repository: set modelRepository.s3Url, modelRepository.existingClaim or modelRepository.volume" }}
{{- end }}
{{- if and $c.triton.model_repository (not (or $repo.existingClaim $repo.volume)) }}
{{- fail "config.triton.model_repository makes the fast worker write policy heads there: set modelRepository.existingClaim (ReadWriteMany, shared with Triton) or modelRepository.volume, or leave it null for a read-only deployment with precompiled heads" }}
{{- end }}
{{- if and (has "*" .Values.triton.loadModels) (gt (len .Values.triton.loadModels) 1) }}
{{- fail "triton.loadModels: Triton accepts \"*\" only as the sole --load-model" }}
{{- end }}
{{- include "stream-guard.validateReview" . }}
{{- $files := include "stream-guard.policyFiles" . | fromYaml -}}
{{- $dir := printf "%s/" (trimSuffix "/" .Values.policies.mountPath) -}}
{{- $paths := list $c.policy.path -}}
{{- range $tenant, $path := $c.policy.tenants }}{{ $paths = append $paths $path }}{{ end }}
{{- with $c.shadow.policy }}{{ $paths = append $paths . }}{{ end }}
{{- range $path := $paths }}
{{- if hasPrefix $dir $path }}
{{- $file := trimPrefix $dir $path }}
{{- if not (hasKey $files $file) }}
{{- fail (printf "policy file %s is not in the policy ConfigMap: add policies.files.%s" $path $file) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The review worker and console: what would only fail (or leak) at runtime fails the render. */}}
{{- define "stream-guard.validateReview" -}}
{{- $r := .Values.config.review -}}
{{- $manifest := $r.manifest -}}
{{- if and .Values.reviewWorker.enabled $manifest (not (hasPrefix "s3://" $manifest)) }}
{{- if not (hasPrefix "/" $manifest) }}
{{- fail (printf "config.review.manifest=%s: use s3://bucket/prefix, or an absolute folder on reviewWorker.manifestVolume" $manifest) }}
{{- end }}
{{- if not .Values.reviewWorker.manifestVolume }}
{{- fail (printf "config.review.manifest=%s is a folder: set reviewWorker.manifestVolume (e.g. {persistentVolumeClaim: {claimName: review-labels}}), or use s3://bucket/prefix; the root filesystem is read-only" $manifest) }}
{{- end }}
{{- end }}
{{- $console := .Values.reviewConsole -}}
{{- if $console.enabled }}
{{- if has $r.console_host (list "127.0.0.1" "localhost" "::1") }}
{{- fail (printf "config.review.console_host=%s: the console's Service and the kubelet's probes reach the pod IP, listen on 0.0.0.0 (reviewConsole.networkPolicy limits who may connect)" $r.console_host) }}
{{- end }}
{{- if eq (int $r.console_port) 0 }}
{{- fail "config.review.console_port=0 (any free port) cannot back a Service: set a port, e.g. 8090" }}
{{- end }}
{{- if and $console.ingress.enabled (not $console.ingress.authenticated) }}
{{- fail "reviewConsole.ingress: the console trusts config.review.reviewer_header and, without it, a name the page sends; expose it only through an authenticating proxy that sets that header and strips it from client requests, then set reviewConsole.ingress.authenticated=true" }}
{{- end }}
{{- if and $console.networkPolicy.enabled (not $console.networkPolicy.from) }}
{{- fail "reviewConsole.networkPolicy.from is empty: name the authenticating proxy's pods (and Prometheus), e.g. [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: auth}}}]" }}
{{- end }}
{{- end }}
{{- end }}
