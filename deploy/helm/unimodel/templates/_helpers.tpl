{{/* Names, labels and the flags nodes and gateway share. */}}

{{- define "unimodel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name; component names append -node / -gateway, so keep it short. */}}
{{- define "unimodel.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "unimodel.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "unimodel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "node"). */}}
{{- define "unimodel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "unimodel.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "unimodel.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "unimodel.scheme" -}}
{{ if .Values.tls.existingSecret }}https{{ else }}http{{ end }}
{{- end }}

{{/* etcd endpoints: the given ones, else the etcd subchart's service. */}}
{{- define "unimodel.etcdEndpoints" -}}
{{- if .Values.etcd.endpoints }}
{{- join "," .Values.etcd.endpoints }}
{{- else if .Values.etcd.enabled }}
{{- printf "http://%s-etcd:2379" .Release.Name }}
{{- else }}
{{- fail "set etcd.endpoints (e.g. [http://etcd:2379]) or etcd.enabled=true: nodes register in etcd and the gateway routes from it" }}
{{- end }}
{{- end }}

{{- define "unimodel.natsUrl" -}}
{{- if .Values.nats.url }}
{{- .Values.nats.url }}
{{- else if .Values.nats.enabled }}
{{- printf "nats://%s-nats:4222" .Release.Name }}
{{- end }}
{{- end }}

{{/* Flags for etcd, auth and TLS that `serve` and `gateway` both take (YAML list items). */}}
{{- define "unimodel.commonArgs" -}}
- --etcd={{ include "unimodel.etcdEndpoints" . }}
- --etcd-prefix={{ .Values.etcd.prefix }}
{{- with .Values.auth.apiKeys.existingSecret }}
- --api-key-file=/etc/unimodel/auth/api-keys/{{ $.Values.auth.apiKeys.key }}
{{- end }}
{{- with .Values.auth.jwtSecret.existingSecret }}
- --jwt-secret-file=/etc/unimodel/auth/jwt/{{ $.Values.auth.jwtSecret.key }}
{{- end }}
{{- with .Values.auth.rateLimit }}
- --rate-limit={{ . }}
{{- end }}
{{- if .Values.tls.existingSecret }}
- --tls-cert-file=/etc/unimodel/tls/tls.crt
- --tls-key-file=/etc/unimodel/tls/tls.key
{{- end }}
{{- end }}

{{/* Volumes both components mount: scratch space for the read-only root, auth, TLS. */}}
{{- define "unimodel.commonVolumes" -}}
- name: cache
  emptyDir: {}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- with .Values.auth.apiKeys.existingSecret }}
- name: api-keys
  secret:
    secretName: {{ . }}
{{- end }}
{{- with .Values.auth.jwtSecret.existingSecret }}
- name: jwt-secret
  secret:
    secretName: {{ . }}
{{- end }}
{{- with .Values.tls.existingSecret }}
- name: tls
  secret:
    secretName: {{ . }}
{{- end }}
{{- end }}

{{- define "unimodel.commonVolumeMounts" -}}
- name: cache
  mountPath: /var/cache/unimodel
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/unimodel
{{- if .Values.auth.apiKeys.existingSecret }}
- name: api-keys
  mountPath: /etc/unimodel/auth/api-keys
  readOnly: true
{{- end }}
{{- if .Values.auth.jwtSecret.existingSecret }}
- name: jwt-secret
  mountPath: /etc/unimodel/auth/jwt
  readOnly: true
{{- end }}
{{- if .Values.tls.existingSecret }}
- name: tls
  mountPath: /etc/unimodel/tls
  readOnly: true
{{- end }}
{{- end }}

{{/* A probe on a health route: (dict "path" P "port" NAME "scheme" S "settings" VALUES). */}}
{{- define "unimodel.probe" -}}
httpGet:
  path: {{ .path }}
  port: {{ .port }}
  scheme: {{ .scheme | upper }}
{{- toYaml .settings | nindent 0 }}
{{- end }}
