package main

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/sluicemesh/sluice/internal/layer"
)

// staticBinary builds a tiny Go program with CGO_ENABLED=0 into a temporary
// directory: a static ELF for this GOARCH, as `make image` builds sluice.
func staticBinary(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for file, body := range map[string]string{
		"go.mod":  "module tiny\n\ngo 1.22\n",
		"main.go": "package main\n\nfunc main() {}\n",
	} {
		if err := os.WriteFile(filepath.Join(dir, file), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(dir, "tiny")
	cmd := exec.Command(goTool, "build", "-trimpath", "-ldflags=-s -w", "-o", bin, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH, "GOFLAGS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build a static binary: %v\n%s", err, out)
	}
	return bin
}

// writeImage runs the command's run with the binary and returns the tarball.
func writeImage(t *testing.T, bin string, extra func(*options)) string {
	t.Helper()
	o := options{
		binary:  bin,
		tag:     "sluice:dev",
		out:     filepath.Join(t.TempDir(), "sub", "image.tar"),
		arch:    runtime.GOARCH,
		version: "v0.0.0-test",
	}
	if extra != nil {
		extra(&o)
	}
	if err := run(o); err != nil {
		t.Fatal(err)
	}
	return o.out
}

// files reads the image's one layer as path -> header and body.
func files(t *testing.T, img v1.Image) (map[string]*tar.Header, map[string][]byte) {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != 1 {
		t.Fatalf("image has %d layers, want 1", len(layers))
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	headers, bodies := map[string]*tar.Header{}, map[string][]byte{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		headers[h.Name], bodies[h.Name] = h, body
	}
	return headers, bodies
}

func TestImage(t *testing.T) {
	bin := staticBinary(t)
	want, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	ociDir := filepath.Join(t.TempDir(), "oci")
	out := writeImage(t, bin, func(o *options) { o.ociLayout = ociDir })

	tag, err := name.NewTag("docker.io/library/sluice:dev")
	if err != nil {
		t.Fatal(err)
	}
	img, err := tarball.ImageFromPath(out, &tag)
	if err != nil {
		t.Fatalf("read the tarball back as docker.io/library/sluice:dev: %v", err)
	}
	m, err := tarball.LoadManifest(func() (io.ReadCloser, error) { return os.Open(out) })
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 1 || !slices.Equal(m[0].RepoTags, []string{"docker.io/library/sluice:dev"}) {
		t.Errorf("manifest.json: %+v, want one image tagged docker.io/library/sluice:dev", m)
	}

	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cfg.Config.Entrypoint, []string{"/sluice"}) {
		t.Errorf("Entrypoint %q, want [/sluice]", cfg.Config.Entrypoint)
	}
	if cfg.Config.User != "" || cfg.OS != "linux" || cfg.Architecture != runtime.GOARCH {
		t.Errorf("User %q OS %q Architecture %q, want \"\" linux %s", cfg.Config.User, cfg.OS, cfg.Architecture, runtime.GOARCH)
	}
	if v := cfg.Config.Labels["org.opencontainers.image.version"]; v != "v0.0.0-test" {
		t.Errorf("version label %q, want v0.0.0-test", v)
	}
	if s := cfg.Config.Labels["org.opencontainers.image.source"]; s != sourceURL {
		t.Errorf("source label %q, want %s", s, sourceURL)
	}

	headers, bodies := files(t, img)
	for path, mode := range map[string]os.FileMode{
		"sluice":     0o755,
		"etc/passwd": 0o644,
		"etc/group":  0o644,
		"tmp/":       os.ModeDir | os.ModeSticky | 0o777,
	} {
		h := headers[path]
		if h == nil {
			t.Errorf("no %s in the layer", path)
			continue
		}
		if got := h.FileInfo().Mode(); got != mode {
			t.Errorf("%s: mode %v, want %v", path, got, mode)
		}
		if h.Uid != 0 || h.Gid != 0 || !h.ModTime.Equal(layer.Epoch) {
			t.Errorf("%s: owner %d:%d mtime %v, want 0:0 %v", path, h.Uid, h.Gid, h.ModTime, layer.Epoch)
		}
	}
	for _, tool := range []string{"istio-iptables", "proxy-init"} {
		if h := headers["usr/local/bin/"+tool]; h == nil || h.Typeflag != tar.TypeSymlink || h.Linkname != "/sluice" {
			t.Errorf("/usr/local/bin/%s: %+v, want a link to /sluice", tool, h)
		}
	}
	if !bytes.Equal(bodies["sluice"], want) {
		t.Errorf("/sluice is %d bytes unlike the binary's %d", len(bodies["sluice"]), len(want))
	}
	if !strings.Contains(string(bodies["etc/passwd"]), "sluice-proxy:x:1337:1337:") {
		t.Errorf("/etc/passwd has no uid 1337:\n%s", bodies["etc/passwd"])
	}
	if !strings.Contains(string(bodies["etc/group"]), "sluice-proxy:x:1337:") {
		t.Errorf("/etc/group has no gid 1337:\n%s", bodies["etc/group"])
	}

	// The same image, from the OCI layout.
	digest, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	idx, err := layout.ImageIndexFromPath(ociDir)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 || im.Manifests[0].Digest != digest ||
		im.Manifests[0].Annotations["io.containerd.image.name"] != "docker.io/library/sluice:dev" {
		t.Errorf("OCI layout index %+v, want one manifest %s named docker.io/library/sluice:dev", im.Manifests, digest)
	}
}

func TestReproducible(t *testing.T) {
	bin := staticBinary(t)
	var digests []v1.Hash
	for range 2 {
		img, err := tarball.ImageFromPath(writeImage(t, bin, nil), nil)
		if err != nil {
			t.Fatal(err)
		}
		d, err := img.Digest()
		if err != nil {
			t.Fatal(err)
		}
		digests = append(digests, d)
	}
	if digests[0] != digests[1] {
		t.Errorf("two builds of the same binary: manifest digests %s and %s", digests[0], digests[1])
	}
}

func TestCanonicalTag(t *testing.T) {
	for in, want := range map[string]string{
		"sluice:dev":                    "docker.io/library/sluice:dev",
		"sluice":                        "docker.io/library/sluice:latest",
		"sluicemesh/sluice:v1":          "docker.io/sluicemesh/sluice:v1",
		"ghcr.io/sluicemesh/sluice:v1":  "ghcr.io/sluicemesh/sluice:v1",
		"localhost:5000/sluice:dev":     "localhost:5000/sluice:dev",
		"docker.io/library/sluice:dev":  "docker.io/library/sluice:dev",
		"index.docker.io/x/sluice:dev2": "docker.io/x/sluice:dev2",
	} {
		got, err := canonicalTag(in)
		if err != nil {
			t.Errorf("%s: %v", in, err)
		} else if got.String() != want {
			t.Errorf("%s: %s, want %s", in, got, want)
		}
	}
	if _, err := canonicalTag("Sluice:dev"); err == nil {
		t.Error("Sluice:dev (upper case) accepted")
	}
}

func TestRefusesNonStatic(t *testing.T) {
	notELF := filepath.Join(t.TempDir(), "script")
	if err := os.WriteFile(notELF, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	other := "arm64"
	if runtime.GOARCH == other {
		other = "amd64"
	}
	for _, tc := range []struct{ binary, arch, want string }{
		{"/bin/true", runtime.GOARCH, "/bin/true is dynamically linked and the image has no libc: build it with CGO_ENABLED=0"},
		{notELF, runtime.GOARCH, "is not an ELF executable"},
		{"/bin/true", "mips", `unsupported -arch "mips"`},
		{"/bin/true", other, ", not " + other + ": set GOARCH or -arch"},
	} {
		out := filepath.Join(t.TempDir(), "image.tar")
		err := run(options{binary: tc.binary, tag: "sluice:dev", out: out, arch: tc.arch})
		if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s (%s): error %v, want one line containing %q", tc.binary, tc.arch, err, tc.want)
		}
		if _, err := os.Stat(out); err == nil {
			t.Errorf("%s: wrote %s anyway", tc.binary, out)
		}
	}
}
