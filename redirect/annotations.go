package redirect

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
)

// AnnotationPrefix starts the pod annotations that set install's per-workload
// policy: sluice.dev/<flag> sets --<flag>, for the flags in AnnotatedFlags.
// The init container reads them from a downward API file (install
// --annotations), so a workload states its fast paths in its own pod spec.
const AnnotationPrefix = "sluice.dev/"

// AnnotatedFlags are the flags a pod annotation may set.
var AnnotatedFlags = []string{"splice", "kernel-only-ports", "kernel-only-cidrs", "kernel-only-inbound-ports", "offload-ports", "offload-inbound-ports", "resolve-services",
	"redirect-dns", "capture-all-dns", "dns-servers", "dns-port"}

// Annotations that say what to do with a pod rather than set a flag:
// install reads past them.
const (
	// InjectAnnotation "false" keeps sluice inject from a pod.
	InjectAnnotation = AnnotationPrefix + "inject"
	// CaptureAnnotation "true" has the CNI plugin capture the pod.
	CaptureAnnotation = AnnotationPrefix + "capture"
	// WorkloadAnnotation names the pod's workload for the CNI plugin,
	// which the runtime gives the pod's name but not its owner's.
	WorkloadAnnotation = AnnotationPrefix + "workload"
)

// ParseAnnotations reads a Kubernetes downward API annotations file: one
// key="value" line per annotation, the value quoted as Go quotes strings.
func ParseAnnotations(r io.Reader) (map[string]string, error) {
	ann := map[string]string{}
	sc := bufio.NewScanner(r)
	sc.Buffer(nil, 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if strings.TrimSpace(line) == "" {
			continue
		}
		key, quoted, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("line %d: %q is not key=\"value\"", n, line)
		}
		value, err := strconv.Unquote(quoted)
		if err != nil {
			return nil, fmt.Errorf("line %d: the value of %q is not a quoted string: %q", n, key, quoted)
		}
		ann[key] = value
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read the annotations: %v", err)
	}
	return ann, nil
}

// AnnotationSettings returns the flag settings ann's sluice.dev/ annotations
// ask for, as flag name and value pairs in AnnotatedFlags' order. An unknown
// sluice.dev/ annotation is an error: a misspelt one would otherwise be
// ignored without a word.
func AnnotationSettings(ann map[string]string) ([][2]string, error) {
	for key := range ann {
		name, ok := strings.CutPrefix(key, AnnotationPrefix)
		if ok && !slices.Contains(AnnotatedFlags, name) && !slices.Contains([]string{InjectAnnotation, CaptureAnnotation, WorkloadAnnotation}, key) {
			return nil, fmt.Errorf("unknown annotation %s: the known ones are %s%s", key, AnnotationPrefix, strings.Join(AnnotatedFlags, ", "+AnnotationPrefix))
		}
	}
	var set [][2]string
	for _, name := range AnnotatedFlags {
		if v, ok := ann[AnnotationPrefix+name]; ok {
			set = append(set, [2]string{name, v})
		}
	}
	return set, nil
}

// AnnotationPlan is the plan a pod's sluice.dev/ annotations ask for, the
// rest as by default: what the CNI plugin installs, and what sluice inject
// and the injector check before a pod is made (an annotation wrong there
// would fail the pod's sandbox, again and again).
func AnnotationPlan(ann map[string]string) (Plan, error) {
	settings, err := AnnotationSettings(ann)
	if err != nil {
		return Plan{}, err
	}
	fs := flag.NewFlagSet("annotations", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	policy := DefaultPolicy()
	policy.RegisterFlags(fs)
	for _, kv := range settings {
		if err := SetAnnotated(fs, kv[0], kv[1]); err != nil {
			return Plan{}, err
		}
	}
	if policy.RedirectDNS && !policy.CaptureAllDNS && len(policy.DNSServers) == 0 {
		// The CNI plugin is given no resolv.conf of the pod to read:
		// with no nameservers named, every query to port 53 is the pod's,
		// as Istio's CNI plugin has it. The forwarder still asks the
		// nameserver each query was for.
		policy.CaptureAllDNS = true
	}
	return policy.Plan()
}

// SetAnnotated sets flag name of fs to the value of its sluice.dev/
// annotation; the error names the annotation, and for a switch the values
// it takes (the flag package says only "parse error").
func SetAnnotated(fs *flag.FlagSet, name, value string) error {
	err := fs.Set(name, value)
	if err == nil {
		return nil
	}
	if f := fs.Lookup(name); f != nil {
		if b, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && b.IsBoolFlag() {
			return fmt.Errorf("annotation %s%s=%q: want \"true\" or \"false\"", AnnotationPrefix, name, value)
		}
	}
	return fmt.Errorf("annotation %s%s=%q: %v", AnnotationPrefix, name, value, err)
}
