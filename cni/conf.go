package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
)

// PluginType is sluice-cni's type in a conflist: the binary's name in the
// CNI bin directory.
const PluginType = "sluice-cni"

// Entry is sluice-cni's entry in the node's conflist: it asks the runtime
// for the pod's annotations and cgroup (the capabilities), and says where
// pins and pods' cgroups are.
func Entry(pinRoot, cgroupRoot string) map[string]any {
	e := map[string]any{
		"type":         PluginType,
		"capabilities": map[string]any{"io.kubernetes.cri.pod-annotations": true, "cgroupPath": true},
	}
	if pinRoot != "" {
		e["pinRoot"] = pinRoot
	}
	if cgroupRoot != "" {
		e["cgroupRoot"] = cgroupRoot
	}
	return e
}

// primaryConf is the network configuration the runtime uses: the first
// .conflist, .conf or .json file of dir by name, as libcni orders them.
func primaryConf(dir string) (string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	for _, e := range entries { // ReadDir sorts by name
		if ext := filepath.Ext(e.Name()); !e.IsDir() && (ext == ".conflist" || ext == ".conf" || ext == ".json") {
			return filepath.Join(dir, e.Name()), nil
		}
	}
	return "", fmt.Errorf("no CNI network configuration in %s yet (the cluster's network plugin writes one): sluice-cni chains onto it", dir)
}

// InstallConf puts entry last in the plugins of dir's primary network
// configuration, replacing an older sluice-cni entry, and turns a single
// plugin's .conf into a .conflist holding both. It writes only when the
// file is not as it should be (another plugin may rewrite the file: the
// agent calls this again and restores the entry), and atomically. It
// returns the file and whether it wrote it.
func InstallConf(dir string, entry map[string]any) (string, bool, error) {
	file, conf, err := readPrimary(dir)
	if err != nil {
		return file, false, err
	}
	plugins, _ := conf["plugins"].([]any)
	if _, single := conf["type"]; single && plugins == nil {
		// A .conf: one plugin, the network settings beside it.
		plugin := map[string]any{}
		for k, v := range conf {
			if k != "cniVersion" && k != "name" {
				plugin[k] = v
			}
		}
		conf = map[string]any{"cniVersion": conf["cniVersion"], "name": conf["name"], "plugins": []any{plugin}}
		plugins = conf["plugins"].([]any)
	}
	kept := slices.DeleteFunc(slices.Clone(plugins), isOurs)
	want := append(kept, entry)
	if reflect.DeepEqual(normalize(plugins), normalize(want)) && strings.HasSuffix(file, ".conflist") {
		return file, false, nil
	}
	conf["plugins"] = want
	target := strings.TrimSuffix(file, filepath.Ext(file)) + ".conflist"
	if err := writeConf(target, conf); err != nil {
		return file, false, err
	}
	if target != file {
		if err := os.Remove(file); err != nil {
			return target, true, fmt.Errorf("remove %s, now %s: %w", file, target, err)
		}
	}
	return target, true, nil
}

// RemoveConf takes sluice-cni out of dir's primary configuration; it
// returns whether it wrote the file.
func RemoveConf(dir string) (string, bool, error) {
	file, conf, err := readPrimary(dir)
	if err != nil {
		return file, false, err
	}
	plugins, _ := conf["plugins"].([]any)
	kept := slices.DeleteFunc(slices.Clone(plugins), isOurs)
	if len(kept) == len(plugins) {
		return file, false, nil
	}
	conf["plugins"] = kept
	return file, true, writeConf(file, conf)
}

func isOurs(p any) bool {
	m, _ := p.(map[string]any)
	return m["type"] == PluginType
}

// normalize is v as JSON would read it back, for comparing.
func normalize(v any) any {
	data, _ := json.Marshal(v)
	var out any
	json.Unmarshal(data, &out)
	return out
}

// readPrimary reads dir's primary configuration.
func readPrimary(dir string) (string, map[string]any, error) {
	file, err := primaryConf(dir)
	if err != nil {
		return "", nil, err
	}
	conf, err := readConf(file)
	return file, conf, err
}

func readConf(file string) (map[string]any, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var conf map[string]any
	if err := json.Unmarshal(data, &conf); err != nil {
		return nil, fmt.Errorf("%s is not JSON: %w", file, err)
	}
	return conf, nil
}

// writeConf writes conf to file through a temporary file and a rename,
// so the runtime never reads half a file.
func writeConf(file string, conf map[string]any) error {
	data, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return err
	}
	return writeAtomic(file, append(data, '\n'), 0o644)
}

func writeAtomic(file string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(file), "."+filepath.Base(file)+".tmp-")
	if err != nil {
		return err
	}
	_, werr := tmp.Write(data)
	err = errors.Join(werr, tmp.Chmod(mode), tmp.Close())
	if err == nil {
		err = os.Rename(tmp.Name(), file)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("write %s: %w", file, err)
	}
	return nil
}

// Binary keeps sluice-cni in a CNI bin directory: a copy of the running
// executable. The agent calls Ensure every pass; it reads the 20 MB files
// only when the copy changed since it last checked it (another file in its
// place, another size or mtime), not every pass.
type Binary struct {
	Self, BinDir string
	checked      os.FileInfo // the copy when it was last known good
}

// Ensure copies Self into BinDir as sluice-cni, atomically, unless it is
// there with the same bytes; it returns whether it wrote it.
func (b *Binary) Ensure() (bool, error) {
	target := filepath.Join(b.BinDir, PluginType)
	st, err := os.Stat(target)
	if err == nil && b.checked != nil && os.SameFile(st, b.checked) && st.Size() == b.checked.Size() && st.ModTime().Equal(b.checked.ModTime()) {
		return false, nil
	}
	want, err := os.ReadFile(b.Self)
	if err != nil {
		return false, err
	}
	wrote := false
	if have, err := os.ReadFile(target); err != nil || !bytes.Equal(have, want) {
		if err := writeAtomic(target, want, 0o755); err != nil {
			return false, err
		}
		wrote = true
	}
	b.checked, err = os.Stat(target)
	return wrote, err
}

// RemoveBinary removes sluice-cni from binDir.
func RemoveBinary(binDir string) error {
	err := os.Remove(filepath.Join(binDir, PluginType))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}
