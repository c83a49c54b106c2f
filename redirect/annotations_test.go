package redirect

import (
	"strings"
	"testing"
)

func TestParseAnnotations(t *testing.T) {
	file := `kubectl.kubernetes.io/restartedAt="2026-11-26T02:00:00Z"
sluice.dev/offload-ports="8080,9000"
sluice.dev/kernel-only-cidrs="198.19.64.0/18"
sluice.dev/inject="true"
note="a \"quoted\" value\nwith a newline"
`
	ann, err := ParseAnnotations(strings.NewReader(file))
	if err != nil {
		t.Fatal(err)
	}
	if ann["note"] != "a \"quoted\" value\nwith a newline" || ann["sluice.dev/offload-ports"] != "8080,9000" {
		t.Errorf("parsed %q", ann)
	}
	set, err := AnnotationSettings(ann)
	if err != nil {
		t.Fatal(err)
	}
	want := [][2]string{{"kernel-only-cidrs", "198.19.64.0/18"}, {"offload-ports", "8080,9000"}}
	if len(set) != len(want) || set[0] != want[0] || set[1] != want[1] {
		t.Errorf("settings %q, want %q", set, want)
	}

	for _, bad := range []string{"no equals sign", `key=unquoted`, `key="unterminated`} {
		if _, err := ParseAnnotations(strings.NewReader(bad)); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
	if _, err := AnnotationSettings(map[string]string{"sluice.dev/offload-port": "8080"}); err == nil || !strings.Contains(err.Error(), "sluice.dev/offload-ports") {
		t.Errorf("a misspelt annotation: %v, want an error naming the known ones", err)
	}
}

// DNS capture by annotation: with no nameservers named (the CNI plugin has
// no resolv.conf to read), every query to port 53 is captured; named ones
// keep capture to them.
func TestAnnotationPlanDNS(t *testing.T) {
	for _, c := range []struct {
		ann        map[string]string
		all        bool
		servers    int
		port       uint16
		wantErrSub string
	}{
		{ann: map[string]string{"sluice.dev/redirect-dns": "true"}, all: true, port: DefaultDNSPort},
		{ann: map[string]string{"sluice.dev/redirect-dns": "true", "sluice.dev/dns-servers": "198.18.0.10,2001:2::10"}, servers: 2, port: DefaultDNSPort},
		{ann: map[string]string{"sluice.dev/redirect-dns": "true", "sluice.dev/dns-port": "15054"}, all: true, port: 15054},
		{ann: map[string]string{"sluice.dev/dns-servers": "198.18.0.10"}},
		{ann: map[string]string{"sluice.dev/capture-all-dns": "true"}, wantErrSub: "needs --redirect-dns"},
		{ann: map[string]string{"sluice.dev/redirect-dns": "yes"}, wantErrSub: `sluice.dev/redirect-dns="yes": want "true" or "false"`},
	} {
		plan, err := AnnotationPlan(c.ann)
		if c.wantErrSub != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErrSub) {
				t.Errorf("%v: %v, want an error naming %q", c.ann, err, c.wantErrSub)
			}
			continue
		}
		if err != nil {
			t.Errorf("%v: %v", c.ann, err)
			continue
		}
		if plan.CaptureAllDNS != c.all || len(plan.DNSServers) != c.servers || plan.DNSPort != c.port {
			t.Errorf("%v: capture all %v, servers %v, port %d; want %v, %d servers, port %d",
				c.ann, plan.CaptureAllDNS, plan.DNSServers, plan.DNSPort, c.all, c.servers, c.port)
		}
	}
}
