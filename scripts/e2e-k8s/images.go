package main

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
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

// file is one entry of an image's only layer.
type file struct {
	name string
	mode int64
	body []byte // nil and no link: a directory
	link string // a symbolic link to this
}

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
	if err := writeImage(imgs.pause, pauseRef, []string{"/pause"}, []file{{name: "pause", mode: 0o755, body: pause}}); err != nil {
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
	files := []file{
		{name: "bin/", mode: 0o755}, {name: "bin/busybox", mode: 0o755, body: bb},
		{name: "etc/", mode: 0o755},
		{name: "etc/passwd", mode: 0o644, body: []byte("root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")},
		{name: "etc/group", mode: 0o644, body: []byte("root:x:0:\nnogroup:x:65534:\n")},
		{name: "tmp/", mode: 0o1777},
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet != "busybox" {
			files = append(files, file{name: "bin/" + applet, mode: 0o777, link: "busybox"})
		}
	}
	if err := writeImage(imgs.busybox, busyboxRef, []string{"/bin/sh"}, files); err != nil {
		return images{}, fmt.Errorf("busybox: %w", err)
	}
	slog.Info("images packed", "pause", imgs.pause, "busybox", imgs.busybox)
	return imgs, nil
}

// writeImage writes a one-layer image of files as a docker-archive.
func writeImage(path, ref string, entrypoint []string, files []file) error {
	tag, err := name.NewTag(ref)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	epoch := time.Unix(0, 0).UTC()
	for _, f := range files {
		h := &tar.Header{Name: f.name, Mode: f.mode, ModTime: epoch, Format: tar.FormatPAX}
		switch {
		case f.link != "":
			h.Typeflag, h.Linkname = tar.TypeSymlink, f.link
		case f.body == nil:
			h.Typeflag = tar.TypeDir
		default:
			h.Typeflag, h.Size = tar.TypeReg, int64(len(f.body))
		}
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("layer %s: %w", f.name, err)
		}
		if _, err := tw.Write(f.body); err != nil {
			return fmt.Errorf("layer %s: %w", f.name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(buf.Bytes())), nil
	})
	if err != nil {
		return err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", runtime.GOARCH
	cfg.Created = v1.Time{Time: epoch}
	cfg.Config = v1.Config{Entrypoint: entrypoint}
	if img, err = mutate.ConfigFile(img, cfg); err != nil {
		return err
	}
	return tarball.WriteToFile(path, tag, img)
}
