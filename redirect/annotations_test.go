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
