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

{{/*
Labels of every object, without the component.
*/}}
{{- define "sentry.commonLabels" -}}
helm.sh/chart: {{ include "sentry.chart" . }}
{{ include "sentry.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sentry
{{- end }}

{{/*
Labels of the poller's objects. The component is not a selector label:
selectors are immutable, and adding it there would break upgrades.
*/}}
{{- define "sentry.labels" -}}
{{ include "sentry.commonLabels" . }}
app.kubernetes.io/component: poller
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
A duration in the forms Sentry's config accepts, as milliseconds; -1 when it is
not one. Integer seconds ("90"), or humantime text: numbers with units, parts
optionally separated by spaces ("90s", "15m", "1h30m", "1m 30s", "500ms").
*/}}
{{- define "sentry.durationMillis" -}}
{{- $text := . | toString | trim }}
{{- if regexMatch "^[0-9]+$" $text }}
{{- mul (int64 $text) 1000 }}
{{- else if regexMatch "^([0-9]+ *[a-zA-Zµ]+ *)+$" $text }}
{{- $units := dict "nanos" 0 "nsec" 0 "ns" 0 "usec" 0 "us" 0 "µs" 0 "millis" 1 "msec" 1 "ms" 1 "seconds" 1000 "second" 1000 "secs" 1000 "sec" 1000 "s" 1000 "minutes" 60000 "minute" 60000 "min" 60000 "mins" 60000 "m" 60000 "hours" 3600000 "hour" 3600000 "hr" 3600000 "hrs" 3600000 "h" 3600000 "days" 86400000 "day" 86400000 "d" 86400000 "weeks" 604800000 "week" 604800000 "wk" 604800000 "wks" 604800000 "w" 604800000 "months" 2630016000 "month" 2630016000 "M" 2630016000 "years" 31557600000 "year" 31557600000 "yr" 31557600000 "yrs" 31557600000 "y" 31557600000 }}
{{- $total := int64 0 }}
{{- $bad := false }}
{{- range regexFindAll "[0-9]+ *[a-zA-Zµ]+" $text -1 }}
{{- $unit := regexReplaceAll "^[0-9]+ *" . "" }}
{{- if hasKey $units $unit }}
{{- $total = add $total (mul (int64 (regexFind "^[0-9]+" .)) (get $units $unit)) }}
{{- else }}
{{- $bad = true }}
{{- end }}
{{- end }}
{{- if $bad }}-1{{ else }}{{ $total }}{{ end }}
{{- else }}
{{- -1 }}
{{- end }}
{{- end }}

{{/*
Checks that must hold for any rendering. Included by deployment.yaml and
hpa.yaml; renders nothing or fails.
*/}}
{{- define "sentry.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail (printf "replicaCount=%d needs leader election: without leaderElection.enabled=true every replica polls on its own and deploys every change once per replica. Enable it, or keep replicaCount at 1 (or 0 to pause)." (int .Values.replicaCount)) }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- fail "autoscaling.enabled=true is not supported: with leader election one replica works and the others stand by, so more replicas never add capacity. Set autoscaling.enabled=false and choose replicaCount (with leaderElection.enabled for more than 1)." }}
{{- end }}
{{- if and .Values.leaderElection.enabled (not (has .Values.leaderElection.stateBackend (list "kubernetes" "file"))) }}
{{- fail (printf "leaderElection.stateBackend=%s: use kubernetes or file." .Values.leaderElection.stateBackend) }}
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
{{- $grace := .Values.config.shutdown_grace | default "20s" | toString | trim }}
{{- if not (contains "${" $grace) }}
{{- $graceMillis := include "sentry.durationMillis" $grace | int64 }}
{{- if lt $graceMillis 0 }}
{{- fail (printf "config.shutdown_grace (%s) is not a duration: write integer seconds or text such as 90s, 15m, 1h30m." $grace) }}
{{- end }}
{{- if ge $graceMillis (mul (int64 .Values.terminationGracePeriodSeconds) 1000) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be longer than config.shutdown_grace (%s): otherwise the kubelet kills Sentry before it has stopped its commands and saved its state." (int .Values.terminationGracePeriodSeconds) $grace) }}
{{- end }}
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
{{- if or .Values.serviceAccount.automountToken (and .Values.rbac.create .Values.rbac.deployer) .Values.jobExecutor.enabled }}true{{ else }}false{{ end }}
{{- end }}

{{/*
Webhook container port, from config.server.webhook_listen ("0.0.0.0:8081" -> 8081);
empty when webhooks share server.listen.
*/}}
{{- define "sentry.webhookPort" -}}
{{- $server := .Values.config.server | default dict }}
{{- with $server.webhook_listen }}{{ last (splitList ":" (toString .)) | int }}{{ end }}
{{- end }}

{{/*
Leader election: the Lease and the state ConfigMap names.
*/}}
{{- define "sentry.leaseName" -}}
{{- .Values.leaderElection.leaseName | default (printf "%s-leader" (include "sentry.fullname" .)) }}
{{- end }}

{{- define "sentry.stateConfigMapName" -}}
{{- .Values.leaderElection.stateConfigMap | default (printf "%s-state" (include "sentry.fullname" .)) }}
{{- end }}

{{/*
The Sentry configuration as rendered: .Values.config, plus leader_election and
(with the kubernetes backend) state when leaderElection.enabled.
*/}}
{{- define "sentry.config" -}}
{{- $config := deepCopy .Values.config }}
{{- if .Values.leaderElection.enabled }}
{{- $le := dict "enabled" true "lease_name" (include "sentry.leaseName" .) "lease_duration" .Values.leaderElection.leaseDuration "renew_deadline" .Values.leaderElection.renewDeadline "retry_period" .Values.leaderElection.retryPeriod }}
{{- $_ := set $config "leader_election" $le }}
{{- if eq .Values.leaderElection.stateBackend "kubernetes" }}
{{- $_ := set $config "state" (dict "backend" "kubernetes" "configmap" (include "sentry.stateConfigMapName" .)) }}
{{- end }}
{{- end }}
{{- toYaml $config }}
{{- end }}
