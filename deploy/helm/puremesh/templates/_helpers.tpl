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

{{/* Security (README "Security"): the token files and the TLS files, mounted from Secrets. */}}
{{- define "puremesh.tokensSecret" -}}
{{- .Values.security.tokens.existingSecret | default (printf "%s-tokens" (include "puremesh.fullname" .)) }}
{{- end }}

{{- define "puremesh.tlsSecret" -}}
{{- .Values.security.tls.existingSecret | default (printf "%s-learner-tls" (include "puremesh.fullname" .)) }}
{{- end }}

{{- define "puremesh.tokenFile" -}}
{{- printf "/etc/puremesh/tokens/%s.token" . }}
{{- end }}

{{- define "puremesh.tlsFile" -}}
{{- printf "/etc/puremesh/tls/%s" . }}
{{- end }}

{{/*
The volumes holding a pod's token files and TLS files: (dict "root" $ "tokens" (list KEY...)
"tls" (list FILE...)); each token KEY of the tokens Secret becomes KEY.token, each TLS FILE
(tls.crt, tls.key, ca.crt) a file of the TLS Secret (only when TLS is on).
*/}}
{{- define "puremesh.securityVolumes" -}}
{{- if .tokens }}
- name: tokens
  secret:
    secretName: {{ include "puremesh.tokensSecret" .root }}
    defaultMode: 0400
    items:
      {{- range .tokens }}
      - key: {{ . }}
        path: {{ . }}.token
      {{- end }}
{{- end }}
{{- if and .tls .root.Values.security.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "puremesh.tlsSecret" .root }}
    defaultMode: 0400
    items:
      {{- range .tls }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
{{- end }}
{{- end }}

{{- define "puremesh.securityMounts" -}}
{{- if .tokens }}
- name: tokens
  mountPath: /etc/puremesh/tokens
  readOnly: true
{{- end }}
{{- if and .tls .root.Values.security.tls.enabled }}
- name: tls
  mountPath: /etc/puremesh/tls
  readOnly: true
{{- end }}
{{- end }}

{{/*
A service's settings as a dict: the values' `settings`, then the keys the chart owns
(server.metrics_port and server.metrics_host; server.auth_tokens, the service's token file;
rollout's weights_target and weights_security, the replicas' way to the learner).
Call with (dict "root" $ "name" "rollout"); with "json" true it is JSON, for `fromJson` (a YAML
round trip through fromYaml turns a string such as "\n", prm.step_tag, into "").
*/}}
{{- define "puremesh.serviceSettings" -}}
{{- $root := .root }}
{{- $svc := index $root.Values.services .name }}
{{- $settings := deepCopy ($svc.settings | default dict) }}
{{- /* metrics_host 0.0.0.0: the PodMonitor scrapes the pod's address, never its loopback. */}}
{{- $server := dict "metrics_port" $svc.metricsPort "metrics_host" "0.0.0.0" "auth_tokens" (include "puremesh.tokenFile" .name) }}
{{- $owned := dict "server" $server }}
{{- if eq .name "rollout" }}
{{- $_ := set $owned "weights_target" (include "puremesh.weightsTarget" $root) }}
{{- $weights := dict "token_file" (include "puremesh.tokenFile" "weights") }}
{{- if $root.Values.security.tls.enabled }}
{{- $_ := set $weights "tls_ca" (include "puremesh.tlsFile" "ca.crt") }}
{{- end }}
{{- $_ := set $owned "weights_security" $weights }}
{{- end }}
{{- if .json }}
{{- toJson (mergeOverwrite $settings $owned) }}
{{- else }}
{{- toYaml (mergeOverwrite $settings $owned) }}
{{- end }}
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
{{- $weights := dict "host" "0.0.0.0" "port" .Values.learner.weightsPort "bulk_port" .Values.learner.weightsBulkPort "auth_tokens" (include "puremesh.tokenFile" "weights") }}
{{- if .Values.security.tls.enabled }}
{{- $_ := set $weights "tls_cert" (include "puremesh.tlsFile" "tls.crt") }}
{{- $_ := set $weights "tls_key" (include "puremesh.tlsFile" "tls.key") }}
{{- else }}
{{- /* All addresses without TLS: the learner refuses that unless told (README "Security"). */}}
{{- $_ := set $weights "insecure" true }}
{{- end }}
{{- /* The Serve ingress has no TLS: the tokens only. */}}
{{- $security := dict }}
{{- range $name := list "rollout" "prm" "verify" }}
{{- $_ := set $security $name (dict "token_file" (include "puremesh.tokenFile" $name)) }}
{{- end }}
{{- $owned := dict "metrics_port" .Values.learner.metricsPort "weights" $weights "endpoints" (dict "security" $security) }}
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
- --token-file
- {{ include "puremesh.tokenFile" .name }}
{{- end }}
