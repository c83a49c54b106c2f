// Command image builds the Sluice container image without Docker: one layer
// on an empty base holding the static binary at /sluice, /etc/passwd and
// /etc/group naming root and the proxy user (1337, sluice-proxy), and /tmp.
// It writes a docker-archive ("docker save" format) tarball, which
// `ctr -n k8s.io images import` and `docker load` read, and on request an
// OCI image layout directory.
//
//	go run ./scripts/image [-binary bin/sluice] [-tag sluice:dev] [-out results/sluice-image.tar] [-arch amd64] [-version v1.2.3] [-oci-layout DIR]
//
// Every timestamp is fixed, so the same binary always gives the same
// manifest digest.
package main

import (
	"bytes"
	"debug/elf"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/sluicemesh/sluice/internal/layer"
)

const (
	sourceURL = "https://github.com/sluicemesh/sluice"
	// proxyID is the uid and gid `sluice install` exempts by default (-u/-g 1337).
	proxyID   = 1337
	proxyName = "sluice-proxy"
)

// elfMachine is the ELF machine a binary must be built for, per GOARCH.
var elfMachine = map[string]elf.Machine{
	"amd64":   elf.EM_X86_64,
	"arm64":   elf.EM_AARCH64,
	"arm":     elf.EM_ARM,
	"386":     elf.EM_386,
	"ppc64le": elf.EM_PPC64,
	"s390x":   elf.EM_S390,
	"riscv64": elf.EM_RISCV,
}

type options struct {
	binary    string
	tag       string
	out       string
	arch      string
	version   string
	ociLayout string
}

func main() {
	var o options
	flag.StringVar(&o.binary, "binary", "bin/sluice", "the static sluice binary (CGO_ENABLED=0)")
	flag.StringVar(&o.tag, "tag", "sluice:dev", "the image's name and tag")
	flag.StringVar(&o.out, "out", "results/sluice-image.tar", "the docker-archive tarball to write")
	flag.StringVar(&o.arch, "arch", runtime.GOARCH, "the binary's GOARCH, recorded in the image config")
	flag.StringVar(&o.version, "version", "dev", "the org.opencontainers.image.version label (git describe)")
	flag.StringVar(&o.ociLayout, "oci-layout", "", "also write an OCI image layout to this directory")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "image: unexpected arguments %q\n", flag.Args())
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func run(o options) error {
	ref, err := canonicalTag(o.tag)
	if err != nil {
		return err
	}
	img, err := build(o)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(o.out), 0o755); err != nil {
		return err
	}
	if err := tarball.WriteToFile(o.out, ref, img); err != nil {
		return fmt.Errorf("write %s: %w", o.out, err)
	}
	if o.ociLayout != "" {
		if err := writeLayout(o.ociLayout, ref, img, o.arch); err != nil {
			return fmt.Errorf("write OCI layout %s: %w", o.ociLayout, err)
		}
	}
	digest, err := img.Digest()
	if err != nil {
		return err
	}
	fmt.Printf("%s: %s %s\n", o.out, ref, digest)
	return nil
}

// canonicalTag names the image as containerd does: a short Docker Hub name
// (sluice:dev) becomes docker.io/library/sluice:dev, the reference a pod spec's
// "sluice:dev" resolves to, so the archive's tag needs no normalizing.
func canonicalTag(s string) (name.Tag, error) {
	tag, err := name.NewTag(s)
	if err != nil {
		return name.Tag{}, fmt.Errorf("bad -tag %q: %w", s, err)
	}
	if tag.RegistryStr() == name.DefaultRegistry {
		return name.NewTag("docker.io/" + tag.RepositoryStr() + ":" + tag.TagStr())
	}
	return tag, nil
}

