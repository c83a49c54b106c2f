package deploy

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// sluiceImage is the image every Sluice container runs.
const sluiceImage = "sluice:dev"

// wantCaps is every Sluice container's capability set, by container name: the
// table in README.md must say the same.
var wantCaps = map[string][]string{
	"sluice-init":  {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "CHOWN", "FOWNER", "DAC_OVERRIDE", "SETUID", "SETGID"},
	"istio-init":   {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "CHOWN", "FOWNER", "DAC_OVERRIDE"},
	"linkerd-init": {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "CHOWN", "FOWNER", "DAC_OVERRIDE"},
	"sluice-proxy": nil,
	"agent":        {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"},
	"webhook":      nil,
}

// nonRootContainers run as a uid other than root: the sidecar as the proxy
// uid, the injector as nobody's.
var nonRootContainers = []string{"sluice-proxy", "webhook"}

// identityEnv are the variables an init container records as who the pod
// is (install's --workload, --namespace, --app, --version default to
// them), for the node agent's metrics of the pod's flows. The sidecar reads
// none of them: set there, they would silently do nothing.
var identityEnv = []string{"SLUICE_WORKLOAD", "POD_NAMESPACE", "SLUICE_APP", "SLUICE_VERSION"}

// initContainers are the containers that install capture, and so record
// the pod's identity.
var initContainers = []string{"sluice-init", "istio-init", "linkerd-init"}

// hostPIDContainers may run in a pod with the host's PID namespace: the
// agent finds a pod's process through its cgroup.procs (host pids) to read
// its sockets in its network namespace.
var hostPIDContainers = []string{"agent"}

// wantCommands are the Sluice containers' command lines. The drop-ins' are
// the injectors' own argument lists: that is what makes them drop-ins.
var wantCommands = map[string][]string{
	"sluice-init":  {"/sluice", "install", "--validate", "--annotations", "/etc/podinfo/annotations"},
	"istio-init":   {"/sluice", "istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"},
	"linkerd-init": {"/sluice", "proxy-init", "--incoming-proxy-port", "4143", "--outgoing-proxy-port", "4140", "--proxy-uid", "2102", "--inbound-ports-to-ignore", "4190,4191,4567,4568", "--outbound-ports-to-ignore", "4567,4568"},
	"sluice-proxy": {"/sluice", "run", "--metrics-addr", ":15090", "--log-format", "json"},
	"agent":        {"/sluice", "agent", "--metrics-addr", ":9102", "--pin-root", "/sys/fs/bpf/sluice", "--gc-interval", "30s", "--kubernetes"},
	"webhook":      {"/sluice", "webhook", "--addr", ":9443", "--tls-dir", "/tls", "--cni"},
}

// cniFlags are what deploy/cni/ adds to the agent's command line: the
// host's CNI directories, mounted at these paths.
var cniFlags = []string{"--cni-bin-dir", "/host/opt/cni/bin", "--cni-conf-dir", "/host/etc/cni/net.d"}

// hostPaths are the only host directories a pod may mount.
var hostPaths = []string{"/sys/fs/bpf", "/sys/fs/cgroup"}

// doc is one YAML document of one file under deploy/.
type doc struct {
	file string // relative to deploy/
	n    int    // 1-based position in the file
	body []byte
}

func (d doc) String() string { return fmt.Sprintf("%s (document %d)", d.file, d.n) }

// manifests is every decoded document, by type.
type manifests struct {
	deployments     map[string]*appsv1.Deployment // by file
	daemonSets      []*appsv1.DaemonSet
	services        []*corev1.Service
	configMaps      []*corev1.ConfigMap
	serviceMonitors []*serviceMonitor
	podMonitors     []*podMonitor
	kustomizations  map[string]*kustomization // by directory
	webhookConfigs  []*admissionv1.MutatingWebhookConfiguration
	clusterRoles    []*rbacv1.ClusterRole
	scrape          *scrapeConfig
	rules           *ruleFile
}

// Every YAML file under deploy/ decodes strictly (no unknown or duplicate
// field, keys matched case-sensitively, as the API server's strict field
// validation does) into the type its apiVersion and kind name, or, for the
// files that are no Kubernetes objects, into their own shape.
func TestManifestsDecodeStrictly(t *testing.T) {
	m := load(t, ".")
	if len(m.deployments) != 5 || len(m.daemonSets) != 1 || len(m.kustomizations) != 6 || m.scrape == nil || m.rules == nil ||
		len(m.serviceMonitors) != 1 || len(m.podMonitors) != 1 || len(m.services) != 2 || len(m.webhookConfigs) != 1 {
		t.Errorf("decoded %d Deployments, %d DaemonSets, %d Services, %d ServiceMonitors, %d PodMonitors, %d kustomizations, %d MutatingWebhookConfigurations; scrape config %t, rules %t: a manifest went missing",
			len(m.deployments), len(m.daemonSets), len(m.services), len(m.serviceMonitors), len(m.podMonitors), len(m.kustomizations), len(m.webhookConfigs), m.scrape != nil, m.rules != nil)
	}
}

func load(t *testing.T, root string) manifests {
	t.Helper()
	docs, err := readDocs(root)
	if err != nil {
		t.Fatal(err)
	}
	m := manifests{deployments: map[string]*appsv1.Deployment{}, kustomizations: map[string]*kustomization{}}
	for _, d := range docs {
		if err := m.add(d); err != nil {
			t.Errorf("%s: %v", d, err)
		}
	}
	return m
}

// readDocs splits every *.yaml under root into its documents, leaving out
// those that hold only comments.
func readDocs(root string) ([]doc, error) {
	var docs []doc
	sep := regexp.MustCompile(`(?m)^---[ \t]*$`)
	err := filepath.WalkDir(root, func(path string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() || !strings.HasSuffix(path, ".yaml") {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		for i, part := range sep.Split(string(data), -1) {
			if onlyComments(part) {
				continue
			}
			docs = append(docs, doc{file: filepath.ToSlash(rel), n: i + 1, body: []byte(part)})
		}
		return nil
	})
	return docs, err
}

func onlyComments(s string) bool {
	for _, line := range strings.Split(s, "\n") {
		if l := strings.TrimSpace(line); l != "" && !strings.HasPrefix(l, "#") {
			return false
		}
	}
	return true
}

// decodeStrict decodes a YAML document into v and fails on anything v has no
// field for.
func decodeStrict(body []byte, v any) error {
	j, err := yaml.YAMLToJSONStrict(body)
	if err != nil {
		return err
	}
	strict, err := kjson.UnmarshalStrict(j, v, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err != nil {
		return err
	}
	return errors.Join(strict...)
}

func (m *manifests) add(d doc) error {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(d.body, &tm); err != nil {
		return err
	}
	switch gvk := tm.APIVersion + " " + tm.Kind; gvk {
	case "apps/v1 Deployment":
		var list []*appsv1.Deployment
		if err := decodeAppend(d, &list); err != nil {
			return err
		}
		if _, dup := m.deployments[d.file]; dup {
			return errors.New("a second Deployment in one file: one per file")
		}
		m.deployments[d.file] = list[0]
		return nil
	case "apps/v1 DaemonSet":
		return decodeAppend(d, &m.daemonSets)
	case "v1 Service":
		return decodeAppend(d, &m.services)
	case "v1 ConfigMap":
		return decodeAppend(d, &m.configMaps)
	case "v1 Namespace":
		return decodeStrict(d.body, new(corev1.Namespace))
	case "v1 ServiceAccount":
		return decodeStrict(d.body, new(corev1.ServiceAccount))
	case "rbac.authorization.k8s.io/v1 ClusterRole":
		return decodeAppend(d, &m.clusterRoles)
	case "rbac.authorization.k8s.io/v1 ClusterRoleBinding":
		return decodeStrict(d.body, new(rbacv1.ClusterRoleBinding))
	case "monitoring.coreos.com/v1 ServiceMonitor":
		return decodeAppend(d, &m.serviceMonitors)
	case "monitoring.coreos.com/v1 PodMonitor":
		return decodeAppend(d, &m.podMonitors)
	case "kustomize.config.k8s.io/v1beta1 Kustomization":
		k := new(kustomization)
		m.kustomizations[filepath.Dir(d.file)] = k
		return decodeStrict(d.body, k)
	case "admissionregistration.k8s.io/v1 MutatingWebhookConfiguration":
		return decodeAppend(d, &m.webhookConfigs)
	case " ":
		// No Kubernetes objects: known by where they are.
		switch d.file {
		case "prometheus/scrape-config.yaml":
			m.scrape = new(scrapeConfig)
			return decodeStrict(d.body, m.scrape)
		case "prometheus/recording-rules.yaml":
			m.rules = new(ruleFile)
			return decodeStrict(d.body, m.rules)
		}
		return errors.New("no apiVersion and kind, and not a file this test knows: teach manifests.add its type")
	default:
		return fmt.Errorf("%s: a kind this test does not know: teach manifests.add its type", gvk)
	}
}

func decodeAppend[T any](d doc, list *[]*T) error {
	v := new(T)
	if err := decodeStrict(d.body, v); err != nil {
		return err
	}
	*list = append(*list, v)
	return nil
}

// Local shapes of what k8s.io/api has no type for; only the fields the
// manifests use, so a typo is an unknown field.
type (
	labelSelector = metav1.LabelSelector
	relabeling    struct {
		SourceLabels []string `json:"sourceLabels,omitempty"`
		TargetLabel  string   `json:"targetLabel,omitempty"`
	}
	endpoint struct {
		Port        string       `json:"port"`
		Path        string       `json:"path,omitempty"`
		Interval    string       `json:"interval,omitempty"`
		Relabelings []relabeling `json:"relabelings,omitempty"`
	}
	namespaceSelector struct {
		Any        bool     `json:"any,omitempty"`
		MatchNames []string `json:"matchNames,omitempty"`
	}
	// monitor is a Prometheus Operator object: ServiceMonitor or PodMonitor.
	monitor[S any] struct {
		metav1.TypeMeta `json:",inline"`
		Metadata        metav1.ObjectMeta `json:"metadata"`
		Spec            S                 `json:"spec"`
	}
	serviceMonitor = monitor[struct {
		Selector          labelSelector     `json:"selector"`
		NamespaceSelector namespaceSelector `json:"namespaceSelector"`
		Endpoints         []endpoint        `json:"endpoints"`
	}]
	podMonitor = monitor[struct {
		Selector            labelSelector     `json:"selector"`
		NamespaceSelector   namespaceSelector `json:"namespaceSelector"`
		PodTargetLabels     []string          `json:"podTargetLabels,omitempty"`
		PodMetricsEndpoints []endpoint        `json:"podMetricsEndpoints"`
	}]
	kustomization struct {
		metav1.TypeMeta  `json:",inline"`
		Resources        []string `json:"resources,omitempty"`
		GeneratorOptions struct {
			DisableNameSuffixHash bool `json:"disableNameSuffixHash"`
		} `json:"generatorOptions"`
		Patches []struct {
			Target struct {
				Kind string `json:"kind"`
				Name string `json:"name"`
			} `json:"target"`
			Patch string `json:"patch"`
		} `json:"patches,omitempty"`
		ConfigMapGenerator []struct {
			Name      string   `json:"name"`
			Namespace string   `json:"namespace"`
			Files     []string `json:"files"`
			Options   struct {
				Labels map[string]string `json:"labels,omitempty"`
			} `json:"options"`
		} `json:"configMapGenerator"`
	}
	promRelabel struct {
		SourceLabels []string `json:"source_labels,omitempty"`
		Action       string   `json:"action,omitempty"`
		Regex        string   `json:"regex,omitempty"`
		Replacement  string   `json:"replacement,omitempty"`
		TargetLabel  string   `json:"target_label,omitempty"`
	}
	scrapeConfig struct {
		ScrapeConfigs []struct {
			JobName             string `json:"job_name"`
			KubernetesSDConfigs []struct {
				Role       string `json:"role"`
				Namespaces *struct {
					Names []string `json:"names"`
				} `json:"namespaces,omitempty"`
			} `json:"kubernetes_sd_configs"`
			RelabelConfigs []promRelabel `json:"relabel_configs"`
		} `json:"scrape_configs"`
	}
	ruleFile struct {
		Groups []struct {
			Name  string `json:"name"`
			Rules []struct {
				Record string            `json:"record"`
				Expr   string            `json:"expr"`
				Labels map[string]string `json:"labels,omitempty"`
			} `json:"rules"`
		} `json:"groups"`
	}
)

// podSpecs is every pod template, named by its file and workload.
func (m manifests) podSpecs() map[string]*corev1.PodTemplateSpec {
	specs := map[string]*corev1.PodTemplateSpec{}
	for file, d := range m.deployments {
		specs[file+": "+d.Name] = &d.Spec.Template
	}
	for _, d := range m.daemonSets {
		specs["agent/daemonset.yaml: "+d.Name] = &d.Spec.Template
	}
	return specs
}

// Every Sluice container drops every capability and adds exactly its own,
// is never privileged, never escalates, runs the image and command it should;
// the pods mount no host path but /sys/fs/bpf and /sys/fs/cgroup, the cgroup
// tree read-only, share neither the host's network nor IPC namespace, and
// only the agent's shares its PID namespace (which it needs); every volume
// is mounted by some container.
func TestPrivileges(t *testing.T) {
	m := load(t, ".")
	seen := map[string]bool{}
	for name, tmpl := range m.podSpecs() {
		spec := tmpl.Spec
		if spec.HostNetwork || spec.HostIPC {
			t.Errorf("%s: shares the host's network or IPC namespace", name)
		}
		all := slices.Concat(spec.InitContainers, spec.Containers)
		needsHostPID := slices.ContainsFunc(all, func(c corev1.Container) bool {
			return c.Image == sluiceImage && slices.Contains(hostPIDContainers, c.Name)
		})
		if spec.HostPID != needsHostPID {
			t.Errorf("%s: hostPID %t, want %t: only %v need the host's pids (a pod's cgroup.procs), and the agent does for its pods' open flows",
				name, spec.HostPID, needsHostPID, hostPIDContainers)
		}
		mounted := map[string]bool{}
		for _, c := range all {
			for _, vm := range c.VolumeMounts {
				mounted[vm.Name] = true
			}
		}
		for _, v := range spec.Volumes {
			if !mounted[v.Name] {
				t.Errorf("%s: volume %s is mounted by no container", name, v.Name)
			}
		}
		volumes := map[string]corev1.Volume{}
		for _, v := range spec.Volumes {
			volumes[v.Name] = v
			if v.HostPath == nil {
				continue
			}
			if !slices.Contains(hostPaths, v.HostPath.Path) {
				t.Errorf("%s: volume %s mounts host path %s, want only %v", name, v.Name, v.HostPath.Path, hostPaths)
			}
			if v.HostPath.Type == nil || *v.HostPath.Type != corev1.HostPathDirectory {
				t.Errorf("%s: host path %s has type %v, want Directory (never created by the kubelet)", name, v.HostPath.Path, v.HostPath.Type)
			}
		}
		for _, c := range slices.Concat(spec.InitContainers, spec.Containers) {
			for _, vm := range c.VolumeMounts {
				checkMount(t, name, c, vm, volumes[vm.Name])
			}
			if c.Image != sluiceImage && strings.Contains(c.Image, "sluice") {
				t.Errorf("%s: container %s runs %s, want %s", name, c.Name, c.Image, sluiceImage)
			}
			if c.Image != sluiceImage {
				continue
			}
			seen[c.Name] = true
			checkSluiceContainer(t, name, c, volumes)
		}
	}
	for c := range wantCaps {
		if !seen[c] {
			t.Errorf("no container %s in any manifest", c)
		}
	}
}

func checkMount(t *testing.T, pod string, c corev1.Container, vm corev1.VolumeMount, v corev1.Volume) {
	t.Helper()
	if v.HostPath == nil {
		return
	}
	if vm.MountPropagation != nil && *vm.MountPropagation == corev1.MountPropagationBidirectional {
		t.Errorf("%s: %s mounts %s with Bidirectional propagation, which needs a privileged container", pod, c.Name, v.HostPath.Path)
	}
	if v.HostPath.Path == "/sys/fs/cgroup" && !vm.ReadOnly {
		t.Errorf("%s: %s mounts the host's cgroup tree writable: Sluice only reads it", pod, c.Name)
	}
	if c.Image != sluiceImage {
		t.Errorf("%s: container %s (%s) mounts host path %s: only Sluice's containers may", pod, c.Name, c.Image, v.HostPath.Path)
	}
}

func checkSluiceContainer(t *testing.T, pod string, c corev1.Container, volumes map[string]corev1.Volume) {
	t.Helper()
	where := pod + ": container " + c.Name
	want, ok := wantCaps[c.Name]
	if !ok {
		t.Errorf("%s: a Sluice container this test does not know: add it to wantCaps and the README's table", where)
		return
	}
	if got := slices.Concat(c.Command, c.Args); !slices.Equal(got, wantCommands[c.Name]) {
		t.Errorf("%s: command %q, want %q", where, got, wantCommands[c.Name])
	}
	if c.ImagePullPolicy != corev1.PullIfNotPresent {
		t.Errorf("%s: imagePullPolicy %q, want IfNotPresent", where, c.ImagePullPolicy)
	}
	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Errorf("%s: no securityContext with capabilities", where)
		return
	}
	if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("%s: drops %v, want [ALL]", where, sc.Capabilities.Drop)
	}
	var added []string
	for _, c := range sc.Capabilities.Add {
		added = append(added, string(c))
	}
	if !slices.Equal(sorted(added), sorted(want)) {
		t.Errorf("%s: adds %v, want exactly %v", where, added, want)
	}
	if sc.Privileged == nil || *sc.Privileged {
		t.Errorf("%s: privileged must be set, to false", where)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("%s: allowPrivilegeEscalation must be set, to false", where)
	}
	if c.Name == "sluice-proxy" {
		checkSidecar(t, where, c, volumes)
	}
	if slices.Contains(initContainers, c.Name) {
		checkIdentityEnv(t, where, c)
	}
}

// Each init container records who the pod is from its environment: the
// namespace and the app and version labels through the downward API, the
// workload by name.
func checkIdentityEnv(t *testing.T, where string, c corev1.Container) {
	t.Helper()
	env := map[string]corev1.EnvVar{}
	for _, e := range c.Env {
		env[e.Name] = e
	}
	for _, name := range identityEnv {
		if _, ok := env[name]; !ok {
			t.Errorf("%s: no env %s: install records who the pod is from it, for the agent's metrics of its flows", where, name)
		}
	}
	for name, field := range map[string]string{"POD_NAMESPACE": "metadata.namespace", "SLUICE_APP": "metadata.labels['app']", "SLUICE_VERSION": "metadata.labels['version']"} {
		e, ok := env[name]
		if ok && (e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != field) {
			t.Errorf("%s: env %s is not the downward API's %s", where, name, field)
		}
	}
	if e, ok := env["SLUICE_WORKLOAD"]; ok && e.Value == "" {
		t.Errorf("%s: env SLUICE_WORKLOAD has no value", where)
	}
}

// The sidecar runs as the proxy uid/gid 1337, non-root, on a read-only root
// file system, as a native sidecar, and mounts nothing of the host: it opens
// no pin (the pod's hooks answer its questions) and the pod's flows are the
// agent's. Nor does it carry the pod's identity, which it no longer reads.
func checkSidecar(t *testing.T, where string, c corev1.Container, volumes map[string]corev1.Volume) {
	t.Helper()
	sc := c.SecurityContext
	if ptr(sc.RunAsUser) != 1337 || ptr(sc.RunAsGroup) != 1337 || !ptr(sc.RunAsNonRoot) || !ptr(sc.ReadOnlyRootFilesystem) {
		t.Errorf("%s: runAsUser %d, runAsGroup %d, runAsNonRoot %t, readOnlyRootFilesystem %t; want 1337, 1337, true, true",
			where, ptr(sc.RunAsUser), ptr(sc.RunAsGroup), ptr(sc.RunAsNonRoot), ptr(sc.ReadOnlyRootFilesystem))
	}
	if c.RestartPolicy == nil || *c.RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Errorf("%s: want a native sidecar (restartPolicy: Always), so it listens before the app starts", where)
	}
	for _, vm := range c.VolumeMounts {
		if v := volumes[vm.Name]; v.HostPath != nil || v.EmptyDir != nil {
			t.Errorf("%s: mounts %s at %s: the sidecar needs no host path, nor the emptyDir that held a bpffs mount point", where, vm.Name, vm.MountPath)
		}
	}
	for _, e := range c.Env {
		if slices.Contains(identityEnv, e.Name) || strings.HasPrefix(e.Name, "SLUICE_") || strings.HasPrefix(e.Name, "ISTIO_META_") {
			t.Errorf("%s: env %s: the sidecar reads no identity; set it on the init container, which records it for the agent", where, e.Name)
		}
	}
}

