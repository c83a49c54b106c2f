// Package inject adds Sluice to workloads' manifests, as sluice inject
// does: the containers, volumes, labels and annotations of
// deploy/pod/pod-template.yaml, merged into every pod template of a YAML
// stream (Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs,
// CronJobs, and Lists of them). Pure: manifests in, manifests out; it keeps
// the user's comments and the order of their fields. Pod does the same to
// one Pod in JSON, answering with a JSON patch, for the webhook.
package inject

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/sluicemesh/sluice/redirect"
)

// The names inject gives Sluice's parts, which also tell an injected pod.
const (
	InitContainer    = "sluice-init"
	SidecarContainer = "sluice-proxy"
	// OptOut on a pod template, "false", leaves the workload as it is.
	OptOut = redirect.InjectAnnotation
)

// Options say what to inject.
type Options struct {
	Image string // the Sluice image; empty: the template's
	// CNI injects for a node whose sluice-cni plugin installs capture: the
	// sidecar and the annotations asking the plugin for capture, and no
	// init container or volume, so the pod needs no privilege.
	CNI bool
}

// Report says what became of each document, in order.
type Report struct {
	Kind, Name string
	// Injected is true when Sluice was added; else Skipped says why
	// (not a workload, already injected, opted out, host network).
	Injected bool
	Skipped  string
}

// parts are the Sluice pieces of the template, decoded once per run.
type parts struct {
	cni            bool
	initContainers []*yaml.Node // sluice-init (not for CNI), sluice-proxy
	volumes        []*yaml.Node
	labels         [][2]*yaml.Node // key, value
	annotations    [][2]*yaml.Node
}

// Inject reads manifests from r and writes them to w with Sluice added to
// every pod template, per the template (deploy.PodTemplate's bytes).
func Inject(r io.Reader, w io.Writer, template []byte, opts Options) ([]Report, error) {
	p, err := templateParts(template, opts)
	if err != nil {
		return nil, err
	}
	dec := yaml.NewDecoder(r)
	var docs []*yaml.Node
	var reports []Report
	for i := 1; ; i++ {
		var doc yaml.Node
		if err := dec.Decode(&doc); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		if len(doc.Content) == 0 {
			continue // an empty document between two ---
		}
		rs, err := injectObject(doc.Content[0], p)
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		docs, reports = append(docs, &doc), append(reports, rs...)
	}
	var out bytes.Buffer
	enc := yaml.NewEncoder(&out)
	enc.SetIndent(2)
	for _, doc := range docs {
		if err := enc.Encode(doc); err != nil {
			return nil, err
		}
	}
	if err := enc.Close(); err != nil {
		return nil, err
	}
	_, err = w.Write(out.Bytes())
	return reports, err
}

// podSpecPath is where each kind keeps its pod template's metadata and
// spec: a Pod at the top, a CronJob two templates down.
var podSpecPath = map[string][]string{
	"Pod":         {},
	"Deployment":  {"spec", "template"},
	"StatefulSet": {"spec", "template"},
	"DaemonSet":   {"spec", "template"},
	"ReplicaSet":  {"spec", "template"},
	"Job":         {"spec", "template"},
	"CronJob":     {"spec", "jobTemplate", "spec", "template"},
}

// injectObject injects one object (a List's items each).
func injectObject(obj *yaml.Node, p parts) ([]Report, error) {
	if obj.Kind != yaml.MappingNode {
		return nil, errors.New("not a Kubernetes object (a YAML mapping)")
	}
	kind := scalar(get(obj, "kind"))
	name := scalar(get(get(obj, "metadata"), "name"))
	if name == "" {
		name = scalar(get(get(obj, "metadata"), "generateName"))
	}
	if strings.HasSuffix(kind, "List") {
		var reports []Report
		for _, item := range items(get(obj, "items")) {
			rs, err := injectObject(item, p)
			if err != nil {
				return nil, fmt.Errorf("%s item: %w", kind, err)
			}
			reports = append(reports, rs...)
		}
		return reports, nil
	}
	path, ok := podSpecPath[kind]
	if !ok {
		return []Report{{Kind: kind, Name: name, Skipped: "not a workload"}}, nil
	}
	tmpl := obj
	for _, key := range path {
		if tmpl = get(tmpl, key); tmpl == nil {
			return nil, fmt.Errorf("%s %s has no %s", kind, name, strings.Join(path, "."))
		}
	}
	skipped, err := injectPod(tmpl, name, p)
	return []Report{{Kind: kind, Name: name, Injected: skipped == "", Skipped: skipped}}, err
}

