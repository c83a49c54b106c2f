package deploy

import _ "embed"

// PodTemplate is pod/pod-template.yaml: the Sluice parts of a pod (its two
// containers, volumes, labels and annotations), which sluice inject copies
// into workloads, so the injector and the documented example cannot part.
//
//go:embed pod/pod-template.yaml
var PodTemplate []byte

// WebhookConfiguration is webhook/mutatingwebhookconfiguration.yaml, which
// sluice webhook certs prints with its CA filled in.
//
//go:embed webhook/mutatingwebhookconfiguration.yaml
var WebhookConfiguration []byte