// The root containers run as root because install and the agent need it,
// and so say it explicitly.
func TestRootContainersSayRoot(t *testing.T) {
	m := load(t, ".")
	for name, tmpl := range m.podSpecs() {
		for _, c := range slices.Concat(tmpl.Spec.InitContainers, tmpl.Spec.Containers) {
			if c.Image != sluiceImage || slices.Contains(nonRootContainers, c.Name) || c.SecurityContext == nil {
				continue
			}
			if ptr(c.SecurityContext.RunAsUser) != 0 || c.SecurityContext.RunAsUser == nil || ptr(c.SecurityContext.RunAsNonRoot) {
				t.Errorf("%s: %s must say runAsUser: 0 and runAsNonRoot: false", name, c.Name)
			}
		}
	}
}

func ptr[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

// The init container comes first and the sidecar right after it: capture is
// fail-closed, so the sidecar must listen before the app starts.
func TestPodTemplateOrder(t *testing.T) {
	m := load(t, ".")
	d := m.deployments["pod/pod-template.yaml"]
	if d == nil {
		t.Fatal("no Deployment in pod/pod-template.yaml")
	}
	var names []string
	for _, c := range d.Spec.Template.Spec.InitContainers {
		names = append(names, c.Name)
	}
	if !slices.Equal(names, []string{"sluice-init", "sluice-proxy"}) {
		t.Errorf("init containers %v, want [sluice-init sluice-proxy]", names)
	}
}

// The monitoring objects find what they are meant to: the Service selects
// the agent's pods and names its port, the ServiceMonitor selects the
// Service, the PodMonitor and the scrape annotations the sidecar's port, the
// agent's annotations its metrics port (it has every pod's flows), the
// scrape config's agent job keeps the agent's endpoints, and its sidecars
// job scrapes the example pod's sidecar and leaves the agent to the agent
// job (no agent scraped twice).
func TestMonitoringWiring(t *testing.T) {
	m := load(t, ".")
	i := slices.IndexFunc(m.services, func(s *corev1.Service) bool { return s.Name == "sluice-agent" })
	if len(m.daemonSets) != 1 || i < 0 || len(m.serviceMonitors) != 1 || len(m.podMonitors) != 1 || m.scrape == nil {
		t.Fatal("manifests missing: see TestManifestsDecodeStrictly")
	}
	ds, svc := m.daemonSets[0], m.services[i]
	if !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(ds.Spec.Template.Labels)) {
		t.Errorf("Service %s selects %v, not the agent's pods %v", svc.Name, svc.Spec.Selector, ds.Spec.Template.Labels)
	}
	if svc.Spec.ClusterIP != corev1.ClusterIPNone {
		t.Errorf("Service %s: clusterIP %q, want None (headless: one target per agent)", svc.Name, svc.Spec.ClusterIP)
	}
	for _, p := range svc.Spec.Ports {
		if !hasPort(ds.Spec.Template.Spec.Containers, p.TargetPort.String(), p.Port) {
			t.Errorf("Service %s: port %s targets %s, which no agent container has", svc.Name, p.Name, p.TargetPort.String())
		}
	}

	sm := m.serviceMonitors[0]
	if !matches(t, sm.Spec.Selector, svc.Labels) || !slices.Contains(sm.Spec.NamespaceSelector.MatchNames, svc.Namespace) {
		t.Errorf("ServiceMonitor %s does not select Service %s/%s", sm.Metadata.Name, svc.Namespace, svc.Name)
	}
	for _, e := range sm.Spec.Endpoints {
		if !slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == e.Port }) {
			t.Errorf("ServiceMonitor %s: port %s is not a port of Service %s", sm.Metadata.Name, e.Port, svc.Name)
		}
	}

	tmpl := m.deployments["pod/pod-template.yaml"].Spec.Template
	all := slices.Concat(tmpl.Spec.InitContainers, tmpl.Spec.Containers)
	pm := m.podMonitors[0]
	if !matches(t, pm.Spec.Selector, tmpl.Labels) || !pm.Spec.NamespaceSelector.Any {
		t.Errorf("PodMonitor %s does not select the example pod (labels %v) in any namespace", pm.Metadata.Name, tmpl.Labels)
	}
	for _, e := range pm.Spec.PodMetricsEndpoints {
		if !hasPort(all, e.Port, 0) {
			t.Errorf("PodMonitor %s: port %s is no port of the example pod", pm.Metadata.Name, e.Port)
		}
	}
	if tmpl.Annotations["prometheus.io/scrape"] != "true" || !hasPort(all, "http-metrics", 15090) || tmpl.Annotations["prometheus.io/port"] != "15090" {
		t.Errorf("example pod: annotations %v, want prometheus.io/scrape true and prometheus.io/port the sidecar's http-metrics port 15090", tmpl.Annotations)
	}

	agent := ds.Spec.Template
	if agent.Annotations["prometheus.io/scrape"] != "true" || !hasPort(agent.Spec.Containers, "http-metrics", 9102) ||
		agent.Annotations["prometheus.io/port"] != "9102" || agent.Annotations["prometheus.io/path"] != "/metrics" {
		t.Errorf("agent pod: annotations %v, want prometheus.io/scrape true, prometheus.io/port its http-metrics port 9102, prometheus.io/path /metrics", agent.Annotations)
	}

	jobs := map[string]bool{}
	for _, sc := range m.scrape.ScrapeConfigs {
		jobs[sc.JobName] = true
		if sc.JobName == "sluice-sidecars" {
			const ip = "198.18.0.9"
			got, kept := relabel(sc.RelabelConfigs, podMeta(tmpl, ip))
			if !kept || got["__address__"] != ip+":15090" || got["__metrics_path__"] != "/metrics" {
				t.Errorf("scrape job sluice-sidecars: the example pod kept %t, address %q, path %q; want kept, %s:15090, /metrics",
					kept, got["__address__"], got["__metrics_path__"], ip)
			}
			if _, kept := relabel(sc.RelabelConfigs, podMeta(agent, ip)); kept {
				t.Error("scrape job sluice-sidecars keeps the agent's pods, which the sluice-agent job scrapes: each agent scraped twice, every flow series doubled")
			}
		}
		for _, r := range sc.RelabelConfigs {
			if _, err := regexp.Compile("^(?:" + r.Regex + ")$"); err != nil {
				t.Errorf("scrape job %s: regex %q: %v", sc.JobName, r.Regex, err)
			}
			if r.Action == "keep" && sc.JobName == "sluice-agent" {
				re := regexp.MustCompile("^(?:" + r.Regex + ")$")
				if !re.MatchString(svc.Name + ";" + svc.Spec.Ports[0].Name) {
					t.Errorf("scrape job sluice-agent keeps %q, not Service %s port %s", r.Regex, svc.Name, svc.Spec.Ports[0].Name)
				}
			}
		}
	}
	if !jobs["sluice-sidecars"] || !jobs["sluice-agent"] {
		t.Errorf("scrape jobs %v, want sluice-sidecars and sluice-agent", jobs)
	}
}

