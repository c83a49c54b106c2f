package inject

import (
	"cmp"
	"encoding/json"
	"fmt"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Pod injects one Pod given as JSON, as an admission request holds it, for
// the webhook. It returns the change as an RFC 6902 JSON patch, or a nil
// patch and r.Skipped saying why the pod is left alone. namespace is the
// request's: a pod being created often has none in its own metadata.
func Pod(pod []byte, namespace string, template []byte, opts Options) (patch []byte, r Report, err error) {
	p, err := templateParts(template, opts)
	if err != nil {
		return nil, Report{}, err
	}
	r.Kind = "Pod"
	// yaml.v3 reads JSON too, so the pod goes through the very code sluice
	// inject runs on manifests.
	var doc yaml.Node
	if err := yaml.Unmarshal(pod, &doc); err != nil {
		return nil, r, fmt.Errorf("the pod in namespace %s is not JSON: %w", namespace, err)
	}
	if len(doc.Content) == 0 || doc.Content[0].Kind != yaml.MappingNode {
		return nil, r, fmt.Errorf("the pod in namespace %s is not a JSON object", namespace)
	}
	obj := doc.Content[0]
	meta := get(obj, "metadata")
	r.Name = cmp.Or(scalar(get(meta, "name")), scalar(get(meta, "generateName")))
	hadMeta := meta != nil && meta.Kind == yaml.MappingNode
	skipped, err := injectPod(obj, workloadName(meta), p)
	if err != nil {
		return nil, r, fmt.Errorf("pod %s/%s: %w", namespace, r.Name, err)
	}
	if skipped != "" {
		r.Skipped = skipped
		return nil, r, nil
	}
	r.Injected = true
	// The spec whole, so whatever injectPod changes there is in the
	// patch; "add" of a member the pod has replaces it (RFC 6902 4.1).
	ops := []patchOp{{Op: "replace", Path: "/spec", node: get(obj, "spec")}}
	if hadMeta {
		ops = append(ops,
			patchOp{Op: "add", Path: "/metadata/labels", node: get(meta, "labels")},
			patchOp{Op: "add", Path: "/metadata/annotations", node: get(meta, "annotations")})
	} else {
		ops = append(ops, patchOp{Op: "add", Path: "/metadata", node: get(obj, "metadata")})
	}
	for i := range ops {
		// Decoded into any, a mapping is a map[string]any and a scalar
		// keeps its YAML type: the pod's numbers stay numbers and its
		// strings (quoted in JSON) strings.
		if err := ops[i].node.Decode(&ops[i].Value); err != nil {
			return nil, r, fmt.Errorf("pod %s/%s: %s: %w", namespace, r.Name, ops[i].Path, err)
		}
	}
	if patch, err = json.Marshal(ops); err != nil {
		return nil, r, fmt.Errorf("pod %s/%s: the patch: %w", namespace, r.Name, err)
	}
	return patch, r, nil
}

// patchOp is one operation of a JSON patch, its value taken from node.
type patchOp struct {
	Op    string     `json:"op"`
	Path  string     `json:"path"`
	Value any        `json:"value"`
	node  *yaml.Node // injectPod made sure it exists
}

// workloadName names a pod's workload for its metrics and the CNI plugin:
// its owner's name. A pod a controller makes has no name yet, only the one
// it is generated from: a ReplicaSet's "web-5d9f8b7c9-" (the Deployment's
// name and its template's hash), a Job's or a DaemonSet's "web-".
func workloadName(meta *yaml.Node) string {
	labels := get(meta, "labels")
	generated := scalar(get(meta, "generateName"))
	if hash := scalar(get(labels, "pod-template-hash")); hash != "" {
		if name, ok := strings.CutSuffix(generated, "-"+hash+"-"); ok {
			generated = name
		}
	}
	return cmp.Or(strings.TrimSuffix(generated, "-"), scalar(get(meta, "name")),
		scalar(get(labels, "app.kubernetes.io/name")), scalar(get(labels, "app")))
}
