//go:build demo

package main

import (
	"strings"
	"testing"

	"github.com/sluicemesh/sluice/internal/testbed"
)

func TestDemo(t *testing.T) {
	privileged(t)
	out := testbed.MustRun(t, sluice(t, "demo"))
	for _, want := range []string{
		"app   198.18.2.2:8080       198.18.2.2:8080             198.18.2.2:8080           1 MiB intact  outbound, captured",
		"app   [2001:2:0:2::2]:8080  [2001:2:0:2::2]:8080        [2001:2:0:2::2]:8080      1 MiB intact  outbound, captured (IPv6)",
		"app   198.18.2.2:9090       198.18.2.2:9090             -                         1 MiB intact  outbound, direct",
		"web   198.18.1.2:8080       198.18.1.2:8080             198.18.1.2:8080           1 MiB intact  inbound, captured",
		"web   [2001:2:0:1::2]:8080  [2001:2:0:1::2]:8080        [2001:2:0:1::2]:8080      1 MiB intact  inbound, captured (IPv6)",
		"outbound 198.18.1.2:", // the flows section: source ports vary
		`sluice_tcp_connections_closed_total{destination_service="198.18.2.2:8080",reporter="source",...} 1`,
		`sluice_tcp_connections_closed_total{destination_service="198.18.1.2:8080",reporter="destination",...} 1`,
		"100/0 100 100 0 198.19.0.10:80",
		"0/100 100 0 100 198.19.0.10:80",
		"splice_sockets_joined +2",
		"kernel_only_outbound +1",
	} {
		// Column widths are tabwriter's business: compare words only.
		if !strings.Contains(strings.Join(strings.Fields(out), " "), strings.Join(strings.Fields(want), " ")) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
}
