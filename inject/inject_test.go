package inject

import (
	"bytes"
	"reflect"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/sluicemesh/sluice/deploy"
)

func run(t *testing.T, in string, opts Options) (string, []Report) {
	t.Helper()
	var out bytes.Buffer
	reports, err := Inject(strings.NewReader(in), &out, deploy.PodTemplate, opts)
	if err != nil {
		t.Fatalf("inject: %v", err)
	}
	return out.String(), reports
}

// strict decodes one document into v, refusing unknown fields, as the API
// server's strict field validation would.
func strict(t *testing.T, doc string, v any) {
	t.Helper()
	if err := yaml.UnmarshalStrict([]byte(doc), v); err != nil {
		t.Fatalf("strict decode: %v\n%s", err, doc)
	}
}

// The template's own Deployment with every Sluice part taken out, injected,
// is the template again: the injector adds exactly what the documented
// example has, from the example itself.
func TestInjectRebuildsTheTemplate(t *testing.T) {
	var want appsv1.Deployment
	strict(t, string(deploy.PodTemplate), &want)
	plain := want.DeepCopy()
	pod := &plain.Spec.Template
	pod.Spec.InitContainers = slices.DeleteFunc(pod.Spec.InitContainers, func(c corev1.Container) bool {
		return c.Name == InitContainer || c.Name == SidecarContainer
	})
	pod.Spec.Volumes = nil
	delete(pod.Labels, "sluice-capture")
	pod.Annotations = nil
	in, err := yaml.Marshal(plain)
	if err != nil {
		t.Fatal(err)
	}
	out, reports := run(t, string(in), Options{})
	if len(reports) != 1 || !reports[0].Injected || reports[0].Kind != "Deployment" || reports[0].Name != "app" {
		t.Errorf("reports %+v", reports)
	}
	var got appsv1.Deployment
	strict(t, out, &got)
	if !reflect.DeepEqual(got.Spec.Template, want.Spec.Template) {
		t.Errorf("injected pod template differs from the template's:\ngot  %+v\nwant %+v", got.Spec.Template, want.Spec.Template)
	}
}

const workloads = `# the user's comment stays
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata:
      labels: {app: db}
      annotations: {prometheus.io/port: "9187"}
    spec:
      initContainers:
        - {name: migrate, image: db:1}
      containers:
        - {name: db, image: db:1}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: report}
spec:
  schedule: "@daily"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{name: report, image: report:1}]
---
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Pod
    metadata: {name: one}
    spec:
      containers: [{name: one, image: one:1}]
  - apiVersion: apps/v1
    kind: DaemonSet
    metadata: {name: agent}
    spec:
      selector: {matchLabels: {app: agent}}
      template:
        metadata: {labels: {app: agent}}
        spec:
          hostNetwork: true
          containers: [{name: agent, image: agent:1}]
  - apiVersion: batch/v1
    kind: Job
    metadata: {name: batch}
    spec:
      template:
        metadata:
          annotations: {sluice.dev/inject: "false"}
        spec:
          restartPolicy: Never
          containers: [{name: batch, image: batch:1}]
`

