package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/sluicemesh/sluice/deploy"
	"github.com/sluicemesh/sluice/inject"
)

func injectCommand() command {
	c := command{
		name:    "inject",
		summary: "add Sluice to workloads' manifests (like istioctl kube-inject), for kubectl apply",
		help: `Usage: sluice inject [-f FILE] [--image IMAGE] [--cni]

Reads Kubernetes manifests (a file, or - for standard input) and writes
them to standard output with Sluice added to every pod template: Pods,
Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs, and
Lists of them. It adds what deploy/pod/pod-template.yaml shows, from that
very file: the init container that installs capture (sluice-init), the
sidecar (sluice-proxy, a native sidecar: Kubernetes 1.29+), their volumes,
the sluice-capture label and the prometheus.io annotations (a pod's own
stay). Sluice's containers go first, since capture is fail-closed and the
app's own init containers need the sidecar. Other objects pass through;
comments and field order stay.

With --cni (nodes where the agent installed the sluice-cni plugin) it adds
the sidecar alone and the annotations sluice.dev/capture: "true" and
sluice.dev/workload: NAME, which ask the plugin to install capture when
the pod's sandbox is made: no init container, no volume, no privilege, so
the pod passes Pod Security "restricted".

Left alone, each said on standard error: a pod already injected (so
running it twice changes nothing), one annotated sluice.dev/inject:
"false", one on the host's network (capture works on a pod's own network
namespace). A pod with a volume of one of Sluice's names, or a sluice.dev/
annotation the install would refuse (misspelt, or a wrong value), is
refused, naming it.

Examples:
  sluice inject -f deploy.yaml | kubectl apply -f -
  kubectl get deploy web -o yaml | sluice inject | kubectl apply -f -
  sluice inject --cni -f deploy.yaml | kubectl apply -n restricted-ns -f -`,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		fs := flag.NewFlagSet("inject", flag.ContinueOnError)
		file := fs.String("f", "-", "the manifests: a file, or - for standard input")
		image := fs.String("image", "", "the Sluice image (default: the template's, sluice:dev)")
		cniMode := fs.Bool("cni", false, "for nodes with the sluice-cni plugin: the sidecar and the annotations asking the plugin\n"+
			"for capture, no init container and no volume (the pod needs no privilege: Pod Security \"restricted\")")
		if err := parseFlags(fs, c, args, stdout); err != nil {
			return err
		}
		in := io.Reader(os.Stdin)
		if *file != "-" {
			f, err := os.Open(*file)
			if err != nil {
				return usageError{fmt.Sprintf("-f %s: %v", *file, err)}
			}
			defer f.Close()
			in = f
		}
		reports, err := inject.Inject(in, stdout, deploy.PodTemplate, inject.Options{Image: *image, CNI: *cniMode})
		if err != nil {
			return fmt.Errorf("%s: %w (nothing written)", *file, err)
		}
		for _, r := range reports {
			switch {
			case r.Injected:
				fmt.Fprintf(os.Stderr, "injected %s/%s\n", r.Kind, r.Name)
			case r.Skipped != "not a workload":
				fmt.Fprintf(os.Stderr, "left %s/%s as it is: %s\n", r.Kind, r.Name, r.Skipped)
			}
		}
		return nil
	}
	return c
}
