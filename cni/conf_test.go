package cni

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const bridge = `{"cniVersion": "1.0.0", "name": "k8s", "plugins": [
  {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.18.5.0/24"}]]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}`

func pluginTypes(t *testing.T, file string) []string {
	t.Helper()
	conf, err := readConf(file)
	if err != nil {
		t.Fatal(err)
	}
	var types []string
	for _, p := range conf["plugins"].([]any) {
		types = append(types, p.(map[string]any)["type"].(string))
	}
	return types
}

// The entry goes last in the primary conflist, once; a plugin that
// rewrites the file loses it until the next call puts it back; removal
// leaves the file as the network plugin wrote it.
func TestInstallConf(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "10-k8s.conflist")
	os.WriteFile(file, []byte(bridge), 0o644)
	os.WriteFile(filepath.Join(dir, "99-later.conflist"), []byte(bridge), 0o644) // not the runtime's
	entry := Entry("/sys/fs/bpf/sluice", "")
	got, changed, err := InstallConf(dir, entry)
	if err != nil || !changed || got != file {
		t.Fatalf("InstallConf = %s, %v, %v", got, changed, err)
	}
	if types := strings.Join(pluginTypes(t, file), ","); types != "bridge,portmap,sluice-cni" {
		t.Errorf("plugins %s, want sluice-cni chained last", types)
	}
	conf, _ := readConf(file)
	ours := conf["plugins"].([]any)[2].(map[string]any)
	if caps, _ := ours["capabilities"].(map[string]any); caps["io.kubernetes.cri.pod-annotations"] != true || ours["pinRoot"] != "/sys/fs/bpf/sluice" {
		t.Errorf("entry %v: want the pod-annotations capability", ours)
	}
	if _, changed, _ := InstallConf(dir, entry); changed {
		t.Error("a second InstallConf wrote the file")
	}
	os.WriteFile(file, []byte(bridge), 0o644) // the network plugin rewrites it
	if _, changed, _ := InstallConf(dir, entry); !changed || len(pluginTypes(t, file)) != 3 {
		t.Error("the entry was not restored after a rewrite")
	}
	if types := pluginTypes(t, filepath.Join(dir, "99-later.conflist")); len(types) != 2 {
		t.Errorf("a configuration the runtime does not use was changed: %v", types)
	}
	if _, changed, err := RemoveConf(dir); err != nil || !changed {
		t.Fatalf("RemoveConf: %v, %v", changed, err)
	}
	var before, after any
	json.Unmarshal([]byte(bridge), &before)
	data, _ := os.ReadFile(file)
	json.Unmarshal(data, &after)
	if normalize(before) == nil || !jsonEqual(before, after) {
		t.Errorf("after RemoveConf:\n%s\nwant the network plugin's", data)
	}
}

func jsonEqual(a, b any) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return string(x) == string(y)
}

// A single plugin's .conf becomes a .conflist chaining both.
func TestInstallConfFromConf(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "10-flannel.conf"), []byte(`{"cniVersion": "0.4.0", "name": "cbr0", "type": "flannel", "delegate": {"isDefaultGateway": true}}`), 0o644)
	file, changed, err := InstallConf(dir, Entry("", ""))
	if err != nil || !changed || filepath.Base(file) != "10-flannel.conflist" {
		t.Fatalf("InstallConf = %s, %v, %v", file, changed, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "10-flannel.conf")); !os.IsNotExist(err) {
		t.Errorf("the .conf is still there, and the runtime would take it first: %v", err)
	}
	conf, _ := readConf(file)
	if conf["name"] != "cbr0" || conf["cniVersion"] != "0.4.0" || strings.Join(pluginTypes(t, file), ",") != "flannel,sluice-cni" {
		t.Errorf("conflist %v", conf)
	}
	if d := conf["plugins"].([]any)[0].(map[string]any)["delegate"]; d == nil {
		t.Errorf("flannel's settings were lost: %v", conf)
	}
}

func TestInstallConfNeedsANetwork(t *testing.T) {
	if _, _, err := InstallConf(t.TempDir(), Entry("", "")); err == nil || !strings.Contains(err.Error(), "no CNI network configuration") {
		t.Errorf("an empty directory: %v", err)
	}
}

// Binary copies the executable once, then leaves the copy while it is the
// same file; another written in its place (or the copy removed) is put back.
func TestBinary(t *testing.T) {
	self := filepath.Join(t.TempDir(), "sluice")
	os.WriteFile(self, []byte("binary v1"), 0o755)
	bin := t.TempDir()
	b := &Binary{Self: self, BinDir: bin}
	if changed, err := b.Ensure(); err != nil || !changed {
		t.Fatalf("Ensure: %v, %v", changed, err)
	}
	target := filepath.Join(bin, PluginType)
	if st, err := os.Stat(target); err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("installed binary: %v, %v", st, err)
	}
	if changed, _ := b.Ensure(); changed {
		t.Error("a second Ensure wrote it again")
	}
	if changed, _ := (&Binary{Self: self, BinDir: bin}).Ensure(); changed {
		t.Error("a new agent rewrote a copy with the same bytes")
	}
	os.WriteFile(target+".new", []byte("another plugin"), 0o755)
	os.Rename(target+".new", target)
	if changed, _ := b.Ensure(); !changed {
		t.Error("a file put in its place was left there")
	}
	if have, _ := os.ReadFile(target); string(have) != "binary v1" {
		t.Errorf("the copy holds %q", have)
	}
	os.Remove(target)
	if changed, _ := b.Ensure(); !changed {
		t.Error("a removed copy was not put back")
	}
	if err := RemoveBinary(bin); err != nil || RemoveBinary(bin) != nil {
		t.Errorf("RemoveBinary: %v", err)
	}
}