// build makes the image from the binary at o.binary, refusing one that is not
// a static ELF executable for o.arch.
func build(o options) (v1.Image, error) {
	bin, err := readStatic(o.binary, o.arch)
	if err != nil {
		return nil, err
	}
	root, err := layer.New(rootfs(bin))
	if err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	img, err := mutate.Append(empty.Image, mutate.Addendum{
		Layer: root,
		History: v1.History{
			Created:   v1.Time{Time: layer.Epoch},
			CreatedBy: "scripts/image",
			Comment:   "sluice " + o.version,
		},
	})
	if err != nil {
		return nil, err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cfg = cfg.DeepCopy()
	cfg.OS = "linux"
	cfg.Architecture = o.arch
	cfg.Created = v1.Time{Time: layer.Epoch}
	// User stays empty (root): install runs as root and the pod spec sets
	// runAsUser 1337 on the sidecar container.
	cfg.Config = v1.Config{
		Entrypoint: []string{"/sluice"},
		Labels: map[string]string{
			"org.opencontainers.image.source":  sourceURL,
			"org.opencontainers.image.version": o.version,
		},
	}
	return mutate.ConfigFile(img, cfg)
}

// readStatic returns the binary's bytes if it is an ELF executable for arch
// with no program interpreter: the image has no libc for a dynamic one.
func readStatic(path, arch string) ([]byte, error) {
	want, ok := elfMachine[arch]
	if !ok {
		return nil, fmt.Errorf("unsupported -arch %q", arch)
	}
	bin, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	f, err := elf.NewFile(bytes.NewReader(bin))
	if err != nil {
		return nil, fmt.Errorf("%s is not an ELF executable: build it with 'make image'", path)
	}
	if f.Machine != want {
		return nil, fmt.Errorf("%s is built for %s, not %s: set GOARCH or -arch", path, f.Machine, arch)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return nil, fmt.Errorf("%s is dynamically linked and the image has no libc: build it with CGO_ENABLED=0 (make image)", path)
		}
	}
	return bin, nil
}

// rootfs is the layer's files: the binary, the users a pod may run it as, /tmp.
func rootfs(bin []byte) []layer.File {
	passwd := fmt.Sprintf("root:x:0:0:root:/:/sbin/nologin\n%[1]s:x:%[2]d:%[2]d:%[1]s:/:/sbin/nologin\n", proxyName, proxyID)
	group := fmt.Sprintf("root:x:0:\n%s:x:%d:\n", proxyName, proxyID)
	return []layer.File{
		{Name: "etc/", Mode: 0o755},
		{Name: "etc/group", Mode: 0o644, Body: []byte(group)},
		{Name: "etc/passwd", Mode: 0o644, Body: []byte(passwd)},
		{Name: "sluice", Mode: 0o755, Body: bin},
		{Name: "tmp/", Mode: 0o1777},
		// The meshes' init-container tools, by the names sluice answers
		// to as argv[0]: an injection template that runs the tool as its
		// command works with only the image swapped.
		{Name: "usr/", Mode: 0o755},
		{Name: "usr/local/", Mode: 0o755},
		{Name: "usr/local/bin/", Mode: 0o755},
		{Name: "usr/local/bin/istio-iptables", Mode: 0o777, Link: "/sluice"},
		{Name: "usr/local/bin/proxy-init", Mode: 0o777, Link: "/sluice"},
	}
}

// writeLayout writes an OCI image layout holding the one image, named as
// containerd's own export names it.
func writeLayout(dir string, ref name.Tag, img v1.Image, arch string) error {
	desc, err := partial.Descriptor(img)
	if err != nil {
		return err
	}
	desc.ArtifactType = "" // an image, not an artifact
	desc.Platform = &v1.Platform{OS: "linux", Architecture: arch}
	desc.Annotations = map[string]string{
		"io.containerd.image.name":          ref.String(),
		"org.opencontainers.image.ref.name": ref.TagStr(),
	}
	_, err = layout.Write(dir, mutate.AppendManifests(empty.Index, mutate.IndexAddendum{Add: img, Descriptor: *desc}))
	return err
}
