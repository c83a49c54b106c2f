package agent

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/telemetry"
)

// Every pod's series carry its cgroup and, for a kubelet's pod, its uid, to
// join with kube-state-metrics' kube_pod_info{uid}.
var (
	podLabels = []string{"pod_cgroup", "pod_uid"}

	descPods = prometheus.NewDesc("sluice_agent_pods",
		"Pods with Sluice installed on this node, by state: complete, incomplete, or gone (cgroup deleted, pins not yet collected).", []string{"state"}, nil)
	descCollected = prometheus.NewDesc("sluice_agent_collected_pods_total",
		"Pods whose pins and links the agent removed after their cgroup was gone.", nil, nil)
	descUpgraded = prometheus.NewDesc("sluice_agent_upgraded_pods_total",
		"Pods the agent moved onto its own build from another (their links updated in place).", nil, nil)
	descEvents     = prometheus.NewDesc("sluice_kernel_events_total", telemetry.KernelEventsHelp, append(podLabels, "event"), nil)
	descNodeEvents = prometheus.NewDesc("sluice_node_kernel_events_total",
		"What the kernel hooks counted for no pod they could name (by event), every build on the node summed.", []string{"event"}, nil)
	descMemory = prometheus.NewDesc("sluice_agent_kernel_memory_bytes",
		"Kernel memory (memlock) of Sluice's maps and programs on this node: owner=\"node\" is what every pod shares (programs, node maps), owner=\"pods\" the pods' own maps.", []string{"owner"}, nil)
	descWeight = prometheus.NewDesc("sluice_route_weight",
		"A canary route's programmed weight for each backend.", append(podLabels, "service", "backend"), nil)
	descPicks = prometheus.NewDesc("sluice_route_picks_total",
		"New connections to a routed service, by the backend the kernel picked: the effective split.", append(podLabels, "service", "backend"), nil)
)

type collector struct{ a *Agent }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPods, descCollected, descUpgraded, descEvents, descNodeEvents, descMemory, descWeight, descPicks} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(descCollected, prometheus.CounterValue, float64(c.a.collected.Load()))
	ch <- prometheus.MustNewConstMetric(descUpgraded, prometheus.CounterValue, float64(c.a.upgraded.Load()))
	if node, err := loader.NodeCounters(c.a.opts.PinRoot); err != nil {
		c.a.opts.Logger.Warn("read node counters", "err", err)
	} else {
		for event, n := range node {
			ch <- prometheus.MustNewConstMetric(descNodeEvents, prometheus.CounterValue, float64(n), event)
		}
	}
	if mem, err := loader.NodeMemory(c.a.opts.PinRoot); err != nil {
		c.a.opts.Logger.Warn("read node memory", "err", err)
	} else {
		ch <- prometheus.MustNewConstMetric(descMemory, prometheus.GaugeValue, float64(mem.Total()), "node")
	}
	pods, err := c.a.recentPods()
	if err != nil {
		c.a.opts.Logger.Warn("list pods", "err", err)
		return
	}
	states := map[string]int{"complete": 0, "incomplete": 0, "gone": 0}
	exported := c.a.flows.exported()
	var podMemory uint64
	for _, p := range pods {
		states[p.State()]++
		podMemory += p.KernelMemory
		// A pod whose flows the agent exports has its counters and
		// routes there, with the flows.
		if p.Gone || exported[p.Cgroup] {
			continue
		}
		for event, n := range p.Counters {
			ch <- prometheus.MustNewConstMetric(descEvents, prometheus.CounterValue, float64(n), p.Cgroup, p.UID, event)
		}
		for _, r := range p.Routes {
			svc := r.Service.String()
			for i, b := range r.Backends {
				ch <- prometheus.MustNewConstMetric(descWeight, prometheus.GaugeValue, float64(b.Weight), p.Cgroup, p.UID, svc, b.AddrPort().String())
				ch <- prometheus.MustNewConstMetric(descPicks, prometheus.CounterValue, float64(r.Picks[i]), p.Cgroup, p.UID, svc, b.AddrPort().String())
			}
		}
	}
	for state, n := range states {
		ch <- prometheus.MustNewConstMetric(descPods, prometheus.GaugeValue, float64(n), state)
	}
	ch <- prometheus.MustNewConstMetric(descMemory, prometheus.GaugeValue, float64(podMemory), "pods")
}
