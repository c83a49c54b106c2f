package main

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"

	"github.com/sluicemesh/sluice/cni"
	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/redirect"
	"github.com/sluicemesh/sluice/telemetry"
)

// runCNI is sluice-cni: a chained CNI plugin that installs capture on a pod
// annotated sluice.dev/capture: "true" when its sandbox is made (ADD),
// removes it when the sandbox goes (DEL) and says whether it is whole
// (CHECK). It does what the init container's install does, from the node,
// so the pod needs no privilege. Its answer is on stdout, its log on
// stderr (the runtime logs it); an error fails the pod's sandbox with the
// message, which the kubelet shows in the pod's events.
func runCNI(getenv func(string) string, stdin io.Reader, stdout, stderr io.Writer) int {
	req, err := cni.ReadRequest(getenv, stdin)
	if err != nil {
		cni.WriteError(stdout, req.Config.CNIVersion, err)
		return 1
	}
	log, lerr := newLogger(stderr, "text", cmp.Or(req.Config.LogLevel, "info"))
	if lerr != nil {
		log = slog.New(slog.NewTextHandler(stderr, nil))
	}
	log = log.With("plugin", cni.PluginType, "command", req.Command, "container", req.ContainerID,
		"pod", req.Args["K8S_POD_NAMESPACE"]+"/"+req.Args["K8S_POD_NAME"])
	switch req.Command {
	case cni.Version:
		err = cni.WriteVersions(stdout, req)
	case cni.Add:
		if err = cniAdd(req, log); err == nil {
			err = cni.WriteResult(stdout, req)
		}
	case cni.Del:
		err = cniDel(req, log)
	case cni.Check:
		err = cniCheck(req)
	}
	if err != nil {
		log.Error("failed", "err", err)
		cni.WriteError(stdout, req.Config.CNIVersion, fmt.Errorf("sluice-cni %s: %w", req.Command, err))
		return 1
	}
	return 0
}

// captured tells whether the pod asked for capture.
func captured(req cni.Request) bool {
	return req.Config.RuntimeConfig.PodAnnotations[redirect.CaptureAnnotation] == "true"
}

// cniTarget is the pod of req: its cgroup (by uid), pins, netns, and who
// it is.
func cniTarget(req cni.Request) (loader.Target, error) {
	uid := req.PodUID()
	if uid == "" {
		return loader.Target{}, &cni.Error{Code: cni.CodeInvalidEnv, Msg: "CNI_ARGS has no K8S_POD_UID", Details: "the runtime passes it for Kubernetes pods"}
	}
	cgroup, err := loader.PodCgroup(req.Config.CgroupRoot, uid, req.Config.RuntimeConfig.CgroupPath)
	if err != nil {
		return loader.Target{}, err
	}
	t, err := loader.ResolveTarget(cgroup, "")
	if err != nil {
		return loader.Target{}, err
	}
	if req.Config.PinRoot != "" {
		t.PinDir = filepath.Join(req.Config.PinRoot, filepath.Base(t.PinDir))
	}
	t.Netns, t.Interface = req.Netns, cmp.Or(req.IfName, "eth0")
	ann := req.Config.RuntimeConfig.PodAnnotations
	id := telemetry.Identity{Namespace: req.Args["K8S_POD_NAMESPACE"], Workload: cmp.Or(ann[redirect.WorkloadAnnotation], req.Args["K8S_POD_NAME"])}
	t.Identity = id.WithDefaults().Map()
	return t, nil
}

func cniAdd(req cni.Request, log *slog.Logger) error {
	if !captured(req) {
		log.Debug("pod not annotated for capture: left as it is", "annotation", redirect.CaptureAnnotation)
		return nil
	}
	plan, err := redirect.AnnotationPlan(req.Config.RuntimeConfig.PodAnnotations)
	if err != nil {
		return &cni.Error{Code: cni.CodeInvalidConfig, Msg: "the pod's annotations", Details: err.Error() + ": fix the pod's annotation"}
	}
	t, err := cniTarget(req)
	if err != nil {
		return err
	}
	res, err := loader.Install(t, plan, nil, log)
	if err != nil {
		return err
	}
	log.Info("installed", "cgroup", t.Cgroup, "pins", t.PinDir, "changes", res.Changes)
	return nil
}

// cniDel removes the capture of a pod annotated for it. It succeeds when
// there is none (the runtime may call DEL more than once, or for a pod ADD
// failed), and when the pod's cgroup is already gone (the agent's GC
// removes what is left). A pod not annotated keeps what its init container
// installed: a sandbox made again reruns the init container, which finds
// its capture in place.
func cniDel(req cni.Request, log *slog.Logger) error {
	if req.PodUID() == "" || !captured(req) {
		return nil
	}
	t, err := cniTarget(req)
	if err != nil {
		log.Debug("no pod cgroup: nothing to remove here (the agent collects what a gone pod left)", "reason", err)
		return nil
	}
	if err := loader.Uninstall(t, log); err != nil && !errors.Is(err, loader.ErrNotInstalled) {
		return err
	}
	return nil
}

// cniCheck fails when a pod annotated for capture is not wholly captured.
func cniCheck(req cni.Request) error {
	if !captured(req) {
		return nil
	}
	t, err := cniTarget(req)
	if err != nil {
		return err
	}
	s, err := loader.Status(t)
	if err != nil {
		return err
	}
	if !s.Complete {
		return &cni.Error{Code: cni.CodeInstall, Msg: "the pod's capture is incomplete", Details: fmt.Sprintf("missing %v", s.Missing)}
	}
	return nil
}