// podMeta is the discovery labels Prometheus's kubernetes_sd role pod gives
// a pod of tmpl at ip with no container port declared (what the sidecars
// job relabels).
func podMeta(tmpl corev1.PodTemplateSpec, ip string) map[string]string {
	meta := map[string]string{"__address__": ip, "__metrics_path__": "/metrics"}
	name := regexp.MustCompile(`[^a-zA-Z0-9_]`)
	for k, v := range tmpl.Labels {
		meta["__meta_kubernetes_pod_label_"+name.ReplaceAllString(k, "_")] = v
	}
	for k, v := range tmpl.Annotations {
		meta["__meta_kubernetes_pod_annotation_"+name.ReplaceAllString(k, "_")] = v
	}
	return meta
}

// relabel applies rules as Prometheus does (keep, drop, replace; labelmap
// and the rest change nothing the test looks at) and reports whether the
// target was kept.
func relabel(rules []promRelabel, labels map[string]string) (map[string]string, bool) {
	out := maps.Clone(labels)
	for _, r := range rules {
		var vals []string
		for _, l := range r.SourceLabels {
			vals = append(vals, out[l])
		}
		regex := cmp.Or(r.Regex, "(.*)")
		re := regexp.MustCompile("^(?:" + regex + ")$")
		val := strings.Join(vals, ";")
		switch cmp.Or(r.Action, "replace") {
		case "keep":
			if !re.MatchString(val) {
				return out, false
			}
		case "drop":
			if re.MatchString(val) {
				return out, false
			}
		case "replace":
			m := re.FindStringSubmatchIndex(val)
			if m == nil {
				continue
			}
			repl := cmp.Or(r.Replacement, "$1")
			out[r.TargetLabel] = string(re.ExpandString(nil, repl, val, m))
		}
	}
	return out, true
}

