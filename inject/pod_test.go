package inject

import (
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
	corev1 "k8s.io/api/core/v1"

	"github.com/sluicemesh/sluice/deploy"
	"github.com/sluicemesh/sluice/internal/admissiontest"
)

// deploymentPod is a pod as a Deployment's ReplicaSet asks the API server
// to create it: no name yet, a generateName with the template's hash, and
// an app that Pod Security "restricted" admits.
const deploymentPod = `{
  "apiVersion": "v1", "kind": "Pod",
  "metadata": {
    "generateName": "web-5d9f8b7c9-", "namespace": "shop",
    "labels": {"app": "web", "pod-template-hash": "5d9f8b7c9"},
    "annotations": {"prometheus.io/port": "9000"},
    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d9f8b7c9", "uid": "6b1e6c39-8f7e-4a43-9b5e-3c0f3b0f1a2d", "controller": true, "blockOwnerDeletion": true}]
  },
  "spec": {
    "initContainers": [{"name": "migrate", "image": "web:1", "command": ["/migrate"]}],
    "containers": [{
      "name": "web", "image": "registry.example/web:1",
      "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
      "env": [{"name": "WORKERS", "value": "4"}, {"name": "DEBUG", "value": "true"}],
      "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
      "securityContext": {
        "runAsNonRoot": true, "runAsUser": 1000, "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}
      }
    }],
    "volumes": [{"name": "cache", "emptyDir": {}}],
    "terminationGracePeriodSeconds": 30,
    "restartPolicy": "Always"
  }
}`

func names(cs []corev1.Container) []string {
	var out []string
	for _, c := range cs {
		out = append(out, c.Name)
	}
	return out
}

// A pod a Deployment makes gets a patch that, applied, is that pod with
// Sluice's parts, named after the Deployment; the app's own fields come
// through the patch with their types.
func TestPodPatch(t *testing.T) {
	for _, cni := range []bool{false, true} {
		patch, r, err := Pod([]byte(deploymentPod), "shop", deploy.PodTemplate, Options{CNI: cni})
		if err != nil || !r.Injected || r.Kind != "Pod" || r.Name != "web-5d9f8b7c9-" || patch == nil {
			t.Fatalf("cni %t: report %+v, patch %s, error %v", cni, r, patch, err)
		}
		pod := admissiontest.StrictPod(t, admissiontest.ApplyPatch(t, []byte(deploymentPod), patch))
		spec := pod.Spec
		wantInits := []string{InitContainer, SidecarContainer, "migrate"}
		wantVolumes := 4
		if cni {
			wantInits, wantVolumes = []string{SidecarContainer, "migrate"}, 1
		}
		if got := names(spec.InitContainers); !slices.Equal(got, wantInits) {
			t.Errorf("cni %t: init containers %v, want %v", cni, got, wantInits)
		}
		if len(spec.Volumes) != wantVolumes || spec.Volumes[0].Name != "cache" {
			t.Errorf("cni %t: volumes %v, want the pod's own first and %d in all", cni, spec.Volumes, wantVolumes)
		}
		a := pod.Annotations
		if cni && (a["sluice.dev/workload"] != "web" || a["sluice.dev/capture"] != "true") {
			t.Errorf("annotations %v: want capture asked of the plugin for workload web", a)
		}
		if !cni && envOf(spec.InitContainers[0], "SLUICE_WORKLOAD") != "web" {
			t.Errorf("SLUICE_WORKLOAD = %q, want web", envOf(spec.InitContainers[0], "SLUICE_WORKLOAD"))
		}
		if a["prometheus.io/port"] != "9000" || pod.Labels["sluice-capture"] != "true" || pod.Labels["pod-template-hash"] != "5d9f8b7c9" {
			t.Errorf("annotations %v, labels %v: want Sluice's added and the pod's own kept", a, pod.Labels)
		}
		app := spec.Containers[0]
		if app.Ports[0].ContainerPort != 8080 || *app.SecurityContext.RunAsUser != 1000 || envOf(app, "WORKERS") != "4" ||
			*spec.TerminationGracePeriodSeconds != 30 || pod.OwnerReferences[0].Name != "web-5d9f8b7c9" {
			t.Errorf("the app's fields changed: %+v", app)
		}
	}
}