// injectPod adds Sluice to a pod template (or a Pod): its metadata and
// spec. It returns why it did not, when it did not.
func injectPod(pod *yaml.Node, workload string, p parts) (string, error) {
	// Nothing is changed until the pod is known to be injected: one left
	// alone comes out as it went in.
	if scalar(get(get(get(pod, "metadata"), "annotations"), OptOut)) == "false" {
		return OptOut + ": \"false\"", nil
	}
	spec := get(pod, "spec")
	if spec == nil || spec.Kind != yaml.MappingNode {
		return "", errors.New("pod template has no spec")
	}
	if scalar(get(spec, "hostNetwork")) == "true" {
		// Its network namespace is the node's: capture there would
		// take every host process's connections.
		return "hostNetwork: true (capture works on a pod's own network namespace)", nil
	}
	for _, c := range append(slices.Clone(items(get(spec, "initContainers"))), items(get(spec, "containers"))...) {
		if n := scalar(get(c, "name")); n == InitContainer || n == SidecarContainer {
			return "already injected (it has " + n + ")", nil
		}
	}
	for _, v := range p.volumes {
		name := scalar(get(v, "name"))
		for _, have := range items(get(spec, "volumes")) {
			if scalar(get(have, "name")) == name {
				return "", fmt.Errorf("the pod already has a volume named %s, which Sluice's init container mounts: rename it", name)
			}
		}
	}
	// What the install will read: wrong, it would fail the pod's init
	// container or sandbox, again and again.
	ann := map[string]string{}
	for _, kv := range pairs(get(get(pod, "metadata"), "annotations"), func(string) bool { return true }) {
		ann[kv[0].Value] = kv[1].Value
	}
	if _, err := redirect.AnnotationPlan(ann); err != nil {
		return "", fmt.Errorf("%v: fix the pod's annotation", err)
	}
	meta, inits, volumes := ensureMap(pod, "metadata"), ensureSeq(spec, "initContainers"), ensureSeq(spec, "volumes")
	// Sluice's first: capture is fail-closed, so the app's own init
	// containers need the sidecar up to reach the network.
	var mine []*yaml.Node
	for _, c := range p.initContainers {
		c = deepCopy(c)
		if scalar(get(c, "name")) == InitContainer {
			setWorkloadEnv(c, workload)
		}
		mine = append(mine, c)
	}
	inits.Content = append(mine, inits.Content...)
	for _, v := range p.volumes {
		volumes.Content = append(volumes.Content, deepCopy(v))
	}
	if len(volumes.Content) == 0 {
		deleteKey(spec, "volumes")
	}
	addAbsent(ensureMap(meta, "labels"), p.labels)
	annotations := p.annotations
	if p.cni {
		annotations = append(slices.Clone(annotations),
			[2]*yaml.Node{str(redirect.CaptureAnnotation), str("true")},
			[2]*yaml.Node{str(redirect.WorkloadAnnotation), str(workload)})
	}
	addAbsent(ensureMap(meta, "annotations"), annotations)
	return "", nil
}

// setWorkloadEnv sets SLUICE_WORKLOAD, which the template gives its own
// example's name, to the workload's.
func setWorkloadEnv(container *yaml.Node, workload string) {
	for _, e := range items(get(container, "env")) {
		if scalar(get(e, "name")) == "SLUICE_WORKLOAD" {
			if v := get(e, "value"); v != nil {
				v.Value, v.Tag, v.Style = workload, "!!str", yaml.DoubleQuotedStyle
			}
		}
	}
}

// templateParts takes Sluice's parts from the template's first workload.
func templateParts(template []byte, opts Options) (parts, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(template, &doc); err != nil || len(doc.Content) == 0 {
		return parts{}, fmt.Errorf("the pod template: %v", err)
	}
	tmpl := get(get(doc.Content[0], "spec"), "template")
	spec := get(tmpl, "spec")
	p := parts{cni: opts.CNI}
	for _, c := range items(get(spec, "initContainers")) {
		if n := scalar(get(c, "name")); n == InitContainer || n == SidecarContainer {
			if opts.Image != "" {
				get(c, "image").Value = opts.Image
			}
			p.initContainers = append(p.initContainers, c)
		}
	}
	for _, v := range items(get(spec, "volumes")) {
		if slices.Contains([]string{"bpffs", "cgroup", "podinfo"}, scalar(get(v, "name"))) {
			p.volumes = append(p.volumes, v)
		}
	}
	meta := get(tmpl, "metadata")
	p.labels = pairs(get(meta, "labels"), func(k string) bool { return k == "sluice-capture" })
	p.annotations = pairs(get(meta, "annotations"), func(k string) bool { return strings.HasPrefix(k, "prometheus.io/") })
	if len(p.initContainers) != 2 || len(p.volumes) != 3 || len(p.labels) != 1 || len(p.annotations) != 3 {
		return parts{}, errors.New("the pod template lacks some of Sluice's parts (two init containers, three volumes, a label, three annotations)")
	}
	if opts.CNI {
		// The node's plugin installs capture: the pod keeps the sidecar,
		// which needs no privilege and no volume.
		p.initContainers = slices.DeleteFunc(p.initContainers, func(c *yaml.Node) bool { return scalar(get(c, "name")) == InitContainer })
		p.volumes = nil
		// The sidecar holds the pod unready (and its app unstarted)
		// while the plugin's capture does not answer.
		if args := get(p.initContainers[0], "args"); args != nil {
			args.Content = append(args.Content, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: "--require-capture", Style: args.Content[0].Style})
		}
	}
	return p, nil
}
