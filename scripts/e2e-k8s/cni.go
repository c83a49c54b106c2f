package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// The CNI checks (9): one plain Deployment, `web`, that Pod Security
// "restricted" admits as it is (busybox httpd as uid 10001), started three
// ways: in a namespace nobody labelled (no Sluice), in one labelled
// sluice.dev/inject=enabled that enforces "restricted" (the injector adds
// the sidecar, sluice-cni installs capture), and as `sluice inject` writes
// it (the init container) in default. Each one's create-to-Ready time is
// the run's pod-start figure.

const (
	plainNS = "plain"
	cniNS   = "shop"
)

// webManifest is the plain Deployment in ns.
func (k *checker) webManifest(ns string) string {
	return fmt.Sprintf(`apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: %s
spec:
  replicas: 1
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web, version: v1}
    spec:
      terminationGracePeriodSeconds: 1
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        runAsGroup: 10001
        seccompProfile: {type: RuntimeDefault}
      containers:
        - name: app
          image: %s
          imagePullPolicy: Never
          command: ["/bin/sh", "-c", %q]
          readinessProbe:
            tcpSocket: {port: 8080}
            periodSeconds: 1
          securityContext:
            allowPrivilegeEscalation: false
            capabilities: {drop: ["ALL"]}
          volumeMounts:
            - {name: www, mountPath: /www}
      volumes:
        - name: www
          emptyDir: {}
`, ns, k.imgs.busyboxRef, www("web"))
}

// startWeb applies manifest and waits for the web pod in ns; it returns
// the pod and the time from apply to Ready.
func (k *checker) startWeb(name, ns, manifest string, extra ...string) (string, time.Duration, error) {
	path := k.c.path(name + ".yaml")
	if err := os.WriteFile(path, []byte(manifest), 0o644); err != nil {
		return "", 0, err
	}
	start := time.Now()
	if _, err := k.c.kubectl(k.ctx, append([]string{"apply", "-f", path}, extra...)...); err != nil {
		return "", 0, err
	}
	pod, err := k.podOf(ns, "app=web")
	return pod, time.Since(start), err
}

// containerNames are the names of the pod's init containers and containers.
func (k *checker) containerNames(ns, pod string) (string, error) {
	return k.field(ns, pod, `{range .spec.initContainers[*]}{.name} {end}/ {range .spec.containers[*]}{.name} {end}`)
}

// plainWeb: in a namespace not labelled for injection the Deployment runs
// as it was written: no Sluice container, annotation or pin.
func (k *checker) plainWeb(t *timings) (string, error) {
	if _, err := k.c.kubectl(k.ctx, "create", "namespace", plainNS); err != nil {
		return "", err
	}
	pod, took, err := k.startWeb("web-plain", plainNS, k.webManifest(plainNS))
	if err != nil {
		return "", err
	}
	t.podStart = append(t.podStart, [2]string{"no Sluice", fmt.Sprintf("%.1fs", took.Seconds())})
	names, err := k.containerNames(plainNS, pod)
	if err != nil {
		return "", err
	}
	if names != "/ app" {
		return "", fmt.Errorf("%s/%s has containers %q, want the app's alone", plainNS, pod, names)
	}
	ann, err := k.field(plainNS, pod, "{.metadata.annotations}")
	if err != nil {
		return "", err
	}
	if strings.Contains(ann, "sluice.dev/") {
		return "", fmt.Errorf("%s/%s has Sluice annotations: %s", plainNS, pod, ann)
	}
	_, id, err := k.cgroupOf(plainNS, pod)
	if err != nil {
		return "", err
	}
	if _, err := os.Stat(filepath.Join(bpffs, "sluice", strconv.FormatUint(id, 10))); err == nil {
		return "", fmt.Errorf("%s/%s (cgroup %d) has pins", plainNS, pod, id)
	}
	return fmt.Sprintf("%s/%s Ready in %.1fs: containers %q, no sluice.dev/ annotation, no pins", plainNS, pod, took.Seconds(), names), nil
}

