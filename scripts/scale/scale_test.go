package main

import (
	"strings"
	"testing"
	"time"
)

// The guard names each figure over its limit, with where the limit is set,
// and nothing when both are within (or no limit is given).
func TestOverLimits(t *testing.T) {
	r := report{Pods: 40, InstallMedianMs: 130, IPTablesMs: 20, ResidentMedianMs: 6, IdlePodKiB: 283}
	if msgs := r.overLimits(limits{10, 0.5, 300}, "the Makefile"); len(msgs) != 0 {
		t.Errorf("within every limit: %q", msgs)
	}
	if msgs := r.overLimits(limits{}, ""); len(msgs) != 0 {
		t.Errorf("no limits: %q", msgs)
	}
	msgs := r.overLimits(limits{6, 0.25, 200}, "the Makefile")
	if len(msgs) != 3 ||
		!strings.Contains(msgs[0], "6.50x") || !strings.Contains(msgs[0], "MAX_INSTALL_RATIO=6, set in the Makefile") ||
		!strings.Contains(msgs[1], "0.30x") || !strings.Contains(msgs[1], "MAX_RESIDENT_RATIO=0.25, set in the Makefile") ||
		!strings.Contains(msgs[2], "283 KiB") || !strings.Contains(msgs[2], "MAX_IDLE_KIB=200, set in the Makefile") {
		t.Errorf("over every limit: %q", msgs)
	}
	if msgs := r.overLimits(limits{installRatio: 6}, ""); len(msgs) != 1 || !strings.Contains(msgs[0], "-max-install-ratio 6") {
		t.Errorf("a flag's limit: %q", msgs)
	}
}

func TestParsePoints(t *testing.T) {
	got, err := parsePoints("100, 1,10,,1000")
	if err != nil || len(got) != 4 || got[0] != 1 || got[3] != 1000 {
		t.Errorf("got %v %v, want 1 10 100 1000", got, err)
	}
	if _, err := parsePoints("1,-2"); err == nil {
		t.Error("a negative point was taken")
	}
}

// Every excluded CIDR gets its RETURN rule before the jump to the redirect,
// as istio-iptables -x writes them.
func TestIstioRulesExcluding(t *testing.T) {
	rules := string(istioRulesExcluding(excluded(3)))
	jump := strings.Index(rules, "-A ISTIO_OUTPUT -j ISTIO_REDIRECT")
	for _, c := range excluded(3) {
		i := strings.Index(rules, "-A ISTIO_OUTPUT -d "+c+" -j RETURN")
		if i < 0 || i > jump {
			t.Errorf("%s: RETURN at %d, jump at %d", c, i, jump)
		}
	}
}

func TestPercentile(t *testing.T) {
	ds := []time.Duration{5, 1, 4, 2, 3}
	if p := percentile(ds, 50); p != 3 {
		t.Errorf("p50 %v, want 3", p)
	}
	if p := percentile(ds, 100); p != 5 {
		t.Errorf("p100 %v, want 5", p)
	}
	if ds[0] != 5 {
		t.Error("percentile sorted its argument")
	}
}
