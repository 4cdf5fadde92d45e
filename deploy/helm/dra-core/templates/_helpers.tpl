{{/*
What the chart knows of each backend: its default driver name (a test checks it against the
backend's identity), whether its agent must be privileged, the options and host mounts it
always gets, and the node labels that select its nodes by default.
*/}}
{{- define "dra-core.backends" -}}
fake:
  driverName: fake.dra-core.dev
  privileged: false
  options: {}
  hostMounts: []
  nodeLabels: []
i915:
  driverName: gpu.intel.com
  privileged: true
  # The host's sysfs and devfs at the same paths: the device paths in CDI specs are host paths,
  # and the device nodes of VFs created through sysfs appear at once.
  options:
    sysfs-root: /sys
    devfs-root: /dev
  hostMounts:
    - {name: sysfs, path: /sys}
    - {name: devfs, path: /dev}
  nodeLabels:
    - feature.node.kubernetes.io/pci-0300_8086.present
    - feature.node.kubernetes.io/pci-0380_8086.present
    - intel.feature.node.kubernetes.io/gpu
    - gpu.intel.com/dra-core
{{- end }}

{{/* The chosen backend's entry of dra-core.backends (a dict); fails for an unknown one. */}}
{{- define "dra-core.backend" -}}
{{- $all := include "dra-core.backends" . | fromYaml -}}
{{- if not (hasKey $all .Values.backend) -}}
{{- fail (printf "backend %q is not one this chart installs: %s" .Values.backend (keys $all | sortAlpha | join ", ")) -}}
{{- end -}}
{{- index $all .Values.backend | toYaml -}}
{{- end }}

{{- define "dra-core.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{/* The prefix of every object name. */}}
{{- define "dra-core.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end }}

{{- define "dra-core.driverName" -}}
{{- .Values.driverName | default (include "dra-core.backend" . | fromYaml).driverName -}}
{{- end }}

{{- define "dra-core.agentName" -}}
{{- printf "%s-agent" (include "dra-core.fullname" .) -}}
{{- end }}

{{- define "dra-core.webhookName" -}}
{{- printf "%s-webhook" (include "dra-core.fullname" .) -}}
{{- end }}

{{- define "dra-core.webhookSecretName" -}}
{{- .Values.webhook.tls.secretName | default (printf "%s-tls" (include "dra-core.webhookName" .)) -}}
{{- end }}

{{- define "dra-core.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end }}

{{/*
Labels. dra-core.selectorLabels (with a component) select pods; dra-core.labels add the ones
Helm's tooling reads, on the objects themselves only (not on pod templates, whose change would
restart pods).
*/}}
{{- define "dra-core.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dra-core.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "dra-core.labels" -}}
{{ include "dra-core.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Values.image.tag | default .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end }}

{{/* The agent's files (backendFiles, and config.yaml from backendConfig) as a YAML dict. */}}
{{- define "dra-core.agentFiles" -}}
{{- $files := deepCopy .Values.backendFiles -}}
{{- if .Values.backendConfig -}}
{{- if hasKey $files "config.yaml" -}}
{{- fail "backendFiles may not hold config.yaml when backendConfig is set: the chart writes it" -}}
{{- end -}}
{{- $_ := set $files "config.yaml" (dict "backend" .Values.backendConfig | toYaml) -}}
{{- end -}}
{{- /* The newline keeps a file's last one through fromYaml. */ -}}
{{- printf "%s\n" (toYaml $files) -}}
{{- end }}

{{/*
The feature gates a DeviceClass of the backend may need (its annotation
dra-core.dev/feature-gates, written by `dra-core render` from the fields its CEL uses) and the
first Kubernetes release with each on by default. A test checks the chart against `dra-core
render --kubernetes-version` for every supported release.
*/}}
{{- define "dra-core.gatesOnByDefaultFrom" -}}
DRAConsumableCapacity: "1.36.0-0"
{{- end }}

{{/*
The backend's DeviceClasses split by whether the cluster's API server accepts them, as YAML:
classes (the documents to install, for the chosen driver name) and leftOut (class name: the
gates it needs that are off). A gate is on when deviceClasses.featureGates says so, else when
the cluster's release (.Capabilities.KubeVersion) has it on by default.
*/}}
{{- define "dra-core.deviceClassPlan" -}}
{{- $file := printf "files/deviceclasses-%s.yaml" .Values.backend }}
{{- $text := .Files.Get $file }}
{{- if not $text }}
{{- fail (printf "the chart has no %s: generate it with `dra-core render --backend %s`" $file .Values.backend) }}
{{- end }}
{{- $default := (include "dra-core.backend" . | fromYaml).driverName }}
{{- $driver := include "dra-core.driverName" . }}
{{- $since := include "dra-core.gatesOnByDefaultFrom" . | fromYaml }}
{{- $set := .Values.deviceClasses.featureGates | default dict }}
{{- $kube := .Capabilities.KubeVersion.Version }}
{{- $classes := list }}
{{- $leftOut := dict }}
{{- range $doc := splitList "\n---\n" $text }}
{{- $class := fromYaml $doc }}
{{- $annotations := $class.metadata.annotations | default dict }}
{{- $off := list }}
{{- range $gate := compact (splitList "," (get $annotations "dra-core.dev/feature-gates")) }}
{{- $on := false }}
{{- if hasKey $set $gate }}
{{- $on = index $set $gate }}
{{- else if hasKey $since $gate }}
{{- $on = semverCompare (printf ">=%s" (index $since $gate)) $kube }}
{{- else }}
{{- fail (printf "DeviceClass %s needs the feature gate %s, which the chart does not know: set deviceClasses.featureGates.%s" $class.metadata.name $gate $gate) }}
{{- end }}
{{- if not $on }}
{{- $off = append $off $gate }}
{{- end }}
{{- end }}
{{- /* The file is rendered for the backend's own driver name; with another one every
       occurrence is that name instead, as `dra-core render --driver-name` prints it. */}}
{{- $name := replace $default $driver $class.metadata.name }}
{{- if $off }}
{{- $_ := set $leftOut $name (join ", " $off) }}
{{- else }}
{{- $classes = append $classes (replace $default $driver $doc) }}
{{- end }}
{{- end }}
{{- dict "classes" $classes "leftOut" $leftOut | toYaml }}
{{- end }}