func matches(t *testing.T, sel metav1.LabelSelector, set map[string]string) bool {
	t.Helper()
	s, err := metav1.LabelSelectorAsSelector(&sel)
	if err != nil {
		t.Errorf("selector %v: %v", sel, err)
		return false
	}
	return !s.Empty() && s.Matches(labels.Set(set))
}

// hasPort reports whether a container has a port named name (and numbered
// number, unless 0).
func hasPort(cs []corev1.Container, name string, number int32) bool {
	for _, c := range cs {
		for _, p := range c.Ports {
			if p.Name == name && (number == 0 || p.ContainerPort == number) {
				return true
			}
		}
	}
	return false
}

// Every kustomization's resources and generated files exist, and the
// ConfigMaps are generated from the real dashboard and rules, so nothing is
// copied by hand.
func TestKustomization(t *testing.T) {
	ks := load(t, ".").kustomizations
	files := map[string]map[string]string{} // file → labels of its ConfigMap
	for dir, k := range ks {
		for _, r := range k.Resources {
			if _, err := os.Stat(filepath.Join(dir, r)); err != nil {
				t.Errorf("%s/kustomization.yaml: resource %s: %v", dir, r, err)
			}
		}
		for _, g := range k.ConfigMapGenerator {
			for _, f := range g.Files {
				path := filepath.Join(dir, f)
				if _, err := os.Stat(path); err != nil {
					t.Errorf("%s/kustomization.yaml: ConfigMap %s: file %s: %v", dir, g.Name, f, err)
				}
				files[path] = g.Options.Labels
			}
		}
	}
	if l, ok := files["grafana/sluice.json"]; !ok || l["grafana_dashboard"] != "1" {
		t.Errorf("want a ConfigMap of grafana/sluice.json labelled grafana_dashboard: \"1\", got labels %v (present %t)", l, ok)
	}
	if _, ok := files["prometheus/recording-rules.yaml"]; !ok {
		t.Error("want a ConfigMap of prometheus/recording-rules.yaml")
	}
	// deploy/ and deploy/cni/ each install all of Sluice, in their mode.
	for _, dir := range []string{".", "cni"} {
		for _, want := range []string{"agent", "grafana", "prometheus"} {
			if !slices.ContainsFunc(ks[dir].Resources, func(r string) bool { return filepath.Base(r) == want }) {
				t.Errorf("%s/kustomization.yaml: resources %v, want %s", dir, ks[dir].Resources, want)
			}
		}
	}
}

