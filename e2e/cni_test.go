package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/sluicemesh/sluice/loader"
)

// cniPod is a pod whose cgroup is named as the kubelet's systemd driver
// names one (so sluice-cni finds it by uid), uncaptured until the plugin
// runs, on a "node" whose CNI directories the agent set up.
type cniPod struct {
	*capturedPod
	uid    string
	plugin string         // sluice-cni, as the agent installed it
	conf   map[string]any // the network configuration, as the agent left it
	entry  map[string]any // sluice-cni's entry in it
}

// bridgeConf is a node's network configuration before Sluice: what the
// cluster's network plugin wrote.
const bridgeConf = `{"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
  {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}`

func newCNIPod(t *testing.T) *cniPod {
	const uid = "5f0c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f"
	podDir := "kubepods-besteffort-pod" + strings.ReplaceAll(uid, "-", "_") + ".slice"
	c := newUncapturedPod(t, []string{"kubepods.slice", "kubepods-besteffort.slice", podDir, "cri-containerd-app.scope"})
	mount, err := loader.Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	// The test bed's cgroup stands for the kubelet's --cgroup-root.
	root, err := filepath.Rel(mount, filepath.Dir(filepath.Dir(filepath.Dir(c.cgroup))))
	if err != nil {
		t.Fatal(err)
	}
	confDir, binDir := t.TempDir(), t.TempDir()
	confFile := filepath.Join(confDir, "10-k8s.conflist")
	if err := os.WriteFile(confFile, []byte(bridgeConf), 0o644); err != nil {
		t.Fatal(err)
	}
	mustCLI(t, "agent", "--once", "--metrics-addr", "127.0.0.1:0", "--cni-bin-dir", binDir, "--cni-conf-dir", confDir, "--cni-cgroup-root", root)
	p := &cniPod{capturedPod: c, uid: uid, plugin: filepath.Join(binDir, "sluice-cni")}
	data, err := os.ReadFile(confFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &p.conf); err != nil {
		t.Fatal(err)
	}
	plugins, _ := p.conf["plugins"].([]any)
	if len(plugins) != 3 {
		t.Fatalf("the agent left the network configuration with %d plugins, want sluice-cni chained last:\n%s", len(plugins), data)
	}
	p.entry = plugins[2].(map[string]any)
	if p.entry["type"] != "sluice-cni" {
		t.Fatalf("last plugin %v, want sluice-cni", p.entry)
	}
	return p
}

// call runs the plugin as the container runtime does (libcni): its
// conflist entry with the list's name and version, the capabilities' runtime
// config (the pod's annotations) and the previous plugin's result on stdin;
// it returns the JSON on stdout and the exit code.
func (p *cniPod) call(t *testing.T, command string, annotations map[string]string) (map[string]any, int) {
	t.Helper()
	prev := `{"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "` + p.pod.Netns + `"}], "ips": [{"address": "` + p.pod.Addr4.String() + `/24", "interface": 0}]}`
	stdin := map[string]any{}
	for k, v := range p.entry {
		if k != "capabilities" {
			stdin[k] = v
		}
	}
	stdin["cniVersion"], stdin["name"] = p.conf["cniVersion"], p.conf["name"]
	stdin["runtimeConfig"] = map[string]any{"io.kubernetes.cri.pod-annotations": annotations}
	stdin["prevResult"] = json.RawMessage(prev)
	conf, err := json.Marshal(stdin)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(p.plugin)
	cmd.Env = append(os.Environ(), "CNI_COMMAND="+command, "CNI_CONTAINERID=sandbox-1", "CNI_NETNS="+p.pod.Netns, "CNI_IFNAME=eth0",
		"CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=sandbox-1;K8S_POD_UID="+p.uid)
	cmd.Stdin = bytes.NewReader(conf)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	t.Logf("sluice-cni %s: exit %d\nstdout %s\nstderr %s", command, code, stdout.String(), stderr.String())
	var out map[string]any
	if stdout.Len() > 0 {
		if err := json.Unmarshal(stdout.Bytes(), &out); err != nil {
			t.Fatalf("sluice-cni %s wrote no JSON: %v\n%s", command, err, stdout.String())
		}
	}
	return out, code
}

