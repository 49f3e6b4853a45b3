{{/*
The pod template of a Ray head or worker group.
Call with (dict "root" $ "group" <head or worker group values> "container" <name> "head" <bool>).
*/}}
{{- define "puremesh.rayPodTemplate" -}}
{{- $root := .root }}
{{- $values := $root.Values -}}
metadata:
  labels:
    {{- include "puremesh.labels" $root | nindent 4 }}
    app.kubernetes.io/component: ray
spec:
  serviceAccountName: {{ include "puremesh.serviceAccountName" $root }}
  {{- /* The in-tree autoscaler (a sidecar of the head) talks to the Kubernetes API. */}}
  automountServiceAccountToken: {{ and .head $values.ray.autoscaler.enabled }}
  securityContext:
    {{- include "puremesh.podSecurityContext" $root | nindent 4 }}
  {{- with $values.image.pullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ include "puremesh.image" $root }}
      imagePullPolicy: {{ $values.image.pullPolicy }}
      ports:
        {{- if .head }}
        - name: gcs
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
        {{- end }}
        - name: serve
          containerPort: {{ $values.ray.httpPort }}
        - name: serve-grpc
          containerPort: {{ $values.ray.grpcPort }}
        - name: metrics
          containerPort: {{ $values.ray.metricsPort }}
        {{- range $name := list "rollout" "prm" "verify" }}
        - name: metrics-{{ $name }}
          containerPort: {{ (index $values.services $name).metricsPort }}
        {{- end }}
      env:
        {{- include "puremesh.commonEnv" $root | nindent 8 }}
        {{- with include "puremesh.credentialsEnv" $root }}{{ . | trim | nindent 8 }}{{ end }}
        {{- with $values.ray.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        {{- toYaml .group.resources | nindent 8 }}
      securityContext:
        {{- include "puremesh.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: shm
          mountPath: /dev/shm
        {{- with include "puremesh.modelsMount" $root }}{{ . | trim | nindent 8 }}{{ end }}
  volumes:
    - name: tmp
      emptyDir: {}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .group.shmSize }}
    {{- with include "puremesh.modelsVolume" $root }}{{ . | trim | nindent 4 }}{{ end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
