{{/* The models and adapters volumes of a pod, and their mounts in a container. */}}

{{- define "loraplex.claimName" -}}
{{- $v := index .ctx.Values .volume }}
{{- $v.existingClaim | default (printf "%s-%s" (include "loraplex.fullname" .ctx) .volume) }}
{{- end }}

{{- define "loraplex.volumes" -}}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "loraplex.claimName" (dict "ctx" . "volume" "models") }}
- name: adapters
  persistentVolumeClaim:
    claimName: {{ include "loraplex.claimName" (dict "ctx" . "volume" "adapters") }}
{{- end }}

{{/* (dict "ctx" $ "adaptersReadOnly" BOOL) */}}
{{- define "loraplex.volumeMounts" -}}
- name: models
  mountPath: {{ .ctx.Values.models.mountPath }}
- name: adapters
  mountPath: {{ .ctx.Values.adapters.mountPath }}
  readOnly: {{ .adaptersReadOnly }}
{{- end }}
