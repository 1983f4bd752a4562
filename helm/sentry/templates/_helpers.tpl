{{/*
Chart name, truncated to the 63 characters Kubernetes allows in a name.
*/}}
{{- define "sentry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. When the release name already contains the chart
name it is used alone ("sentry", not "sentry-sentry").
*/}}
{{- define "sentry.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sentry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The namespace every namespaced object goes to.
*/}}
{{- define "sentry.namespace" -}}
{{- default .Release.Namespace .Values.namespace.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sentry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sentry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sentry.labels" -}}
helm.sh/chart: {{ include "sentry.chart" . }}
{{ include "sentry.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sentry
{{- end }}

{{- define "sentry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sentry.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secret whose keys become the container's environment.
*/}}
{{- define "sentry.secretName" -}}
{{- if .Values.existingSecret }}
{{- .Values.existingSecret }}
{{- else }}
{{- printf "%s-secrets" (include "sentry.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "sentry.configMapName" -}}
{{- printf "%s-config" (include "sentry.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sentry.pvcName" -}}
{{- if .Values.persistence.existingClaim }}
{{- .Values.persistence.existingClaim }}
{{- else }}
{{- printf "%s-state" (include "sentry.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "sentry.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Directory of the state file (and of the audit log): a writable volume.
*/}}
{{- define "sentry.stateDir" -}}
{{- dir (.Values.config.state_file | default "/var/lib/sentry/state.json") }}
{{- end }}

{{- define "sentry.workDir" -}}
{{- .Values.config.work_dir | default "/var/cache/sentry/work" }}
{{- end }}

{{/*
Where the work volume is mounted: the parent of work_dir. A volume's root is not
Sentry's own (root-owned, or group-writable with fsGroup), and Sentry refuses such a
work_dir; it creates work_dir itself, mode 0700, inside the volume.
*/}}
{{- define "sentry.workVolumeDir" -}}
{{- dir (include "sentry.workDir" .) }}
{{- end }}

{{/*
Container port, taken from config.server.listen ("0.0.0.0:8080" -> 8080).
*/}}
{{- define "sentry.containerPort" -}}
{{- $server := .Values.config.server | default dict }}
{{- $listen := $server.listen | default "0.0.0.0:8080" | toString }}
{{- last (splitList ":" $listen) | int }}
{{- end }}

{{/*
Checks that must hold for any rendering. Included by deployment.yaml and
hpa.yaml; renders nothing or fails.
*/}}
{{- define "sentry.validate" -}}
{{- if gt (int .Values.replicaCount) 1 }}
{{- fail (printf "replicaCount=%d is not supported: Sentry has no leader election, so every replica polls on its own and deploys every change once per replica. Keep replicaCount at 1 (or 0 to pause)." (int .Values.replicaCount)) }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- fail "autoscaling.enabled=true is not supported: Sentry has no leader election, so a scaled-out poller deploys every change once per replica. Set autoscaling.enabled=false and keep replicaCount at 1." }}
{{- end }}
{{- if not .Values.config }}
{{- fail "config is empty: set config to the content of sentry.yaml (see values.yaml)." }}
{{- end }}
{{- if .Values.config.audit_log }}
{{- $auditDir := dir .Values.config.audit_log }}
{{- if not (or (eq $auditDir (include "sentry.stateDir" .)) (eq $auditDir (include "sentry.workVolumeDir" .)) (eq $auditDir "/tmp")) }}
{{- fail (printf "config.audit_log (%s) must be in the directory of config.state_file (%s): only that directory, work_dir and /tmp are writable (readOnlyRootFilesystem)." .Values.config.audit_log (include "sentry.stateDir" .)) }}
{{- end }}
{{- end }}
{{- $grace := .Values.config.shutdown_grace | default "20s" | toString }}
{{- $graceSeconds := 0 }}
{{- if regexMatch "^[0-9]+$" $grace }}
{{- $graceSeconds = int $grace }}
{{- else if regexMatch "^[0-9]+s$" $grace }}
{{- $graceSeconds = int (trimSuffix "s" $grace) }}
{{- else if regexMatch "^[0-9]+m$" $grace }}
{{- $graceSeconds = mul (int (trimSuffix "m" $grace)) 60 }}
{{- else if regexMatch "^[0-9]+h$" $grace }}
{{- $graceSeconds = mul (int (trimSuffix "h" $grace)) 3600 }}
{{- end }}
{{- if ge (int $graceSeconds) (int .Values.terminationGracePeriodSeconds) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be longer than config.shutdown_grace (%s): otherwise the kubelet kills Sentry before it has stopped its commands and saved its state." (int .Values.terminationGracePeriodSeconds) $grace) }}
{{- end }}
{{- if and .Values.existingSecret (not (kindIs "string" .Values.existingSecret)) }}
{{- fail "existingSecret must be the name of a Secret" }}
{{- end }}
{{- end }}

{{/*
Whether the pod gets a ServiceAccount token: only when asked for, or when the
deploy commands are granted rights (rbac.deployer), which they use through it.
*/}}
{{- define "sentry.automountToken" -}}
{{- if or .Values.serviceAccount.automountToken (and .Values.rbac.create .Values.rbac.deployer) }}true{{ else }}false{{ end }}
{{- end }}

{{/*
Webhook container port, from config.server.webhook_listen ("0.0.0.0:8081" -> 8081);
empty when webhooks share server.listen.
*/}}
{{- define "sentry.webhookPort" -}}
{{- $server := .Values.config.server | default dict }}
{{- with $server.webhook_listen }}{{ last (splitList ":" (toString .)) | int }}{{ end }}
{{- end }}
