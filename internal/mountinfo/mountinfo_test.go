package mountinfo

import (
	"slices"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	in := strings.Join([]string{
		`25 1 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw`,
		`30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate`,
		`31 25 0:27 / /sys/fs/cgroup/with\040space rw - cgroup2 cgroup2 rw`,
		`32 25 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu`,
		`garbage`,
	}, "\n")
	got, err := parse(strings.NewReader(in), "cgroup2")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"/sys/fs/cgroup/unified", "/sys/fs/cgroup/with space"}
	if !slices.Equal(got, want) {
		t.Errorf("parse = %q, want %q", got, want)
	}
}

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{`/a\040b`: "/a b", `/a\134b`: `/a\b`, `/plain`: "/plain", `/bad\9`: `/bad\9`} {
		if got := unescape(in); got != want {
			t.Errorf("unescape(%q) = %q, want %q", in, got, want)
		}
	}
}