// kustomize builds the objects kubectl apply -k deploy/ (or deploy/cni/)
// would apply, each decoding strictly.
func kustomize(t *testing.T, dir string) manifests {
	t.Helper()
	kubectl, err := exec.LookPath("kubectl")
	if err != nil {
		// Debian has no kubectl package; scripts/e2e-k8s applies both
		// kustomizations with the kubectl it builds.
		t.Skip("kubectl not installed: kustomize build not checked")
	}
	out, err := exec.Command(kubectl, "kustomize", dir).CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl kustomize deploy/%s: %v\n%s", dir, err, out)
	}
	tmp := t.TempDir()
	if err := os.WriteFile(filepath.Join(tmp, "built.yaml"), out, 0o644); err != nil {
		t.Fatal(err)
	}
	return load(t, tmp)
}

// kubectl's kustomize builds the objects the test reads, and every one
// decodes strictly; the dashboard ConfigMap holds the generated file as is.
func TestKustomizeBuild(t *testing.T) {
	m := kustomize(t, ".")
	dashboard, err := os.ReadFile("grafana/sluice.json")
	if err != nil {
		t.Fatal(err)
	}
	var found bool
	for _, cm := range m.configMaps {
		if data, ok := cm.Data["sluice.json"]; ok {
			found = true
			if data != string(dashboard) {
				t.Errorf("ConfigMap %s: sluice.json differs from grafana/sluice.json", cm.Name)
			}
		}
	}
	if !found {
		t.Error("kustomize built no ConfigMap holding sluice.json")
	}
	if len(m.daemonSets) != 1 || len(m.deployments) != 0 {
		t.Errorf("deploy/ builds %d DaemonSets and %d Deployments, want the agent alone", len(m.daemonSets), len(m.deployments))
	}
}

