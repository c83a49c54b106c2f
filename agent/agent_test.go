package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/redirect"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// node is a node with pods installed under a pin root of its own (on the
// host's bpffs, removed when the test ends).
type node struct {
	root string
	pods map[string]*testbed.Pod
	tgts map[string]loader.Target
}

func newNode(t *testing.T, names ...string) *node {
	t.Helper()
	testbed.RequirePrivileged(t)
	n := &node{root: filepath.Join(loader.DefaultPinRoot+"-agent-test", fmt.Sprint(os.Getpid())), pods: map[string]*testbed.Pod{}, tgts: map[string]loader.Target{}}
	t.Cleanup(func() { os.RemoveAll(filepath.Dir(n.root)) })
	n.add(t, names...)
	return n
}

// add installs more pods on the node, with the default plan.
func (n *node) add(t *testing.T, names ...string) {
	t.Helper()
	plan, err := redirect.DefaultPolicy().Plan()
	if err != nil {
		t.Fatal(err)
	}
	n.addWith(t, plan, names...)
}

// addWith installs more pods on the node, with plan.
func (n *node) addWith(t *testing.T, plan redirect.Plan, names ...string) {
	t.Helper()
	bed := testbed.Must(t)
	for _, name := range names {
		pod, err := bed.AddPod(name)
		if err != nil {
			t.Fatal(err)
		}
		tgt, err := loader.ResolveTarget(pod.Cgroup, "")
		if err != nil {
			t.Fatal(err)
		}
		tgt.PinDir = filepath.Join(n.root, fmt.Sprint(tgt.CgroupID))
		tgt.Netns = pod.Netns
		if _, err := loader.Install(tgt, plan, nil, quiet); err != nil {
			t.Fatal(err)
		}
		// Registered after the bed: runs before the bed removes the pod.
		t.Cleanup(func() {
			if err := loader.Uninstall(tgt, quiet); err != nil && !errors.Is(err, loader.ErrNotInstalled) {
				t.Error(err)
			}
		})
		n.pods[name], n.tgts[name] = pod, tgt
	}
}

func (n *node) agent() *Agent { return New(Options{PinRoot: n.root, Logger: quiet}) }

// Pods reports each install with its state: complete while its cgroup
// lives, gone once the cgroup is deleted with the pins left behind.
func TestPodsReportsEachInstall(t *testing.T) {
	n := newNode(t, "live", "deleted")
	if err := n.pods["deleted"].Delete(); err != nil {
		t.Fatal(err)
	}
	pods, err := n.agent().Pods()
	if err != nil {
		t.Fatal(err)
	}
	states := map[string]string{}
	for _, p := range pods {
		states[p.Cgroup] = p.State()
		if p.Cgroup == n.pods["live"].Cgroup && (len(p.Counters) == 0 || p.Error != "") {
			t.Errorf("live pod: counters %v, error %q", p.Counters, p.Error)
		}
	}
	want := map[string]string{n.pods["live"].Cgroup: "complete", n.pods["deleted"].Cgroup: "gone"}
	for cg, state := range want {
		if states[cg] != state {
			t.Errorf("%s: state %q, want %q (all: %v)", cg, states[cg], state, states)
		}
	}
}

