{{/*
The learner's ranks (README, "Training on many GPUs"): learner.nodes pods with learner.gpusPerNode
GPUs each and one rank per GPU (one rank per pod without GPUs). One pod with at most one GPU runs
`puremesh train` as a single rank; anything more runs torchrun in every pod of an indexed Job, with
a static rendezvous at pod 0 (global rank 0, the controller) through the headless ranks Service.
*/}}
{{- define "puremesh.learnerRanksPerPod" -}}
{{- max 1 (int .Values.learner.gpusPerNode) }}
{{- end }}

{{- define "puremesh.learnerTorchrun" -}}
{{- if or (gt (int .Values.learner.nodes) 1) (gt (int .Values.learner.gpusPerNode) 1) }}true{{ end }}
{{- end }}

{{- define "puremesh.learnerRanksService" -}}
{{- printf "%s-learner-ranks" (include "puremesh.fullname" .) }}
{{- end }}

{{/* Refuse layouts that cannot work, before anything is applied. */}}
{{- define "puremesh.learnerChecks" -}}
{{- $learner := .Values.learner }}
{{- $workspace := .Values.storage.workspace }}
{{- if and (gt (int $learner.nodes) 1) (not $workspace.existingClaim) (not (has "ReadWriteMany" $workspace.accessModes)) }}
{{- fail "learner.nodes > 1: every rank writes its checkpoint shards to the workspace, so storage.workspace.accessModes needs ReadWriteMany (or give an existingClaim that is)" }}
{{- end }}
{{- if and (gt (int $learner.gpusPerNode) 0) (not (hasPrefix "cuda" (toString (($learner.settings | default dict).device | default "cpu")))) }}
{{- fail "learner.gpusPerNode > 0 needs learner.settings.device: cuda" }}
{{- end }}
{{- end }}

{{/* The learner container's resources: learner.resources, with gpusPerNode GPUs when set. */}}
{{- define "puremesh.learnerResources" -}}
{{- $resources := deepCopy .Values.learner.resources }}
{{- $gpus := int .Values.learner.gpusPerNode }}
{{- if gt $gpus 0 }}
{{- range $kind := list "requests" "limits" }}
{{- $_ := set $resources $kind (merge (dict "nvidia.com/gpu" (toString $gpus)) (get $resources $kind | default dict)) }}
{{- end }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* What the learner container runs: `puremesh train`, under torchrun when there are ranks. */}}
{{- define "puremesh.learnerCommand" -}}
{{- $root := .root }}
{{- $learner := $root.Values.learner }}
{{- $train := list "train" "--config" "/etc/puremesh/learner.yaml" "--log-level" $learner.logLevel }}
{{- if $learner.resume }}{{ $train = append $train "--resume" }}{{ end }}
{{- if include "puremesh.learnerTorchrun" $root }}
{{- $run := list (printf "--nnodes=%d" (int $learner.nodes)) (printf "--nproc-per-node=%s" (include "puremesh.learnerRanksPerPod" $root)) "--max-restarts=0" }}
{{- if gt (int $learner.nodes) 1 }}
{{- $master := printf "%s-0.%s" .jobName (include "puremesh.learnerRanksService" $root) }}
{{- $run = concat $run (list "--node-rank=$(JOB_COMPLETION_INDEX)" (printf "--master-addr=%s" $master) (printf "--master-port=%d" (int $learner.rendezvousPort))) }}
{{- else }}
{{- $run = append $run "--standalone" }}
{{- end }}
command: [torchrun]
args:
  {{- toYaml (concat $run (list "--module" "puremesh.cli.main") $train) | nindent 2 }}
{{- else }}
args:
  {{- toYaml $train | nindent 2 }}
{{- end }}
{{- end }}

{{/* The learner's pod template; the Job's name carries its hash (see learner-job.yaml).
Called with (dict "root" $ "jobName" NAME): the rendezvous address names pod 0 of that Job. */}}
{{- define "puremesh.learnerPodTemplate" -}}
{{- $job := .jobName -}}
{{- with .root -}}
{{- $values := .Values -}}
{{- /* The services' tokens (client), the replicas' token (server) and the WeightService's TLS. */}}
{{- $security := dict "root" . "tokens" (list "rollout" "prm" "verify" "weights") "tls" (list "tls.crt" "tls.key") }}
{{- $multi := gt (int $values.learner.nodes) 1 -}}
metadata:
  labels:
    {{- include "puremesh.labels" . | nindent 4 }}
    app.kubernetes.io/component: learner
    {{- include "puremesh.rpcClientLabel" . | nindent 4 }}
  annotations:
    checksum/config: {{ include "puremesh.learnerConfig" . | sha256sum }}
