{{/* Names. The full name is kept short: KubeRay appends suffixes to it for clusters and pods. */}}
{{- define "puremesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "puremesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "puremesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "puremesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "puremesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "puremesh.labels" -}}
helm.sh/chart: {{ include "puremesh.chart" . }}
{{ include "puremesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: puremesh
{{- end }}

{{/* Pods that may call the Serve gRPC ingress carry this label (the learner, the helm test). */}}
{{- define "puremesh.rpcClientLabel" -}}
puremesh.io/rpc-client: "true"
{{- end }}

{{- define "puremesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "puremesh.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "puremesh.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.flavor) -}}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* KubeRay names the Serve Service of a RayService <name>-serve-svc. */}}
{{- define "puremesh.serveService" -}}
{{- printf "%s-serve-svc" (include "puremesh.fullname" .) }}
{{- end }}

{{- define "puremesh.serveTarget" -}}
{{- printf "%s.%s.svc:%v" (include "puremesh.serveService" .) .Release.Namespace .Values.ray.grpcPort }}
{{- end }}

{{- define "puremesh.learnerService" -}}
{{- printf "%s-learner" (include "puremesh.fullname" .) }}
{{- end }}

{{- define "puremesh.weightsTarget" -}}
{{- printf "%s.%s.svc:%v" (include "puremesh.learnerService" .) .Release.Namespace .Values.learner.weightsPort }}
{{- end }}

{{/*
A service's settings as a dict: the values' `settings`, then the keys the chart owns
(server.metrics_port and server.metrics_host; rollout's weights_target).
Call with (dict "root" $ "name" "rollout").
*/}}
{{- define "puremesh.serviceSettings" -}}
{{- $root := .root }}
{{- $svc := index $root.Values.services .name }}
{{- $settings := deepCopy ($svc.settings | default dict) }}
{{- /* metrics_host 0.0.0.0: the PodMonitor scrapes the pod's address, never its loopback. */}}
{{- $owned := dict "server" (dict "metrics_port" $svc.metricsPort "metrics_host" "0.0.0.0") }}
{{- if eq .name "rollout" }}
{{- $_ := set $owned "weights_target" (include "puremesh.weightsTarget" $root) }}
{{- end }}
{{- toYaml (mergeOverwrite $settings $owned) }}
{{- end }}

{{/*
The learner's config file (`puremesh train --config`): {learner: LearnerSettings}. The endpoints
default to the Serve gRPC ingress, each call naming its application (`application` metadata).
*/}}
{{- define "puremesh.learnerConfig" -}}
{{- $settings := deepCopy (.Values.learner.settings | default dict) }}
{{- $target := include "puremesh.serveTarget" . }}
{{- $apps := dict "rollout" "rollout" "prm" "prm" "verify" "verify" }}
{{- $defaults := dict "endpoints" (dict "rollout" (list $target) "prm" (list $target) "verify" (list $target) "applications" $apps) }}
{{- $settings = merge $settings $defaults }}
{{- $owned := dict "metrics_port" .Values.learner.metricsPort "weights" (dict "host" "0.0.0.0" "port" .Values.learner.weightsPort "bulk_port" .Values.learner.weightsBulkPort) }}
{{- toYaml (dict "learner" (mergeOverwrite $settings $owned)) }}
{{- end }}

{{/* Environment variables from the credentials Secret. */}}
{{- define "puremesh.credentialsEnv" -}}
{{- $secret := .Values.credentials.existingSecret }}
{{- if $secret }}
{{- range $name, $key := .Values.credentials.env }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $key }}
      optional: true
{{- end }}
{{- end }}
{{- end }}

{{/* Offline model loading (ARCHITECTURE.md rule 8) and writable caches under /tmp. */}}
{{- define "puremesh.commonEnv" -}}
- name: HOME
  value: /tmp/home
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
- name: TOKENIZERS_PARALLELISM
  value: "false"
- name: PYTHONUNBUFFERED
  value: "1"
{{- end }}

{{- define "puremesh.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "puremesh.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{- define "puremesh.modelsVolume" -}}
{{- if .Values.storage.models.existingClaim }}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.storage.models.existingClaim }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "puremesh.modelsMount" -}}
{{- if .Values.storage.models.existingClaim }}
- name: models
  mountPath: {{ .Values.storage.models.mountPath }}
  readOnly: true
  {{- with .Values.storage.models.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/* `puremesh probe` of one Serve application through the gRPC ingress. */}}
{{- define "puremesh.probeArgs" -}}
- probe
- --target
- {{ include "puremesh.serveTarget" .root }}
- --service
- {{ .name }}
- --application
- {{ .name }}
- --timeout
- {{ .root.Values.tests.probeTimeoutSeconds | quote }}
{{- end }}