// deploy/cni/ is deploy/ with the agent installing sluice-cni (its command
// line plus the CNI flags, the host's two CNI directories mounted where the
// flags say, nothing else changed) and the injector.
func TestCNIKustomization(t *testing.T) {
	base, m := kustomize(t, "."), kustomize(t, "cni")
	if len(m.daemonSets) != 1 || len(m.deployments) != 1 || len(m.configMaps) != len(base.configMaps) {
		t.Fatalf("deploy/cni/ builds %d DaemonSets, %d Deployments, %d ConfigMaps; want the agent, the injector and deploy/'s %d ConfigMaps",
			len(m.daemonSets), len(m.deployments), len(m.configMaps), len(base.configMaps))
	}
	agent := m.daemonSets[0].Spec.Template.Spec
	c := agent.Containers[0]
	if got, want := slices.Concat(c.Command, c.Args), slices.Concat(wantCommands["agent"], cniFlags); !slices.Equal(got, want) {
		t.Errorf("agent command %q, want %q", got, want)
	}
	mounts := map[string]string{}
	for _, vm := range c.VolumeMounts {
		mounts[vm.MountPath] = vm.Name
	}
	volumes := map[string]corev1.Volume{}
	for _, v := range agent.Volumes {
		volumes[v.Name] = v
	}
	for host, in := range map[string]string{"/opt/cni/bin": cniFlags[1], "/etc/cni/net.d": cniFlags[3]} {
		v, ok := volumes[mounts[in]]
		if !ok || v.HostPath == nil || v.HostPath.Path != host || ptr(v.HostPath.Type) != corev1.HostPathDirectory {
			t.Errorf("agent: %s is not the host's %s (a Directory hostPath): volume %+v", in, host, v)
		}
	}
	baseAgent := base.daemonSets[0].Spec.Template.Spec
	if len(agent.Volumes) != len(baseAgent.Volumes)+2 || len(c.VolumeMounts) != len(baseAgent.Containers[0].VolumeMounts)+2 {
		t.Errorf("agent: %d volumes, %d mounts; want deploy/'s %d and %d and the two CNI directories",
			len(agent.Volumes), len(c.VolumeMounts), len(baseAgent.Volumes), len(baseAgent.Containers[0].VolumeMounts))
	}
	for _, d := range m.deployments {
		restricted(t, "deploy/cni/: "+d.Name, d.Spec.Template.Spec)
	}
}