// Collect uninstalls exactly the pods whose cgroup is gone: their pins go,
// the live pod's install stays complete, and the count is exported.
func TestCollectRemovesOnlyGonePods(t *testing.T) {
	n := newNode(t, "live", "deleted")
	if err := n.pods["deleted"].Delete(); err != nil {
		t.Fatal(err)
	}
	a := n.agent()
	done, err := a.Collect()
	if err != nil {
		t.Fatal(err)
	}
	if len(done) != 1 || done[0] != n.pods["deleted"].Cgroup {
		t.Errorf("collected %v, want only %s", done, n.pods["deleted"].Cgroup)
	}
	if _, err := os.Stat(n.tgts["deleted"].PinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the gone pod's pins are still at %s (%v)", n.tgts["deleted"].PinDir, err)
	}
	s, err := loader.Status(n.tgts["live"])
	if err != nil || !s.Complete {
		t.Errorf("the live pod after collection: complete %v, missing %v, %v", s.Complete, s.Missing, err)
	}
	if again, err := a.Collect(); err != nil || len(again) != 0 {
		t.Errorf("a second collection took %v (%v), want nothing", again, err)
	}
	body := get(t, a.Handler(), "/metrics")
	node, err := loader.NodeMemory(n.root)
	if err != nil || node.Programs == 0 || node.Maps == 0 {
		t.Errorf("node memory %+v, %v: want the programs and node maps the live pod runs", node, err)
	}
	for _, want := range []string{
		"sluice_agent_collected_pods_total 1",
		`sluice_agent_pods{state="complete"} 1`,
		`sluice_agent_pods{state="gone"} 0`,
		fmt.Sprintf(`sluice_kernel_events_total{event="inbound_steered",pod_cgroup=%q,pod_uid=""} 0`, n.pods["live"].Cgroup),
		// What the one pod left holds, and the programs it shares.
		fmt.Sprintf(`sluice_agent_kernel_memory_bytes{owner="pods"} %s`, strconv.FormatFloat(float64(s.Memory.Total()), 'g', -1, 64)),
		fmt.Sprintf(`sluice_agent_kernel_memory_bytes{owner="node"} %s`, strconv.FormatFloat(float64(node.Total()), 'g', -1, 64)),
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s:\n%s", want, body)
		}
	}
}

// /pods serves Pods as JSON.
func TestPodsEndpoint(t *testing.T) {
	n := newNode(t, "live")
	var pods []Pod
	if err := json.Unmarshal([]byte(get(t, n.agent().Handler(), "/pods")), &pods); err != nil {
		t.Fatal(err)
	}
	if len(pods) != 1 || pods[0].Cgroup != n.pods["live"].Cgroup || !pods[0].Complete {
		t.Errorf("/pods: %+v", pods)
	}
}

func get(t *testing.T, h http.Handler, path string) string {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("GET %s: %d %s", path, rec.Code, rec.Body.String())
	}
	return rec.Body.String()
}

// The agent puts sluice-cni back within a moment of the network plugin
// rewriting its configuration without it, or of its binary being removed:
// not at the next pass (an hour away here).
func TestCNIRestoredAtOnce(t *testing.T) {
	conf, bin := t.TempDir(), t.TempDir()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	plain := []byte(`{"cniVersion": "1.0.0", "name": "pods", "plugins": [{"type": "bridge"}]}`)
	file := filepath.Join(conf, "10-pods.conflist")
	if err := os.WriteFile(file, plain, 0o644); err != nil {
		t.Fatal(err)
	}
	a := New(Options{PinRoot: t.TempDir(), Logger: quiet, CNI: &CNI{BinDir: bin, ConfDir: conf, Self: self}})
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan struct{})
	go func() { defer close(ran); a.Run(ctx, time.Hour) }()
	defer func() { cancel(); <-ran }()
	chained := func() error {
		data, err := os.ReadFile(file)
		if err == nil && !bytes.Contains(data, []byte(`"sluice-cni"`)) {
			err = fmt.Errorf("%s has no sluice-cni: %s", file, data)
		}
		if err == nil {
			_, err = os.Stat(filepath.Join(bin, "sluice-cni"))
		}
		return err
	}
	within := func(what string, d time.Duration) {
		t.Helper()
		deadline := time.Now().Add(d)
		for err := chained(); err != nil; err = chained() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not restored after %v: %v", what, d, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	within("the first pass", 5*time.Second)
	// As a network plugin does on start: its own file, written anew.
	if err := os.WriteFile(file+".tmp", plain, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(file+".tmp", file); err != nil {
		t.Fatal(err)
	}
	within("the configuration rewritten", 2*time.Second)
	if err := os.Remove(filepath.Join(bin, "sluice-cni")); err != nil {
		t.Fatal(err)
	}
	within("the binary removed", 2*time.Second)
}
