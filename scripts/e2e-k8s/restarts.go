package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// killInPod SIGKILLs, as a crash would, the process in the pod's cgroup tree
// whose command line starts with prefix, and returns its pid. Only the
// cluster this run started has such processes.
func killInPod(podDir, prefix string) (int, error) {
	var found int
	err := filepath.WalkDir(podDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || found != 0 || d.Name() != "cgroup.procs" {
			return nil
		}
		data, _ := os.ReadFile(path)
		for _, f := range strings.Fields(string(data)) {
			pid, _ := strconv.Atoi(f)
			cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			if strings.HasPrefix(strings.ReplaceAll(string(cmd), "\x00", " "), prefix) {
				found = pid
				return filepath.SkipAll
			}
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	if found == 0 {
		return 0, fmt.Errorf("no process %q in %s", prefix, podDir)
	}
	return found, syscall.Kill(found, syscall.SIGKILL)
}

// restarts returns how often the pod's init container (native sidecars
// included) named name has restarted.
func (k *checker) restarts(pod, name string) (int, error) {
	out, err := k.field("default", pod, fmt.Sprintf(`{.status.initContainerStatuses[?(@.name=="%s")].restartCount}`, name))
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(out)
}

// waitRestart polls until the init container name of pod has restarted more
// than before and the pod is Ready again.
func (k *checker) waitRestart(pod, name string, before int) error {
	err := k.c.poll(k.ctx, k.c.timeout, pod+"'s "+name+" to restart", func() error {
		n, err := k.restarts(pod, name)
		if err == nil && n <= before {
			err = fmt.Errorf("%s restarted %d times, as before", name, n)
		}
		return err
	})
	if err != nil {
		return err
	}
	_, err = k.c.kubectl(k.ctx, "wait", "--for=condition=Ready", "pod/"+pod, "--timeout", k.c.timeout.String())
	return err
}

// appNeverRestarted fails when the pod's app container restarted: capture
// coming and going must never fail the pod itself.
func (k *checker) appNeverRestarted(pod string) error {
	out, err := k.field("default", pod, `{.status.containerStatuses[?(@.name=="app")].restartCount}`)
	if err != nil {
		return err
	}
	if out != "0" {
		return fmt.Errorf("the app container of %s restarted %s times", pod, out)
	}
	return nil
}

// sidecarCrash kills the Sluice pod's sidecar; the kubelet restarts it, the
// pod stays up, and capture works again with no reinstall.
func (k *checker) sidecarCrash() (string, error) {
	pod := k.ip["app/pod"]
	dir, _, err := k.cgroupOf("default", pod)
	if err != nil {
		return "", err
	}
	before, err := k.restarts(pod, "sluice-proxy")
	if err != nil {
		return "", err
	}
	start := time.Now()
	if _, err := killInPod(dir, "/sluice run"); err != nil {
		return "", err
	}
	if err := k.waitRestart(pod, "sluice-proxy", before); err != nil {
		return "", err
	}
	took := time.Since(start)
	if err := k.appNeverRestarted(pod); err != nil {
		return "", err
	}
	out, err := k.outbound("app", 15090)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("sidecar back in %.1fs; %s", took.Seconds(), out), nil
}

// agentRestart deletes the agent's pod; its DaemonSet starts another, and
// capture is untouched meanwhile.
func (k *checker) agentRestart() (string, error) {
	if _, err := k.c.kubectl(k.ctx, "delete", "pod", "-n", "sluice-system", "-l", "app.kubernetes.io/name=sluice-agent", "--wait", "--timeout", "60s", "--grace-period", "1"); err != nil {
		return "", err
	}
	if _, err := k.outbound("app", 15090); err != nil {
		return "", fmt.Errorf("with the agent gone: %w", err)
	}
	agent, err := k.podOf("sluice-system", "app.kubernetes.io/name=sluice-agent")
	if err != nil {
		return "", err
	}
	out, err := k.outbound("app", 15090)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("captured while no agent ran, and after %s started; %s", agent, out), nil
}

// sandboxRestart kills the Sluice pod's sandbox (its pause process): the
// kubelet makes a new sandbox (a new network namespace and eth0) and reruns
// the init containers, whose install finishes the capture on the new
// interface; the pod comes back Ready, captured both ways.
func (k *checker) sandboxRestart() (string, error) {
	pod := k.ip["app/pod"]
	dir, _, err := k.cgroupOf("default", pod)
	if err != nil {
		return "", err
	}
	before, err := k.restarts(pod, "sluice-init")
	if err != nil {
		return "", err
	}
	start := time.Now()
	if _, err := killInPod(dir, "/pause"); err != nil {
		return "", err
	}
	if err := k.waitRestart(pod, "sluice-init", before); err != nil {
		return "", err
	}
	took := time.Since(start)
	if _, err := k.describeSluicePod(pod, "app", took); err != nil {
		return "", err
	}
	out, err := k.outbound("app", 15090)
	if err != nil {
		return "", err
	}
	in, err := k.inbound("app", 15090)
	if err != nil {
		return "", errors.Join(errors.New("inbound after the new sandbox"), err)
	}
	return fmt.Sprintf("Ready again in %.1fs at %s; %s; %s", took.Seconds(), k.ip["app"], out, in), nil
}