// promtool accepts the recording rules. Under CI it must be installed
// (scripts/deps.sh installs Debian's prometheus package).
func TestRecordingRulesPromtool(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("promtool not installed (CI must check the rules): %v", err)
		}
		t.Skip("promtool not installed: rules not checked")
	}
	out, err := exec.Command(promtool, "check", "rules", "prometheus/recording-rules.yaml").CombinedOutput()
	if err != nil {
		t.Errorf("promtool check rules: %v\n%s", err, out)
	}
}

// The README's table of capabilities is the test's: docs and manifests
// cannot drift apart.
func TestReadmeCapabilityTable(t *testing.T) {
	data, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	row := regexp.MustCompile("(?m)^\\| `([a-z-]+)` \\| ([^|]+) \\|")
	documented := map[string][]string{}
	for _, r := range row.FindAllStringSubmatch(string(data), -1) {
		var caps []string
		if strings.TrimSpace(r[2]) == "none" {
			documented[r[1]] = nil
			continue
		}
		for _, c := range strings.Split(r[2], ",") {
			caps = append(caps, strings.Trim(strings.TrimSpace(c), "`"))
		}
		documented[r[1]] = caps
	}
	for name, want := range wantCaps {
		if got := documented[name]; !slices.Equal(sorted(got), sorted(want)) {
			t.Errorf("README.md: %s has %v, the manifests %v", name, got, want)
		}
	}
	for name := range documented {
		if _, ok := wantCaps[name]; !ok {
			t.Errorf("README.md documents container %s, which no manifest has", name)
		}
	}
}

// The agent's ClusterRole reads and creates events, nothing else: no
// write of any object, no Secret, no wildcard.
func TestAgentRBACOnlyReads(t *testing.T) {
	roles := load(t, ".").clusterRoles
	if len(roles) != 1 || roles[0].Name != "sluice-agent" {
		t.Fatalf("%d ClusterRoles, want the agent's", len(roles))
	}
	for _, r := range roles[0].Rules {
		for _, res := range r.Resources {
			for _, v := range r.Verbs {
				ok := slices.Contains([]string{"list", "watch"}, v) || res == "events" && v == "create"
				if !ok || res == "*" || res == "secrets" || slices.Contains(r.APIGroups, "*") {
					t.Errorf("the agent may %s %v %s: it reads Services, EndpointSlices and routes, and creates events", v, r.APIGroups, res)
				}
			}
		}
	}
}
