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

{{/* Whether a component serves TLS: (dict "ctx" $ "component" "node"|"gateway"). The
gateway does when tls.existingSecret is set; nodes only with tls.nodes too. */}}
{{- define "unimodel.tlsOn" -}}
{{- $tls := .ctx.Values.tls }}
{{- if and $tls.existingSecret (or (eq .component "gateway") $tls.nodes) }}true{{ end }}
{{- end }}

{{- define "unimodel.scheme" -}}
{{ if include "unimodel.tlsOn" . }}https{{ else }}http{{ end }}
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

{{/* Flags for etcd, auth and TLS that `serve` and `gateway` both take (YAML list items):
(dict "ctx" $ "component" "node"|"gateway"). */}}
{{- define "unimodel.commonArgs" -}}
{{- $v := .ctx.Values }}
- --etcd={{ include "unimodel.etcdEndpoints" .ctx }}
- --etcd-prefix={{ $v.etcd.prefix }}
{{- if $v.auth.apiKeys.existingSecret }}
- --api-key-file=/etc/unimodel/auth/api-keys/{{ $v.auth.apiKeys.key }}
{{- end }}
{{- if $v.auth.jwtSecret.existingSecret }}
- --jwt-secret-file=/etc/unimodel/auth/jwt/{{ $v.auth.jwtSecret.key }}
{{- end }}
{{- with $v.auth.rateLimit }}
- --rate-limit={{ . }}
{{- end }}
{{- if include "unimodel.tlsOn" . }}
- --tls-cert-file=/etc/unimodel/tls/tls.crt
- --tls-key-file=/etc/unimodel/tls/tls.key
{{- end }}
{{- end }}

{{/* Volumes both components mount: scratch space for the read-only root, auth, TLS
(dict "ctx" $ "component" C, like the two below). */}}
{{- define "unimodel.commonVolumes" -}}
{{- $v := .ctx.Values }}
- name: cache
  emptyDir: {}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- with $v.auth.apiKeys.existingSecret }}
- name: api-keys
  secret:
    secretName: {{ . }}
{{- end }}
{{- with $v.auth.jwtSecret.existingSecret }}
- name: jwt-secret
  secret:
    secretName: {{ . }}
{{- end }}
{{- if include "unimodel.tlsOn" . }}
- name: tls
  secret:
    secretName: {{ $v.tls.existingSecret }}
{{- end }}
{{- end }}

{{- define "unimodel.commonVolumeMounts" -}}
{{- $v := .ctx.Values }}
- name: cache
  mountPath: /var/cache/unimodel
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/unimodel
{{- if $v.auth.apiKeys.existingSecret }}
- name: api-keys
  mountPath: /etc/unimodel/auth/api-keys
  readOnly: true
{{- end }}
{{- if $v.auth.jwtSecret.existingSecret }}
- name: jwt-secret
  mountPath: /etc/unimodel/auth/jwt
  readOnly: true
{{- end }}
{{- if include "unimodel.tlsOn" . }}
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
