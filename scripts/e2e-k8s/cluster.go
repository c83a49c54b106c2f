package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// cluster is one run's processes, started in order and stopped in reverse.
type cluster struct {
	plan
	base  hostState
	procs []*proc
	// bridgeMade, parentMade: teardown deletes the bridge and the run
	// directory's parent only if this run made them.
	bridgeMade, parentMade bool
	rssAtReady             int64 // bytes, every process's, with the busybox pod Ready
	// seenIDs are the kubelet's cgroup ids seen while pods ran: teardown
	// removes Sluice's pins of these too (pods deleted before it).
	seenIDs []uint64
	checks  *checker // the Sluice checks' results, printed after teardown
}

// proc is a process the cluster started, in its own process group so a
// Ctrl-C reaches only this command, which stops them in order.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

func (c *cluster) start(name string, args ...string) (*proc, error) {
	logf, err := os.Create(c.path("logs", name+".log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	pr := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() { pr.err = cmd.Wait(); close(pr.done) }()
	c.procs = append(c.procs, pr)
	slog.Info("started", "process", name, "pid", cmd.Process.Pid, "log", logf.Name())
	return pr, nil
}

// stop ends the process by its pid: SIGTERM, then SIGKILL after grace.
func (pr *proc) stop(grace time.Duration) {
	select {
	case <-pr.done:
		return
	default:
	}
	_ = pr.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-pr.done:
	case <-time.After(grace):
		slog.Warn("did not stop on SIGTERM: killing", "process", pr.name, "pid", pr.cmd.Process.Pid)
		_ = pr.cmd.Process.Kill()
		<-pr.done
	}
}

// alive fails if the process has exited, pointing at its log.
func (c *cluster) alive(pr *proc) error {
	select {
	case <-pr.done:
		return fmt.Errorf("%s exited (%v): see %s", pr.name, pr.err, c.path("logs", pr.name+".log"))
	default:
		return nil
	}
}

// poll calls f until it succeeds, every process is still alive, or timeout.
func (c *cluster) poll(ctx context.Context, timeout time.Duration, what string, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return nil
		}
		for _, pr := range c.procs {
			if aerr := c.alive(pr); aerr != nil {
				return fmt.Errorf("waiting for %s: %w", what, aerr)
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not after %v: %w", what, timeout, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", what, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func run1(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

func (c *cluster) kubectl(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(c.binDir, "kubectl"), append([]string{"--kubeconfig", c.path("pki", "admin.kubeconfig")}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return out, nil
}

func (c *cluster) ctr(args ...string) ([]byte, error) {
	cmd := exec.Command("ctr", append([]string{"--address", c.path("containerd", "containerd.sock"), "--namespace", "k8s.io"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return out, nil
}

// up brings the cluster up: bridge, etcd, containerd (images imported),
// apiserver, controller-manager, scheduler, kubelet, and waits for the node
// to be Ready and the default service account to exist.
func (c *cluster) up(ctx context.Context, imgs images) error {
	if _, err := os.Stat(c.run); err == nil {
		return fmt.Errorf("%s exists: an earlier run did not finish its teardown; look at it, then remove it", c.run)
	}
	if _, err := os.Stat(filepath.Dir(c.run)); errors.Is(err, os.ErrNotExist) {
		c.parentMade = true
	}
	for _, d := range []string{"logs", "etcd", "containerd", "kubelet", "pod-logs", "cni/net.d", "cni/ipam", "cni/bin", "apiserver", "kcm"} {
		if err := os.MkdirAll(c.path(d), 0o700); err != nil {
			return err
		}
	}
	if err := c.linkCNIPlugins(); err != nil {
		return err
	}
	if err := writePKI(c.path("pki"), c.plan); err != nil {
		return fmt.Errorf("certificates: %w", err)
	}
	if err := c.writeConfigs(imgs); err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	// The bridge carries the node's address: the CNI bridge plugin with
	// isGateway false never gives it one.
	if _, err := net.InterfaceByName(c.bridge); err == nil {
		return fmt.Errorf("bridge %s exists already", c.bridge)
	}
	if err := run1("ip", "link", "add", c.bridge, "type", "bridge"); err != nil {
		return err
	}
	c.bridgeMade = true
	if err := run1("ip", "addr", "add", c.nodeIP+"/24", "dev", c.bridge); err != nil {
		return err
	}
	if err := run1("ip", "link", "set", c.bridge, "up"); err != nil {
		return err
	}

	if _, err := c.start("etcd", "etcd", "--name", "e2e", "--data-dir", c.path("etcd"),
		"--listen-client-urls", c.etcdURL, "--advertise-client-urls", c.etcdURL,
		"--listen-peer-urls", c.peerURL, "--initial-advertise-peer-urls", c.peerURL,
		"--initial-cluster", "e2e="+c.peerURL, "--initial-cluster-state", "new"); err != nil {
		return err
	}
	if _, err := c.start("containerd", "containerd", "--config", c.path("containerd", "config.toml")); err != nil {
		return err
	}
	if err := c.poll(ctx, 30*time.Second, "etcd", func() error { return httpOK(nil, c.etcdURL+"/health", "") }); err != nil {
		return err
	}
	if err := c.poll(ctx, 30*time.Second, "containerd", func() error { _, err := c.ctr("version"); return err }); err != nil {
		return err
	}
	for _, tar := range []string{imgs.pause, imgs.busybox} {
		if _, err := c.ctr("images", "import", tar); err != nil {
			return err
		}
	}

	pki := func(f string) string { return c.path("pki", f) }
	kubeconfig := pki("admin.kubeconfig")
	if _, err := c.start("kube-apiserver", filepath.Join(c.binDir, "kube-apiserver"),
		"--etcd-servers", c.etcdURL,
		"--bind-address", c.nodeIP, "--advertise-address", c.nodeIP, "--secure-port", fmt.Sprint(c.apiPort),
		"--cert-dir", c.path("apiserver"),
		"--tls-cert-file", pki("apiserver.crt"), "--tls-private-key-file", pki("apiserver.key"),
		"--token-auth-file", pki("tokens.csv"), "--authorization-mode", "RBAC",
		"--service-cluster-ip-range", c.svcCIDR,
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", pki("sa.pub"), "--service-account-signing-key-file", pki("sa.key"),
		"--kubelet-preferred-address-types", "InternalIP", // no DNS lookup of the node name
		// No kube-proxy here: a Service's cluster IP leads nowhere, so the
		// API server calls the injector's Service at its endpoints.
		"--enable-aggregator-routing",
		"--allow-privileged", "--profiling=false"); err != nil {
		return err
	}
	caPool, err := certPool(pki("ca.crt"))
	if err != nil {
		return err
	}
	token, err := readToken(pki("tokens.csv"))
	if err != nil {
		return err
	}
	api := fmt.Sprintf("https://%s:%d", c.nodeIP, c.apiPort)
	if err := c.poll(ctx, 90*time.Second, "kube-apiserver /readyz", func() error { return httpOK(caPool, api+"/readyz", token) }); err != nil {
		return err
	}
	if _, err := c.start("kube-controller-manager", filepath.Join(c.binDir, "kube-controller-manager"),
		"--kubeconfig", kubeconfig, "--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", "0",
		"--cert-dir", c.path("kcm"),
		"--service-account-private-key-file", pki("sa.key"), "--root-ca-file", pki("ca.crt"),
		"--use-service-account-credentials=false", "--service-cluster-ip-range", c.svcCIDR, "--profiling=false"); err != nil {
		return err
	}
	if _, err := c.start("kube-scheduler", filepath.Join(c.binDir, "kube-scheduler"),
		"--kubeconfig", kubeconfig, "--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", "0",
		"--profiling=false"); err != nil {
		return err
	}
	if _, err := c.start("kubelet", filepath.Join(c.binDir, "kubelet"),
		"--config", c.path("kubelet.yaml"), "--kubeconfig", kubeconfig,
		"--root-dir", c.path("kubelet"), "--cert-dir", c.path("kubelet", "pki"),
		"--hostname-override", c.node, "--node-ip", c.nodeIP); err != nil {
		return err
	}
	if err := c.poll(ctx, c.timeout, "node Ready", func() error {
		out, err := c.kubectl(ctx, "get", "node", c.node, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		if err == nil && string(out) != "True" {
			err = fmt.Errorf("Ready=%q", out)
		}
		return err
	}); err != nil {
		return err
	}
	return c.poll(ctx, c.timeout, "service account default/default", func() error {
		_, err := c.kubectl(ctx, "get", "serviceaccount", "default")
		return err
	})
}

// writeConfigs writes containerd's, the kubelet's and the CNI configuration.
func (c *cluster) writeConfigs(imgs images) error {
	cd := func(f string) string { return c.path("containerd", f) }
	containerd := fmt.Sprintf(`version = 2
root = %q
state = %q

[grpc]
  address = %q

[ttrpc]
  address = %q

[plugins."io.containerd.internal.v1.opt"]
  path = %q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  # No CAP_SYS_RESOURCE here: runc fails ("can't get final child's PID from
  # pipe") setting an oom_score_adj below containerd's own.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = %q
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
`, cd("root"), cd("state"), cd("containerd.sock"), cd("containerd.sock.ttrpc"), cd("opt"),
		imgs.pauseRef, cd("runc"), c.path("cni", "bin"), c.path("cni", "net.d"))
	kubelet := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://%s
address: %s
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
cgroupDriver: cgroupfs
failSwapOn: false
failCgroupV1: false
makeIPTablesUtilChains: false
# Image GC off: the imported images cannot be pulled again.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
podLogsDir: %s
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
resolvConf: /etc/resolv.conf
serializeImagePulls: false
`, cd("containerd.sock"), c.nodeIP, c.path("pod-logs"))
	cni := fmt.Sprintf(`{
  "cniVersion": "0.4.0",
  "name": "sluice-e2e",
  "plugins": [{
    "type": "bridge",
    "bridge": %q,
    "isGateway": false,
    "ipMasq": false,
    "hairpinMode": false,
    "ipam": {
      "type": "host-local",
      "dataDir": %q,
      "ranges": [[{"subnet": %q, "rangeStart": "198.18.240.10", "gateway": %q}]],
      "routes": [{"dst": "0.0.0.0/0", "gw": %q}]
    }
  }]
}
`, c.bridge, c.path("cni", "ipam"), c.podCIDR, c.nodeIP, c.nodeIP)
	for path, data := range map[string]string{
		cd("config.toml"):                         containerd,
		c.path("kubelet.yaml"):                    kubelet,
		c.path("cni", "net.d", "10-e2e.conflist"): cni,
	} {
		if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// linkCNIPlugins gives containerd a CNI bin directory of the run's own,
// holding links to Debian's plugins: deploy/cni/'s agent copies sluice-cni
// there (the hostPath it mounts is this directory), not into the host's.
func (c *cluster) linkCNIPlugins() error {
	plugins, err := filepath.Glob("/usr/lib/cni/*")
	if err != nil || len(plugins) == 0 {
		return fmt.Errorf("no CNI plugins in /usr/lib/cni (make deps installs containernetworking-plugins): %v", err)
	}
	for _, p := range plugins {
		if err := os.Symlink(p, c.path("cni", "bin", filepath.Base(p))); err != nil {
			return err
		}
	}
	return nil
}

func httpOK(pool *x509.CertPool, url, token string) error {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

func certPool(path string) (*x509.CertPool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, errors.New("no certificate in " + path)
	}
	return pool, nil
}

func readToken(tokensCSV string) (string, error) {
	data, err := os.ReadFile(tokensCSV)
	if err != nil {
		return "", err
	}
	tok, _, ok := strings.Cut(string(data), ",")
	if !ok {
		return "", errors.New("no token in " + tokensCSV)
	}
	return tok, nil
}
