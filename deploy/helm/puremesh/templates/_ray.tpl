{{/*
The pod template of a Ray head or worker group.
Call with (dict "root" $ "group" <head or worker group values> "container" <name> "head" <bool>
"service" <the worker group's service; empty for the head>). A worker group's pods declare their
service's metrics port only: its replicas are the only ones there (see puremesh.rayWorkerGroups).
They mount their service's token file (the rollout group also the replicas' token for the
learner and its CA); the head, which runs no replica, mounts none.
*/}}
{{- define "puremesh.rayPodTemplate" -}}
{{- $root := .root }}
{{- $values := $root.Values -}}
{{- $tokens := list }}
{{- $tls := list }}
{{- with .service }}
{{- $tokens = list . }}
{{- if eq . "rollout" }}{{ $tokens = append $tokens "weights" }}{{ $tls = list "ca.crt" }}{{ end }}
{{- end }}
{{- $security := dict "root" $root "tokens" $tokens "tls" $tls }}
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
        {{- with .service }}
        - name: metrics-{{ . }}
          containerPort: {{ (index $values.services .).metricsPort }}
        {{- end }}
      env:
        {{- include "puremesh.commonEnv" $root | nindent 8 }}
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
        {{- with include "puremesh.securityMounts" $security }}{{ . | trim | nindent 8 }}{{ end }}
  volumes:
    - name: tmp
      emptyDir: {}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .group.shmSize }}
    {{- with include "puremesh.modelsVolume" $root }}{{ . | trim | nindent 4 }}{{ end }}
    {{- with include "puremesh.securityVolumes" $security }}{{ . | trim | nindent 4 }}{{ end }}
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

{{/*
The Ray custom resource a service's worker group advertises and its replicas request (the Python
side: services/ray_serve.py ServeApp.resource).
*/}}
{{- define "puremesh.rayResource" -}}
puremesh_{{ . }}
{{- end }}

{{/*
Placement: one worker group per service, named after it. Its pods advertise
{puremesh_<svc>: 100} through rayStartParams `resources`, as single-quoted JSON
('{"puremesh_rollout":100}'): the form KubeRay itself writes and parses (when it adds GPUs and
accelerators; it cannot parse the older backslash-escaped form of its samples), that `ray start`
receives through bash, and that Ray's autoscaler reads. Each replica of the service requests 1 of
it, and at most maxReplicasPerNode replicas of the application share a pod.
*/}}
{{- define "puremesh.rayWorkerGroups" -}}
{{- $root := . }}
{{- range $name := list "rollout" "prm" "verify" }}
{{- $group := (index $root.Values.services $name).workerGroup }}
{{- $resources := printf "'%s'" (dict (include "puremesh.rayResource" $name) 100 | toJson) }}
{{- $params := merge (dict "metrics-export-port" ($root.Values.ray.metricsPort | toString) "resources" $resources) (deepCopy ($group.rayStartParams | default dict)) }}
- groupName: {{ $name }}
  replicas: {{ $group.replicas }}
  minReplicas: {{ $group.minReplicas }}
  maxReplicas: {{ $group.maxReplicas }}
  rayStartParams:
    {{- toYaml $params | nindent 4 }}
  template:
    {{- include "puremesh.rayPodTemplate" (dict "root" $root "group" $group "container" "ray-worker" "head" false "service" $name) | nindent 4 }}
{{- end }}
{{- end }}

{{/*
Fails the render when a service's worker group cannot hold its application: Serve autoscaling up
to autoscaling.max_replicas needs max_replicas / maxReplicasPerNode pods of the group (maxReplicas
with the autoscaler, replicas without it). The values schema cannot compare two values.
*/}}
{{- define "puremesh.checkPlacement" -}}
{{- $root := . }}
{{- range $name := list "rollout" "prm" "verify" }}
{{- $svc := index $root.Values.services $name }}
{{- $group := $svc.workerGroup }}
{{- $min := int $group.minReplicas }}
{{- $max := int $group.maxReplicas }}
{{- $replicas := int $group.replicas }}
{{- if gt $min $max }}
{{- fail (printf "services.%s.workerGroup: minReplicas (%d) exceeds maxReplicas (%d)" $name $min $max) }}
{{- end }}
{{- if or (lt $replicas $min) (gt $replicas $max) }}
{{- fail (printf "services.%s.workerGroup: replicas (%d) is outside [minReplicas, maxReplicas] = [%d, %d]" $name $replicas $min $max) }}
{{- end }}
{{- $perNode := int $svc.maxReplicasPerNode }}
{{- $appMax := int $svc.autoscaling.max_replicas }}
{{- $needed := div (add $appMax (sub $perNode 1)) $perNode }}
{{- if $root.Values.ray.autoscaler.enabled }}
{{- if lt $max $needed }}
{{- fail (printf "services.%s: autoscaling.max_replicas is %d, but its worker group holds at most workerGroup.maxReplicas (%d) x maxReplicasPerNode (%d) = %d replica(s); raise services.%s.workerGroup.maxReplicas to at least %d (scale the application and its worker group together)" $name $appMax $max $perNode (mul $max $perNode) $name $needed) }}
{{- end }}
{{- else if lt $replicas $needed }}
{{- fail (printf "services.%s: autoscaling.max_replicas is %d, but without the autoscaler (ray.autoscaler.enabled: false) its worker group runs workerGroup.replicas (%d) pods x maxReplicasPerNode (%d) = %d replica(s); raise services.%s.workerGroup.replicas (and maxReplicas) to at least %d, or lower autoscaling.max_replicas" $name $appMax $replicas $perNode (mul $replicas $perNode) $name $needed) }}
{{- end }}
{{- end }}
{{- end }}

{{- /*
A vllm rollout replica on cuda spans settings.tensor_parallel_size GPUs: its deployment must
reserve that many (rayActorOptions.num_gpus) and each pod of its worker group must have them
(workerGroup.resources.limits nvidia.com/gpu, times maxReplicasPerNode).
*/ -}}
{{- define "puremesh.checkRolloutGpus" -}}
{{- $svc := .Values.services.rollout }}
{{- $settings := $svc.settings | default dict }}
{{- if and (eq ($settings.engine | default "hf") "vllm") (hasPrefix "cuda" ($settings.device | default "cpu")) }}
{{- $ranks := int ($settings.tensor_parallel_size | default 1) }}
{{- $reserved := float64 ($svc.rayActorOptions.num_gpus | default 0) }}
{{- if lt $reserved (float64 $ranks) }}
{{- fail (printf "services.rollout: settings.tensor_parallel_size is %d, but rayActorOptions.num_gpus reserves %v GPU(s) per replica; set rayActorOptions.num_gpus to %d" $ranks $reserved $ranks) }}
{{- end }}
{{- $limits := ($svc.workerGroup.resources | default dict).limits | default dict }}
{{- $podGpus := int (index $limits "nvidia.com/gpu" | default 0) }}
{{- $needed := mul $ranks (int $svc.maxReplicasPerNode) }}
{{- if lt $podGpus $needed }}
{{- fail (printf "services.rollout: each pod holds maxReplicasPerNode (%d) replica(s) of tensor_parallel_size %d, but workerGroup.resources.limits nvidia.com/gpu is %d; raise it to %d" (int $svc.maxReplicasPerNode) $ranks $podGpus $needed) }}
{{- end }}
{{- end }}
{{- end }}