// Every kind that holds a pod template is injected, the rest passes
// through; a pod on the host's network or opted out is left alone, and
// running inject on its own output changes nothing.
func TestInjectEveryKind(t *testing.T) {
	out, reports := run(t, workloads, Options{Image: "registry.example/sluice:1.2"})
	got := map[string]string{}
	for _, r := range reports {
		got[r.Kind+"/"+r.Name] = r.Skipped
		if r.Injected {
			got[r.Kind+"/"+r.Name] = "injected"
		}
	}
	want := map[string]string{
		"Service/web": "not a workload", "StatefulSet/db": "injected", "CronJob/report": "injected", "Pod/one": "injected",
		"DaemonSet/agent": "hostNetwork: true (capture works on a pod's own network namespace)",
		"Job/batch":       `sluice.dev/inject: "false"`,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("reports %v, want %v", got, want)
	}
	if strings.Contains(out, "PodMonitor") {
		t.Errorf("the template's comment on its label came along (it splits a flow mapping):\n%s", out)
	}
	if !strings.HasPrefix(out, "# the user's comment stays\n") {
		t.Errorf("the user's comment is gone:\n%s", out)
	}
	docs := strings.Split(out, "\n---\n")
	if len(docs) != 4 {
		t.Fatalf("%d documents out, want 4:\n%s", len(docs), out)
	}
	var svc corev1.Service
	strict(t, docs[0], &svc)

	var sts appsv1.StatefulSet
	strict(t, docs[1], &sts)
	spec := sts.Spec.Template.Spec
	var names []string
	for _, c := range spec.InitContainers {
		names = append(names, c.Name)
		if strings.HasPrefix(c.Name, "sluice-") && c.Image != "registry.example/sluice:1.2" {
			t.Errorf("%s runs %s, want --image's", c.Name, c.Image)
		}
	}
	if !slices.Equal(names, []string{InitContainer, SidecarContainer, "migrate"}) {
		t.Errorf("init containers %v: want Sluice's first (the app's need the sidecar up)", names)
	}
	if env := envOf(spec.InitContainers[0], "SLUICE_WORKLOAD"); env != "db" {
		t.Errorf("SLUICE_WORKLOAD = %q, want the workload's name", env)
	}
	if a := sts.Spec.Template.Annotations; a["prometheus.io/port"] != "9187" || a["prometheus.io/scrape"] != "true" {
		t.Errorf("annotations %v: the pod's own port must stay", a)
	}
	if len(spec.Volumes) != 3 || sts.Spec.Template.Labels["sluice-capture"] != "true" || sts.Spec.Template.Labels["app"] != "db" {
		t.Errorf("volumes %v, labels %v", spec.Volumes, sts.Spec.Template.Labels)
	}

	var cj batchv1.CronJob
	strict(t, docs[2], &cj)
	if n := len(cj.Spec.JobTemplate.Spec.Template.Spec.InitContainers); n != 2 {
		t.Errorf("CronJob's pod has %d init containers, want Sluice's 2", n)
	}
	var list corev1.List
	strict(t, docs[3], &list)
	var pod corev1.Pod
	strict(t, string(list.Items[0].Raw), &pod)
	if len(pod.Spec.InitContainers) != 2 || envOf(pod.Spec.InitContainers[0], "SLUICE_WORKLOAD") != "one" {
		t.Errorf("the List's Pod: %+v", pod.Spec.InitContainers)
	}
	var ds appsv1.DaemonSet
	strict(t, string(list.Items[1].Raw), &ds)
	if len(ds.Spec.Template.Spec.InitContainers) != 0 {
		t.Errorf("a hostNetwork DaemonSet got %d init containers", len(ds.Spec.Template.Spec.InitContainers))
	}

	again, reports := run(t, out, Options{Image: "registry.example/sluice:1.2"})
	if again != out {
		t.Errorf("inject of its own output changed it:\n%s\n---- was\n%s", again, out)
	}
	for _, r := range reports {
		if r.Injected {
			t.Errorf("injected %s/%s twice", r.Kind, r.Name)
		}
	}
}

func envOf(c corev1.Container, name string) string {
	for _, e := range c.Env {
		if e.Name == name {
			return e.Value
		}
	}
	return ""
}

