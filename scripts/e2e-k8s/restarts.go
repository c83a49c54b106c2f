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
	out, err := k.outbound("app")
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("sidecar back in %.1fs; %s", took.Seconds(), out), nil
}

// agentRestart deletes the agent's pod, as a crash or an eviction would:
// capture is untouched (the pins hold it), its DaemonSet starts another,
// and the new agent, whose counts start from zero, counts a connection
// made with it.
func (k *checker) agentRestart() (string, error) {
	const key = "app"
	old := k.ip["agent/pod"]
	if _, err := k.c.kubectl(k.ctx, "delete", "pod", "-n", "sluice-system", old, "--wait", "--timeout", "60s", "--grace-period", "1"); err != nil {
		return "", err
	}
	if err := k.fetchOutbound(key); err != nil {
		return "", fmt.Errorf("with the agent's pod deleted: %w", err)
	}
	agent, err := k.agentPod()
	if err != nil {
		return "", err
	}
	if agent == old {
		return "", fmt.Errorf("the agent's pod is still %s", old)
	}
	out, err := k.outbound(key)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("captured with %s deleted (256 KiB intact), then by the DaemonSet's %s: %s", old, agent, out), nil
}

// agentAbsent takes the agent off the node (a nodeSelector no node has,
// so the DaemonSet deletes its pod and starts none), makes a connection
// while no agent runs, and puts the DaemonSet back as deploy/ has it.
// Capture is untouched; nothing reads the node's flow ring meanwhile, so
// the connection's events wait there, and the next agent, whose counts
// start from zero, counts it as soon as it is up.
func (k *checker) agentAbsent() (string, error) {
	const key = "app"
	old := k.ip["agent/pod"]
	if _, err := k.c.kubectl(k.ctx, "patch", "daemonset", "-n", "sluice-system", "sluice-agent",
		"-p", `{"spec":{"template":{"spec":{"nodeSelector":{"sluice-e2e/no-such-node":"true"}}}}}`); err != nil {
		return "", err
	}
	start := time.Now()
	none := func() error {
		out, err := k.c.kubectl(k.ctx, "get", "pod", "-n", "sluice-system", "-l", "app.kubernetes.io/name=sluice-agent", "-o", "name")
		if err == nil && len(strings.TrimSpace(string(out))) > 0 {
			err = fmt.Errorf("agent pods: %s", strings.Join(strings.Fields(string(out)), " "))
		}
		return err
	}
	if err := k.c.poll(k.ctx, 60*time.Second, "no agent pod", none); err != nil {
		return "", err
	}
	gone := time.Since(start)
	if err := k.fetchOutbound(key); err != nil {
		return "", fmt.Errorf("with no agent: %w", err)
	}
	if err := none(); err != nil {
		return "", fmt.Errorf("an agent came back during the fetch: %w", err)
	}
	if _, err := k.c.kubectl(k.ctx, "patch", "daemonset", "-n", "sluice-system", "sluice-agent", "--type", "json",
		"-p", `[{"op":"remove","path":"/spec/template/spec/nodeSelector"}]`); err != nil {
		return "", err
	}
	agent, err := k.agentPod()
	if err != nil {
		return "", err
	}
	want := []string{`reporter="source"`, fmt.Sprintf(`destination_service="%s:8080"`, k.ip["server1"]), fmt.Sprintf(`source_workload="%s"`, key)}
	var meanwhile float64
	err = k.c.poll(k.ctx, 10*time.Second, "the new agent to count the flow left in the ring", func() error {
		meanwhile, err = k.flowMetric(key, opened, want...)
		if err == nil && meanwhile < 1 {
			err = fmt.Errorf("new agent %s: %s{pod_uid=%q,%s} %v: the connection made while no agent ran is not counted", agent, opened, k.ip[key+"/uid"], strings.Join(want, ","), meanwhile)
		}
		return err
	})
	if err != nil {
		return "", err
	}
	out, err := k.outbound(key)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s gone %.1fs after the patch; captured with no agent pod before or after the fetch (256 KiB intact); the next agent %s counted it from the node's ring (%v); then %s",
		old, gone.Seconds(), agent, meanwhile, out), nil
}

// fetchOutbound: the pod's app fetches server1's file intact, and server1
// logs the pod's IP: what capture does with no agent.
func (k *checker) fetchOutbound(key string) error {
	pod := k.ip[key+"/pod"]
	sum, n, err := k.fetch(pod, "app", "http://"+k.ip["server1"]+":8080/file")
	if err != nil {
		return err
	}
	if sum != k.sum["server1"] || n != 262144 {
		return fmt.Errorf("%s got %d bytes sha256 %s, want 262144 bytes %s", pod, n, sum, k.sum["server1"])
	}
	return k.logged("default", "server1", "httpd", peer(k.ip[key]))
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
	// The agent takes up the pod's new network namespace (which the rerun
	// of install recorded) at its next look, every 2 s: the pod's flow
	// counts start again there, from zero.
	time.Sleep(3 * time.Second)
	out, err := k.outbound("app")
	if err != nil {
		return "", err
	}
	in, err := k.inbound("app")
	if err != nil {
		return "", errors.Join(errors.New("inbound after the new sandbox"), err)
	}
	return fmt.Sprintf("Ready again in %.1fs at %s; %s; %s", took.Seconds(), k.ip["app"], out, in), nil
}
