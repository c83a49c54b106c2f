package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

const addConfig = `{
  "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "sluice-cni",
  "pinRoot": "/sys/fs/bpf/sluice",
  "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"sluice.dev/capture": "true", "sluice.dev/splice": "false"}},
  "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1"}], "ips": [{"address": "198.18.5.2/24", "interface": 0}]}
}`

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func addEnv() map[string]string {
	return map[string]string{
		"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/var/run/netns/cni-1", "CNI_IFNAME": "eth0",
		"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1b4e28ba-2fa1-11d2-883f-0016d3cca427",
	}
}

func TestReadAdd(t *testing.T) {
	r, err := ReadRequest(env(addEnv()), strings.NewReader(addConfig))
	if err != nil {
		t.Fatal(err)
	}
	if r.Command != Add || r.Netns != "/var/run/netns/cni-1" || r.PodUID() != "1b4e28ba-2fa1-11d2-883f-0016d3cca427" || r.Args["K8S_POD_NAMESPACE"] != "shop" {
		t.Errorf("request %+v", r)
	}
	if r.Config.RuntimeConfig.PodAnnotations["sluice.dev/capture"] != "true" || r.Config.PinRoot != "/sys/fs/bpf/sluice" {
		t.Errorf("config %+v", r.Config)
	}
	var out bytes.Buffer
	if err := WriteResult(&out, r); err != nil {
		t.Fatal(err)
	}
	var res, prev map[string]any
	json.Unmarshal(out.Bytes(), &res)
	json.Unmarshal(r.Config.PrevResult, &prev)
	if res["ips"] == nil || len(res) != len(prev) {
		t.Errorf("result %s: want the previous plugin's passed on", out.String())
	}
}

// Each malformed request is refused with the spec's code and a message
// the kubelet shows in the pod's events.
func TestReadRefuses(t *testing.T) {
	for _, c := range []struct {
		name   string
		change func(map[string]string) string
		code   int
		msg    string
	}{
		{"no command", func(e map[string]string) string { delete(e, "CNI_COMMAND"); return addConfig }, CodeInvalidEnv, "CNI_COMMAND is not set"},
		{"unknown command", func(e map[string]string) string { e["CNI_COMMAND"] = "FROB"; return addConfig }, CodeInvalidEnv, `"FROB"`},
		{"no netns", func(e map[string]string) string { delete(e, "CNI_NETNS"); return addConfig }, CodeInvalidEnv, "CNI_NETNS"},
		{"not JSON", func(map[string]string) string { return "{" }, CodeDecode, "not JSON"},
		{"old version", func(map[string]string) string {
			return strings.Replace(addConfig, `"1.0.0", "name"`, `"0.3.1", "name"`, 1)
		}, CodeIncompatibleVersion, `"0.3.1"`},
		{"not chained", func(map[string]string) string {
			return addConfig[:strings.Index(addConfig, `,
  "prevResult"`)] + "}"
		}, CodeInvalidConfig, "chained plugin"},
	} {
		e := addEnv()
		conf := c.change(e)
		_, err := ReadRequest(env(e), strings.NewReader(conf))
		var ce *Error
		if !errors.As(err, &ce) || ce.Code != c.code || !strings.Contains(ce.Error(), c.msg) {
			t.Errorf("%s: %v, want code %d naming %q", c.name, err, c.code, c.msg)
		}
	}
	// DEL may come with no netns (the runtime lost it): still a request.
	e := addEnv()
	e["CNI_COMMAND"], e["CNI_NETNS"] = Del, ""
	if _, err := ReadRequest(env(e), strings.NewReader(addConfig)); err != nil {
		t.Errorf("DEL with no netns: %v", err)
	}
}

func TestVersionAndErrors(t *testing.T) {
	r, err := ReadRequest(env(map[string]string{"CNI_COMMAND": "VERSION"}), strings.NewReader(""))
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	WriteVersions(&out, r)
	var v struct {
		CNIVersion        string
		SupportedVersions []string
	}
	if err := json.Unmarshal(out.Bytes(), &v); err != nil || len(v.SupportedVersions) != len(SupportedVersions) {
		t.Errorf("VERSION: %s (%v)", out.String(), err)
	}
	out.Reset()
	WriteError(&out, "1.0.0", errors.New("install capture: the pod's cgroup is gone"))
	var e struct {
		CNIVersion string
		Code       int
		Msg        string
	}
	if err := json.Unmarshal(out.Bytes(), &e); err != nil || e.Code != CodeInstall || e.CNIVersion != "1.0.0" || !strings.Contains(e.Msg, "cgroup is gone") {
		t.Errorf("error result %s (%v)", out.String(), err)
	}
}
