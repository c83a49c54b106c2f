package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// runBusybox runs a busybox pod with an exec readiness probe to Ready,
// shows where its container landed in the cgroup2 hierarchy, and deletes
// it. It returns how long the pod took from apply to Ready.
func (c *cluster) runBusybox(ctx context.Context, imgs images) (time.Duration, error) {
	pod := fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: busybox
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: busybox
    image: %s
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "touch /tmp/ready; exec sleep 3600"]
    readinessProbe:
      exec: {command: ["cat", "/tmp/ready"]}
      periodSeconds: 1
`, imgs.busyboxRef)
	path := c.path("busybox.yaml")
	if err := os.WriteFile(path, []byte(pod), 0o644); err != nil {
		return 0, err
	}
	start := time.Now()
	if _, err := c.kubectl(ctx, "apply", "-f", path); err != nil {
		return 0, err
	}
	if err := c.podReady(ctx, "pod/busybox"); err != nil {
		return 0, err
	}
	ready := time.Since(start)
	c.rssAtReady = c.rss()
	out, err := c.kubectl(ctx, "exec", "busybox", "--", "cat", "/proc/self/cgroup")
	if err != nil {
		return 0, err
	}
	var cg2 string
	for _, l := range strings.Split(string(out), "\n") {
		if rest, ok := strings.CutPrefix(l, "0::"); ok {
			cg2 = rest
		}
	}
	ip, err := c.kubectl(ctx, "get", "pod", "busybox", "-o", "jsonpath={.status.podIP}")
	if err != nil {
		return 0, err
	}
	slog.Info("busybox pod", "ip", string(ip), "cgroup2", cg2)
	if _, err := c.kubectl(ctx, "delete", "pod", "busybox", "--wait", "--timeout", c.timeout.String()); err != nil {
		return 0, err
	}
	return ready, nil
}

// podReady waits for the pod to be Ready; when it is not, the error holds
// what kubectl describe says of the pods.
func (c *cluster) podReady(ctx context.Context, what string) error {
	_, err := c.kubectl(ctx, "wait", "--for=condition=Ready", what, "--timeout", c.timeout.String())
	if err == nil {
		return nil
	}
	desc, derr := c.kubectl(ctx, "describe", "pods")
	return fmt.Errorf("%s not Ready: %w\n%s", what, errors.Join(err, derr), desc)
}

// sluiceReport prints a Sluice pod's description and its containers'
// logs, and saves them under results/e2e-k8s/.
func (c *cluster) sluiceReport(ctx context.Context, app string, containers []string) {
	var b strings.Builder
	desc, err := c.kubectl(ctx, "describe", "pod", "-l", "app="+app)
	fmt.Fprintf(&b, "### kubectl describe pod -l app=%s (%v)\n%s\n", app, err, desc)
	for _, ctn := range containers {
		logs, err := c.kubectl(ctx, "logs", "-l", "app="+app, "-c", ctn, "--tail", "60")
		fmt.Fprintf(&b, "### logs %s (%v)\n%s\n", ctn, err, logs)
	}
	dir := filepath.Join(c.repo, "results", "e2e-k8s")
	path := filepath.Join(dir, "sluice-pod-"+app+"-"+time.Now().UTC().Format("20060102T150405Z")+".txt")
	if err := os.MkdirAll(dir, 0o755); err == nil {
		err = os.WriteFile(path, []byte(b.String()), 0o644)
		if err != nil {
			slog.Warn("save the sluice report", "err", err)
		}
	}
	fmt.Print(b.String())
	slog.Info("sluice pod report saved", "path", path)
}

// rss is the resident memory of every process the cluster started.
func (c *cluster) rss() int64 {
	var kib int64
	for _, pr := range c.procs {
		status, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pr.cmd.Process.Pid), "status"))
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(status), "\n") {
			if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
				n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
				kib += n
			}
		}
	}
	return kib << 10
}