// The chained plugin captures a pod annotated for it when its sandbox is
// made, exactly as the init container would (status cannot tell them
// apart), passes the previous plugin's result on, answers CHECK, and
// removes everything on DEL, twice over; a pod not annotated is left as it
// is, on ADD and on DEL.
func TestCNIPluginCapturesAnnotatedPod(t *testing.T) {
	p := newCNIPod(t)
	t.Cleanup(func() { sluice(t, "uninstall", "--cgroup", p.cgroup).Run() })

	if out, code := p.call(t, "ADD", map[string]string{"other": "x"}); code != 0 || out["ips"] == nil {
		t.Fatalf("ADD of a pod not annotated: exit %d, %v", code, out)
	}
	if installedOn(t, p.cgroup) {
		t.Fatal("a pod not annotated was captured")
	}

	ann := map[string]string{"sluice.dev/capture": "true", "sluice.dev/workload": "web", "sluice.dev/kernel-only-ports": "9090"}
	out, code := p.call(t, "ADD", ann)
	if code != 0 || out["ips"] == nil || out["cniVersion"] != "1.0.0" {
		t.Fatalf("ADD: exit %d, %v; want the previous result passed on", code, out)
	}
	s := statusJSON(t, p.cgroup)
	if !s.Complete || s.Target.Netns != p.pod.Netns || s.Target.Identity["workload"] != "web" || s.Target.Identity["namespace"] != "shop" {
		t.Fatalf("status after ADD: complete %v, netns %q, identity %v", s.Complete, s.Target.Netns, s.Target.Identity)
	}
	if !slices.Contains(s.Plan.KernelOnlyPorts, 9090) {
		t.Errorf("the annotation's kernel-only port is not in the plan: %+v", s.Plan)
	}
	if _, code := p.call(t, "CHECK", ann); code != 0 {
		t.Errorf("CHECK of a whole capture: exit %d", code)
	}
	p.startSidecar(t)
	out4 := netip.AddrPortFrom(p.host.Addr4, 8080).String()
	p.expectProxied(t, p.client(t, out4), out4)
	in := netip.AddrPortFrom(p.pod.Addr4, 8080).String()
	if err := p.pod.StartEcho(self(t), in); err != nil {
		t.Fatal(err)
	}
	p.expectProxiedDir(t, p.inbound(t, in), in, "inbound")

	// A pod not annotated keeps what its init container installed: DEL
	// of its sandbox leaves it (a new sandbox reruns the init container).
	if _, code := p.call(t, "DEL", map[string]string{"other": "x"}); code != 0 || !installedOn(t, p.cgroup) {
		t.Fatalf("DEL of a pod not annotated: exit %d, installed %t; want exit 0 and its capture kept", code, installedOn(t, p.cgroup))
	}
	for i := range 2 { // the runtime may repeat DEL
		if _, code := p.call(t, "DEL", ann); code != 0 {
			t.Fatalf("DEL %d: exit %d", i+1, code)
		}
	}
	if installedOn(t, p.cgroup) {
		t.Error("DEL left the pod installed")
	}
	if _, err := os.Stat(s.Target.PinDir); !os.IsNotExist(err) {
		t.Errorf("DEL left %s: %v", s.Target.PinDir, err)
	}
}

// A pod the plugin cannot capture fails its sandbox with the spec's error
// JSON naming the problem (the kubelet shows it in the pod's events), and
// is left with nothing installed.
func TestCNIPluginFailsTheSandboxWithTheReason(t *testing.T) {
	p := newCNIPod(t)
	out, code := p.call(t, "ADD", map[string]string{"sluice.dev/capture": "true", "sluice.dev/offload-port": "8080"})
	if code == 0 || out["code"] == nil || !strings.Contains(fmt.Sprint(out["msg"], out["details"]), "unknown annotation sluice.dev/offload-port") {
		t.Errorf("ADD with a misspelt annotation: exit %d, %v; want an error naming it", code, out)
	}
	if installedOn(t, p.cgroup) {
		t.Error("a refused ADD installed")
	}
	if out, code := p.call(t, "VERSION", nil); code != 0 || out["supportedVersions"] == nil {
		t.Errorf("VERSION: exit %d, %v", code, out)
	}
}

// installedOn tells whether the pod of cgroup has pins.
func installedOn(t *testing.T, cgroup string) bool {
	t.Helper()
	target, err := loader.ResolveTarget(cgroup, "")
	if err != nil {
		t.Fatal(err)
	}
	_, err = loader.Status(target)
	return !errors.Is(err, loader.ErrNotInstalled)
}
