{{/* Names, labels and the Secret references every component shares. */}}

{{- define "loraplex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loraplex.fullname" -}}
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

{{/* Component names: fullname plus a suffix, within the 63-character limit. */}}
{{- define "loraplex.controlPlane.fullname" -}}
{{- printf "%s-control-plane" (include "loraplex.fullname" . | trunc 49 | trimSuffix "-") }}
{{- end }}
{{- define "loraplex.engine.fullname" -}}
{{- printf "%s-engine" (include "loraplex.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}
{{- define "loraplex.engine.headless" -}}
{{- printf "%s-engine-headless" (include "loraplex.fullname" . | trunc 47 | trimSuffix "-") }}
{{- end }}
{{- define "loraplex.postgresql.fullname" -}}
{{- printf "%s-postgresql" (include "loraplex.fullname" . | trunc 52 | trimSuffix "-") }}
{{- end }}

{{- define "loraplex.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "loraplex.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "loraplex.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraplex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "loraplex.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The Secret and key holding the admin token. */}}
{{- define "loraplex.adminToken.secretName" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin-token" (include "loraplex.fullname" .)) }}
{{- end }}
{{- define "loraplex.adminToken.secretKey" -}}
{{- if .Values.adminToken.existingSecret }}{{ .Values.adminToken.existingSecretKey }}{{ else }}admin-token{{ end }}
{{- end }}

{{/* The Secret and key holding the Postgres password of the bundled StatefulSet. */}}
{{- define "loraplex.postgresql.secretName" -}}
{{- .Values.postgresql.auth.existingSecret | default (include "loraplex.postgresql.fullname" .) }}
{{- end }}
{{- define "loraplex.postgresql.secretKey" -}}
{{- if .Values.postgresql.auth.existingSecret }}{{ .Values.postgresql.auth.existingSecretKey }}{{ else }}password{{ end }}
{{- end }}

{{/*
A value kept across upgrades: the Secret's current key if the cluster has it (lookup
finds nothing when rendering offline), else `given`, else a random string.
Call with (dict "ctx" $ "secret" NAME "key" KEY "given" VALUE).
*/}}
{{- define "loraplex.secretValue" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .secret }}
{{- $current := dig "data" .key "" ($existing | default dict) }}
{{- if .given }}{{ .given }}
{{- else if $current }}{{ $current | b64dec }}
{{- else }}{{ randAlphaNum 32 }}
{{- end }}
{{- end }}

{{/*
Env entries giving LORAPLEX_DATABASE_URL, from Secrets only. For the bundled Postgres
the password comes from its Secret and Kubernetes substitutes it into the URL, so no
password is written into the manifest.
*/}}
{{- define "loraplex.databaseEnv" -}}
{{- if .Values.postgresql.enabled }}
- name: LORAPLEX_POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "loraplex.postgresql.secretName" . }}
      key: {{ include "loraplex.postgresql.secretKey" . }}
- name: LORAPLEX_DATABASE_URL
  value: {{ printf "postgresql+psycopg://%s:$(LORAPLEX_POSTGRES_PASSWORD)@%s:5432/%s" .Values.postgresql.auth.username (include "loraplex.postgresql.fullname" .) .Values.postgresql.auth.database | quote }}
{{- else }}
- name: LORAPLEX_DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.database.existingSecret }}
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.existingSecretKey }}
      {{- else }}
      name: {{ include "loraplex.fullname" . }}-database
      key: database-url
      {{- end }}
{{- end }}
{{- end }}

{{- define "loraplex.adminTokenEnv" -}}
- name: LORAPLEX_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "loraplex.adminToken.secretName" . }}
      key: {{ include "loraplex.adminToken.secretKey" . }}
{{- end }}

{{/* A gRPC health probe on `port`: (dict "port" PORT "probe" VALUES). */}}
{{- define "loraplex.grpcProbe" -}}
grpc:
  port: {{ .port }}
  service: {{ .probe.service | quote }}
{{- with omit .probe "service" }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Stops a render whose values cannot work, with a message saying what to set. */}}
{{- define "loraplex.validate" -}}
{{- if and (not .Values.postgresql.enabled) (not .Values.database.url) (not .Values.database.existingSecret) }}
{{- fail "postgresql.enabled is false: set database.existingSecret (or database.url) to the control plane's Postgres URL" }}
{{- end }}
{{- if and .Values.postgresql.enabled (or .Values.database.url .Values.database.existingSecret) }}
{{- fail "database.url/existingSecret name an external Postgres: set postgresql.enabled=false to use it" }}
{{- end }}
{{- if and .Values.adminToken.value (lt (len .Values.adminToken.value) 32) }}
{{- fail "adminToken.value is shorter than 32 characters, which the servers refuse: leave it empty for a random one, or set adminToken.existingSecret" }}
{{- end }}
{{- if not (has (int .Values.engine.gpus) (list 0 1)) }}
{{- fail "engine.gpus must be 0 (CPU) or 1: one engine serves one GPU; add engine.replicas instead" }}
{{- end }}
{{- end }}

{{/* `- FLAG` / `- VALUE` arg pairs for each flag whose value is set (not null). */}}
{{- define "loraplex.optionalFlags" -}}
{{- range $flag, $value := . }}
{{- if not (kindIs "invalid" $value) }}
- {{ $flag }}
- {{ $value | toString | quote }}
{{- end }}
{{- end }}
{{- end }}
