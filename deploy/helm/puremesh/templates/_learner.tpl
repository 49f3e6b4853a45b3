{{/* The learner's pod template; the Job's name carries its hash (see learner-job.yaml). */}}
{{- define "puremesh.learnerPodTemplate" -}}
{{- $values := .Values -}}
metadata:
  labels:
    {{- include "puremesh.labels" . | nindent 4 }}
    app.kubernetes.io/component: learner
    {{- include "puremesh.rpcClientLabel" . | nindent 4 }}
  annotations:
    checksum/config: {{ include "puremesh.learnerConfig" . | sha256sum }}
spec:
  restartPolicy: Never
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
            until puremesh probe --target {{ include "puremesh.serveTarget" . }} --service "$app" --application "$app"; do
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
  {{- end }}
  containers:
    - name: learner
      image: {{ include "puremesh.image" . }}
      imagePullPolicy: {{ $values.image.pullPolicy }}
      args:
        - train
        - --config
        - /etc/puremesh/learner.yaml
        - --log-level
        - {{ $values.learner.logLevel }}
        {{- if $values.learner.resume }}
        - --resume
        {{- end }}
      ports:
        - name: weights
          containerPort: {{ $values.learner.weightsPort }}
        - name: weights-bulk
          containerPort: {{ $values.learner.weightsBulkPort }}
        - name: metrics
          containerPort: {{ $values.learner.metricsPort }}
      env:
        {{- include "puremesh.commonEnv" . | nindent 8 }}
        {{- with include "puremesh.credentialsEnv" . }}{{ . | trim | nindent 8 }}{{ end }}
        {{- with $values.learner.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        {{- toYaml $values.learner.resources | nindent 8 }}
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
