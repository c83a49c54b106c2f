package main

import (
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/sluicemesh/sluice/internal/layer"
)

// images are the archives ctr imports and the names pods use.
type images struct {
	pause, busybox       string // docker-archive tarballs
	pauseRef, busyboxRef string
}

const (
	pauseRef   = "registry.k8s.io/pause:sluice-e2e"
	busyboxRef = "docker.io/library/sluice-e2e-busybox:v1"
)

// buildImages packs the pause image (a static build of ./scripts/e2e-k8s/pause)
// and a busybox image (/bin/busybox of busybox-static and a link per applet)
// into the cache directory.
func buildImages(p plan) (images, error) {
	dir := filepath.Join(p.cache, "images")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return images{}, err
	}
	imgs := images{
		pause: filepath.Join(dir, "pause.tar"), busybox: filepath.Join(dir, "busybox.tar"),
		pauseRef: pauseRef, busyboxRef: busyboxRef,
	}
	pauseBin := filepath.Join(dir, "pause")
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", pauseBin, "./scripts/e2e-k8s/pause")
	build.Dir = p.repo
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return images{}, fmt.Errorf("build pause: %w: %s", err, out)
	}
	pause, err := os.ReadFile(pauseBin)
	if err != nil {
		return images{}, err
	}
	if err := writeImage(imgs.pause, pauseRef, []string{"/pause"}, []layer.File{{Name: "pause", Mode: 0o755, Body: pause}}); err != nil {
		return images{}, fmt.Errorf("pause: %w", err)
	}
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return images{}, err
	}
	out, err := exec.Command("/bin/busybox", "--list").Output()
	if err != nil {
		return images{}, fmt.Errorf("busybox --list: %w", err)
	}
	files := []layer.File{
		{Name: "bin/", Mode: 0o755}, {Name: "bin/busybox", Mode: 0o755, Body: bb},
		{Name: "etc/", Mode: 0o755},
		{Name: "etc/passwd", Mode: 0o644, Body: []byte("root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")},
		{Name: "etc/group", Mode: 0o644, Body: []byte("root:x:0:\nnogroup:x:65534:\n")},
		{Name: "tmp/", Mode: 0o1777},
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet != "busybox" {
			files = append(files, layer.File{Name: "bin/" + applet, Mode: 0o777, Link: "busybox"})
		}
	}
	if err := writeImage(imgs.busybox, busyboxRef, []string{"/bin/sh"}, files); err != nil {
		return images{}, fmt.Errorf("busybox: %w", err)
	}
	slog.Info("images packed", "pause", imgs.pause, "busybox", imgs.busybox)
	return imgs, nil
}

// writeImage writes a one-layer image of files as a docker-archive.
func writeImage(path, ref string, entrypoint []string, files []layer.File) error {
	tag, err := name.NewTag(ref)
	if err != nil {
		return err
	}
	lay, err := layer.New(files)
	if err != nil {
		return err
	}
	img, err := mutate.AppendLayers(empty.Image, lay)
	if err != nil {
		return err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", runtime.GOARCH
	cfg.Created = v1.Time{Time: layer.Epoch}
	cfg.Config = v1.Config{Entrypoint: entrypoint}
	if img, err = mutate.ConfigFile(img, cfg); err != nil {
		return err
	}
	return tarball.WriteToFile(path, tag, img)
}
