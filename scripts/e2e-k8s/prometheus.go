package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"sigs.k8s.io/yaml"
)

// promAddr is where the node's Prometheus listens: loopback only.
const promAddr = "127.0.0.1:19091"

// prometheusScrapes runs Debian's Prometheus on the node with the scrape
// jobs of deploy/prometheus/scrape-config.yaml, their relabeling as it is,
// and checks what they scrape: the template pod's flow series, with its
// pod_uid and the workload labels its init container recorded, through the
// agent's job; the agent's own figures there too; the sidecar's proxy
// figures through the annotated pods' job, which leaves the agent (annotated
// too) to the agent's job and has no flow series.
//
// Debian builds Prometheus without Kubernetes service discovery, so each
// job's kubernetes_sd_configs is replaced by a file_sd_config holding the
// targets and __meta_kubernetes_* labels that discovery gives (role pod,
// role endpoints), read from the cluster with kubectl (discover below);
// Prometheus relabels and scrapes them itself.
func (k *checker) prometheusScrapes() (string, error) {
	ctx, out, stop, err := k.startPrometheus("prometheus")
	if err != nil {
		return "", err
	}
	defer stop()

	uid, pod := k.ip["app/uid"], k.ip["app/pod"]
	queries := []string{
		fmt.Sprintf(`sluice_tcp_connections_opened_total{job="sluice-agent",pod_uid=%q,reporter="source",source_workload="app",source_workload_namespace="default",source_app="app",source_version="v1"}`, uid),
		`sluice_agent_pods{job="sluice-agent",state="complete"}`,
		fmt.Sprintf(`up{job="sluice-sidecars",pod=%q}`, pod),
	}
	// Once those arrived, both jobs have scraped: neither may have these.
	none := []string{
		`count(up{job="sluice-sidecars",namespace="sluice-system"})`,
		`count({__name__=~"sluice_tcp_.*|sluice_kernel_events_total",job="sluice-sidecars"})`,
		fmt.Sprintf(`count(up{instance=%q}) > 1`, k.ip["agent"]+":9102"),
	}
	got := map[string]float64{}
	err = k.c.poll(ctx, 60*time.Second, "Prometheus to scrape the agent and the sidecar", func() error {
		for _, q := range queries {
			v, err := promValue(q)
			if err != nil {
				return err
			}
			if v < 1 {
				return fmt.Errorf("%s = %v", q, v)
			}
			got[q] = v
		}
		return nil
	})
	if err != nil {
		if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) {
			err = errors.Join(err, cause)
		}
		targets, _ := promGet("/api/v1/targets")
		return "", fmt.Errorf("%w\nPrometheus said:\n%s\ntargets: %s", err, out.String(), targets)
	}
	for _, q := range none {
		v, err := promValue(q)
		if err != nil {
			return "", err
		}
		if v != 0 {
			return "", fmt.Errorf("%s = %v, want none: the agent is scraped twice, or a sidecar still exports flows", q, v)
		}
	}
	return fmt.Sprintf("job sluice-agent: the app's flows {pod_uid=<uid of %s>,source_workload=app,source_workload_namespace=default,source_app=app,source_version=v1} %v, sluice_agent_pods{state=complete} %v; "+
		"job sluice-sidecars: the app's sidecar up, no flow series, the agent not scraped twice",
		pod, got[queries[0]], got[queries[1]]), nil
}

// startPrometheus runs Prometheus with deploy/'s scrape jobs and recording
// rules on what the cluster holds now, its data in the run directory's
// dir. ctx ends if it exits; out is what it said; stop ends it.
func (k *checker) startPrometheus(dir string) (ctx context.Context, out *bytes.Buffer, stop func(), err error) {
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		return nil, nil, nil, fmt.Errorf("prometheus not installed (scripts/deps.sh installs Debian's): %w", err)
	}
	dir = k.c.path(dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, nil, nil, err
	}
	cfg, err := k.promConfig(dir)
	if err != nil {
		return nil, nil, nil, err
	}
	cmd := exec.Command(bin, "--config.file="+cfg, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+promAddr, "--log.level=warn")
	out = &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return nil, nil, nil, err
	}
	ctx, exited := context.WithCancelCause(k.ctx)
	done := make(chan struct{})
	go func() {
		err := cmd.Wait()
		exited(fmt.Errorf("prometheus exited: %v", err))
		close(done)
	}()
	return ctx, out, func() {
		cmd.Process.Signal(syscall.SIGTERM)
		<-done
	}, nil
}

