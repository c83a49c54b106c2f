// Package cni speaks the Container Network Interface protocol (spec 1.0)
// for sluice-cni, a chained plugin: it reads the runtime's request (its
// environment and the network configuration on standard input) and writes
// the result or error it expects. Sluice's plugin adds no interface and no
// address: it passes the previous plugin's result on. Pure: no kernel.
package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
)

// Commands of the CNI spec sluice-cni answers.
const (
	Add     = "ADD"
	Del     = "DEL"
	Check   = "CHECK"
	Version = "VERSION"
)

// SupportedVersions are the spec versions whose configuration sluice-cni
// reads: 0.4.0 brought CHECK and prevResult in DEL.
var SupportedVersions = []string{"0.4.0", "1.0.0", "1.1.0"}

// Request is one invocation.
type Request struct {
	Command     string
	ContainerID string
	Netns       string // CNI_NETNS: the pod's network namespace
	IfName      string
	// Args are CNI_ARGS; the kubelet's runtimes pass K8S_POD_NAMESPACE,
	// K8S_POD_NAME, K8S_POD_INFRA_CONTAINER_ID and K8S_POD_UID.
	Args   map[string]string
	Config Config
}

// PodUID is the pod's uid, from CNI_ARGS.
func (r Request) PodUID() string { return r.Args["K8S_POD_UID"] }

// Config is the network configuration: the standard keys a chained
// plugin reads, and Sluice's own.
type Config struct {
	CNIVersion string          `json:"cniVersion"`
	Name       string          `json:"name"`
	Type       string          `json:"type"`
	PrevResult json.RawMessage `json:"prevResult,omitempty"`
	// RuntimeConfig holds what the runtime passes for the capabilities the
	// conflist entry declares: the pod's annotations, which say whether
	// and how the pod is captured (containerd and CRI-O pass them for
	// "io.kubernetes.cri.pod-annotations").
	RuntimeConfig struct {
		PodAnnotations map[string]string `json:"io.kubernetes.cri.pod-annotations,omitempty"`
		// CgroupPath is the sandbox's cgroup parent, the pod's cgroup
		// (containerd passes it for the "cgroupPath" capability).
		CgroupPath string `json:"cgroupPath,omitempty"`
	} `json:"runtimeConfig"`
	// PinRoot is where pods' pins go (default /sys/fs/bpf/sluice).
	PinRoot string `json:"pinRoot,omitempty"`
	// CgroupRoot is the kubelet's --cgroup-root, below the cgroup2 mount,
	// where pods' cgroups are looked for (default: the top).
	CgroupRoot string `json:"cgroupRoot,omitempty"`
	// LogLevel of the plugin's lines on its standard error, which the
	// runtime logs (debug, info, warn, error; default info).
	LogLevel string `json:"logLevel,omitempty"`
}

// ReadRequest reads a request from the environment (getenv) and the
// configuration (stdin). A VERSION request needs no configuration.
func ReadRequest(getenv func(string) string, stdin io.Reader) (Request, error) {
	r := Request{
		Command:     getenv("CNI_COMMAND"),
		ContainerID: getenv("CNI_CONTAINERID"),
		Netns:       getenv("CNI_NETNS"),
		IfName:      getenv("CNI_IFNAME"),
		Args:        map[string]string{},
	}
	for _, kv := range strings.Split(getenv("CNI_ARGS"), ";") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			r.Args[k] = v
		}
	}
	switch r.Command {
	case Add, Del, Check, Version:
	case "":
		return r, &Error{Code: CodeInvalidEnv, Msg: "CNI_COMMAND is not set", Details: "sluice-cni is a CNI plugin: the container runtime runs it"}
	default:
		return r, &Error{Code: CodeInvalidEnv, Msg: fmt.Sprintf("CNI_COMMAND %q is not one sluice-cni answers", r.Command), Details: "ADD, DEL, CHECK, VERSION"}
	}
	data, err := io.ReadAll(io.LimitReader(stdin, 1<<20))
	if err != nil {
		return r, &Error{Code: CodeIO, Msg: "read the network configuration", Details: err.Error()}
	}
	if r.Command == Version && len(strings.TrimSpace(string(data))) == 0 {
		return r, nil
	}
	if err := json.Unmarshal(data, &r.Config); err != nil {
		return r, &Error{Code: CodeDecode, Msg: "the network configuration is not JSON", Details: err.Error()}
	}
	if r.Command == Version {
		return r, nil
	}
	if !slices.Contains(SupportedVersions, r.Config.CNIVersion) {
		return r, &Error{Code: CodeIncompatibleVersion, Msg: fmt.Sprintf("cniVersion %q is not one sluice-cni reads", r.Config.CNIVersion), Details: strings.Join(SupportedVersions, ", ")}
	}
	if r.ContainerID == "" || (r.Command != Del && r.Netns == "") {
		return r, &Error{Code: CodeInvalidEnv, Msg: "CNI_CONTAINERID or CNI_NETNS is not set"}
	}
	if r.Command == Add && len(r.Config.PrevResult) == 0 {
		return r, &Error{Code: CodeInvalidConfig, Msg: "no prevResult: sluice-cni is a chained plugin", Details: "list it after the plugin that sets the pod's network up, in the same conflist"}
	}
	return r, nil
}

// Error codes of the spec (1-99 are the spec's).
const (
	CodeIncompatibleVersion = 1
	CodeUnsupportedField    = 2
	CodeUnknownContainer    = 3
	CodeInvalidEnv          = 4
	CodeIO                  = 5
	CodeDecode              = 6
	CodeInvalidConfig       = 7
	CodeTryAgain            = 11
	// CodeInstall is Sluice's: capture could not be installed (or, for
	// CHECK, is not as it should be).
	CodeInstall = 100
)

// Error is the spec's error result; the runtime shows Msg and Details in
// the pod's events (the kubelet's "Failed to create pod sandbox").
type Error struct {
	Code    int    `json:"code"`
	Msg     string `json:"msg"`
	Details string `json:"details,omitempty"`
}

func (e *Error) Error() string {
	if e.Details == "" {
		return e.Msg
	}
	return e.Msg + ": " + e.Details
}

// WriteError writes err as the spec's error result in version.
func WriteError(w io.Writer, version string, err error) error {
	var e *Error
	if !errors.As(err, &e) {
		e = &Error{Code: CodeInstall, Msg: err.Error()}
	}
	if version == "" {
		version = SupportedVersions[len(SupportedVersions)-1]
	}
	return json.NewEncoder(w).Encode(struct {
		CNIVersion string `json:"cniVersion"`
		*Error
	}{version, e})
}

// WriteResult writes an ADD's result: the previous plugin's, passed on.
func WriteResult(w io.Writer, r Request) error {
	_, err := w.Write(append(r.Config.PrevResult, '\n'))
	return err
}

// WriteVersions writes the answer to VERSION.
func WriteVersions(w io.Writer, r Request) error {
	v := r.Config.CNIVersion
	if v == "" {
		v = SupportedVersions[len(SupportedVersions)-1]
	}
	return json.NewEncoder(w).Encode(struct {
		CNIVersion        string   `json:"cniVersion"`
		SupportedVersions []string `json:"supportedVersions"`
	}{v, SupportedVersions})
}
