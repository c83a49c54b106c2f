package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sluicemesh/sluice/internal/testbed"
)

// The shipped binary has no test bed nor Kubernetes' Go types in it, and
// the environment variables that switch the demo's helpers on do nothing
// to it.
func TestShippedBinaryHasNoTestBed(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("go not on PATH: %v", err)
	}
	out, err := exec.Command(goBin, "list", "-deps", "github.com/sluicemesh/sluice/cmd/sluice").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	if strings.Contains(string(out), "internal/testbed") {
		t.Errorf("cmd/sluice depends on internal/testbed")
	}
	// Every Sluice process, each pod's sidecar and the CNI plugin among
	// them, would pay for these at start: the Kubernetes API's Go types
	// register their protobuf descriptors: 12 MiB resident at start was
	// about 8 MiB more with gamma on k8s.io/api's types, 17 more with
	// client-go. The agent and the injector read the API's JSON into
	// types of their own.
	for _, heavy := range []string{"k8s.io/api/", "k8s.io/client-go/", "sigs.k8s.io/gateway-api/", "k8s.io/apimachinery/"} {
		for _, dep := range strings.Fields(string(out)) {
			if strings.HasPrefix(dep, heavy) {
				t.Errorf("cmd/sluice depends on %s (through %s): keep Kubernetes' Go types out of the shipped binary", heavy, dep)
				break
			}
		}
	}
	bin := filepath.Join(t.TempDir(), "sluice")
	if out, err := exec.Command(goBin, "build", "-o", bin, "github.com/sluicemesh/sluice/cmd/sluice").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "SLUICE_TESTBED_ROLE=relay", "SLUICE_TESTBED_ADDR=127.0.0.1:0", "SLUICE_TESTBED_TARGET=127.0.0.1:1")
	res := testbed.Run(t, cmd)
	if res.Code != 2 || !strings.Contains(res.Stdout, "Commands:") {
		t.Errorf("shipped binary with the relay role set: exit %d\n%s%s", res.Code, res.Stdout, res.Stderr)
	}
}
