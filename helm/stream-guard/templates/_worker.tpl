{{/*
A Deployment of one stream-guard process; all run the same image and the same Settings:
(dict "root" $ "component" "fast-worker" "key" "fastWorker" "command" "serve" "reasoning" false
      "writesHeads" true "labels" false "port" 9464 "loglevel" true)
reasoning: gets the reasoning API key. writesHeads: mounts the model repository at
config.triton.model_repository. labels: mounts reviewWorker.manifestVolume at a folder
config.review.manifest. port: the container port named http (default telemetry.metrics_port).
loglevel: the command takes --loglevel (the Faust workers; the review console does not).
SIGTERM goes straight to the process (exec-form entrypoint, no preStop hook): a worker stops
fetching, lets in-flight batches publish and commit within config.shutdown_grace_s, then exits;
the pod's grace period is longer than that.
*/}}
{{- define "stream-guard.workerDeployment" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $w := index $v .key -}}
{{- $ctx := dict "root" $root "component" .component -}}
{{- $repo := $v.modelRepository -}}
{{- $writesHeads := and .writesHeads $v.config.triton.model_repository -}}
{{- $manifest := $v.config.review.manifest -}}
{{- $labelsDir := and .labels $manifest (not (hasPrefix "s3://" (toString $manifest))) -}}
{{- $port := default $v.config.telemetry.metrics_port .port -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "stream-guard.componentName" $ctx }}
  labels:
    {{- include "stream-guard.labels" $ctx | nindent 4 }}