// promConfig writes prometheus.yml: the scrape jobs of
// deploy/prometheus/scrape-config.yaml, each job's Kubernetes service
// discovery replaced by a file of what it would discover now, and every job
// a 1 s interval.
func (k *checker) promConfig(dir string) (string, error) {
	data, err := os.ReadFile(filepath.Join(k.c.repo, "deploy", "prometheus", "scrape-config.yaml"))
	if err != nil {
		return "", err
	}
	var doc struct {
		ScrapeConfigs []map[string]any `json:"scrape_configs"`
	}
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return "", fmt.Errorf("scrape-config.yaml: %w", err)
	}
	if len(doc.ScrapeConfigs) == 0 {
		return "", errors.New("scrape-config.yaml: no scrape_configs")
	}
	for _, job := range doc.ScrapeConfigs {
		name, _ := job["job_name"].(string)
		raw, err := json.Marshal(job["kubernetes_sd_configs"])
		if err != nil {
			return "", err
		}
		var sds []sdConfig
		if err := json.Unmarshal(raw, &sds); err != nil {
			return "", fmt.Errorf("scrape-config.yaml: job %s: kubernetes_sd_configs: %w", name, err)
		}
		var groups []targetGroup
		for _, sd := range sds {
			g, err := k.discover(sd)
			if err != nil {
				return "", fmt.Errorf("job %s: %w", name, err)
			}
			groups = append(groups, g...)
		}
		file := filepath.Join(dir, "sd-"+name+".json")
		b, err := json.MarshalIndent(groups, "", "  ")
		if err != nil {
			return "", err
		}
		if err := os.WriteFile(file, b, 0o644); err != nil {
			return "", err
		}
		delete(job, "kubernetes_sd_configs")
		job["file_sd_configs"] = []any{map[string]any{"files": []string{file}}}
		job["scrape_interval"] = "1s"
	}
	cfg, err := yaml.Marshal(map[string]any{
		"global":         map[string]any{"scrape_interval": "1s", "evaluation_interval": "1s"},
		"rule_files":     []string{filepath.Join(k.c.repo, "deploy", "prometheus", "recording-rules.yaml")},
		"scrape_configs": doc.ScrapeConfigs,
	})
	if err != nil {
		return "", err
	}
	path := filepath.Join(dir, "prometheus.yml")
	return path, os.WriteFile(path, cfg, 0o644)
}

// sdConfig is one kubernetes_sd_config: what the emulation honours.
type sdConfig struct {
	Role       string `json:"role"`
	Namespaces *struct {
		Names []string `json:"names"`
	} `json:"namespaces"`
}

// targetGroup is one entry of a file_sd file.
type targetGroup struct {
	Targets []string          `json:"targets"`
	Labels  map[string]string `json:"labels"`
}

// k8sObject is what the emulation reads of a pod, an Endpoints or a
// Service.
type k8sObject struct {
	Metadata struct {
		Name        string            `json:"name"`
		Namespace   string            `json:"namespace"`
		UID         string            `json:"uid"`
		Labels      map[string]string `json:"labels"`
		Annotations map[string]string `json:"annotations"`
	} `json:"metadata"`
	Spec struct {
		NodeName       string         `json:"nodeName"`
		Containers     []k8sContainer `json:"containers"`
		InitContainers []k8sContainer `json:"initContainers"`
	} `json:"spec"`
	Status struct {
		Phase  string `json:"phase"`
		PodIP  string `json:"podIP"`
		HostIP string `json:"hostIP"`
	} `json:"status"`
	Subsets []struct {
		Addresses []endpointAddress `json:"addresses"`
		NotReady  []endpointAddress `json:"notReadyAddresses"`
		Ports     []struct {
			Name     string `json:"name"`
			Port     int    `json:"port"`
			Protocol string `json:"protocol"`
		} `json:"ports"`
	} `json:"subsets"`
}