// cniWeb: in deploy/pod/restricted-namespace.yaml's namespace, labelled
// sluice.dev/inject=enabled and enforcing Pod Security "restricted", the same Deployment's pod is injected (the
// sidecar alone, asking sluice-cni for capture), admitted, captured (its
// pins) and Ready. That the namespace really enforces "restricted" is shown
// by a server-side dry run of an init-container pod there, which must be
// refused.
func (k *checker) cniWeb(t *timings) (string, error) {
	// The namespace of deploy/pod/restricted-namespace.yaml, as it is.
	example, err := os.ReadFile(filepath.Join(k.c.repo, "deploy", "pod", "restricted-namespace.yaml"))
	if err != nil {
		return "", err
	}
	nsDoc, _, _ := strings.Cut(string(example), "\n---\n")
	if !strings.Contains(nsDoc, "kind: Namespace") || !strings.Contains(nsDoc, "name: "+cniNS+"\n") {
		return "", fmt.Errorf("restricted-namespace.yaml's first document is no Namespace %s", cniNS)
	}
	if err := k.apply("ns-"+cniNS, nsDoc); err != nil {
		return "", err
	}
	privileged, err := k.injected(fmt.Sprintf("apiVersion: v1\nkind: Pod\nmetadata:\n  name: privileged\n  namespace: %s\nspec:\n  containers:\n    - {name: app, image: %s}\n", cniNS, k.imgs.busyboxRef))
	if err != nil {
		return "", err
	}
	path := k.c.path("privileged.yaml")
	if err := os.WriteFile(path, privileged, 0o644); err != nil {
		return "", err
	}
	if _, err := k.c.kubectl(k.ctx, "apply", "--dry-run=server", "-f", path); err == nil || !strings.Contains(err.Error(), "violates PodSecurity") {
		return "", fmt.Errorf("namespace %s admitted an init-container pod (or refused it for another reason): %v", cniNS, err)
	}
	pod, took, err := k.startWeb("web-cni", cniNS, k.webManifest(cniNS))
	if err != nil {
		return "", err
	}
	t.podStart = append(t.podStart, [2]string{"CNI (injector)", fmt.Sprintf("%.1fs", took.Seconds())})
	names, err := k.containerNames(cniNS, pod)
	if err != nil {
		return "", err
	}
	if names != "sluice-proxy / app" {
		return "", fmt.Errorf("%s/%s has containers %q, want the injector's sidecar and the app", cniNS, pod, names)
	}
	capture, err := k.field(cniNS, pod, `{.metadata.annotations.sluice\.dev/capture}`)
	if err != nil || capture != "true" {
		return "", fmt.Errorf("%s/%s: annotation sluice.dev/capture %q (%v), want \"true\"", cniNS, pod, capture, err)
	}
	detail, err := k.describeSluicePod(cniNS+"/"+pod, "web", took)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("init-container pod refused by PodSecurity there; %s: containers %q; %s", pod, names, detail), nil
}

// injected is manifest as `sluice inject` (init-container mode) writes it.
func (k *checker) injected(manifest string) ([]byte, error) {
	cmd := exec.Command(k.sluiceBin(), "inject")
	cmd.Stdin = strings.NewReader(manifest)
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("sluice inject: %w", err)
	}
	return out, nil
}

// cniDelete deletes the CNI pod (its Deployment first, so no other takes
// its place): sluice-cni's DEL, when the kubelet stops the sandbox, removes
// its pins and links before the kubelet removes its cgroup, so the agent,
// which collects only pods whose cgroup is gone, never sees them (its log
// must not name the pins).
func (k *checker) cniDelete() (string, error) {
	ns, pod := splitPod(k.ip["web/pod"])
	_, id, err := k.cgroupOf(ns, pod)
	if err != nil {
		return "", err
	}
	pins := filepath.Join(bpffs, "sluice", strconv.FormatUint(id, 10))
	if _, err := k.c.kubectl(k.ctx, "delete", "deployment", "-n", ns, "web", "--cascade=orphan"); err != nil {
		return "", err
	}
	start := time.Now()
	if _, err := k.c.kubectl(k.ctx, "delete", "pod", "-n", ns, pod, "--wait", "--timeout", "60s", "--grace-period", "1"); err != nil {
		return "", err
	}
	err = k.c.poll(k.ctx, 20*time.Second, "the CNI pod's pins and links to go", func() error {
		if _, err := os.Stat(pins); err == nil {
			return fmt.Errorf("%s still there", pins)
		}
		return noLinkOn(id)
	})
	if err != nil {
		return "", err
	}
	took := time.Since(start)
	if k.logged("sluice-system", k.ip["agent/pod"], "agent", "pin_dir="+pins) == nil {
		return "", fmt.Errorf("the agent collected %s: sluice-cni's DEL did not remove it", pins)
	}
	return fmt.Sprintf("%s and every link on cgroup %d gone %.1fs after the delete began; the agent collected nothing of it", pins, id, took.Seconds()), nil
}