// A pod with a volume of one of Sluice's names is refused, naming it,
// rather than given two; so is one whose sluice.dev/ annotations the
// install would refuse (a name misspelt, a value wrong), which would fail
// its init container or sandbox on every try; what is not YAML of objects
// is refused too.
func TestInjectRefuses(t *testing.T) {
	for in, want := range map[string]string{
		"kind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a, image: a}]\n  volumes: [{name: bpffs, emptyDir: {}}]\n": "already has a volume named bpffs",
		"- just\n- a list\n":                      "not a Kubernetes object",
		"kind: Deployment\nmetadata: {name: d}\n": "Deployment d has no spec.template",
		"kind: Pod\n  bad: indent\n":              "document 1",
		"kind: Pod\nmetadata:\n  name: p\n  annotations: {sluice.dev/offload-port: \"8080\"}\nspec:\n  containers: [{name: a, image: a}]\n":      "unknown annotation sluice.dev/offload-port",
		"kind: Pod\nmetadata:\n  name: p\n  annotations: {sluice.dev/kernel-only-ports: \"http\"}\nspec:\n  containers: [{name: a, image: a}]\n": "annotation sluice.dev/kernel-only-ports=\"http\"",
	} {
		var out bytes.Buffer
		if _, err := Inject(strings.NewReader(in), &out, deploy.PodTemplate, Options{}); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("inject %q: %v, want %q", in, err, want)
		}
	}
}

// For a node with the CNI plugin, a pod gets the sidecar alone, which Pod
// Security "restricted" admits, and the annotations that ask the plugin
// for capture: no init container, no volume, no privilege.
func TestInjectForCNI(t *testing.T) {
	in := "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: web, image: web:1}]\n"
	out, reports := run(t, in, Options{CNI: true})
	if len(reports) != 1 || !reports[0].Injected {
		t.Fatalf("reports %+v", reports)
	}
	var d appsv1.Deployment
	strict(t, out, &d)
	pod := d.Spec.Template
	if len(pod.Spec.InitContainers) != 1 || pod.Spec.InitContainers[0].Name != SidecarContainer || len(pod.Spec.Volumes) != 0 {
		t.Fatalf("init containers %v, volumes %v: want the sidecar alone", pod.Spec.InitContainers, pod.Spec.Volumes)
	}
	if args := pod.Spec.InitContainers[0].Args; !slices.Contains(args, "--require-capture") {
		t.Errorf("sidecar args %v: want --require-capture, so a pod the plugin missed never starts its app", args)
	}
	if pod.Annotations["sluice.dev/capture"] != "true" || pod.Annotations["sluice.dev/workload"] != "web" {
		t.Errorf("annotations %v: want the plugin asked for capture, with the workload's name", pod.Annotations)
	}
	sc := pod.Spec.InitContainers[0].SecurityContext
	restricted := sc != nil && sc.RunAsNonRoot != nil && *sc.RunAsNonRoot &&
		sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation &&
		sc.Capabilities != nil && slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) && len(sc.Capabilities.Add) == 0 &&
		sc.SeccompProfile != nil && sc.SeccompProfile.Type == corev1.SeccompProfileTypeRuntimeDefault &&
		(sc.Privileged == nil || !*sc.Privileged)
	if !restricted {
		t.Errorf("the sidecar's securityContext %+v is not what Pod Security \"restricted\" admits", sc)
	}
	if again, _ := run(t, out, Options{CNI: true}); again != out {
		t.Errorf("a second inject changed it:\n%s", again)
	}
}

// A pod left alone comes out as it went in, not with empty fields added.
func TestInjectLeavesSkippedPodsAsTheyAre(t *testing.T) {
	for _, in := range []string{
		"kind: Pod\nmetadata:\n  name: p\n  annotations: {sluice.dev/inject: \"false\"}\nspec:\n  containers: [{name: a, image: a}]\n",
		"kind: Pod\nmetadata: {name: p}\nspec:\n  hostNetwork: true\n  containers: [{name: a, image: a}]\n",
		"kind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: sluice-proxy, image: sluice}]\n",
	} {
		if out, reports := run(t, in, Options{}); out != in || reports[0].Injected {
			t.Errorf("left alone (%s), but changed:\n%s\nwas\n%s", reports[0].Skipped, out, in)
		}
	}
}