type k8sContainer struct {
	Name  string `json:"name"`
	Ports []struct {
		Name          string `json:"name"`
		ContainerPort int    `json:"containerPort"`
		Protocol      string `json:"protocol"`
	} `json:"ports"`
}

type endpointAddress struct {
	IP        string `json:"ip"`
	NodeName  string `json:"nodeName"`
	TargetRef *struct {
		Kind      string `json:"kind"`
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"targetRef"`
}

// list reads kind from the namespaces (all when none).
func (k *checker) list(kind string, namespaces []string) ([]k8sObject, error) {
	var all []k8sObject
	args := [][]string{{"-A"}}
	if len(namespaces) > 0 {
		args = nil
		for _, ns := range namespaces {
			args = append(args, []string{"-n", ns})
		}
	}
	for _, a := range args {
		out, err := k.c.kubectl(k.ctx, append(append([]string{"get", kind}, a...), "-o", "json")...)
		if err != nil {
			return nil, err
		}
		var l struct {
			Items []k8sObject `json:"items"`
		}
		if err := json.Unmarshal(out, &l); err != nil {
			return nil, fmt.Errorf("kubectl get %s: %w", kind, err)
		}
		all = append(all, l.Items...)
	}
	return all, nil
}

var invalidLabel = regexp.MustCompile(`[^a-zA-Z0-9_]`)

// metaMap adds a map's entries as Prometheus names them: prefix_<name>
// and prefixpresent_<name>.
func metaMap(l map[string]string, prefix string, m map[string]string) {
	for k, v := range m {
		n := invalidLabel.ReplaceAllString(k, "_")
		l[prefix+"_"+n] = v
		l[prefix+"present_"+n] = "true"
	}
}

// podMeta is the labels role pod gives every target of pod p.
func podMeta(p k8sObject) map[string]string {
	l := map[string]string{
		"__meta_kubernetes_namespace":     p.Metadata.Namespace,
		"__meta_kubernetes_pod_name":      p.Metadata.Name,
		"__meta_kubernetes_pod_ip":        p.Status.PodIP,
		"__meta_kubernetes_pod_node_name": p.Spec.NodeName,
		"__meta_kubernetes_pod_host_ip":   p.Status.HostIP,
		"__meta_kubernetes_pod_uid":       p.Metadata.UID,
		"__meta_kubernetes_pod_phase":     p.Status.Phase,
	}
	metaMap(l, "__meta_kubernetes_pod_label", p.Metadata.Labels)
	metaMap(l, "__meta_kubernetes_pod_annotation", p.Metadata.Annotations)
	return l
}

// discover lists what Kubernetes service discovery of sd would find now:
// role pod, a target per container port of every pod with an IP (one with
// no port for a container that declares none); role endpoints, a target
// per address and port of every Endpoints, with its Service's and pod's
// labels.
func (k *checker) discover(sd sdConfig) ([]targetGroup, error) {
	var namespaces []string
	if sd.Namespaces != nil {
		namespaces = sd.Namespaces.Names
	}
	pods, err := k.list("pods", nil)
	if err != nil {
		return nil, err
	}
	var groups []targetGroup
	switch sd.Role {
	case "pod":
		for _, p := range pods {
			if p.Status.PodIP == "" || (len(namespaces) > 0 && !slices.Contains(namespaces, p.Metadata.Namespace)) {
				continue
			}
			for _, c := range append(append([]k8sContainer{}, p.Spec.Containers...), p.Spec.InitContainers...) {
				init := strconv.FormatBool(containsContainer(p.Spec.InitContainers, c.Name))
				if len(c.Ports) == 0 {
					l := podMeta(p)
					l["__meta_kubernetes_pod_container_name"], l["__meta_kubernetes_pod_container_init"] = c.Name, init
					groups = append(groups, targetGroup{Targets: []string{p.Status.PodIP}, Labels: l})
				}
				for _, port := range c.Ports {
					l := podMeta(p)
					l["__meta_kubernetes_pod_container_name"], l["__meta_kubernetes_pod_container_init"] = c.Name, init
					l["__meta_kubernetes_pod_container_port_name"] = port.Name
					l["__meta_kubernetes_pod_container_port_number"] = strconv.Itoa(port.ContainerPort)
					l["__meta_kubernetes_pod_container_port_protocol"] = port.Protocol
					groups = append(groups, targetGroup{Targets: []string{fmt.Sprintf("%s:%d", p.Status.PodIP, port.ContainerPort)}, Labels: l})
				}
			}
		}
	case "endpoints":
		eps, err := k.list("endpoints", namespaces)
		if err != nil {
			return nil, err
		}
		svcs, err := k.list("services", namespaces)
		if err != nil {
			return nil, err
		}
		for _, ep := range eps {
			for _, sub := range ep.Subsets {
				for ready, addrs := range map[string][]endpointAddress{"true": sub.Addresses, "false": sub.NotReady} {
					for _, a := range addrs {
						for _, port := range sub.Ports {
							l := map[string]string{}
							for _, p := range pods {
								if a.TargetRef != nil && a.TargetRef.Kind == "Pod" && p.Metadata.Name == a.TargetRef.Name && p.Metadata.Namespace == a.TargetRef.Namespace {
									l = podMeta(p)
								}
							}
							l["__meta_kubernetes_namespace"] = ep.Metadata.Namespace
							l["__meta_kubernetes_endpoints_name"] = ep.Metadata.Name
							metaMap(l, "__meta_kubernetes_endpoints_label", ep.Metadata.Labels)
							for _, s := range svcs {
								if s.Metadata.Name == ep.Metadata.Name && s.Metadata.Namespace == ep.Metadata.Namespace {
									l["__meta_kubernetes_service_name"] = s.Metadata.Name
									metaMap(l, "__meta_kubernetes_service_label", s.Metadata.Labels)
									metaMap(l, "__meta_kubernetes_service_annotation", s.Metadata.Annotations)
								}
							}
							l["__meta_kubernetes_endpoint_ready"] = ready
							l["__meta_kubernetes_endpoint_port_name"] = port.Name
							l["__meta_kubernetes_endpoint_port_protocol"] = port.Protocol
							if a.NodeName != "" {
								l["__meta_kubernetes_endpoint_node_name"] = a.NodeName
							}
							if a.TargetRef != nil {
								l["__meta_kubernetes_endpoint_address_target_kind"] = a.TargetRef.Kind
								l["__meta_kubernetes_endpoint_address_target_name"] = a.TargetRef.Name
							}
							groups = append(groups, targetGroup{Targets: []string{fmt.Sprintf("%s:%d", a.IP, port.Port)}, Labels: l})
						}
					}
				}
			}
		}
	default:
		return nil, fmt.Errorf("kubernetes_sd_configs role %q: the emulation knows pod and endpoints", sd.Role)
	}
	return groups, nil
}

func containsContainer(cs []k8sContainer, name string) bool {
	for _, c := range cs {
		if c.Name == name {
			return true
		}
	}
	return false
}

func promGet(path string) ([]byte, error) {
	resp, err := http.Get("http://" + promAddr + path)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return io.ReadAll(resp.Body)
}

// promValue sums an instant query's vector; 0 when it is empty.
func promValue(expr string) (float64, error) {
	body, err := promGet("/api/v1/query?query=" + url.QueryEscape(expr))
	if err != nil {
		return 0, err
	}
	var r struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result []struct {
				Value [2]any `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		return 0, fmt.Errorf("query %s: %v: %s", expr, err, strings.TrimSpace(string(body)))
	}
	if r.Status != "success" {
		return 0, fmt.Errorf("query %s: %s", expr, r.Error)
	}
	var sum float64
	for _, s := range r.Data.Result {
		if v, ok := s.Value[1].(string); ok {
			f, _ := strconv.ParseFloat(v, 64)
			sum += f
		}
	}
	return sum, nil
}