// noLinkOn fails if a BPF link is attached to cgroup id.
func noLinkOn(id uint64) error {
	out, err := exec.Command("bpftool", "-j", "link", "show").Output()
	if err != nil {
		return fmt.Errorf("bpftool link show: %w", err)
	}
	var links []struct {
		ID       uint64 `json:"id"`
		CgroupID uint64 `json:"cgroup_id"`
	}
	if err := json.Unmarshal(out, &links); err != nil {
		return fmt.Errorf("bpftool link show: %w", err)
	}
	for _, l := range links {
		if l.CgroupID == id {
			return fmt.Errorf("link %d is still on cgroup %d", l.ID, id)
		}
	}
	return nil
}

// injectedWeb applies `sluice inject` of the Deployment (init-container
// mode) in default, strictly validated by the API server; the pod is
// captured (pins) and Ready, the run's init-container pod-start figure.
func (k *checker) injectedWeb(t *timings) (string, error) {
	manifest, err := k.injected(k.webManifest("default"))
	if err != nil {
		return "", err
	}
	pod, took, err := k.startWeb("web-init", "default", string(manifest), "--validate=strict")
	if err != nil {
		return "", err
	}
	t.podStart = append(t.podStart, [2]string{"init container (sluice inject)", fmt.Sprintf("%.1fs", took.Seconds())})
	names, err := k.containerNames("default", pod)
	if err != nil {
		return "", err
	}
	if names != "sluice-init sluice-proxy / app" {
		return "", fmt.Errorf("%s has containers %q, want sluice inject's", pod, names)
	}
	k.ip["web-init/workload"] = "web"
	detail, err := k.describeSluicePod(pod, "web-init", took)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("containers %q; %s", names, detail), nil
}

// misspelt: a pod with a misspelt sluice.dev/ annotation is refused by the
// injector in the labelled namespace, naming the annotation; one that
// asks sluice-cni for capture directly (the annotation sluice inject --cni
// writes, no injector in an unlabelled namespace) has its sandbox failed
// by the plugin, and the kubelet's event for the pod names the
// annotation. Nothing is installed for it.
func (k *checker) misspelt() (string, error) {
	pod := func(ns, name, annotations string) string {
		return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: %s
  namespace: %s
  annotations: {%s}
spec:
  terminationGracePeriodSeconds: 1
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    seccompProfile: {type: RuntimeDefault}
  containers:
    - name: app
      image: %s
      imagePullPolicy: Never
      command: ["sleep", "3600"]
      securityContext:
        allowPrivilegeEscalation: false
        capabilities: {drop: ["ALL"]}
`, name, ns, annotations, k.imgs.busyboxRef)
	}
	const want = "unknown annotation sluice.dev/offload-port"
	err := k.apply("misspelt-injected", pod(cniNS, "misspelt", `sluice.dev/offload-port: "8080"`))
	if err == nil || !strings.Contains(err.Error(), want) {
		return "", fmt.Errorf("the injector admitted a pod with a misspelt annotation, or refused it for another reason: %v", err)
	}
	refused := err.Error()
	if i := strings.Index(refused, "admission webhook"); i >= 0 {
		refused = refused[i:]
	}
	if err := k.apply("misspelt-cni", pod(plainNS, "misspelt", `sluice.dev/capture: "true", sluice.dev/offload-port: "8080"`)); err != nil {
		return "", err
	}
	var event string
	err = k.c.poll(k.ctx, 30*time.Second, "the pod's sandbox failure event", func() error {
		out, err := k.c.kubectl(k.ctx, "get", "events", "-n", plainNS, "--field-selector", "involvedObject.name=misspelt,reason=FailedCreatePodSandBox",
			"-o", "jsonpath={.items[*].message}")
		if event = string(out); err == nil && !strings.Contains(event, want) {
			err = fmt.Errorf("no FailedCreatePodSandBox event naming the annotation yet: %q", event)
		}
		return err
	})
	if err != nil {
		return "", err
	}
	uid, err := k.field(plainNS, "misspelt", "{.metadata.uid}")
	if err != nil {
		return "", err
	}
	_, id, cerr := podCgroup(uid)
	if _, err := k.c.kubectl(k.ctx, "delete", "pod", "-n", plainNS, "misspelt", "--wait", "--timeout", "60s", "--grace-period", "1"); err != nil {
		return "", err
	}
	if cerr == nil {
		if _, err := os.Stat(filepath.Join(bpffs, "sluice", strconv.FormatUint(id, 10))); err == nil {
			return "", fmt.Errorf("the refused pod (cgroup %d) has pins", id)
		}
	}
	if i := strings.Index(event, "sluice-cni"); i >= 0 {
		event = event[i:]
	}
	return fmt.Sprintf("injector: %s; kubelet: %s", tail(refused, 1), tail(event, 1)), nil
}