spec:
  restartPolicy: Never
  {{- if $multi }}
  # Pod i of the indexed Job is <job>-i.<ranks Service>: pod 0 is the rendezvous (global rank 0).
  subdomain: {{ include "puremesh.learnerRanksService" . }}
  {{- end }}
  serviceAccountName: {{ include "puremesh.serviceAccountName" . }}
  automountServiceAccountToken: false
  securityContext:
    {{- include "puremesh.podSecurityContext" . | nindent 4 }}
  {{- with $values.image.pullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- if $values.learner.waitForServices }}
  initContainers:
    # The services first: each Serve application answers a probe through the gRPC ingress.
    - name: wait-for-services
      image: {{ include "puremesh.image" . }}
      imagePullPolicy: {{ $values.image.pullPolicy }}
      command:
        - sh
        - -c
        - |
          for app in rollout prm verify; do
            until puremesh probe --target {{ include "puremesh.serveTarget" . }} --service "$app" --application "$app" --token-file "/etc/puremesh/tokens/$app.token"; do
              echo "waiting for the $app application"; sleep 10
            done
          done
      env:
        {{- include "puremesh.commonEnv" . | nindent 8 }}
      resources:
        requests: {cpu: 50m, memory: 128Mi}
        limits: {cpu: 500m, memory: 512Mi}
      securityContext:
        {{- include "puremesh.containerSecurityContext" . | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- include "puremesh.securityMounts" (dict "root" . "tokens" (list "rollout" "prm" "verify")) | nindent 8 }}
  {{- end }}
  containers:
    - name: learner
      image: {{ include "puremesh.image" . }}
      imagePullPolicy: {{ $values.image.pullPolicy }}
      {{- include "puremesh.learnerCommand" (dict "root" . "jobName" $job) | trim | nindent 6 }}
      ports:
        - name: weights
          containerPort: {{ $values.learner.weightsPort }}
        - name: weights-bulk
          containerPort: {{ $values.learner.weightsBulkPort }}
        - name: metrics
          containerPort: {{ $values.learner.metricsPort }}
        {{- if $multi }}
        - name: rendezvous
          containerPort: {{ $values.learner.rendezvousPort }}
        {{- end }}
      env:
        {{- include "puremesh.commonEnv" . | nindent 8 }}
        {{- if $multi }}
        - name: JOB_COMPLETION_INDEX
          valueFrom:
            fieldRef:
              fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
        {{- end }}
        {{- with include "puremesh.credentialsEnv" . }}{{ . | trim | nindent 8 }}{{ end }}
        {{- with $values.learner.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        {{- include "puremesh.learnerResources" . | nindent 8 }}
      securityContext:
        {{- include "puremesh.containerSecurityContext" . | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/puremesh
          readOnly: true
        - name: workspace
          mountPath: {{ $values.storage.workspace.mountPath }}
        - name: tmp
          mountPath: /tmp
        - name: shm
          mountPath: /dev/shm
        {{- with include "puremesh.modelsMount" . }}{{ . | trim | nindent 8 }}{{ end }}
        {{- include "puremesh.securityMounts" $security | nindent 8 }}
  volumes:
    - name: config
      configMap:
        name: {{ include "puremesh.fullname" . }}-config
        items:
          - key: learner.yaml
            path: learner.yaml
    - name: workspace
      persistentVolumeClaim:
        claimName: {{ $values.storage.workspace.existingClaim | default (printf "%s-workspace" (include "puremesh.fullname" .)) }}
    - name: tmp
      emptyDir: {}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: 2Gi
    {{- with include "puremesh.modelsVolume" . }}{{ . | trim | nindent 4 }}{{ end }}
    {{- include "puremesh.securityVolumes" $security | nindent 4 }}
  {{- with $values.learner.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $values.learner.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $values.learner.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}
