// Package admissiontest holds what the injector's tests share: applying
// the JSON patch an admission answer carries, and decoding the result as
// the API server would. Imported by tests only.
package admissiontest

import (
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	kjson "sigs.k8s.io/json"
)

// ApplyPatch applies a JSON patch of add and replace operations, the only
// ones inject.Pod makes, to doc.
func ApplyPatch(t testing.TB, doc, patch []byte) []byte {
	t.Helper()
	var obj map[string]any
	if err := json.Unmarshal(doc, &obj); err != nil {
		t.Fatal(err)
	}
	var ops []struct {
		Op, Path string
		Value    any
	}
	if err := json.Unmarshal(patch, &ops); err != nil {
		t.Fatalf("no JSON patch: %v\n%s", err, patch)
	}
	for _, op := range ops {
		keys := strings.Split(strings.TrimPrefix(op.Path, "/"), "/")
		parent := obj
		for _, k := range keys[:len(keys)-1] {
			if parent, _ = parent[k].(map[string]any); parent == nil {
				t.Fatalf("%s %s: no object at %s", op.Op, op.Path, k)
			}
		}
		last := keys[len(keys)-1]
		if _, ok := parent[last]; !slices.Contains([]string{"add", "replace"}, op.Op) || op.Op == "replace" && !ok {
			t.Fatalf("%s %s: want add, or replace of what is there", op.Op, op.Path)
		}
		parent[last] = op.Value
	}
	out, err := json.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// StrictPod decodes a pod as the API server's strict field validation
// would: no unknown or duplicate field, keys matched case-sensitively.
func StrictPod(t testing.TB, doc []byte) corev1.Pod {
	t.Helper()
	var pod corev1.Pod
	strict, err := kjson.UnmarshalStrict(doc, &pod, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err = errors.Join(append(strict, err)...); err != nil {
		t.Fatalf("strict decode: %v\n%s", err, doc)
	}
	return pod
}
