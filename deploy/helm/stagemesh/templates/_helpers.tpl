{{/* Names, labels and the settings every stage shares. */}}

{{- define "stagemesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "stagemesh.labels" -}}
app.kubernetes.io/name: stagemesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The labels that pick one component's pods: (dict "root" $ "component" "decode"). */}}
{{- define "stagemesh.selector" -}}
app.kubernetes.io/name: stagemesh
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Each stage: its gRPC port (the stages' own defaults), its image, whether it reads the model. */}}
{{- define "stagemesh.stages" -}}
tokenizer: {port: 50052, image: light, model: true, engine: false}
router: {port: 50051, image: light, model: false, engine: false}
kvstore: {port: 50050, image: engine, model: false, engine: false}
prefill: {port: 50053, image: engine, model: true, engine: true}
decode: {port: 50054, image: engine, model: true, engine: true}
{{- end -}}

{{/* The Secret with a role's certificate (tls.crt, tls.key, ca.crt). */}}
{{- define "stagemesh.tlsSecret" -}}
{{- if .root.Values.tls.existingSecretPrefix -}}
{{ .root.Values.tls.existingSecretPrefix }}-{{ .role }}
{{- else -}}
{{ include "stagemesh.fullname" .root }}-tls-{{ .role }}
{{- end -}}
{{- end -}}

{{- define "stagemesh.meshKeySecret" -}}
{{- .Values.meshKey.existingSecret | default (printf "%s-mesh-key" (include "stagemesh.fullname" .)) -}}
{{- end -}}

{{/* etcd's client endpoints, comma-separated host:port. */}}
{{- define "stagemesh.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $name := printf "%s-etcd" (include "stagemesh.fullname" .) -}}
{{- $members := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $members = append $members (printf "%s-%d.%s.%s.svc:2379" $name $i $name $.Release.Namespace) -}}
{{- end -}}
{{- join "," $members -}}
{{- else -}}
{{- required "etcd.endpoints: name your etcd's client endpoints, or set etcd.enabled" (join "," .Values.etcd.endpoints) -}}
{{- end -}}
{{- end -}}

{{/* The credentials and etcd every stage container gets. */}}
{{- define "stagemesh.credentialEnv" -}}
- name: STAGEMESH_ETCD
  value: {{ include "stagemesh.etcdEndpoints" . | quote }}
- name: STAGEMESH_TLS_CERT
  value: /var/run/stagemesh/tls/tls.crt
- name: STAGEMESH_TLS_KEY
  value: /var/run/stagemesh/tls/tls.key
- name: STAGEMESH_TLS_CA
  value: /var/run/stagemesh/tls/ca.crt
{{- end -}}

{{/* A role's certificate as a volume (mode 0440: the stagemesh group, fsGroup, reads it). */}}
{{- define "stagemesh.tlsVolume" -}}
- name: tls
  secret:
    secretName: {{ include "stagemesh.tlsSecret" . }}
    defaultMode: 0440
{{- end -}}

{{- define "stagemesh.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "stagemesh.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  capabilities: {drop: [ALL]}
{{- end -}}