// A pod opted out, one already injected and one on the host's network get
// no patch, and the report says why.
func TestPodSkipped(t *testing.T) {
	for want, pod := range map[string]string{
		`sluice.dev/inject: "false"`: `{"metadata": {"name": "p", "annotations": {"sluice.dev/inject": "false"}}, "spec": {"containers": [{"name": "a", "image": "a"}]}}`,
		"already injected":           `{"metadata": {"name": "p"}, "spec": {"initContainers": [{"name": "sluice-proxy", "image": "s"}], "containers": [{"name": "a", "image": "a"}]}}`,
		"hostNetwork: true":          `{"metadata": {"name": "p"}, "spec": {"hostNetwork": true, "containers": [{"name": "a", "image": "a"}]}}`,
	} {
		patch, r, err := Pod([]byte(pod), "shop", deploy.PodTemplate, Options{CNI: true})
		if err != nil || patch != nil || r.Injected || !strings.Contains(r.Skipped, want) {
			t.Errorf("%s: patch %s, report %+v, error %v: want no patch, skipped %q", pod, patch, r, err, want)
		}
	}
}

// A pod with a volume of one of Sluice's names, or that is not a JSON
// object, is an error that names it.
func TestPodRefused(t *testing.T) {
	for pod, want := range map[string]string{
		`{"metadata": {"generateName": "db-"}, "spec": {"containers": [{"name": "a", "image": "a"}], "volumes": [{"name": "bpffs", "emptyDir": {}}]}}`: "pod shop/db-: the pod already has a volume named bpffs",
		`["a", "list"]`:               "not a JSON object",
		`{"spec": `:                   "not JSON",
		`{"metadata": {"name": "p"}}`: "pod template has no spec",
	} {
		if patch, _, err := Pod([]byte(pod), "shop", deploy.PodTemplate, Options{}); err == nil || patch != nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", pod, err, want)
		}
	}
}

// A pod without metadata gets it whole.
func TestPodWithoutMetadata(t *testing.T) {
	pod := `{"spec": {"containers": [{"name": "a", "image": "a"}]}}`
	patch, r, err := Pod([]byte(pod), "shop", deploy.PodTemplate, Options{CNI: true})
	if err != nil || !r.Injected {
		t.Fatalf("report %+v, error %v", r, err)
	}
	if got := admissiontest.StrictPod(t, admissiontest.ApplyPatch(t, []byte(pod), patch)); got.Labels["sluice-capture"] != "true" {
		t.Errorf("labels %v", got.Labels)
	}
}

// A pod's workload is its owner: the name it is generated from, less a
// ReplicaSet's template hash; else its own name or app label.
func TestWorkloadName(t *testing.T) {
	for meta, want := range map[string]string{
		`{generateName: web-5d9f8b7c9-, labels: {pod-template-hash: 5d9f8b7c9}}`: "web",
		`{generateName: web-5d9f8b7c9-, labels: {pod-template-hash: other}}`:     "web-5d9f8b7c9",
		`{generateName: agent-}`:                            "agent",
		`{name: db-0, labels: {app: db}}`:                   "db-0",
		`{labels: {app.kubernetes.io/name: api, app: web}}`: "api",
		`{labels: {app: web}}`:                              "web",
		`{}`:                                                "",
	} {
		var doc yaml.Node
		if err := yaml.Unmarshal([]byte(meta), &doc); err != nil {
			t.Fatal(err)
		}
		if got := workloadName(doc.Content[0]); got != want {
			t.Errorf("%s: workload %q, want %q", meta, got, want)
		}
	}
}
