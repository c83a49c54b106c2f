package deploy

import (
	"bytes"
	"fmt"
	"os"
	"slices"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/sluicemesh/sluice/inject"
)

// restricted fails the test unless spec meets Pod Security's "restricted" profile
// (as of Kubernetes 1.34) in what the manifests can get wrong: no host
// namespace, port or path, no privilege nor escalation, every capability
// dropped (NET_BIND_SERVICE alone may be added), non-root and a
// RuntimeDefault or Localhost seccomp profile, each set on the pod or on
// every container. The e2e (scripts/e2e-k8s) runs the real admission.
func restricted(t *testing.T, where string, spec corev1.PodSpec) {
	t.Helper()
	for _, v := range violations(spec) {
		t.Errorf("%s: %s", where, v)
	}
}

// violations are what keeps spec from "restricted", each said once.
func violations(spec corev1.PodSpec) []string {
	var bad []string
	fail := func(format string, args ...any) { bad = append(bad, fmt.Sprintf(format, args...)) }
	if spec.HostNetwork || spec.HostPID || spec.HostIPC {
		fail("shares a host namespace")
	}
	allowed := []string{"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
	for _, v := range spec.Volumes {
		if kind := volumeKind(v); !slices.Contains(allowed, kind) {
			fail("volume %s is a %s volume, which restricted refuses", v.Name, kind)
		}
	}
	pod := ptr(spec.SecurityContext)
	for _, c := range slices.Concat(spec.InitContainers, spec.Containers) {
		sc := ptr(c.SecurityContext)
		in := "container " + c.Name
		if ptr(sc.Privileged) || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			fail("%s: privileged, or allowPrivilegeEscalation not false", in)
		}
		caps := ptr(sc.Capabilities)
		if !slices.Contains(caps.Drop, "ALL") || slices.ContainsFunc(caps.Add, func(c corev1.Capability) bool { return c != "NET_BIND_SERVICE" }) {
			fail("%s: capabilities %+v, want ALL dropped and none added", in, caps)
		}
		if sc.RunAsNonRoot == nil && pod.RunAsNonRoot == nil || sc.RunAsNonRoot != nil && !*sc.RunAsNonRoot || sc.RunAsNonRoot == nil && !*pod.RunAsNonRoot {
			fail("%s: runAsNonRoot is not true (on the container, or on the pod)", in)
		}
		if sc.RunAsUser != nil && *sc.RunAsUser == 0 || sc.RunAsUser == nil && pod.RunAsUser != nil && *pod.RunAsUser == 0 {
			fail("%s: runs as uid 0", in)
		}
		seccomp := cmpOr(sc.SeccompProfile, pod.SeccompProfile)
		if seccomp == nil || seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault && seccomp.Type != corev1.SeccompProfileTypeLocalhost {
			fail("%s: seccompProfile %+v, want RuntimeDefault or Localhost", in, seccomp)
		}
		for _, p := range c.Ports {
			if p.HostPort != 0 {
				fail("%s: hostPort %d", in, p.HostPort)
			}
		}
	}
	return bad
}

func cmpOr[T any](a, b *T) *T {
	if a != nil {
		return a
	}
	return b
}

// volumeKind is the name of the volume source v sets.
func volumeKind(v corev1.Volume) string {
	switch {
	case v.ConfigMap != nil:
		return "configMap"
	case v.CSI != nil:
		return "csi"
	case v.DownwardAPI != nil:
		return "downwardAPI"
	case v.EmptyDir != nil:
		return "emptyDir"
	case v.Ephemeral != nil:
		return "ephemeral"
	case v.PersistentVolumeClaim != nil:
		return "persistentVolumeClaim"
	case v.Projected != nil:
		return "projected"
	case v.Secret != nil:
		return "secret"
	case v.HostPath != nil:
		return "hostPath"
	}
	return "other"
}

// The example of a restricted namespace (pod/restricted-namespace.yaml)
// enforces "restricted" and asks for injection, and its Deployment passes
// "restricted" as it is, and still once `sluice inject --cni` (and the
// injector, which runs the same code) added Sluice; in init-container mode
// it does not, and the check says so (the check can fail).
func TestInjectedCNIPodIsRestricted(t *testing.T) {
	const file = "pod/restricted-namespace.yaml"
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	docs := bytes.Split(data, []byte("\n---\n"))
	var ns corev1.Namespace
	if err := decodeStrict(docs[0], &ns); err != nil {
		t.Fatal(err)
	}
	if ns.Labels["pod-security.kubernetes.io/enforce"] != "restricted" || ns.Labels["sluice.dev/inject"] != "enabled" {
		t.Errorf("%s: namespace labels %v, want restricted enforced and injection enabled", file, ns.Labels)
	}
	app := load(t, ".").deployments[file]
	if app == nil {
		t.Fatalf("no Deployment in %s", file)
	}
	restricted(t, file, app.Spec.Template.Spec)
	for _, cni := range []bool{true, false} {
		var out bytes.Buffer
		if _, err := inject.Inject(bytes.NewReader(docs[len(docs)-1]), &out, PodTemplate, inject.Options{CNI: cni}); err != nil {
			t.Fatal(err)
		}
		var d appsv1.Deployment
		if err := decodeStrict(out.Bytes(), &d); err != nil {
			t.Fatalf("inject --cni=%t output: %v", cni, err)
		}
		if cni {
			restricted(t, "inject --cni: web", d.Spec.Template.Spec)
		} else if len(violations(d.Spec.Template.Spec)) == 0 {
			t.Error("inject without --cni passes restricted: the check cannot tell a privileged init container")
		}
	}
}