spec:
  {{- if not (dig "autoscaling" "enabled" false $w) }}
  replicas: {{ $w.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  selector:
    matchLabels:
      {{- include "stream-guard.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "stream-guard.labels" $ctx | nindent 8 }}
        {{- with $w.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if or $w.podAnnotations $v.policies.restartOnChange }}
      annotations:
        {{- if $v.policies.restartOnChange }}
        checksum/policies: {{ include "stream-guard.policyFiles" $root | sha256sum }}
        {{- end }}
        {{- with $w.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "stream-guard.serviceAccountName" $root }}
      automountServiceAccountToken: {{ $v.serviceAccount.automountServiceAccountToken }}
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $v.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ include "stream-guard.terminationGracePeriodSeconds" (dict "root" $root "worker" $w "key" .key) }}
      {{- with $w.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "stream-guard.image" $root | quote }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          {{- if .loglevel }}
          args: [{{ .command | quote }}, "--loglevel", {{ lower $v.config.telemetry.log_level | quote }}]
          {{- else }}
          args: [{{ .command | quote }}]
          {{- end }}
          ports:
            - name: http
              containerPort: {{ int $port }}
              protocol: TCP
          env:
            {{- include "stream-guard.configEnv" $root | trim | nindent 12 }}
            {{- with include "stream-guard.secretEnv" (dict "root" $root "reasoning" .reasoning) | trim }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with $w.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          startupProbe:
            {{- toYaml $w.startupProbe | nindent 12 }}
          livenessProbe:
            {{- toYaml $w.livenessProbe | nindent 12 }}
          readinessProbe:
            {{- toYaml $w.readinessProbe | nindent 12 }}
          resources:
            {{- toYaml $w.resources | nindent 12 }}
          securityContext:
            {{- toYaml $v.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: policies
              mountPath: {{ $v.policies.mountPath }}
              readOnly: true
            {{- if $v.secrets.kafka.caKey }}
            - name: kafka-ca
              mountPath: {{ dir $v.config.kafka.ssl_cafile }}
              readOnly: true
            {{- end }}
            {{- if $writesHeads }}
            - name: model-repository
              mountPath: {{ $v.config.triton.model_repository }}
            {{- end }}
            {{- if $labelsDir }}
            - name: review-manifest
              mountPath: {{ $manifest }}
            {{- end }}
            {{- with $w.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: {{ $v.tmpSizeLimit }}
        - name: policies
          configMap:
            name: {{ include "stream-guard.componentName" (dict "root" $root "component" "policies") }}
        {{- if $v.secrets.kafka.caKey }}
        - name: kafka-ca
          secret:
            secretName: {{ $v.secrets.kafka.existingSecret }}
            items:
              - key: {{ $v.secrets.kafka.caKey }}
                path: {{ base $v.config.kafka.ssl_cafile }}
        {{- end }}
        {{- if $writesHeads }}
        - name: model-repository
          {{- if $repo.existingClaim }}
          persistentVolumeClaim:
            claimName: {{ $repo.existingClaim }}
          {{- else }}
          {{- toYaml $repo.volume | nindent 10 }}
          {{- end }}
        {{- end }}
        {{- if $labelsDir }}
        - name: review-manifest
          {{- toYaml $w.manifestVolume | nindent 10 }}
        {{- end }}
        {{- with $w.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $w.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/*
A process's Service: a worker's metrics port (/metrics, /healthz, /readyz) by default, or
(dict ... "port" 8090 "portName" "http-console") for the review console.
*/}}
{{- define "stream-guard.workerService" -}}
{{- $root := .root -}}
{{- $w := index $root.Values .key -}}
{{- $ctx := dict "root" $root "component" .component -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "stream-guard.componentName" $ctx }}
  labels:
    {{- include "stream-guard.labels" $ctx | nindent 4 }}
  {{- with $w.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $w.service.type }}
  selector:
    {{- include "stream-guard.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: {{ default "http-metrics" .portName }}
      port: {{ int (default $root.Values.config.telemetry.metrics_port .port) }}
      targetPort: http
      protocol: TCP
{{- end }}

{{/*
Autoscaling of one worker: a KEDA ScaledObject on consumer lag, else a CPU HPA.
(dict ... "group" G "topic" T) scales on T's lag (autoscaling.lagThreshold); "extraTriggers", a
list of (dict "topic" T "lagThreshold" N), adds topics the same group reads (KEDA takes the max).
*/}}
{{- define "stream-guard.workerAutoscaler" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $w := index $v .key -}}
{{- $ctx := dict "root" $root "component" .component -}}
{{- $name := include "stream-guard.componentName" $ctx -}}
{{- if $w.autoscaling.enabled }}
{{- if $v.keda.enabled }}
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ $name }}
  labels:
    {{- include "stream-guard.labels" $ctx | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicaCount: {{ $w.autoscaling.minReplicas }}
  maxReplicaCount: {{ $w.autoscaling.maxReplicas }}
  pollingInterval: {{ $v.keda.pollingInterval }}
  cooldownPeriod: {{ $v.keda.cooldownPeriod }}
  triggers:
    {{- $group := .group }}
    {{- range $t := prepend (default list .extraTriggers) (dict "topic" .topic "lagThreshold" $w.autoscaling.lagThreshold) }}
    - type: kafka
      metadata:
        bootstrapServers: {{ $v.config.kafka.bootstrap_servers | quote }}
        consumerGroup: {{ $group | quote }}
        topic: {{ $t.topic | quote }}
        lagThreshold: {{ $t.lagThreshold | toString | quote }}
        activationLagThreshold: {{ $w.autoscaling.activationLagThreshold | toString | quote }}
        # The workers read a new group from the earliest offset; lag must be counted the same way.
        offsetResetPolicy: earliest
        allowIdleConsumers: {{ $v.keda.allowIdleConsumers | toString | quote }}
        {{- if include "stream-guard.kafkaUsesSasl" $root }}
        sasl: {{ include "stream-guard.kedaSasl" $root }}
        {{- end }}
        {{- if include "stream-guard.kafkaUsesTls" $root }}
        tls: enable
        {{- end }}
      {{- if include "stream-guard.kedaAuthNeeded" $root }}
      authenticationRef:
        name: {{ include "stream-guard.componentName" (dict "root" $root "component" "kafka") }}
      {{- end }}
    {{- end }}
{{- else }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $name }}
  labels:
    {{- include "stream-guard.labels" $ctx | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicas: {{ $w.autoscaling.minReplicas }}
  maxReplicas: {{ $w.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $w.autoscaling.targetCPUUtilizationPercentage }}
  behavior:
    scaleDown:
      # Every scale-down rebalances the consumer group; do not flap.
      stabilizationWindowSeconds: 300
{{- end }}
{{- end }}
{{- end }}

{{- define "stream-guard.pdb" -}}
{{- $root := .root -}}
{{- $ctx := dict "root" $root "component" .component -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "stream-guard.componentName" $ctx }}
  labels:
    {{- include "stream-guard.labels" $ctx | nindent 4 }}
spec:
  maxUnavailable: {{ .pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "stream-guard.selectorLabels" $ctx | nindent 6 }}
{{- end }}
